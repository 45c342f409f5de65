"""Bounded label values for series whose labels come from runtime data (callbacks, exceptions, threads).

A label drawn from runtime data could grow without limit.  :class:`Slots` gives the first ``n`` keys seen
their own series and adds every later key to ``other``.  Slots are sticky: a key keeps its series while it
is being counted, so no series is created and dropped from one scrape to the next, and every exported
counter only grows (a ranking by count would move keys in and out of the top, and ``other`` would go down
when one moved in -- a counter reset for Prometheus).  A key not counted for ``retire_after`` seconds (an
hour) gives its slot to the next new key; its count moves into ``other``, so the exported values still add
up to the total and ``other`` still only grows.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from . import _forksafe

OTHER = "other"
_DIGITS = re.compile(r"\d+")
_SPACES = re.compile(r"\s+")


def name_pattern(name: str, limit: int = 64) -> str:
    """A thread's name as a label value that does not grow with the number of threads: every run of
    digits becomes ``N`` (``worker-17`` -> ``worker-N``, ``ThreadPoolExecutor-0_3`` ->
    ``ThreadPoolExecutor-N_N``), whitespace ``_``, at most ``limit`` characters."""
    return _SPACES.sub("_", _DIGITS.sub("N", name.strip()))[:limit] or "unnamed"


class Slots:
    def __init__(self, n: int = 20, *, retire_after: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if n < 1 or not retire_after > 0:
            raise ValueError(f"need n >= 1 and retire_after > 0, got n={n}, retire_after={retire_after}")
        self.n = n
        self.retire_after = retire_after
        self._clock = clock
        self._counts: dict[str, float] = {}  # key -> count since it got its slot
        self._last: dict[str, float] = {}  # key -> when it was last counted
        self._other = 0.0
        self._total = 0.0
        self._lock = _forksafe.lock()

    def inc(self, key: str, amount: float = 1.0) -> None:
        with self._lock:
            now = self._clock()
            self._total += amount
            if key not in self._counts and len(self._counts) >= self.n and not self._retire(now):
                self._other += amount
                return
            self._counts[key] = self._counts.get(key, 0.0) + amount
            self._last[key] = now

    def _retire(self, now: float) -> bool:
        """Free the slot of the key idle longest, if it has been idle ``retire_after`` seconds."""
        idle = min(self._last, key=self._last.__getitem__)
        if now - self._last[idle] < self.retire_after:
            return False
        self._other += self._counts.pop(idle)
        del self._last[idle]
        return True

    def items(self) -> list[tuple[str, float]]:
        """``[(label value, count), ...]``: every key with a slot, then ``other`` once anything was added to it."""
        with self._lock:
            values = sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))
            other = self._other
        if other > 0:
            values.append((OTHER, other))
        return values

    @property
    def total(self) -> float:
        return self._total
