"""The core series: how late each loop is (the lag probe's), and loopwatch's own failures.

Counters and histograms are ``_series`` objects updated by the probes and the watchdog; live values (the
lag that grows during a stall) are computed from snapshots at scrape time, in the scraping thread,
without ever calling into the event loop.  Every feature's series are in its own component (see
``_component``); these two are the ones every agent has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from ._component import Component, Naming, Report, ignore_error
from ._log import COMPONENTS
from ._series import Counter, Histogram

DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
                 60.0, 120.0)


def threshold_label(threshold: float) -> str:
    """``0.5`` -> ``"0.5"``, ``2`` -> ``"2.0"``: the ``threshold`` label values."""
    return str(float(threshold))


class LoopLag(Component):
    """``event_loop_lag_seconds`` (live), ``event_loop_delay_seconds`` (the probe's beats) and
    ``event_loop_lag_spikes_total`` (counted by the watchdog, once per stall and threshold)."""

    def __init__(self, naming: Naming, thresholds: Iterable[float],
                 live_lag: Callable[[], Iterable[tuple[str, float]]], *, report: Report = ignore_error) -> None:
        super().__init__(naming, report=report)
        self.thresholds = tuple(thresholds)
        self._live_lag = live_lag
        self._new_series()

    def _new_series(self) -> None:
        ns = self.naming.namespace
        self.delay = Histogram(
            "event_loop_delay_seconds", "How late the lag probe's timer fired, per probe.",
            ["service", "loop"], namespace=ns, buckets=sorted(set(DELAY_BUCKETS) | set(self.thresholds)))
        self.spikes = Counter(
            "event_loop_lag_spikes", "Stalls whose lag crossed each threshold (counted live, once per stall).",
            ["service", "loop", "threshold"], namespace=ns)

    def after_fork(self) -> None:
        """Fresh series: the child's loops start from zero (the agent detaches the parent's)."""
        self._new_series()

    def add_loop(self, loop: str) -> None:
        service = self.naming.service
        self.delay.labels(service, loop)
        for threshold in self.thresholds:
            self.spikes.labels(service, loop, threshold_label(threshold))

    def observe_delay(self, loop: str, delay: float) -> None:
        self.delay.labels(self.naming.service, loop).observe(delay)

    def count_spike(self, loop: str, threshold: float, exemplar: dict[str, str] | None = None) -> None:
        """One stall crossed ``threshold``; ``exemplar``: the trace of the request it blocked, if any."""
        self.spikes.labels(self.naming.service, loop, threshold_label(threshold)).inc(1.0, exemplar)

    def families(self) -> Iterator[Metric]:
        lag = self.naming.family(GaugeMetricFamily, "event_loop_lag_seconds",
                                 "Current event-loop lag; grows live while the loop is stalled.", ["loop"])
        try:
            values = list(self._live_lag())
        except Exception as exc:  # noqa: BLE001 - the other series still go out
            self.report("collector", exc)
            values = []
        for loop, value in values:
            lag.add_metric([self.naming.service, loop], value)
        yield lag
        yield from self.delay.collect()
        yield from self.spikes.collect()


class AgentUp(Component):
    """``agent_up{part}``: 1 while each part that runs something (the watchdog thread, the exporter, the GIL
    probe, the faulthandler fallback, dumps) is alive, 0 once it is not -- it could not start, or died."""

    def __init__(self, naming: Naming, parts: Callable[[], Iterable[Component]], *,
                 report: Report = ignore_error) -> None:
        super().__init__(naming, report=report)
        self._parts = parts

    def families(self) -> list[Metric]:
        up = self.naming.family(GaugeMetricFamily, "agent_up",
                                "1 while each running part of loopwatch is alive, 0 if it could not start or "
                                "died (see errors_total and the loopwatch.error / loopwatch.degraded events).",
                                ["part"])
        for part in self._parts():
            alive = part.up()
            if alive is not None:
                up.add_metric([self.naming.service, part.component], 1.0 if alive else 0.0)
        return [up]


class Errors(Component):
    """``errors_total{component}``: loopwatch's own failures, counted by ``_log.Guard``.  Registered
    last, so a scrape includes the failures of that very scrape."""

    def __init__(self, naming: Naming) -> None:
        super().__init__(naming)
        self.after_fork()

    def after_fork(self) -> None:
        self.errors = Counter("errors", "loopwatch's own failures, by component; it never raises into the app.",
                              ["service", "component"], namespace=self.naming.namespace)
        for component in COMPONENTS:
            self.errors.labels(self.naming.service, component)

    def count(self, component: str) -> None:
        self.errors.labels(self.naming.service, component).inc()

    def families(self) -> list[Metric]:
        return self.errors.collect()
