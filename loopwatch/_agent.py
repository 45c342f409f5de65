"""The agent: owns the metrics, the probes (one per watched loop), the watchdog thread, the dump
writer, the faulthandler watch, the exporter and the loop hooks -- and undoes all of it on ``stop()``.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import errno
import os
import re
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from . import _fork, _forksafe, _frames
from . import _unpatched as _os
from ._config import Options
from ._dumps import DumpWriter, build_dump, safe_reason, write_private
from ._errors import ConfigError
from ._executors import Executors
from ._exporter import Exporter
from ._gc import GcPasses
from ._gil import GilContention, GilProbe
from ._gilheld import FALLBACK_AFTER, GilHeldStacks, leftover_dumps
from ._hooks import LoopHooks, known_loop_method
from ._iteration import ACCELERATED, BeatActivity, UvActivity, UvStretches
from ._log import Guard, emit
from ._metrics import Metrics
from ._pools import Pools
from ._probe import LoopProbe, virtual_clock
from ._pyspy import NativeStacks, find_pyspy
from ._slow import IterationTimer, SlowCallback, SlowCallbackMetrics, SlowCallbacks
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
    """A running loopwatch agent.  Create it with :func:`loopwatch.install`."""

    def __init__(self, options: Options, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self._clock = clock
        self.metrics = Metrics(options.namespace, options.service, options.lag_thresholds,
                               live_lag=self._live_lag)
        self.guard = Guard(self.metrics.count_error)
        self.metrics.on_error = lambda component, exc: self.guard.report(component, exc)
        on = options.enabled  # a feature named in ``disable`` exports, patches and runs nothing
        self.task_health = TaskHealth(self, export=on("tasks"))
        self.slow_metrics = SlowCallbackMetrics(self.metrics, self.probes, slow=on("slow_callbacks"))
        self.slow = SlowCallbacks(options.slow_callback_threshold, observe=self.slow_metrics.observe,
                                  log=self._log_slow, clock=clock)
        self.metrics.add_part("collector", lambda: self.slow_metrics.collect(self.slow.counts))
        self.threads = ThreadCpu(self.metrics, clock=clock)
        if on("threads"):
            self.metrics.add_part("threads", self.threads.collect, reset=self.threads.reset)
        self.gil = GilContention(self.metrics)
        if on("gil"):
            self.metrics.add_part("gil", self.gil.collect, reset=self.gil.reset)
        self.gil_probe = GilProbe(self.gil, options.gil_probe_interval,
                                  on_error=lambda exc: self.guard.report("gil", exc))
        self.executors = Executors(self.metrics, threshold=options.executor_wait_threshold, clock=clock,
                                   on_error=lambda exc: self.guard.report("executor", exc))
        if on("executors"):
            self.metrics.add_part("executor", self.executors.collect, reset=self.executors.reset)
        self.pools = Pools(self.metrics, clock=clock, on_error=lambda exc: self.guard.report("pool", exc))
        if on("pools"):
            self.metrics.add_part("pool", self.pools.collect, reset=self.pools.reset)
        self.writer = DumpWriter(options.dump_dir, keep=options.dump_keep, cooldown=options.dump_cooldown,
                                 clock=clock)
        self._lock = _forksafe.rlock()
        self._probes: tuple[LoopProbe, ...] = ()
        # Loops not watched because their clock is not real (test loops that fast-forward time).
        self._left_alone: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self.accelerated = options.accelerator and ACCELERATED
        self._gilheld: GilHeldStacks | None = None  # stacks of stalls that hold the GIL (see _gilheld)
        self._gilheld_owner: LoopProbe | None = None
        self.gc = GcPasses(accelerated=self.accelerated)
        self._exporter: Exporter | None = None
        self._hooks = LoopHooks(self._on_loop_start, self._on_loop_stop, self._on_loop_close,
                                lambda exc: self.guard.report("hooks", exc))
        self.watchdog = Watchdog(options=options, probes=self.probes, count_spike=self.metrics.count_spike,
                                 writer=self.writer, guard=self.guard, slow=self.slow, build_dump=self.build_dump,
                                 write_dump=self.write_dump, detach=self.detach, gilheld=self.gilheld_for,
                                 gc=self.gc, accelerated=self.accelerated, clock=clock)
        self._degraded: list[str] = []
        self.native_stacks: NativeStacks | None = None
        self._registered = False
        self.started = False
        self.fork_pending = False  # a forked child that has not resumed yet (see _fork)
        self.parent_pid: int | None = None  # set in a forked child

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Register, prepare and start everything; only a registry clash raises (nothing is left)."""
        try:
            self.options.registry.register(self.metrics)
        except ValueError as exc:
            raise ConfigError(
                f"registry already has metrics named like {self.options.namespace}_*: {exc}; "
                f"pass another namespace, or another registry") from None
        self._registered = True
        self.started = True
        self.writer.prepare()
        if not self.writer.enabled:
            self._degrade("dumps", self.writer.disabled_reason or "disabled")
        else:
            with self.guard("dump"):
                self._convert_leftovers()
            if self.options.faulthandler:
                self._open_gilheld()
        if self.options.metrics_port:
            self._start_exporter()
        self._hooks.install()
        for note in self._hooks.notes:
            self._degrade("hooks", note)
        self.gc.install()
        self.watchdog.start()
        self.gil_probe.start()
        if self.options.native_stacks:
            self._start_native_stacks()
        atexit.register(self.stop)
        _fork.register(self)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        probe = self.attach(loop) if loop is not None else None
        emit("info", "loopwatch.installed", version=__version__, namespace=self.options.namespace,
                    service=self.options.service, pid=os.getpid(), metrics_url=self.metrics_url,
                    dump_dir=str(self.options.dump_dir), dumps=self.writer.enabled,
                    loop=None if probe is None else probe.label)

    def stop(self) -> None:
        """Stop threads, cancel probes, undo patches, unregister the metrics.  Idempotent."""
        if not self.started:
            return
        self.started = False
        _fork.unregister(self)
        atexit.unregister(self.stop)
        self._hooks.uninstall()
        self.gil_probe.stop()
        self.watchdog.stop()
        self.watchdog.drain()
        self.gc.uninstall()
        with self._lock:
            probes, self._probes = self._probes, ()
            self._gilheld_owner = None
        with self.guard("hooks"):
            self.task_health.stop()
        with self.guard("executor"):
            self.executors.stop()
        with self.guard("pool"):
            self.pools.stop()
        for probe in probes:
            with self.guard("probe"):
                probe.stop()
                if probe.activity is not None:
                    probe.activity.uninstall()
        if self._gilheld is not None:
            with self.guard("faulthandler"):
                self._gilheld.close()
            self._gilheld = None
        if self._exporter is not None:
            with self.guard("exporter"):
                self._exporter.close()
            self._exporter = None
        if self._registered:
            self._registered = False
            try:
                self.options.registry.unregister(self.metrics)
            except KeyError:
                pass
        emit("info", "loopwatch.uninstalled")

    def _start_native_stacks(self) -> None:
        binary = find_pyspy()
        if binary is None:
            self._degrade("native_stacks", "py-spy not found next to the interpreter or on PATH: "
                                           "pip install 'loopwatch[pyspy]'")
            return
        if not self.writer.enabled:
            return  # no dumps to add native stacks to (already reported as degraded)
        self.native_stacks = NativeStacks(
            binary=binary, degrade=lambda reason: self._degrade("native_stacks", reason),
            on_error=lambda exc: self.guard.report("native_stacks", exc), log=emit)

    def _degrade(self, feature: str, reason: str) -> None:
        self._degraded.append(f"{feature}: {reason}")
        emit("warning", "loopwatch.degraded", feature=feature, reason=reason)

    def _start_exporter(self) -> None:
        ports = self.options.metrics_ports
        exporter = Exporter(self.options.metrics_addr, ports, self.options.registry)
        exporter.on_error = lambda exc: self.guard.report("exporter", exc)
        try:
            exporter.start()
        except OSError as exc:
            self.metrics.count_error("exporter")
            where = f"{self.options.metrics_addr}:{self.options.metrics_port_text}"
            if len(ports) > 1 and exc.errno == errno.EADDRINUSE:
                why = f"no free port in the range {self.options.metrics_port_text} ({exc.strerror or exc})"
            else:
                why = str(exc.strerror or exc)
            self._degrade("exporter", f"cannot serve /metrics on {where}: {why}; metrics are "
                                      f"still collected in the registry")
            return
        self._exporter = exporter

    def _open_gilheld(self) -> None:
        try:
            created_ms = int(psutil.Process().create_time() * 1000)
            gilheld = GilHeldStacks(self.options.dump_dir, pid=os.getpid(), created_ms=created_ms,
                                    service=self.options.service)
            why = gilheld.open()
        except (OSError, psutil.Error, ValueError, RuntimeError) as exc:
            self.metrics.count_error("faulthandler")
            self._degrade("faulthandler", f"cannot set up stacks of stalls that hold the GIL: {exc}")
            return
        if why is not None:
            self._degrade("faulthandler", f"stalls that hold the GIL are counted without a stack: {why}")
            return
        self._gilheld = gilheld

    # -- loops -----------------------------------------------------------------------------------
    def probes(self) -> tuple[LoopProbe, ...]:
        return self._probes

    def attach(self, loop: asyncio.AbstractEventLoop) -> LoopProbe | None:
        """Watch ``loop`` (or resume watching it).  Must be called in the loop's thread."""
        if self.fork_pending:
            _fork.resume(self)
        with self._lock:
            for probe in self._probes:
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
            for closed in [p for p in self._probes if p.closed]:
                self._detach_locked(closed)
            if len(self._probes) >= MAX_LOOPS:
                self.guard.report("probe", RuntimeError(f"more than {MAX_LOOPS} loops; not watching more"))
                return None
            probe = LoopProbe(loop, self._new_label(), interval=self.options.probe_interval,
                              late_threshold=self.options.dump_threshold, observe=self.metrics.observe_delay,
                              on_error=lambda exc: self.guard.report("probe", exc),
                              on_collected=self._on_collected, on_virtual_clock=self._on_virtual_clock,
                              clock=self._clock)
            self.metrics.add_loop(probe.label)
            probe.activity = self._activity_for(loop, probe)
            if getattr(probe.activity, "parkable", False):
                probe.activity.set_park(self.watchdog.park)
            gilheld = self._gilheld
            owner = self._gilheld_owner
            if gilheld is not None and (owner is None or not owner.running or owner.closed):
                self._gilheld_owner = probe
                why = gilheld.watch(probe.native_id, probe.thread_ident)
                if why is not None:
                    self._gilheld_owner = None
                    self.guard.report("faulthandler", RuntimeError(why))
            self._probes = (*self._probes, probe)
        probe.start()
        self._arm_fallback(probe)
        with self.guard("hooks"):
            if self.options.enabled("tasks"):
                if known_loop_method(loop, "call_exception_handler"):
                    self.task_health.attach(probe)
                else:
                    self._not_patched(loop, "call_exception_handler", probe)
        with self.guard("executor"):
            if not self.options.enabled("executors"):
                pass  # ``disable=executors``: run_in_executor left as it is
            elif not known_loop_method(loop, "run_in_executor"):
                self._not_patched(loop, "run_in_executor", probe)
            elif not self.executors.attach(loop, probe.label):
                self._degrade("executor", f"cannot wrap {type(loop).__qualname__}.run_in_executor: the default "
                                          f"executor of loop {probe.label!r} is not measured")
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
        """The loop starts running: a stall that holds the GIL before the watchdog's next look (at most
        ``SAMPLE_AT`` of the threshold away) still gets its stack; the watchdog re-arms it from then on."""
        if probe is self._gilheld_owner and self._gilheld is not None:
            with self.guard("faulthandler"):
                self._gilheld.arm(self._clock() + SAMPLE_AT * self.options.dump_threshold + FALLBACK_AFTER)

    def _new_label(self) -> str:
        thread = _os.current_thread()
        base = "main" if thread is _os.main_thread() else re.sub(r"\s+", "_", thread.name)[:64]
        taken = {p.label for p in self._probes}
        label, n = base, 2
        while label in taken:
            label, n = f"{base}-{n}", n + 1
        return label

    def detach(self, probe: LoopProbe) -> None:
        """Stop watching ``probe``'s loop (it was closed): its series disappear."""
        with self._lock:
            self._detach_locked(probe)

    def _detach_locked(self, probe: LoopProbe) -> None:
        if probe not in self._probes:
            return
        self._probes = tuple(p for p in self._probes if p is not probe)
        probe.stop()
        self.task_health.detach(probe)
        self.executors.detach(probe.label)
        if probe.activity is not None:
            probe.activity.uninstall()
        self.metrics.remove_loop(probe.label)
        self.slow_metrics.remove_loop(probe.label)
        self.slow.counts.pop(probe.label, None)
        if self._gilheld_owner is probe:
            self._gilheld_owner = None
            if self._gilheld is not None:
                self._gilheld.watch(None)

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

    def _log_slow(self, event: SlowCallback) -> None:
        fields = dataclasses.asdict(event)
        fields["duration"] = round(event.duration, 6)
        fields["callback"] = fields.pop("label")
        emit("warning", "loopwatch.slow_callback", **fields)

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
        """The loop was garbage-collected (weakref callback, any thread, maybe inside the GC)."""
        if self._lock.acquire(blocking=False):
            try:
                with self.guard("probe"):
                    self._detach_locked(probe)
            finally:
                self._lock.release()
        else:
            self.watchdog.poke(always=True)  # the watchdog detaches it

    def _on_loop_start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.started:
            self.attach(loop)

    def _on_loop_stop(self, loop: asyncio.AbstractEventLoop) -> None:
        for probe in self._probes:
            if probe.loop is loop:
                probe.pause()
                if probe is self._gilheld_owner and self._gilheld is not None:
                    self._gilheld.disarm()

    def _on_loop_close(self, loop: asyncio.AbstractEventLoop) -> None:
        """A uvloop loop is about to close: our libuv handles must be closed first (uvloop's close walks
        every handle of the loop and takes each for one of its own)."""
        for probe in self._probes:
            if probe.loop is loop and probe.activity is not None:
                probe.activity.uninstall()

    def gilheld_for(self, probe: LoopProbe) -> GilHeldStacks | None:
        return self._gilheld if probe is self._gilheld_owner else None

    def _live_lag(self) -> Iterator[tuple[str, float]]:
        try:
            now = self._clock()
            values = [(p.label, self.lag_of(p, now)) for p in self._probes]
        except Exception as exc:  # noqa: BLE001 - a scrape must never fail because of us
            self.guard.report("collector", exc)
            return iter(())
        return iter(values)

    @staticmethod
    def lag_of(probe: LoopProbe, now: float) -> float:
        """How long ``probe``'s loop has been stuck right now: the age of the busy stretch in progress
        (0 while it waits); on the beat fallback, how overdue its beat is."""
        if not probe.running:
            return 0.0
        activity = probe.activity
        if activity is None or not activity.exact:
            return probe.lag(now)
        since = activity.busy_since(now)
        return 0.0 if since is None else max(0.0, now - since)

    # -- dumps -----------------------------------------------------------------------------------
    def build_dump(self, reason: str, **fields: Any) -> dict[str, Any]:
        """A dump of this service and process (see ``_dumps.build_dump``)."""
        return build_dump(reason, **{"service": self.options.service, **fields})

    def write_dump(self, dump: dict[str, Any]) -> Path | None:
        """Write a dump from the agent's own threads: failures are counted and logged, never raised."""
        try:
            path = self.writer.write(dump)
        except OSError as exc:
            self.guard.report("dump", exc, dump_dir=str(self.options.dump_dir))
            return None
        self._after_write(dump, path)
        return path

    def _after_write(self, dump: dict[str, Any], path: Path) -> None:
        self.metrics.count_dump(dump["reason"])
        if self.native_stacks is not None and dump.get("source") == "watchdog" and dump["reason"] == "event_loop_lag":
            self._enrich_natively(dump, path)
        culprit = dump.get("culprit")
        emit("warning", "loopwatch.dump", reason=dump["reason"], path=str(path), loop=dump.get("loop"),
                       stall_seconds=dump.get("stall_seconds"), source=dump.get("source"),
                       culprit=None if not culprit else
                       f"{culprit['filename']}:{culprit['lineno']} in {culprit['function']}")

    def _enrich_natively(self, dump: dict[str, Any], path: Path) -> None:
        """py-spy adds the loop thread's native stack to this mid-stall dump, if the stall lasts."""
        probe = next((p for p in self._probes if p.label == dump.get("loop")), None)
        if probe is None or self.native_stacks is None or probe.activity is None:
            return
        activity = probe.activity
        since = activity.busy_since(self._clock())

        def still_stalled() -> bool:
            return since is not None and probe.running and activity.busy_since(self._clock()) == since

        with self.guard("native_stacks"):
            self.native_stacks.enrich(path, probe.native_id, still_stalled, write=write_private)

    def dump(self, reason: str = "manual") -> Path:
        """Write a dump now (from any thread); raises ``RuntimeError`` if dumps are disabled."""
        if not self.started:
            raise RuntimeError("loopwatch is not installed")
        if not self.writer.enabled:
            raise RuntimeError(f"loopwatch dumps are disabled: {self.writer.disabled_reason}")
        frames = _frames.current_frames()
        here = _os.get_ident()
        probes = self._probes
        probe = next((p for p in probes if p.thread_ident == here), probes[0] if probes else None)
        loop_stack = _frames.stack_of(frames.get(probe.thread_ident)) if probe else []
        threads = _frames.all_thread_stacks(frames)
        del frames
        loop = probe.loop if probe is not None else None
        tasks = _frames.task_stacks(loop) if loop is not None and not loop.is_closed() else []
        lag = self.lag_of(probe, self._clock()) if probe is not None and probe.running else None
        dump = self.build_dump(safe_reason(reason), loop=probe.label if probe else None, stall_seconds=lag,
                               loop_stack=loop_stack, threads=threads, tasks=tasks, source="manual")
        path = self.writer.write(dump)
        self._after_write(dump, path)
        return path

    def _convert_leftovers(self) -> None:
        """In-flight files left by processes that died mid-stall become ``unfinished_stall`` dumps."""
        own = self._gilheld.path if self._gilheld is not None else None
        for dump in leftover_dumps(self.options.dump_dir, own=own, build=self.build_dump):
            self.write_dump(dump)

    # -- inspection ------------------------------------------------------------------------------
    @property
    def metrics_url(self) -> str | None:
        """The built-in exporter's URL, or ``None`` (port 0, or it could not bind)."""
        return self._exporter.url if self._exporter is not None else None

    def snapshot(self) -> AgentSnapshot:
        now = self._clock()
        loops = tuple(LoopSnapshot(p.label, p.thread_name, p.running, p.lag(now) if p.running else 0.0,
                                   p.last_delay) for p in self._probes)
        return AgentSnapshot(self.metrics_url, self.options.dump_dir, self.writer.enabled,
                             tuple(self._degraded), loops, pid=os.getpid())
