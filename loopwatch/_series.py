"""Counters and histograms with labels, for loopwatch's own collectors.

The subset of prometheus_client's ``Counter`` and ``Histogram`` that loopwatch uses (``labels(...)``,
``inc()``, ``observe()``, ``remove(...)``, ``collect()``), collected as plain ``CounterMetricFamily`` /
``HistogramMetricFamily`` families -- prometheus_client's own building blocks for custom collectors.
Compared with the metric objects they are cheaper to collect (a scrape of an idle app is most of its CPU)
and carry no ``_created`` series, which nothing of loopwatch's dashboards or rules reads.  Updates are
thread-safe (one lock per labelled child); a forked child replaces the objects (``Metrics.reset``).

An observation may carry an OpenMetrics **exemplar** (``exemplar={"trace_id": ...}``): a counter keeps the
last one, a histogram the last one of each bucket, with the value and the time it was observed.  They go
out only in the OpenMetrics format (the one Prometheus asks for); the classic text format drops them.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

from . import _forksafe

INF = float("inf")


def _exemplar(labels: Mapping[str, str], value: float) -> Exemplar:
    return Exemplar(dict(labels), value, time.time())


class _CounterChild:
    __slots__ = ("_lock", "value", "exemplar")

    def __init__(self) -> None:
        self._lock = _forksafe.lock()
        self.value = 0.0
        self.exemplar: Exemplar | None = None

    def inc(self, amount: float = 1.0, exemplar: Mapping[str, str] | None = None) -> None:
        with self._lock:
            self.value += amount
            if exemplar is not None:
                self.exemplar = _exemplar(exemplar, amount)


class _HistogramChild:
    __slots__ = ("_bounds", "_lock", "counts", "sum", "exemplars", "_series", "_key")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._lock = _forksafe.lock()
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.exemplars: list[Exemplar | None] | None = None  # per bucket, once one has been observed
        self._series: Histogram | None = None  # set by Histogram: who to tell when it has listeners
        self._key: tuple[str, ...] = ()

    def observe(self, value: float, exemplar: Mapping[str, str] | None = None) -> None:
        index = bisect_left(self._bounds, value)  # the first bucket whose upper bound is >= value
        with self._lock:
            self.counts[index] += 1
            self.sum += value
            if exemplar is not None:
                if self.exemplars is None:
                    self.exemplars = [None] * len(self._bounds)
                self.exemplars[index] = _exemplar(exemplar, value)

    def snapshot(self) -> tuple[list[int], float, list[Exemplar | None] | None]:
        with self._lock:
            return list(self.counts), self.sum, None if self.exemplars is None else list(self.exemplars)


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

    def _child(self, key: tuple[str, ...]) -> Any:
        raise NotImplementedError

    def labels(self, *values: object) -> Any:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.get(key)
                if child is None:
                    child = self._children[key] = self._child(key)
        return child

    def remove(self, *values: object) -> None:
        """Drop the child with these label values; ``KeyError`` if there is none."""
        with self._lock:
            del self._children[tuple(str(v) for v in values)]

    def items(self) -> list[tuple[tuple[str, ...], Any]]:
        with self._lock:
            return list(self._children.items())


class Counter(_Series):
    def _child(self, key: tuple[str, ...]) -> _CounterChild:
        return _CounterChild()

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self.items():
            exemplar = child.exemplar
            if exemplar is None:
                family.add_metric(key, child.value)
            else:  # CounterMetricFamily.add_metric takes no exemplar: the sample, as it would build it
                family.samples.append(Sample(f"{self.name}_total", dict(zip(self.labelnames, key)), child.value,
                                             None, exemplar))
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

    def _child(self, key: tuple[str, ...]) -> _HistogramChild:
        """A new child, told its series and key (for its listeners)."""
        child = (_ListenedChild if self.listeners else _HistogramChild)(self._bounds)
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
            counts, total, exemplars = child.snapshot()
            cumulative, buckets = 0, []
            for n, (name, count) in enumerate(zip(self._bucket_names, counts)):
                cumulative += count
                exemplar = exemplars[n] if exemplars is not None else None
                buckets.append((name, cumulative) if exemplar is None else (name, cumulative, exemplar))
            family.add_metric(key, buckets, total)
        return [family]
