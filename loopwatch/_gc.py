"""Garbage-collection passes, so that a stall that is mostly a collection is called one (``kind="gc"``).

A ``gc.callbacks`` entry notes when each collection starts and stops, on which thread and for which
generation; passes of at least ``MIN_PASS`` seconds are kept (the last ``KEPT``).  The compiled
``loopwatch._accel.GcWatch`` costs well under a microsecond per collection; :class:`PyGcWatch` is its
pure-Python twin.  A collection holds the GIL (every Python thread waits for it, the loop's included),
so a pass on any thread counts against a stall it overlaps.
"""

from __future__ import annotations

import collections
import gc
import threading
import time
from typing import Any

from ._iteration import _accel

MIN_PASS = 0.001  # seconds: shorter collections are not kept
KEPT = 64
GC_SHARE = 0.5  # a stall is "gc" when collections cover at least this share of it


class PyGcWatch:
    """The twin of ``loopwatch._accel.GcWatch``: ``watch(phase, info)`` and ``passes()``."""

    def __init__(self, min_seconds: float = MIN_PASS) -> None:
        self._min = min_seconds
        self._current: tuple[int, float, int] | None = None
        self._passes: collections.deque[tuple[int, float, float, int]] = collections.deque(maxlen=KEPT)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if phase == "start":
            self._current = (threading.get_ident(), now, info.get("generation", -1))
        elif self._current is not None:
            thread, start, generation = self._current
            self._current = None
            if now - start >= self._min:
                self._passes.append((thread, start, now, generation))

    def passes(self) -> tuple[list[tuple[int, float, float, int]], tuple[int, float, int] | None]:
        return list(self._passes), self._current


class GcPasses:
    """Installs the watch in ``gc.callbacks`` and tells how much of a window collections took."""

    def __init__(self, *, accelerated: bool) -> None:
        self.watch: Any = _accel.GcWatch(MIN_PASS) if accelerated and _accel is not None else PyGcWatch()
        self.installed = False

    def install(self) -> None:
        if not self.installed:
            gc.callbacks.append(self.watch)
            self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            self.installed = False
            try:
                gc.callbacks.remove(self.watch)
            except ValueError:  # removed by someone else
                pass

    def during(self, start: float, end: float) -> tuple[float, int | None]:
        """``(seconds of collection inside [start, end], the oldest generation collected)``; a pass in
        progress counts up to ``end``."""
        passes, current = self.watch.passes()
        windows = [(s, e, g) for _, s, e, g in passes]
        if current is not None:
            windows.append((current[1], end, current[2]))
        seconds, generation = 0.0, None
        for s, e, g in windows:
            overlap = min(e, end) - max(s, start)
            if overlap > 0:
                seconds += overlap
                generation = g if generation is None else max(generation, g)
        return seconds, generation

    def kind(self, start: float, end: float) -> tuple[float, int] | None:
        """``(gc seconds, generation)`` if collections took at least ``GC_SHARE`` of [start, end]."""
        seconds, generation = self.during(start, end)
        if generation is not None and end > start and seconds >= GC_SHARE * (end - start):
            return seconds, generation
        return None
