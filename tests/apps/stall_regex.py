"""GIL-held stall: catastrophic ``re`` backtracking calibrated to last about ``argv[4]`` seconds.
No Python thread runs during it: the loop thread writes its own stack on the fallback timer's signal."""

from __future__ import annotations

import asyncio
import os

from stall_common import BACKTRACK, argv, backtracking_input, install, say, wait_for_stop
from marker import emit_line


def match_order_id(text: str) -> bool:
    return BACKTRACK.match(text) is not None  # STALL-LINE


async def handle_request(text: str) -> bool:
    await asyncio.sleep(0.5)
    say("REGEX-START")
    found = match_order_id(text)
    say("REGEX-END")
    return found


async def main(text: str) -> None:
    dump_dir, port, stop, _ = argv()
    install(dump_dir, port)
    emit_line(f"PID {os.getpid()}")
    await asyncio.create_task(handle_request(text), name="handler-task")
    await wait_for_stop(stop)


SECONDS = float(argv()[3][0])
asyncio.run(main(backtracking_input(SECONDS)))  # calibrated before the loop (and loopwatch) start
