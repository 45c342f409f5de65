"""Bounded label values for series whose labels come from runtime data (callbacks, exceptions, threads).

A label drawn from runtime data could grow without limit; :class:`TopN` keeps exact counts for a bounded
number of keys, exports the ``n`` largest under their own label value and folds everything else into
``other`` (whose value is the total minus the exported ones, so the exported values still add up to
the total).  Keys not updated for ``forget_after`` seconds are dropped first when the table is full.
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


class TopN:
    def __init__(self, n: int = 20, *, track: int = 500, forget_after: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if n < 1 or track < n:
            raise ValueError(f"need 1 <= n <= track, got n={n}, track={track}")
        self.n = n
        self.track = track
        self.forget_after = forget_after
        self._clock = clock
        self._counts: dict[str, float] = {}
        self._seen: dict[str, float] = {}
        self._total = 0.0
        self._lock = _forksafe.lock()

    def inc(self, key: str, amount: float = 1.0) -> None:
        with self._lock:
            now = self._clock()
            self._total += amount
            if key not in self._counts and len(self._counts) >= self.track:
                self._evict(now)
                if len(self._counts) >= self.track:
                    return  # counted in the total, so in ``other``
            self._counts[key] = self._counts.get(key, 0.0) + amount
            self._seen[key] = now

    def _evict(self, now: float) -> None:
        stale = [k for k, seen in self._seen.items() if now - seen > self.forget_after]
        if not stale:  # drop the smallest quarter instead
            stale = sorted(self._counts, key=self._counts.__getitem__)[: max(1, self.track // 4)]
        top = set(self._top())
        for key in stale:
            if key not in top:
                del self._counts[key]
                del self._seen[key]

    def _top(self) -> list[str]:
        return sorted(self._counts, key=lambda k: (-self._counts[k], k))[: self.n]

    def items(self) -> list[tuple[str, float]]:
        """``[(label value, count), ...]``: the top ``n`` keys, then ``other`` if anything is folded."""
        with self._lock:
            top = self._top()
            values = [(key, self._counts[key]) for key in top]
            rest = self._total - sum(v for _, v in values)
        if rest > 1e-9 or len(self._counts) > len(top):
            values.append((OTHER, max(0.0, rest)))
        return values

    @property
    def total(self) -> float:
        return self._total
