"""An asyncio app WITHOUT loopwatch: ``loopwatch dump PID`` falls back to py-spy for it.  Prints ``READY <pid>``
and then waits in ``waiting_without_loopwatch`` (a blocking sleep, the loop stalled) until killed.
``NOT_DUMPABLE=1``: it makes itself non-dumpable first (``PR_SET_DUMPABLE`` 0), so that only a tracer with
``CAP_SYS_PTRACE`` may read it."""

from __future__ import annotations

import asyncio
import ctypes
import os
import time

from marker import emit_line

PR_SET_DUMPABLE = 4


def waiting_without_loopwatch() -> None:
    while True:
        time.sleep(0.2)


async def main() -> None:
    if os.environ.get("NOT_DUMPABLE"):  # as after a change of credentials: only CAP_SYS_PTRACE may read it
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    emit_line(f"READY {os.getpid()}")
    waiting_without_loopwatch()


asyncio.run(main())
