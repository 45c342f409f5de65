"""The agent's Prometheus metrics, registered as one collector (one register, one unregister).

Counters and histograms are prometheus_client objects updated by the probe and the watchdog; live
values (the lag that grows during a stall) are computed from snapshots at scrape time, in the
scraping thread, without ever calling into the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._log import COMPONENTS
from ._series import Counter, Histogram

DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
                 60.0, 120.0)
KNOWN_DUMP_REASONS = ("event_loop_lag", "manual", "unfinished_stall")
MAX_DUMP_REASONS = 16


def threshold_label(threshold: float) -> str:
    """``0.5`` -> ``"0.5"``, ``2`` -> ``"2.0"``: the ``threshold`` label values."""
    return str(float(threshold))


class Metrics(Collector):
    """All loopwatch series; every one carries the constant ``service`` label."""

    def __init__(self, namespace: str, service: str, thresholds: Iterable[float],
                 live_lag: Callable[[], Iterable[tuple[str, float]]]) -> None:
        self.namespace = namespace
        self.service = service
        self.thresholds = tuple(thresholds)
        self._live_lag = live_lag
        ns = namespace
        self.delay = Histogram(
            "event_loop_delay_seconds", "How late the lag probe's timer fired, per probe.",
            ["service", "loop"], namespace=ns,
            buckets=sorted(set(DELAY_BUCKETS) | set(self.thresholds)))
        self.spikes = Counter(
            "event_loop_lag_spikes", "Stalls whose lag crossed each threshold (counted live, once per stall).",
            ["service", "loop", "threshold"], namespace=ns)
        self.dumps = Counter("dumps", "Stack dumps written, by reason.", ["service", "reason"],
                             namespace=ns)
        self.errors = Counter("errors", "loopwatch's own failures, by component; it never raises into the app.",
                              ["service", "component"], namespace=ns)
        for reason in KNOWN_DUMP_REASONS:
            self.dumps.labels(service, reason)
        for component in COMPONENTS:
            self.errors.labels(service, component)
        self._reasons = set(KNOWN_DUMP_REASONS)
        self._parts: list[tuple[str, Callable[[], Iterable[Metric]]]] = []
        self._resets: list[Callable[[], None]] = []
        self.on_error: Callable[[str, BaseException], None] = lambda component, exc: None

    def add_part(self, component: str, collect: Callable[[], Iterable[Metric]],
                 reset: Callable[[], None] | None = None) -> None:
        """Add a feature's own families to every scrape; its failures are counted under ``component``.

        ``reset`` (optional) zeroes the feature's counters: :meth:`reset` calls it in a forked child.
        """
        self._parts.append((component, collect))
        if reset is not None:
            self._resets.append(reset)

    def reset(self) -> None:
        """Start every series from zero, with no loops (a forked child: see ``_fork``).

        The prometheus_client objects are replaced, not cleared: their locks may have been held by a
        thread of the parent at ``fork()``, and that thread does not exist in the child.
        """
        fresh = Metrics(self.namespace, self.service, self.thresholds, self._live_lag)
        for name, value in vars(fresh).items():
            if isinstance(value, (Counter, Histogram)):
                setattr(self, name, value)
        self._reasons = fresh._reasons
        for reset in self._resets:
            try:
                reset()
            except Exception as exc:  # noqa: BLE001 - never raise into the host
                self.on_error("collector", exc)

    def family(self, kind: type[Metric], name: str, documentation: str, labels: Iterable[str] = ()) -> Metric:
        """A family named ``<namespace>_<name>`` whose samples start with the ``service`` label."""
        return kind(f"{self.namespace}_{name}", documentation, labels=["service", *labels])

    # -- per-loop series -------------------------------------------------------------------------
    def add_loop(self, loop: str) -> None:
        self.delay.labels(self.service, loop)
        for threshold in self.thresholds:
            self.spikes.labels(self.service, loop, threshold_label(threshold))

    def remove_loop(self, loop: str) -> None:
        for metric, labels in ((self.delay, (self.service, loop)),):
            try:
                metric.remove(*labels)
            except KeyError:
                pass
        for threshold in self.thresholds:
            try:
                self.spikes.remove(self.service, loop, threshold_label(threshold))
            except KeyError:
                pass

    # -- updates ---------------------------------------------------------------------------------
    def observe_delay(self, loop: str, delay: float) -> None:
        self.delay.labels(self.service, loop).observe(delay)

    def count_spike(self, loop: str, threshold: float) -> None:
        self.spikes.labels(self.service, loop, threshold_label(threshold)).inc()

    def count_dump(self, reason: str) -> None:
        if reason not in self._reasons:
            if len(self._reasons) >= MAX_DUMP_REASONS:
                reason = "other"
            self._reasons.add(reason)
        self.dumps.labels(self.service, reason).inc()

    def count_error(self, component: str) -> None:
        self.errors.labels(self.service, component).inc()

    # -- Collector -------------------------------------------------------------------------------
    def describe(self) -> list[Metric]:
        """Lets the registry detect a name clash at ``register()`` time."""
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            f"{self.namespace}_event_loop_lag_seconds",
            "Current event-loop lag; grows live while the loop is stalled.", labels=["service", "loop"])
        for loop, value in self._live_lag():
            lag.add_metric([self.service, loop], value)
        yield lag
        yield from self.delay.collect()
        yield from self.spikes.collect()
        yield from self.dumps.collect()
        for component, part in self._parts:
            try:
                families = list(part())
            except Exception as exc:  # noqa: BLE001 - a scrape must never fail because of us
                self.on_error(component, exc)
                continue
            yield from families
        yield from self.errors.collect()  # last: includes failures of this very scrape
