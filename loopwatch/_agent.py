"""The agent: composes the components (one per feature, see ``_component``), watches the loops (one probe
per loop, attached by the loop hooks) and tells the components about them -- and undoes all of it on
``stop()``.  Lifecycle and composition only: each feature's work is in its own module.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import os
import ssl
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _fork, _forksafe, _frames
from . import _unpatched as _os
from ._component import Component, Naming, weak
from ._context import ContextReader, event_fields
from ._config import Options, tls_context
from ._console import Console, ConsoleView
from ._dumps import Dumps, safe_reason
from ._errors import ConfigError
from ._executors import Executors
from ._exporter import MetricsEndpoint
from ._gc import GcPasses
from ._gil import GilContention
from ._gilheld import FaulthandlerFallback
from ._hooks import LoopHooks, known_loop_method
from ._iteration import ACCELERATED, BeatActivity, UvActivity, UvStretches
from ._labels import name_pattern
from ._log import Degraded, Guard, emit
from ._metrics import AgentUp, Errors, LoopLag
from ._otel import OtelMetrics
from ._pools import Pools
from ._probe import LoopProbe, Loops, virtual_clock
from ._remote import DumpRequests
from ._slow import IterationTimer, SlowCallback, SlowCallbackMetrics, running_task
from ._tasks import TaskHealth
from ._threads import ThreadCpu
from ._version import __version__
from ._watchdog import SAMPLE_AT, Watchdog

MAX_LOOPS = 64


@dataclasses.dataclass(frozen=True)
class LoopSnapshot:
    """One watched loop, as the agent sees it right now."""

    label: str
    thread_name: str
    running: bool
    lag_seconds: float
    last_delay_seconds: float


@dataclasses.dataclass(frozen=True)
class AgentSnapshot:
    """A frozen view of the agent's state (what the exporter and the logs read)."""

    metrics_url: str | None
    dump_dir: Path
    dumps_enabled: bool
    degraded: tuple[str, ...]
    loops: tuple[LoopSnapshot, ...]
    pid: int  # this process: tells the workers of a pre-forking server apart


class Agent:
    """A running loopwatch agent.  Create it with :func:`loopwatch.install`.

    The agent composes the components (``_component``): it builds each feature that is not switched off,
    hands it what it needs, registers each with the registry on its own, starts and stops them, and
    tells them when a loop is attached or detached.  Lifecycle and composition only.
    """

    def __init__(self, options: Options, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self._clock = clock
        naming = Naming(options.namespace, options.service)
        self.errors = Errors(naming)
        self.guard = Guard(self.errors.count)
        report = self.guard.report
        self._lock = _forksafe.rlock()  # attach and detach
        self.loops = loops = Loops(clock)  # what components read; the agent adds and removes
        # Loops not watched because their clock is not real (test loops that fast-forward time).
        self._left_alone: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._degrade = Degraded()
        self.accelerated = options.accelerator and ACCELERATED
        self.gc = GcPasses(accelerated=self.accelerated)
        on = options.enabled  # a feature named in ``disable`` is not built: no series, no patch, no thread

        self.context = context = ContextReader(options.context_keys)  # the request a blocked task served
        self._loop_context = lambda loop: context.of_task(running_task(loop))  # (the task it runs now)
        self.lag = LoopLag(naming, options.lag_thresholds, loops.live_lag, report=report)
        self.slow_metrics = SlowCallbackMetrics(naming, loops, threshold=options.slow_callback_threshold,
                                                log=_log_slow, clock=clock, slow=on("slow_callbacks"),
                                                context=self.context, report=report)
        self.slow = self.slow_metrics.slow
        self.task_health = TaskHealth(naming, loops, report=report, degrade=self._degrade) \
            if on("tasks") else None
        self.threads = ThreadCpu(naming, clock=clock, report=report) if on("threads") else None
        self.gil = GilContention(naming, interval=options.gil_probe_interval, report=report) if on("gil") else None
        self.executors = Executors(naming, threshold=options.executor_wait_threshold, clock=clock,
                                   on_error=lambda exc: report("executor", exc)) if on("executors") else None
        self.pools = Pools(naming, clock=clock, on_error=lambda exc: report("pool", exc)) if on("pools") else None
        self.dumps = dumps = Dumps(naming, options.dump_dir, keep=options.dump_keep, cooldown=options.dump_cooldown,
                                   native_stacks=options.native_stacks, busy_since=loops.stall_of, clock=clock,
                                   report=report, degrade=self._degrade)
        self.writer = dumps.writer
        explicit_signal = options.dump_signal if isinstance(options.dump_signal, int) else None
        self.fallback = FaulthandlerFallback(
            options.dump_dir, service=options.service, enabled=lambda: options.faulthandler and dumps.enabled,
            first_look=SAMPLE_AT * options.dump_threshold, clock=clock, report=report, count=self.errors.count,
            degrade=self._degrade, avoid=frozenset({explicit_signal} if explicit_signal else ()))
        self.exporter = exporter = MetricsEndpoint(
            options.metrics_addr, options.metrics_ports, options.metrics_port_text, options.registry, report=report,
            count=self.errors.count, degrade=self._degrade, tls=_tls(options)) if options.metrics_port else None
        self.requests = DumpRequests(  # ``loopwatch dump PID``
            options.dump_dir, dump_signal=options.dump_signal, walk=options.faulthandler, service=options.service,
            enabled=lambda: dumps.enabled, loops=loops, lag_of=loops.lag_of, build=dumps.build,
            write=dumps.write_or_raise, metrics_url=lambda: exporter.url if exporter is not None else None,
            clock=clock, report=report, degrade=self._degrade, context=self._loop_context)
        self.watchdog = Watchdog(options=options, probes=loops, count_spike=self.lag.count_spike,
                                 writer=self.writer, guard=self.guard, slow=self.slow, build_dump=dumps.build,
                                 write_dump=dumps.write, update_dump=dumps.update, detach=weak(self.detach),
                                 gilheld=self.fallback.for_probe, gc=self.gc, accelerated=self.accelerated,
                                 requests=self.requests, context=self.context, clock=clock)
        self.console = Console(ports=options.console_ports, addr=options.console_addr,
                               task_factory=options.console_task_factory, view=self._console_view(),
                               report=report, degrade=self._degrade) if options.console else None
        sources: list[Component] = []  # every component, once built (the bridge reads their series)
        histograms = weak(self._histograms)
        self.otel = OtelMetrics(options.otel_metrics, namespace=options.namespace, service=options.service,
                                sources=lambda: sources, histograms=lambda: histograms() or {},
                                process=on("threads"), report=report, degrade=self._degrade) \
            if options.otel_metrics != "off" else None
        # Start order (stop is the reverse); registry order too: errors_total last, so a scrape counts
        # the failures of that very scrape.  The OTel bridge last: it reads the others' series.
        parts: tuple[Component, ...] = tuple(c for c in (
            self.lag, self.slow_metrics, self.task_health, self.threads, self.executors, self.pools, dumps,
            self.fallback, self.exporter, self.requests, self.watchdog, self.gil, self.console, self.otel)
            if c is not None)
        self.up = AgentUp(naming, lambda: parts, report=report)
        self.components: tuple[Component, ...] = (*parts, self.up, self.errors)
        sources.extend(self.components)
        self._hooks = LoopHooks(self._on_loop_start, self._on_loop_stop, self._on_loop_close,
                                lambda exc: report("hooks", exc))
        self._registered: list[Component] = []
        self.started = False
        self.fork_pending = False  # a forked child that has not resumed yet (see _fork)
        self.parent_pid: int | None = None  # set in a forked child

    def _histograms(self) -> dict[str, Any]:
        """The histograms the OTel bridge mirrors, as they are now (a forked child's components replace theirs)."""
        found: dict[str, Any] = {"delay": self.lag.delay}
        if self.options.enabled("slow_callbacks"):
            found["slow"] = self.slow_metrics.histogram
        if self.executors is not None:
            found["executor_wait"] = self.executors.histogram
        if self.pools is not None:
            found["pool_wait"], found["pool_use"] = self.pools.wait, self.pools.use
        if self.gil is not None and self.gil.enabled:
            found["gil_wait"] = self.gil.histogram
        return found

    # -- lifecycle -------------------------------------------------------------------------------
    def register(self) -> None:
        """Register every component with the registry, each on its own; a name clash raises
        :class:`ConfigError` and leaves none registered."""
        registry = self.options.registry
        for component in self.components:
            try:
                registry.register(component)
            except ValueError as exc:
                self.unregister()
                raise ConfigError(
                    f"registry already has metrics named like {self.options.namespace}_*: {exc}; "
                    f"pass another namespace, or another registry") from None
            self._registered.append(component)

    def unregister(self) -> None:
        while self._registered:
            try:
                self.options.registry.unregister(self._registered.pop())
            except KeyError:
                pass

    def start(self) -> None:
        """Register, prepare and start everything.  Transactional: a registry clash raises
        :class:`ConfigError`, anything else that escapes raises ``RuntimeError`` -- and either way nothing
        is left behind (no thread, descriptor, patch or registered series).  A part that cannot work is
        a logged degradation instead, and the rest runs."""
        self.register()
        self.started = True
        try:
            probe = self._start()
        except BaseException as exc:
            self.stop(quiet=True)
            raise RuntimeError(f"loopwatch could not be installed ({exc!r}); nothing was left installed") from exc
        emit("info", "loopwatch.installed", version=__version__, namespace=self.options.namespace,
                    service=self.options.service, pid=os.getpid(), metrics_url=self.metrics_url,
                    dump_dir=str(self.options.dump_dir), dumps=self.dumps.enabled,
                    loop=None if probe is None else probe.label)

    def _start(self) -> LoopProbe | None:
        _forksafe.at_fork(self.errors)  # first in a forked child: the others' failures count in the child's
        for component in self.components:
            _forksafe.at_fork(component)
        self.gc.install()
        for component in self.components:
            with self.guard(component.component):
                component.start()
        if self.dumps.enabled:
            with self.guard("dump"):
                self.fallback.convert_leftovers(self.dumps.build, self.dumps.write)
        self._hooks.install()
        for note in self._hooks.notes:
            self._degrade("hooks", note)
        atexit.register(self.stop)
        _fork.register(self)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        return self.attach(loop) if loop is not None else None

    def resume(self) -> None:
        """In a forked child (see ``_fork``): start again what the child lacks -- each component knows."""
        for component in self.components:
            with self.guard(component.component):
                component.start()

    def stop(self, *, quiet: bool = False) -> None:
        """Stop threads, cancel probes, undo patches, unregister the metrics.  Idempotent."""
        if not self.started:
            return
        self.started = False
        _fork.unregister(self)
        atexit.unregister(self.stop)
        self._hooks.uninstall()
        for component in reversed(self.components):
            _forksafe.forget(component)
            with self.guard(component.component):
                component.stop()
        self.gc.uninstall()
        with self._lock:
            probes, self.loops.probes = self.loops.probes, ()
        for probe in probes:
            with self.guard("probe"):
                probe.stop()
                if probe.activity is not None:
                    probe.activity.uninstall()
        self.unregister()
        if not quiet:
            emit("info", "loopwatch.uninstalled")

    # -- loops -----------------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> LoopProbe | None:
        """Watch ``loop`` (or resume watching it).  Must be called in the loop's thread."""
        if self.fork_pending:
            _fork.resume(self)
        with self._lock:
            for probe in self.loops.probes:
                if probe.loop is loop:
                    if not probe.running:
                        probe.resume()
                        self._arm_fallback(probe)
                    return probe
            if loop in self._left_alone:
                return None
            reason = virtual_clock(loop)
            if reason is not None:
                self._leave_alone(loop, reason)
                return None
            for closed in [p for p in self.loops.probes if p.closed]:
                self._detach_locked(closed)
            if len(self.loops.probes) >= MAX_LOOPS:
                self.guard.report("probe", RuntimeError(f"more than {MAX_LOOPS} loops; not watching more"))
                return None
            probe = LoopProbe(loop, self._new_label(), interval=self.options.probe_interval,
                              late_threshold=self.options.dump_threshold, observe=self.lag.observe_delay,
                              on_error=lambda exc: self.guard.report("probe", exc),
                              on_collected=self._on_collected, on_virtual_clock=self._on_virtual_clock,
                              clock=self._clock)
            self.lag.add_loop(probe.label)
            probe.activity = self._activity_for(loop, probe)
            if getattr(probe.activity, "parkable", False):
                probe.activity.set_park(self.watchdog.park)
            self.fallback.attach(probe)
            self.requests.attach(probe)
            self.loops.probes = (*self.loops.probes, probe)
        probe.start()
        self._arm_fallback(probe)
        if self.console is not None:
            with self.guard("console"):
                self.console.attach(probe)
        if self.task_health is not None:
            with self.guard("hooks"):
                if known_loop_method(loop, "call_exception_handler"):
                    self.task_health.attach(probe)
                else:
                    self._not_patched(loop, "call_exception_handler", probe)
        if self.executors is not None:
            with self.guard("executor"):
                if not known_loop_method(loop, "run_in_executor"):
                    self._not_patched(loop, "run_in_executor", probe)
                elif not self.executors.attach(loop, probe.label):
                    self._degrade("executor", f"cannot wrap {type(loop).__qualname__}.run_in_executor: the "
                                              f"default executor of loop {probe.label!r} is not measured")
        return probe

    def attach_current_loop(self) -> None:
        """Attach the loop running in this thread, if any (``install()`` called again inside a loop)."""
        if self.fork_pending:
            _fork.resume(self)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.attach(loop)

    def _arm_fallback(self, probe: LoopProbe) -> None:
        with self.guard("faulthandler"):
            self.fallback.arm(probe)

    def _new_label(self) -> str:
        thread = _os.current_thread()
        # Digits as N: loops in worker-1 ... worker-999, one at a time, are all "worker-N" (no new series each)
        return self.loops.new_label("main" if thread is _os.main_thread() else name_pattern(thread.name))

    def detach(self, probe: LoopProbe) -> None:
        """Stop watching ``probe``'s loop (it was closed).  Its label's series stay (gauges at 0, counters
        where they were): the next loop with that label carries on from there."""
        with self._lock:
            self._detach_locked(probe)

    def _detach_locked(self, probe: LoopProbe) -> None:
        if probe not in self.loops.probes:
            return
        self.loops.probes = tuple(p for p in self.loops.probes if p is not probe)
        probe.stop()
        if self.task_health is not None:
            self.task_health.detach(probe)
        if self.executors is not None:
            self.executors.detach(probe.label)
        self.loops.retire(probe)
        if probe.activity is not None:
            probe.activity.uninstall()
        self.fallback.detach(probe)
        self.requests.detach(probe)
        if self.console is not None:
            self.console.detach(probe)

    def _activity_for(self, loop: asyncio.AbstractEventLoop, probe: LoopProbe) -> Any:
        """The loop's iteration clock: its selector's (stdlib), libuv's (uvloop, with the accelerator), or
        the probe's beats where neither can be read (see ``_iteration``)."""
        self.slow_metrics.add_loop(probe.label)
        slow_on = self.options.slow_callback_mode != "off"
        timer = IterationTimer(loop, probe.label, self.slow,
                               exact_always=self.options.slow_callback_mode == "exact", enabled=slow_on,
                               stall_threshold=self.options.dump_threshold, stall_label=probe.take_stall_callback,
                               accelerated=self.accelerated)
        if timer.install():
            return timer
        if timer.not_wrapped is not None:
            emit("debug", "loopwatch.not_patched", loop=probe.label, reason=timer.not_wrapped)
        uvloop = sys.modules.get("uvloop")
        if uvloop is not None and isinstance(loop, getattr(uvloop, "Loop", ())):
            if not self.accelerated:
                self._degrade("uvloop", "the C accelerator is not built (or accelerator=false): uvloop stalls are "
                                        "timed from the probe's beats, a lower bound short by up to probe_interval")
            else:
                threshold = min(self.slow.threshold if slow_on else self.options.dump_threshold,
                                self.options.dump_threshold)
                try:
                    stretches = UvStretches(loop, threshold, probe.native_id)
                    self._hooks.watch_close(type(loop))
                    return UvActivity(loop, stretches)
                except Exception as exc:  # noqa: BLE001 - an uvloop without the pointer or the symbols
                    self._degrade("uvloop", f"cannot time uvloop's iterations ({exc!r}): stalls are timed from "
                                            f"the probe's beats, a lower bound short by up to probe_interval")
        return BeatActivity(probe)

    @staticmethod
    def _not_patched(loop: asyncio.AbstractEventLoop, method: str, probe: LoopProbe) -> None:
        kind = type(loop)
        emit("debug", "loopwatch.not_patched", loop=probe.label,
             reason=f"{kind.__module__}.{kind.__qualname__}.{method} is its own, not asyncio's: left alone")

    def _leave_alone(self, loop: asyncio.AbstractEventLoop, reason: str) -> None:
        """Never watch ``loop``: a probe timer would be the next event of a loop whose clock is virtual."""
        self._left_alone.add(loop)
        emit("debug", "loopwatch.loop_not_watched", loop_class=type(loop).__qualname__, reason=reason)

    def _on_virtual_clock(self, probe: LoopProbe, reason: str) -> None:
        """A watched loop's clock started running fast (its ``time()`` was patched): stop watching it.
        Called in the loop's thread, from the probe's beat."""
        loop = probe.loop
        with self._lock:
            self._detach_locked(probe)
            if loop is not None:
                self._leave_alone(loop, reason)

    def _on_collected(self, probe: LoopProbe) -> None:
        """The loop was garbage-collected (weakref callback, any thread, maybe inside the GC -- possibly in a
        thread that holds one of loopwatch's locks, which are not reentrant): take no lock here, only wake
        the watchdog, which detaches the probe in its own thread (one ``os.write``)."""
        self.watchdog.poke()

    def _on_loop_start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.started and not (self.console is not None and self.console.owns_current_thread()):
            self.attach(loop)  # not the console's own loop: it is loopwatch's, not the application's

    def _on_loop_stop(self, loop: asyncio.AbstractEventLoop) -> None:
        for probe in self.loops.probes:
            if probe.loop is loop:
                probe.pause()
                self.fallback.pause(probe)

    def _on_loop_close(self, loop: asyncio.AbstractEventLoop) -> None:
        """A uvloop loop is about to close: our libuv handles must be closed first (uvloop's close walks
        every handle of the loop and takes each for one of its own)."""
        for probe in self.loops.probes:
            if probe.loop is loop and probe.activity is not None:
                probe.activity.uninstall()

    # -- dumps -----------------------------------------------------------------------------------
    def dump(self, reason: str = "manual") -> Path:
        """Write a dump now (from any thread); raises ``RuntimeError`` if dumps are disabled."""
        if not self.started:
            raise RuntimeError("loopwatch is not installed")
        if not self.dumps.enabled:
            raise RuntimeError(f"loopwatch dumps are disabled: {self.writer.disabled_reason}")
        frames = _frames.current_frames()
        here = _os.get_ident()
        probes = self.loops.probes
        probe = next((p for p in probes if p.thread_ident == here), probes[0] if probes else None)
        loop_stack = _frames.stack_of(frames.get(probe.thread_ident)) if probe else []
        threads = _frames.all_thread_stacks(frames)
        del frames
        loop = probe.loop if probe is not None else None
        tasks = _frames.task_stacks(loop) if loop is not None and not loop.is_closed() else []
        lag = self.loops.lag_of(probe, self._clock()) if probe is not None and probe.running else None
        dump = self.dumps.build(safe_reason(reason), loop=probe.label if probe else None, stall_seconds=lag,
                                loop_stack=loop_stack, threads=threads, tasks=tasks, source="manual",
                                context=self._loop_context(loop))
        return self.dumps.write_or_raise(dump)

    def _console_view(self) -> ConsoleView:
        """What the console's commands read (none of it holds the agent)."""
        parts = {"threads": (self.threads, self.gil), "executors": (self.executors,), "pools": (self.pools,)}

        def figures(name: str) -> list[Any]:
            return [family for part in parts[name] if part is not None for family in part.collect()]

        watchdog, requests = self.watchdog, self.requests
        return ConsoleView(snapshot=weak(self.snapshot), threshold=self.options.dump_threshold,
                           in_progress=watchdog.in_progress, recent=lambda: tuple(watchdog.recent),
                           dump_now=lambda: requests.dump_now("console"), figures=figures, clock=self._clock)

    # -- inspection ------------------------------------------------------------------------------
    @property
    def metrics_url(self) -> str | None:
        """The built-in exporter's URL, or ``None`` (port 0, or it could not bind)."""
        return self.exporter.url if self.exporter is not None else None

    def snapshot(self) -> AgentSnapshot:
        now = self._clock()
        loops = tuple(LoopSnapshot(p.label, p.thread_name, p.running, self.loops.lag_of(p, now), p.last_delay)
                      for p in self.loops.probes)  # the lag as event_loop_lag_seconds has it
        return AgentSnapshot(self.metrics_url, self.options.dump_dir, self.dumps.enabled,
                             tuple(self._degrade.notes), loops, pid=os.getpid())


def _tls(options: Options) -> ssl.SSLContext | None:
    if options.metrics_certfile is None or options.metrics_keyfile is None:
        return None
    return tls_context(options.metrics_certfile, options.metrics_keyfile, options.metrics_client_cafile,
                       options.metrics_client_capath, options.metrics_client_auth_required)


def _log_slow(event: SlowCallback) -> None:
    fields = dataclasses.asdict(event)
    fields["duration"] = round(event.duration, 6)
    fields["callback"] = fields.pop("label")
    fields.pop("context")
    emit("warning", "loopwatch.slow_callback", **fields, **event_fields(event.context))
