"""OpenTelemetry metrics export (``otel_metrics``, the ``[otel]`` extra): the same measurements as the
Prometheus series, through an OpenTelemetry ``MeterProvider``.

* ``global``: the application's own provider (``opentelemetry.metrics.get_meter_provider()``), when it has
  set a real one; ``otlp``: loopwatch's own SDK provider with a ``PeriodicExportingMetricReader`` and the
  OTLP/HTTP protobuf exporter, both configured by the SDK itself from the standard ``OTEL_*`` variables,
  shut down at ``uninstall()``; ``auto``: the first of the two that applies, else nothing.
* Gauges and counters are asynchronous instruments whose callbacks read the components' own families
  (what a scrape reads), renamed to the semantic conventions (``SERIES``).  Callbacks run in the OTel
  reader's thread; one snapshot of every family serves all the callbacks of one collection.
* Histograms cannot be asynchronous: each mirrored ``_series.Histogram`` gets a listener that appends the
  observation to a bounded deque -- all the observing thread (the loop's, for the probe's beats and pool
  acquires) ever does -- and the reader's thread records the queued values into synchronous OTel
  histograms at the start of the next collection, before the SDK reads them.
* The event loop gets ``asyncio.eventloop.*``, Node's ``nodejs.eventloop.*`` for asyncio: delay statistics
  over each export interval's probe beats, utilization over the interval, time by state.
* Cardinality: the attributes are the Prometheus labels' values, already bounded there.
* Fork: a forked child drops the parent's provider (its exporter sends nothing from another process, and
  the reader thread the SDK restarts in the child is shut down) and builds its own at ``start()``.

OpenTelemetry is imported here only when the option is on; without the extra the feature is degraded with
a logged reason and the rest runs.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import _forksafe
from ._component import Component, Degrade, Report, ignore_error
from ._log import emit
from ._series import Histogram
from ._version import __version__

INSTALL_HINT = "pip install 'loopwatch[otel]'"
REFRESH = 0.1  # seconds: the callbacks of one collection share one snapshot of the families
MAX_PENDING = 65536  # histogram observations queued between two collections (the oldest are dropped)
MAX_DELAYS = 4096  # probe beats kept per loop for one interval's delay statistics
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
OPT_IN = "OTEL_SEMCONV_STABILITY_OPT_IN"
LOOP = "asyncio.eventloop.name"


@dataclasses.dataclass(frozen=True)
class Series:
    """One asynchronous instrument: the Prometheus family (without the namespace) it reads, its OTel name,
    kind (``gauge``, ``counter``, ``updowncounter``), unit, and label -> attribute renames."""

    prom: str
    name: str
    kind: str
    unit: str
    description: str
    attrs: tuple[tuple[str, str], ...] = ()
    old: bool = False  # the pre-1.26 DB name: only with OTEL_SEMCONV_STABILITY_OPT_IN=database/dup


@dataclasses.dataclass(frozen=True)
class Mirror:
    """One synchronous histogram fed from a ``_series.Histogram`` (``source``: the agent's key for it)."""

    source: str
    name: str
    unit: str
    description: str
    attrs: tuple[tuple[str, str], ...] = ()
    scale: float = 1.0
    old: bool = False


_POOL = (("pool_name", "db.client.connection.pool.name"),)
_POOL_OLD = (("pool_name", "pool.name"),)
_EXECUTOR = (("executor", "loopwatch.executor.name"),)

SERIES: tuple[Series, ...] = (
    # the event loop (loopwatch's own view; the Node-like ones are computed, see OtelMetrics._loop_series)
    Series("event_loop_lag_seconds", "loopwatch.eventloop.lag", "gauge", "s",
           "How long the loop has been stuck right now (grows live during a stall).", (("loop", LOOP),)),
    Series("event_loop_lag_spikes", "loopwatch.eventloop.stalls", "counter", "{stall}",
           "Stalls that crossed each lag threshold.",
           (("loop", LOOP), ("threshold", "loopwatch.eventloop.threshold"))),
    Series("slow_callbacks", "loopwatch.eventloop.slow_callbacks", "counter", "{callback}",
           "Callbacks over slow_callback_threshold, by callback.", (("loop", LOOP), ("callback", "code.function.name"))),
    Series("tasks", "loopwatch.eventloop.tasks", "updowncounter", "{task}", "Live tasks of each loop.",
           (("loop", LOOP),)),
    Series("task_exceptions", "loopwatch.task.exceptions", "counter", "{exception}",
           "Exceptions that reached a loop's exception handler.", (("exception", "exception.type"),)),
    Series("last_exception_timestamp_seconds", "loopwatch.task.last_exception.time", "gauge", "s",
           "Unix time of the last exception counted in loopwatch.task.exceptions (0: none)."),
    Series("tasks_destroyed_pending", "loopwatch.task.destroyed_pending", "counter", "{task}",
           "Tasks garbage-collected while still pending."),
    Series("queue_depth", "loopwatch.queue.depth", "updowncounter", "{item}", "Items in each watched queue.",
           (("queue", "loopwatch.queue.name"),)),
    Series("queue_maxsize", "loopwatch.queue.limit", "updowncounter", "{item}", "Each watched queue's maxsize.",
           (("queue", "loopwatch.queue.name"),)),
    # threads and the process
    Series("threads_total", "process.thread.count", "updowncounter", "{thread}", "Process threads count."),
    Series("thread_cpu_seconds", "loopwatch.thread.cpu.time", "counter", "s",
           "CPU seconds (user + system) per kind of thread, ended threads included.",
           (("thread_name", "thread.name"), ("native_id", "loopwatch.thread.native_id"))),
    Series("gil_enabled", "loopwatch.gil.enabled", "gauge", "1", "1 with a GIL, 0 on a free-threaded build without."),
    Series("gil_contention", "loopwatch.gil.contention", "gauge", "{thread}",
           "About how many other threads a thread that wakes up waits behind for the GIL."),
    Series("gil_switch_interval_seconds", "loopwatch.gil.switch_interval", "gauge", "s", "sys.getswitchinterval()."),
    # executors
    Series("to_thread_executor_queue_depth", "loopwatch.executor.queue.depth", "updowncounter", "{work_item}",
           "Work submitted and not started.", _EXECUTOR),
    Series("to_thread_executor_threads", "loopwatch.executor.thread.count", "updowncounter", "{thread}",
           "Worker threads (processes) alive.", _EXECUTOR),
    Series("to_thread_executor_max_workers", "loopwatch.executor.thread.limit", "updowncounter", "{thread}",
           "The executor's max_workers.", _EXECUTOR),
    Series("to_thread_executor_busy_threads", "loopwatch.executor.thread.busy", "updowncounter", "{thread}",
           "Workers running a work item.", _EXECUTOR),
    # connection pools: the current semantic conventions, and the v1.24 names on opt-in
    Series("db_client_connection_count", "db.client.connection.count", "updowncounter", "{connection}",
           "The number of connections that are currently in state described by the state attribute.",
           (*_POOL, ("state", "db.client.connection.state"))),
    Series("db_client_connection_max", "db.client.connection.limit", "updowncounter", "{connection}",
           "The maximum number of open connections allowed.", _POOL),
    Series("db_client_connection_pending_requests", "db.client.connection.pending_requests", "updowncounter",
           "{request}", "The number of current pending requests for an open connection.", _POOL),
    Series("db_client_connection_timeouts", "db.client.connection.timeouts", "counter", "{timeout}",
           "The number of connection timeouts that have occurred trying to obtain a connection from the pool.",
           _POOL),
    Series("db_client_connection_overflow", "loopwatch.db.client.connection.overflow", "updowncounter",
           "{connection}", "Connections open beyond the pool size (SQLAlchemy's max_overflow).", _POOL),
    Series("db_client_connection_count", "db.client.connections.usage", "updowncounter", "{connection}",
           "Deprecated, use db.client.connection.count.", (*_POOL_OLD, ("state", "state")), old=True),
    Series("db_client_connection_max", "db.client.connections.max", "updowncounter", "{connection}",
           "Deprecated, use db.client.connection.limit.", _POOL_OLD, old=True),
    Series("db_client_connection_max", "db.client.connection.max", "updowncounter", "{connection}",
           "Deprecated, use db.client.connection.limit (the name of the development releases before it).",
           _POOL, old=True),
    Series("db_client_connection_pending_requests", "db.client.connections.pending_requests", "updowncounter",
           "{request}", "Deprecated, use db.client.connection.pending_requests.", _POOL_OLD, old=True),
    Series("db_client_connection_timeouts", "db.client.connections.timeouts", "counter", "{timeout}",
           "Deprecated, use db.client.connection.timeouts.", _POOL_OLD, old=True),
    # loopwatch itself
    Series("dumps", "loopwatch.dumps", "counter", "{dump}", "Stack dumps written, by reason.",
           (("reason", "loopwatch.dump.reason"),)),
    Series("agent_up", "loopwatch.agent.up", "gauge", "1", "1 while each running part of loopwatch is alive.",
           (("part", "loopwatch.agent.part"),)),
    Series("errors", "loopwatch.errors", "counter", "{error}", "loopwatch's own failures, by component.",
           (("component", "loopwatch.component"),)),
)

MIRRORS: tuple[Mirror, ...] = (
    Mirror("delay", "loopwatch.eventloop.delay", "s", "How late the lag probe's timer fired, per beat.",
           (("loop", LOOP),)),
    Mirror("slow", "loopwatch.eventloop.slow_callback.duration", "s", "Durations of slow callbacks.",
           (("loop", LOOP),)),
    Mirror("executor_wait", "loopwatch.executor.queue.wait_time", "s", "Time from submit to start of each work item.",
           _EXECUTOR),
    Mirror("gil_wait", "loopwatch.gil.wait", "s", "How late the GIL probe thread ran again after each sleep."),
    Mirror("pool_wait", "db.client.connection.wait_time", "s",
           "The time it took to obtain an open connection from the pool.", _POOL),
    Mirror("pool_use", "db.client.connection.use_time", "s",
           "The time between borrowing a connection and returning it to the pool.", _POOL),
    Mirror("pool_wait", "db.client.connections.wait_time", "ms", "Deprecated, use db.client.connection.wait_time.",
           _POOL_OLD, scale=1000.0, old=True),
    Mirror("pool_use", "db.client.connections.use_time", "ms", "Deprecated, use db.client.connection.use_time.",
           _POOL_OLD, scale=1000.0, old=True),
)

# Node's nodejs.eventloop.* for asyncio (computed here, per loop, over each export interval).
DELAY_STATS = ("min", "max", "mean", "stddev", "p50", "p90", "p99")
PROCESS = ("process.cpu.time", "process.memory.usage", "process.memory.virtual",
           "process.unix.file_descriptor.count")


def db_dup(environ: Mapping[str, str]) -> bool:
    """``OTEL_SEMCONV_STABILITY_OPT_IN`` asks for both the old and the current DB names (``database/dup``;
    ``database`` alone, or nothing: the current names only, all loopwatch ever emitted)."""
    return "database/dup" in {t.strip() for t in environ.get(OPT_IN, "").split(",")}


def _attribute(otel: str, value: str) -> Any:
    if otel == "loopwatch.thread.native_id":
        return int(value) if value.isdigit() else value
    if otel == "loopwatch.eventloop.threshold":
        return float(value)
    return value


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def delay_stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    mean = sum(ordered) / len(ordered)
    variance = sum((x - mean) ** 2 for x in ordered) / len(ordered)
    return {"min": ordered[0], "max": ordered[-1], "mean": mean, "stddev": math.sqrt(variance),
            "p50": _percentile(ordered, 0.5), "p90": _percentile(ordered, 0.9), "p99": _percentile(ordered, 0.99)}


class _Bridge:
    """The instruments loopwatch created on one provider (created once per provider: OTel has no way to
    remove an instrument, and asks for one name once), calling back into whichever ``OtelMetrics`` runs now."""

    def __init__(self, provider: Any) -> None:
        self.meter = provider.get_meter("loopwatch", __version__)
        self.target: OtelMetrics | None = None
        self.histograms: dict[str, Any] = {}
        self.created: set[str] = set()

    def ensure(self) -> None:
        meter = self.meter
        factories = {"gauge": meter.create_observable_gauge, "counter": meter.create_observable_counter,
                     "updowncounter": meter.create_observable_up_down_counter}
        for series in SERIES:
            if series.name not in self.created:
                factories[series.kind](series.name, callbacks=[self._callback(series)], unit=series.unit,
                                       description=series.description)
                self.created.add(series.name)
        for name, kind, unit, description in _computed():
            if name not in self.created:
                factories[kind](name, callbacks=[self._computed(name)], unit=unit, description=description)
                self.created.add(name)
        for mirror in MIRRORS:
            if mirror.name not in self.histograms:
                self.histograms[mirror.name] = _histogram(meter, mirror)

    def _callback(self, series: Series) -> Callable[[Any], Iterable[Any]]:
        def observe(options: Any) -> Iterable[Any]:
            target = self.target
            return target.observe(series) if target is not None else ()
        return observe

    def _computed(self, name: str) -> Callable[[Any], Iterable[Any]]:
        def observe(options: Any) -> Iterable[Any]:
            target = self.target
            return target.observe_computed(name) if target is not None else ()
        return observe


def _computed() -> list[tuple[str, str, str, str]]:
    """The instruments computed here rather than read from a family: Node's event-loop set, the process."""
    out = [(f"asyncio.eventloop.delay.{stat}", "gauge", "s", f"Event loop {stat} delay over the export interval "
            f"(the probe's beats).") for stat in DELAY_STATS]
    out += [("asyncio.eventloop.utilization", "gauge", "1", "Event loop utilization over the export interval."),
            ("asyncio.eventloop.time", "counter", "s",
             "Cumulative duration of time the event loop has been in each state."),
            ("process.cpu.time", "counter", "s", "Total CPU seconds broken down by different CPU modes."),
            ("process.memory.usage", "updowncounter", "By", "The amount of physical memory in use."),
            ("process.memory.virtual", "updowncounter", "By", "The amount of committed virtual memory."),
            ("process.unix.file_descriptor.count", "updowncounter", "{file_descriptor}",
             "Number of unix file descriptors in use by the process.")]
    return out


def _histogram(meter: Any, mirror: Mirror) -> Any:
    """A synchronous histogram whose buckets are the Prometheus ones (where the API takes the advisory)."""
    kwargs: dict[str, Any] = {"unit": mirror.unit, "description": mirror.description}
    bounds = _BOUNDS.get(mirror.source)
    if bounds is not None and _takes_advisory(meter):
        kwargs["explicit_bucket_boundaries_advisory"] = [b * mirror.scale for b in bounds]
    return meter.create_histogram(mirror.name, **kwargs)


_BOUNDS: dict[str, tuple[float, ...]] = {}  # source -> the Prometheus buckets (set when a listener is attached)


def _takes_advisory(meter: Any) -> bool:
    import inspect
    try:
        return "explicit_bucket_boundaries_advisory" in inspect.signature(meter.create_histogram).parameters
    except (TypeError, ValueError):
        return False


_bridges: weakref.WeakKeyDictionary[Any, _Bridge] = weakref.WeakKeyDictionary()
_bridges_lock = _forksafe.lock()


class OtelMetrics(Component):
    """The OpenTelemetry bridge (see the module docstring)."""

    component = "otel"

    def __init__(self, mode: str, *, namespace: str, service: str, sources: Callable[[], Iterable[Component]],
                 histograms: Callable[[], Mapping[str, Histogram]], process: bool = True,
                 environ: Mapping[str, str] | None = None, report: Report = ignore_error,
                 degrade: Degrade = lambda feature, reason: None) -> None:
        super().__init__(None, report=report)
        self.mode = mode
        self._prefix = namespace + "_"
        self._service = service
        self._sources = sources
        self._histograms = histograms
        self._process_on = process
        self._environ = os.environ if environ is None else environ
        self._degrade = degrade
        self.provider: Any = None  # what the instruments are on (None: not exporting)
        self.own: tuple[Any, Any] | None = None  # (provider, reader) loopwatch built: it shuts them down
        self._abandoned: Any = None  # the parent's provider, in a forked child
        self.failed = False  # on, but could not start (agent_up{part="otel"} = 0)
        self.dup = db_dup(self._environ)
        self._reset()

    def _reset(self) -> None:
        self._lock = _forksafe.lock()
        self._pending: collections.deque[tuple[str, tuple[str, ...], float]] = collections.deque(maxlen=MAX_PENDING)
        self._attached: dict[str, tuple[Histogram, Callable[..., None]]] = {}
        self._labelnames: dict[str, tuple[str, ...]] = {}
        self._refreshed = -math.inf
        self._families: dict[str, Any] = {}
        self._delays: dict[str, list[float]] = {}
        self._stats: dict[str, dict[str, float]] = {}
        self._busy: dict[str, tuple[float, float]] = {}  # loop -> (when, busy seconds) at the last collection
        self._idle: dict[str, float] = {}
        self._utilization: dict[str, float] = {}
        self._process: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._abandoned is not None:  # a forked child: the reader thread the SDK restarted here stops
            abandoned, self._abandoned = self._abandoned, None
            abandoned.shutdown(timeout_millis=1000)
        if self.provider is not None or self.failed:
            return
        provider = self._provider()
        if provider is None:
            return
        with _bridges_lock:
            bridge = _bridges.get(provider)
            if bridge is None:
                bridge = _bridges[provider] = _Bridge(provider)
            self._attach_listeners()
            bridge.ensure()
            self._bridge = bridge
            self.provider = provider
            bridge.target = self

    def stop(self) -> None:
        own = self.own
        if own is not None:
            try:
                own[0].shutdown(timeout_millis=2000)  # a last export (still reading our series), bounded
            except Exception as exc:  # noqa: BLE001 - never raise out of uninstall()
                self.report(self.component, exc)
        self.own = self.provider = None
        bridge = getattr(self, "_bridge", None)
        if bridge is not None and bridge.target is self:
            bridge.target = None  # the application's provider keeps the instruments: they observe nothing now
        for series, listener in self._attached.values():
            series.remove_listener(listener)
        self._attached.clear()

    def after_fork(self) -> None:
        """A forked child: the parent's provider exports nothing from here (its exporter checks the pid);
        ``start()`` shuts its restarted reader down and builds the child's own."""
        bridge = getattr(self, "_bridge", None)
        if bridge is not None and bridge.target is self:
            bridge.target = None
        if self.own is not None:
            self._abandoned = self.own[0]
            self.own, self.provider = None, None
        elif self.provider is not None:  # the app's provider: its fork handling is the app's
            self.provider = None
        self._reset()

    def up(self) -> bool | None:
        if self.failed:
            return False
        if self.own is None:
            return None  # off, or the application's provider (its reader is the application's)
        thread = getattr(self.own[1], "_daemon_thread", None)
        return True if thread is None else thread.is_alive()

    # -- which provider --------------------------------------------------------------------------------
    def _provider(self) -> Any:
        try:
            import opentelemetry.metrics as metrics_api
        except ImportError as exc:
            return self._fail(f"OpenTelemetry is not installed ({exc}): {INSTALL_HINT}")
        if self.mode in ("global", "auto"):
            provider = metrics_api.get_meter_provider()
            if _is_real(provider):
                return provider
            if self.mode == "global":
                return self._fail(f"otel_metrics='global' but the application has set no OpenTelemetry SDK "
                                  f"MeterProvider ({type(provider).__name__}): call "
                                  f"opentelemetry.metrics.set_meter_provider() before loopwatch.install()")
            if not any(self._environ.get(name) for name in ENDPOINT_VARS):
                emit("info", "loopwatch.otel_off", reason="otel_metrics='auto': no OpenTelemetry SDK MeterProvider "
                     "set by the application and no OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT; nothing exported")
                return None
        return self._own_provider()

    def _own_provider(self) -> Any:
        try:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.resources import Resource
            exporter_class = _exporter_class()
        except ImportError as exc:
            return self._fail(f"the OpenTelemetry SDK or its OTLP/HTTP exporter is not installed ({exc}): "
                              f"{INSTALL_HINT}")
        attributes: dict[str, Any] = {"process.pid": os.getpid()}
        named = self._environ.get("OTEL_SERVICE_NAME") or "service.name=" in self._environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", "")
        if not named:
            attributes["service.name"] = self._service
        reader = PeriodicExportingMetricReader(exporter_class())
        provider = MeterProvider(metric_readers=[reader], resource=Resource.create(attributes))
        self.own = (provider, reader)
        return provider

    def _fail(self, reason: str) -> None:
        self.failed = True
        self._degrade("otel", reason)
        return None

    # -- histograms: queued by the observing thread, recorded by the reader's -------------------------
    def _attach_listeners(self) -> None:
        """Listen to each mirrored histogram (again when a component replaced it, as after a fork)."""
        for source, series in self._histograms().items():
            attached = self._attached.get(source)
            if attached is not None and attached[0] is series:
                continue
            if attached is not None:
                attached[0].remove_listener(attached[1])
            append = self._pending.append

            def listener(key: tuple[str, ...], value: float, _source: str = source) -> None:
                append((_source, key, value))

            series.add_listener(listener)
            self._attached[source] = (series, listener)
            self._labelnames[source] = series.labelnames
            _BOUNDS.setdefault(source, series.bounds[:-1])

    def _drain(self) -> None:
        bridge = self._bridge
        pending = self._pending
        cache: dict[tuple[str, tuple[str, ...], bool], dict[str, Any]] = {}
        mirrors: dict[str, list[Mirror]] = {}
        for mirror in MIRRORS:
            if self.dup or not mirror.old:
                mirrors.setdefault(mirror.source, []).append(mirror)
        while pending:
            try:
                source, key, value = pending.popleft()
            except IndexError:
                break
            labels = dict(zip(self._labelnames.get(source, ()), key))
            if source == "delay":
                loop_delays = self._delays.setdefault(labels.get("loop", ""), [])
                if len(loop_delays) < MAX_DELAYS:
                    loop_delays.append(value)
            for mirror in mirrors.get(source, ()):
                ck = (mirror.name, key, mirror.old)
                attributes = cache.get(ck)
                if attributes is None:
                    attributes = cache[ck] = {o: _attribute(o, labels[p]) for p, o in mirror.attrs if p in labels}
                bridge.histograms[mirror.name].record(value * mirror.scale, attributes)

    # -- one collection ---------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Read every family once per collection (the callbacks of one collection come within ms)."""
        now = time.monotonic()
        if now - self._refreshed < REFRESH:
            return
        self._refreshed = now
        self._attach_listeners()
        families: dict[str, Any] = {}
        for component in self._sources():
            if component is self:
                continue
            for family in component.collect():
                name = family.name
                families[name[len(self._prefix):] if name.startswith(self._prefix) else name] = family
        self._families = families
        self._drain()
        self._loop_series(now)
        if self._process_on:
            self._process = _read_process()

    def _loop_series(self, now: float) -> None:
        self._stats = {loop: delay_stats(samples) for loop, samples in self._delays.items() if samples}
        self._delays = {}
        busy = self._families.get("event_loop_busy_seconds")
        self._utilization = {}
        for sample in busy.samples if busy is not None else ():
            loop = sample.labels.get("loop", "")
            previous = self._busy.get(loop)
            self._busy[loop] = (now, sample.value)
            if previous is None:
                self._idle.setdefault(loop, 0.0)
                continue
            wall, active = now - previous[0], sample.value - previous[1]
            if wall > 0:
                self._utilization[loop] = min(1.0, max(0.0, active / wall))
                self._idle[loop] = self._idle.get(loop, 0.0) + max(0.0, wall - active)

    def observe(self, series: Series) -> list[Any]:
        """The observations of one asynchronous instrument (in the reader's thread; never raises)."""
        if series.old and not self.dup:
            return []
        try:
            with self._lock:
                self._refresh()
                family = self._families.get(series.prom)
            if family is None:
                return []
            from opentelemetry.metrics import Observation
            wanted = (family.name, family.name + "_total")
            out = []
            for sample in family.samples:
                if sample.name not in wanted:
                    continue
                labels = sample.labels
                out.append(Observation(sample.value, {o: _attribute(o, labels[p]) for p, o in series.attrs
                                                      if p in labels}))
            return out
        except Exception as exc:  # noqa: BLE001 - an export never fails because of us
            self.report(self.component, exc)
            return []

    def observe_computed(self, name: str) -> list[Any]:
        try:
            with self._lock:
                self._refresh()
                return self._computed_values(name)
        except Exception as exc:  # noqa: BLE001
            self.report(self.component, exc)
            return []

    def _computed_values(self, name: str) -> list[Any]:
        from opentelemetry.metrics import Observation
        if name.startswith("asyncio.eventloop.delay."):
            stat = name.rsplit(".", 1)[1]
            return [Observation(stats[stat], {LOOP: loop}) for loop, stats in self._stats.items()]
        if name == "asyncio.eventloop.utilization":
            return [Observation(value, {LOOP: loop}) for loop, value in self._utilization.items()]
        if name == "asyncio.eventloop.time":
            out = []
            for loop, (_, active) in self._busy.items():
                out.append(Observation(active, {LOOP: loop, "asyncio.eventloop.state": "active"}))
                out.append(Observation(self._idle.get(loop, 0.0), {LOOP: loop, "asyncio.eventloop.state": "idle"}))
            return out
        value = self._process.get(name)
        if value is None:
            return []
        if name == "process.cpu.time":
            return [Observation(seconds, {"cpu.mode": mode}) for mode, seconds in value]
        return [Observation(value)]


def _read_process() -> dict[str, Any]:
    """The process's CPU, memory and descriptors (psutil; /proc reads, in the reader's thread)."""
    import psutil
    process = psutil.Process()
    times = os.times()
    values: dict[str, Any] = {"process.cpu.time": [("user", times.user), ("system", times.system)]}
    try:
        memory = process.memory_info()
        values["process.memory.usage"] = memory.rss
        values["process.memory.virtual"] = memory.vms
        values["process.unix.file_descriptor.count"] = process.num_fds()
    except (psutil.Error, AttributeError):
        pass
    return values


def _is_real(provider: Any) -> bool:
    """An SDK ``MeterProvider`` the application set (not the API's proxy or no-op default)."""
    try:
        from opentelemetry.sdk.metrics import MeterProvider
    except ImportError:
        return False
    return isinstance(provider, MeterProvider)


_EXPORTER: Any = None


def _exporter_class() -> Any:
    """The OTLP/HTTP exporter, one that sends nothing from a forked child (the parent's data)."""
    global _EXPORTER
    if _EXPORTER is None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import MetricExportResult

        class ProcessExporter(OTLPMetricExporter):  # type: ignore[misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._pid = os.getpid()

            def export(self, metrics_data: Any, *args: Any, **kwargs: Any) -> Any:
                if os.getpid() != self._pid:
                    return MetricExportResult.SUCCESS  # the parent's provider, in a forked child
                return super().export(metrics_data, *args, **kwargs)

            def shutdown(self, *args: Any, **kwargs: Any) -> None:
                if os.getpid() == self._pid:
                    super().shutdown(*args, **kwargs)

        _EXPORTER = ProcessExporter
    return _EXPORTER
