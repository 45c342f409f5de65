"""Counters and histograms with labels, for loopwatch's own collectors.

The subset of prometheus_client's ``Counter`` and ``Histogram`` that loopwatch uses (``labels(...)``,
``inc()``, ``observe()``, ``remove(...)``, ``collect()``), collected as plain ``CounterMetricFamily`` /
``HistogramMetricFamily`` families -- prometheus_client's own building blocks for custom collectors.
Compared with the metric objects they are cheaper to collect (a scrape of an idle app is most of its CPU)
and carry no ``_created`` series, which nothing of loopwatch's dashboards or rules reads.  Updates are
thread-safe (one lock per labelled child); a forked child replaces the objects (``Metrics.reset``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from . import _forksafe

INF = float("inf")


class _CounterChild:
    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self._lock = _forksafe.lock()
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount


class _HistogramChild:
    __slots__ = ("_bounds", "_lock", "counts", "sum", "_series", "_key")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._lock = _forksafe.lock()
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self._series: Histogram | None = None  # set by Histogram: who to tell when it has listeners
        self._key: tuple[str, ...] = ()

    def observe(self, value: float) -> None:
        index = bisect_left(self._bounds, value)  # the first bucket whose upper bound is >= value
        with self._lock:
            self.counts[index] += 1
            self.sum += value

    def snapshot(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self.counts), self.sum


class _ListenedChild(_HistogramChild):
    """A child of a histogram that has listeners (``Histogram.add_listener``): the same object, its class
    switched, so the plain ``observe`` above pays nothing for listeners nobody added."""

    __slots__ = ()

    def observe(self, value: float, *args: Any, **kwargs: Any) -> None:
        _HistogramChild.observe(self, value, *args, **kwargs)
        series = self._series
        if series is not None:
            for listener in series.listeners:
                listener(self._key, value)


class _Series:
    """A family of children by label values."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str], *, namespace: str = "") -> None:
        self.name = f"{namespace}_{name}" if namespace else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = _forksafe.lock()

    def _child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: object) -> Any:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, self._child())
        return child

    def remove(self, *values: object) -> None:
        """Drop the child with these label values; ``KeyError`` if there is none."""
        with self._lock:
            del self._children[tuple(str(v) for v in values)]

    def items(self) -> list[tuple[tuple[str, ...], Any]]:
        with self._lock:
            return list(self._children.items())


class Counter(_Series):
    def _child(self) -> _CounterChild:
        return _CounterChild()

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self.items():
            family.add_metric(key, child.value)
        return [family]


class Histogram(_Series):
    def __init__(self, name: str, documentation: str, labelnames: Iterable[str], *, namespace: str = "",
                 buckets: Iterable[float]) -> None:
        super().__init__(name, documentation, labelnames, namespace=namespace)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != INF:
            bounds.append(INF)
        self._bounds = tuple(bounds)
        self._bucket_names = tuple(floatToGoString(b) for b in bounds)

    listeners: tuple[Callable[[tuple[str, ...], float], None], ...] = ()

    def _child(self) -> _HistogramChild:
        return (_ListenedChild if self.listeners else _HistogramChild)(self._bounds)

    def labels(self, *values: object) -> Any:
        """As ``_Series.labels``, the new child told its series and key (for its listeners)."""
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.get(key)
                if child is None:
                    child = self._children[key] = self._child()
                    child._series, child._key = self, key
        return child

    @property
    def bounds(self) -> tuple[float, ...]:
        """The buckets' upper bounds, ``+Inf`` last."""
        return self._bounds

    def add_listener(self, listener: Callable[[tuple[str, ...], float], None]) -> None:
        """Call ``listener(label_values, value)`` after each ``observe`` (in the observing thread: keep it to an
        append).  Children switch class while there are listeners, so none costs nothing."""
        with self._lock:
            self.listeners = (*self.listeners, listener)
            for child in self._children.values():
                child.__class__ = _ListenedChild

    def remove_listener(self, listener: Callable[[tuple[str, ...], float], None]) -> None:
        with self._lock:
            self.listeners = tuple(f for f in self.listeners if f is not listener)
            if not self.listeners:
                for child in self._children.values():
                    child.__class__ = _HistogramChild

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self.items():
            counts, total = child.snapshot()
            cumulative, buckets = 0, []
            for name, count in zip(self._bucket_names, counts):
                cumulative += count
                buckets.append((name, cumulative))
            family.add_metric(key, buckets, total)
        return [family]
