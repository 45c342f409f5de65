"""The GIL-held fallback is safe by construction (issue 12): its signal handler writes the loop thread's
stack only while that thread holds the GIL -- so never while another thread runs Python -- however late
the signal arrives.  Tried for real with the kernel timer: aimed at a thread that waits without the GIL
while another thread runs Python, it writes nothing; aimed at a thread running Python, it writes that
thread's own stack."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from loopwatch._gilheld import GilHeldStacks


def spin_python(seconds: float) -> int:
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


def test_no_stack_is_written_from_a_thread_that_does_not_hold_the_gil(tmp_path: Path) -> None:
    stacks = GilHeldStacks(tmp_path, pid=os.getpid(), created_ms=1, service="t")
    assert stacks.open() is None
    try:
        asleep = threading.Event()

        def sleeper() -> None:
            asleep.set()
            time.sleep(1.2)  # a call that released the GIL: the watchdog could look for itself

        thread = threading.Thread(target=sleeper, name="waits-without-the-gil")
        thread.start()
        asleep.wait(5)
        stacks.watch(thread.native_id, thread.ident)
        stacks.arm(time.monotonic() + 0.05)  # fires now, then every 0.25 s: ~4 signals while it sleeps
        spin_python(0.9)  # meanwhile another thread (this one) runs Python flat out
        stacks.disarm()
        thread.join(5)
        assert stacks.take() == [], "a stack walked while its thread did not hold the GIL"

        # The control: aimed at a thread that runs Python (it holds the GIL), the same signal writes its stack.
        stacks.watch(threading.get_native_id(), threading.get_ident())
        stacks.arm(time.monotonic() + 0.05)
        spin_python(0.4)
        stacks.disarm()
        written = stacks.take()
        assert written and all("spin_python" in stack for stack in written), written
    finally:
        stacks.close()
