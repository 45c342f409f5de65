"""CPU-bound stall: a handler runs a pure-Python busy loop for ~3 s (the GIL is released
periodically, so loopwatch's watchdog thread sees it live)."""

from __future__ import annotations

import asyncio
import time

from stall_common import argv, install, say, wait_for_stop

BUSY_SECONDS = 3.0


def crunch(seconds: float) -> int:
    end = time.monotonic() + seconds
    total = 0
    while time.monotonic() < end:  # CPU-LOOP
        total += 1  # CPU-LOOP
    return total


async def handle_request() -> int:
    await asyncio.sleep(0.5)
    say("STALL-START")
    total = crunch(BUSY_SECONDS)
    say("STALL-END")
    return total


async def main() -> None:
    dump_dir, port, stop, _ = argv()
    install(dump_dir, port)
    await asyncio.create_task(handle_request(), name="handler-task")
    await wait_for_stop(stop)


asyncio.run(main())
