"""Two blocking stalls of ~1.5 s, 1 s apart, with dump_cooldown=60: one dump, both stalls counted."""

from __future__ import annotations

import asyncio
import time

from stall_common import argv, install, say, wait_for_stop


def nap(seconds: float) -> None:
    time.sleep(seconds)  # STALL-LINE


async def handle_request() -> None:
    await asyncio.sleep(0.5)
    say("STALL1-START")
    nap(1.5)
    say("STALL1-END")
    await asyncio.sleep(1.0)
    say("STALL2-START")
    nap(1.5)
    say("STALL2-END")
    await asyncio.sleep(1.0)  # let the watchdog finish the second stall
    say("STALLS-DONE")


async def main() -> None:
    dump_dir, port, stop, _ = argv()
    install(dump_dir, port, dump_cooldown=60)
    await asyncio.create_task(handle_request(), name="handler-task")
    await wait_for_stop(stop)


asyncio.run(main())
