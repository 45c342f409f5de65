"""What the loop thread was doing during a stall: burning CPU, or waiting.

Two per-thread clocks, read from the watchdog thread:

* CPU time (``pthread_getcpuclockid`` + ``clock_gettime``): what the thread actually burned;
* on Linux, time *wanting* a CPU: on-CPU plus waiting in the run queue
  (``/proc/self/task/<tid>/schedstat``).  This is what tells the kind apart on a busy machine: a
  CPU-bound loop thread that shares its core with other work burns only part of the stall, but it is
  runnable the whole time, whereas a thread blocked in a syscall or a lock is neither.

A stall is ``"cpu"`` when the thread wanted a CPU (or, without schedstat, burned one) for at least half
of it, ``"blocked"`` otherwise, ``"unknown"`` where neither clock exists.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

from . import _unpatched as _os

CPU_KIND_RATIO = 0.5


class ThreadSample(NamedTuple):
    wall: float
    cpu: float | None  # CPU seconds burned so far
    wanted: float | None  # seconds on a CPU or runnable so far (Linux schedstat)


class ThreadClock:
    """Samples one thread's clocks (see the module docstring); never raises."""

    def __init__(self, ident: int, native_id: int | None) -> None:
        self._cpu_clock: int | None = None
        getclock = getattr(time, "pthread_getcpuclockid", None)
        if getclock is not None:
            try:
                clock_id = getclock(ident)
                time.clock_gettime(clock_id)
                self._cpu_clock = clock_id
            except (OSError, OverflowError, ValueError):
                pass
        self._schedstat: str | None = None
        if native_id is not None:
            path = f"/proc/self/task/{native_id}/schedstat"
            if _read_schedstat(path) is not None:
                self._schedstat = path

    def sample(self, wall: float, *, light: bool = False) -> ThreadSample:
        """The clocks now; ``light``: the CPU clock only (no /proc read: three system calls fewer)."""
        cpu = None
        if self._cpu_clock is not None:
            try:
                cpu = time.clock_gettime(self._cpu_clock)
            except OSError:
                self._cpu_clock = None
        wanted = None
        if self._schedstat is not None and not light:
            wanted = _read_schedstat(self._schedstat)
            if wanted is None:
                self._schedstat = None
        return ThreadSample(wall, cpu, wanted)


def _read_schedstat(path: str) -> float | None:
    try:
        fd = _os.open(path, os.O_RDONLY)
        try:
            fields = _os.read(fd, 128).split()
        finally:
            _os.close(fd)
        return (int(fields[0]) + int(fields[1])) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def classify(before: ThreadSample | None, after: ThreadSample, stall_seconds: float) -> tuple[str, float | None]:
    """``(kind, cpu_seconds)`` of a stall of ``stall_seconds`` that lies between two samples.

    The window may hold some healthy time too; that adds (almost) nothing, so the busy time is compared
    with the stall, not the window.
    """
    if before is None:
        return "unknown", None
    cpu = None if after.cpu is None or before.cpu is None else max(0.0, after.cpu - before.cpu)
    if after.wanted is not None and before.wanted is not None:
        busy: float | None = after.wanted - before.wanted
    else:
        busy = cpu
    if busy is None or stall_seconds <= 0:
        return "unknown", cpu
    return ("cpu" if busy >= CPU_KIND_RATIO * stall_seconds else "blocked"), cpu
