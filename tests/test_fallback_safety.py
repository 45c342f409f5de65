"""The GIL-held fallback is safe by construction (issue 12): its signal handler writes the loop thread's
stack only while that thread holds the GIL -- so never while another thread runs Python -- however late
the signal arrives.  Tried for real with the kernel timer: aimed at a thread that waits without the GIL
while another thread runs Python, it writes nothing; aimed at a thread running Python, it writes that
thread's own stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loopwatch._gilheld import GilHeldStacks
from loopwatch._iteration import _accel

pytestmark = pytest.mark.skipif(_accel is None, reason="the fallback needs the C accelerator")


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


def test_a_storm_of_signals_on_call_heavy_python_never_crashes(app_runner, tmp_path: Path) -> None:
    """2,000 signals a second for 4 s, landing on a thread that creates and frees frames and objects all
    the time: stacks are written, and the process survives (a crash is death by SIGSEGV)."""
    dump_dir = tmp_path / "dumps"
    dump_dir.mkdir(mode=0o700)
    app = app_runner("fallback_storm", str(dump_dir), "4")
    out = app.finish(timeout=120)
    assert app.proc.returncode == 0, out
    line = next(line for line in out.splitlines() if line.startswith("SURVIVED "))
    result = json.loads(line[len("SURVIVED "):])
    assert result["guard_on_top"] and result["refused"] == 0, result
    # Stacks are written only when the signal lands in a C call (3.11: ~1,000-8,000 in 4 s; 3.13: ~100, where
    # the guard has also caught a real fault in a walk, counted in "faults", and the process lived on).
    assert result["stacks"] >= 10, result


def test_a_fault_inside_a_walk_is_caught_and_any_other_goes_to_the_previous_handler(tmp_path: Path) -> None:
    """The memory-fault guard: a fault while a stack is being walked ends that walk (counted), the process
    goes on; outside a walk, SIGSEGV reaches the handler that was there before (faulthandler's here)."""
    stacks = GilHeldStacks(tmp_path, pid=os.getpid(), created_ms=1, service="t")
    assert stacks.open() is None
    try:
        on_top, faults, _ = _accel.stack_guard()
        assert on_top
        assert _accel.stack_guard_probe() is True
        assert _accel.stack_guard()[1] == faults  # the probe's own fault is not counted as a walk's
    finally:
        stacks.close()
    assert _accel.stack_guard()[0] is False  # removed with the fallback
    crash = subprocess.run(
        [sys.executable, "-c", "import faulthandler, ctypes, os, sys; faulthandler.enable();"
         "from loopwatch._gilheld import GilHeldStacks;"
         "from pathlib import Path; s = GilHeldStacks(Path(sys.argv[1]), pid=os.getpid(), created_ms=1, service='t'); assert s.open() is None;"
         "ctypes.string_at(8)", str(tmp_path)],
        capture_output=True, text=True, timeout=60)
    assert crash.returncode == -signal.SIGSEGV, crash
    assert "Fatal Python error: Segmentation fault" in crash.stderr  # faulthandler's, chained
