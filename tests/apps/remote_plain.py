"""An asyncio app WITHOUT loopwatch: ``loopwatch dump PID`` falls back to py-spy for it.  Prints ``READY <pid>``
and then waits in ``waiting_without_loopwatch`` (a blocking sleep, the loop stalled) until killed."""

from __future__ import annotations

import asyncio
import os
import time

from marker import emit_line


def waiting_without_loopwatch() -> None:
    while True:
        time.sleep(0.2)


async def main() -> None:
    emit_line(f"READY {os.getpid()}")
    waiting_without_loopwatch()


asyncio.run(main())
