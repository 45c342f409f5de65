"""Slow callbacks and loop utilization, without asyncio's debug mode.

Timing every callback costs ~2,400 instructions each (~27% of a callback-heavy loop), so by default loopwatch
times **loop iterations** instead: on the stdlib loop it wraps the loop's selector ``select()`` (one
instance attribute, undone on detach).  The time between ``select()`` returning and the next call is the
iteration's busy time: summed, it is ``event_loop_busy_seconds_total``; an iteration busier than
``slow_callback_threshold`` is a slow callback.  Naming it:

* if the stall also crossed the first lag threshold, the watchdog took the loop thread's stack while it
  was going on, and names the callback that was running;
* otherwise it is counted as ``unattributed`` and **exact timing switches on** for that loop for
  ``EXACT_WINDOW`` seconds (extended while slow callbacks keep coming): ``asyncio.events.Handle._run``
  is wrapped and every callback of that loop is timed, so a slow callback that recurs -- the usual case
  in production -- is named exactly, task name and coroutine included.  With ``slow_callback_mode=
  "exact"`` it is always on.  The wrapper is removed when no loop needs it.

uvloop's loop has no Python selector and its handles cannot be wrapped: there, busy time is the loop
thread's on-CPU time (schedstat, read at scrape time), and the slow callbacks counted are the stalls the
watchdog sees (past the first lag threshold), named after the task step that was running mid-stall
(asyncio's current-task table, read from the watchdog thread) or ``unattributed`` for a plain callback.
"""

from __future__ import annotations

import asyncio
import asyncio.events as _events
import collections
import functools
import math
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric

from . import _forksafe
from ._component import Component, Naming, Report, ignore_error
from ._context import ContextReader, exemplar
from ._frames import is_app_file
from ._iteration import KNOWN_SELECTS, poll_clock, select_clock
from ._labels import Slots
from ._patch import Patch
from ._series import Histogram

EXACT_WINDOW = 60.0  # seconds of exact timing after an unattributed slow iteration
UNATTRIBUTED = "unattributed"
_LOG_EVERY = 1.0  # at most one loopwatch.slow_callback event per callback label per second


@dataclass(frozen=True)
class SlowCallback:
    """One slow callback (or iteration), as logged and counted."""

    loop: str
    duration: float
    label: str  # the bounded ``callback`` label value
    what: str  # "task_step", "callback" or "iteration"
    task: str | None = None
    coro: str | None = None
    source: str | None = None  # file:line where the coroutine/function is defined
    at: str | None = None  # file:line where the task stopped after the step (its next await)
    culprit: str | None = None  # innermost application frame, when a stack was taken mid-stall
    context: dict[str, Any] | None = None  # the request it served (``_context.ContextReader``), if known


def _application_coroutine(coro: Any) -> Any:
    """The outermost coroutine of the application in ``coro``'s await chain (a server's task runs a
    framework's coroutine that awaits the handler), else ``coro``."""
    current, depth = coro, 0
    while current is not None and depth < 32:
        code = getattr(current, "cr_code", None) or getattr(current, "gi_code", None)
        if code is not None and is_app_file(code.co_filename):
            return current
        current = getattr(current, "cr_await", None) or getattr(current, "gi_yieldfrom", None)
        depth += 1
    return coro


def describe_task(task: asyncio.Task) -> dict[str, Any]:
    """A task step: the task's name, its coroutine -- the outermost one of the application in its await
    chain -- where that is defined and where it stands now."""
    coro = _application_coroutine(task.get_coro())
    code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
    frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
    module = frame.f_globals.get("__name__") if frame is not None else None
    qualname = getattr(coro, "__qualname__", type(coro).__name__)
    return {
        "what": "task_step",
        "label": f"{module}.{qualname}" if module else qualname,
        "task": task.get_name(),
        "coro": qualname,
        "source": f"{code.co_filename}:{code.co_firstlineno}" if code is not None else None,
        "at": f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else None,
    }


def running_task(loop: asyncio.AbstractEventLoop | None) -> asyncio.Task | None:
    """The task whose step ``loop`` is running now, read from another thread (the watchdog, mid-stall);
    None for a plain callback.  The public ``asyncio.current_task(loop)``: with the loop given it reads
    the task that loop's thread is running (a dict lookup up to 3.13, the loop's thread state from 3.14,
    where ``asyncio.tasks._current_tasks`` is no longer filled) and runs nothing on the loop."""
    if loop is None:
        return None
    try:
        task = asyncio.current_task(loop)
    except Exception:  # noqa: BLE001 - never raise into the watchdog's look
        return None
    return task if isinstance(task, asyncio.Task) else None


def describe_callback(callback: Any) -> dict[str, Any]:
    """What ran: task name and coroutine for task steps; function and its source otherwise."""
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        return describe_task(owner)
    while isinstance(callback, functools.partial):
        callback = callback.func
    function = getattr(callback, "__func__", callback)
    code = getattr(function, "__code__", None)
    qualname = getattr(callback, "__qualname__", None) or type(callback).__qualname__
    module = getattr(callback, "__module__", None) or getattr(type(owner), "__module__", None)
    return {
        "what": "callback",
        "label": f"{module}.{qualname}" if module else qualname,
        "source": f"{code.co_filename}:{code.co_firstlineno}" if code is not None else None,
    }


def label_from_stack(frame: types.FrameType | None) -> str | None:
    """The callback running on a loop thread, from its stack: the frame just inside ``Handle._run``."""
    inner = None
    while frame is not None:
        if frame.f_code in _RUN_CODES:
            if inner is None:
                return None
            module = inner.f_globals.get("__name__")
            qualname = getattr(inner.f_code, "co_qualname", inner.f_code.co_name)
            return f"{module}.{qualname}" if module else qualname
        inner, frame = frame, frame.f_back
    return None


class SlowCallbacks:
    """Per-agent accounting: the bounded ``callback`` counter, the histogram, the log rate limit."""

    def __init__(self, threshold: float, *, observe: Callable[[str, float, dict[str, str] | None], None],
                 log: Callable[[SlowCallback], None], clock: Callable[[], float] = time.monotonic,
                 context: ContextReader | None = None) -> None:
        self.threshold = threshold
        self.context = context or ContextReader()  # reads the request context of a slow callback
        self.counts: dict[str, Slots] = {}  # per loop label
        self._clock_for_counts = clock
        self._observe = observe
        self._log = log
        self._clock = clock
        self._last_log: dict[str, float] = {}
        self._lock = _forksafe.lock()

    def record(self, event: SlowCallback) -> None:
        counts = self.counts.get(event.loop)
        if counts is None:
            counts = self.counts[event.loop] = Slots(20, clock=self._clock_for_counts)
        counts.inc(event.label)
        self._observe(event.loop, event.duration, exemplar(event.context))
        now = self._clock()
        with self._lock:
            last = self._last_log.get(event.label)
            if last is not None and now - last < _LOG_EVERY:
                return
            if len(self._last_log) > 1000:
                self._last_log.clear()
            self._last_log[event.label] = now
        self._log(event)


# -- exact mode: Handle._run wrapped while some loop needs it ---------------------------------------
_exact: dict[int, IterationTimer] = {}  # id(loop) -> its timer, while in exact mode
_exact_lock = _forksafe.lock()
_run_patch: Patch | None = None  # Handle._run wrapped (see _set_exact)


def _make_timed_run(original: Callable[[asyncio.Handle], None]) -> Callable[[asyncio.Handle], None]:
    """``Handle._run`` timed for the loops in exact mode, chained to the ``_run`` installed before it."""
    def _run(self: asyncio.Handle) -> None:
        timer = _exact.get(id(self._loop))  # type: ignore[attr-defined]
        if timer is None:  # not in exact mode (or a pass-through, left in another library's chain)
            return original(self)
        start = time.perf_counter()
        try:
            return original(self)
        finally:
            elapsed = time.perf_counter() - start
            if elapsed >= timer.threshold:
                timer.exact_slow(self, elapsed)
    return _run


# The code of asyncio's Handle._run and of our wrapper: where a callback's frames begin (label_from_stack).
_STDLIB_RUN = _events.Handle.__dict__["_run"]
_RUN_CODES = frozenset({_STDLIB_RUN.__code__, _make_timed_run(_STDLIB_RUN).__code__})


def _set_exact(timer: IterationTimer, on: bool) -> None:
    """Wrap ``Handle._run`` while some loop is in exact mode; unwrap when none is -- unless another
    library wrapped it over ours meanwhile: then ours stays in their chain, idle (``_exact`` is empty),
    and times again the next time a loop needs it."""
    global _run_patch
    with _exact_lock:
        if on:
            _exact[timer.key] = timer
        elif _exact.get(timer.key) is timer:
            del _exact[timer.key]
        if _exact and _run_patch is not None and not _run_patch.in_chain:
            _run_patch = None  # whoever patched over ours put back what it replaced: ours is out of the chain
        if _exact and _run_patch is None:
            _run_patch = Patch(_events.Handle, "_run", _make_timed_run).apply()
        elif not _exact and _run_patch is not None and _run_patch.on_top:
            _run_patch.undo()
            _run_patch = None


class IterationTimer:
    """Times one stdlib loop's iterations through its selector (see the module docstring and
    ``_iteration``): busy time, slow iterations, and the stretches long enough to be stalls."""

    times_iterations = True  # it counts the loop's slow callbacks itself
    exact = True  # stalls are timed from when they began

    def __init__(self, loop: asyncio.AbstractEventLoop, label: str, slow: SlowCallbacks, *,
                 exact_always: bool, enabled: bool = True, stall_threshold: float = math.inf,
                 stall_label: Callable[[], tuple[str, str | None] | None],
                 accelerated: bool = False, clock: Callable[[], float] | None = None) -> None:
        self._loop_ref = weakref.ref(loop)
        self.key = id(loop)  # the exact-mode key (the loop itself is not kept alive)
        self.label = label
        self.threshold = slow.threshold if enabled else math.inf
        self.stall_threshold = stall_threshold
        self._slow = slow
        self._exact_always = exact_always
        self._stall_label = stall_label
        self._accelerated = accelerated
        self._clock = clock or time.monotonic
        self._injected_clock = clock
        self._exact_until = 0.0
        self._exact_on = False
        self._patch: Patch | None = None  # the selector's select (or the epoll object inside it), timed
        self._iterations: Any = None  # its clock: read() and restart()
        self._last_busy = 0.0  # what busy_now() last returned: the counter never goes back
        self._paused = False  # the loop is not running (between run_until_complete calls)
        self._finished: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)
        self.saw_exact_slow = False
        self.not_wrapped: str | None = None  # why install() left a Python selector alone

    def install(self) -> bool:
        """Wrap the selector; False (nothing changed) where the loop has no Python selector, or one of
        a class loopwatch does not know (``not_wrapped`` says which)."""
        loop = self._loop_ref()
        selector = getattr(loop, "_selector", None)
        if selector is None:
            return False
        if getattr(type(selector), "select", None) not in KNOWN_SELECTS:
            kind = type(selector)
            self.not_wrapped = (f"the loop's selector is a {kind.__module__}.{kind.__qualname__}, not one of the "
                                f"standard library's: its select() is left alone")
            return False
        original = getattr(selector, "select", None)
        if getattr(original, "__self__", None) is not selector:  # replaced on the instance: someone else's
            self.not_wrapped = "the loop's selector.select was already replaced on the instance: left alone"
            return False
        threshold = min(self.threshold, self.stall_threshold)
        polling = poll_clock(selector, threshold, self._long, clock=self._injected_clock) if self._accelerated else None
        if polling is not None:  # the selector's own epoll/poll object, timed (see _iteration)
            self._patch = Patch(selector, "_selector", lambda inner: polling).apply()
            self._iterations = polling
        else:
            select, iterations = select_clock(original, threshold, self._long,
                                              accelerated=self._accelerated, clock=self._injected_clock)
            try:
                self._patch = Patch(selector, "select", lambda installed: select).apply()
            except AttributeError:  # a selector without an instance dict
                return False
            self._iterations = iterations
        if self._exact_always:
            self._exact_on = True
            _set_exact(self, True)
        return True

    def uninstall(self) -> None:
        self.set_park(None)
        patch, self._patch = self._patch, None
        if patch is not None:
            patch.undo()  # restored if still on top; else it keeps timing, in whoever's chain holds it
        if self._iterations is not None:
            self.busy_now()  # kept as the final value: the wrapper's clock stops here
        self._iterations = None
        if self._exact_on:
            self._exact_on = False
            _set_exact(self, False)

    def reset(self) -> None:
        """The loop (re)starts running: time outside it is not busy time."""
        self._paused = False
        if self._iterations is not None:
            self._iterations.restart(False)

    def pause(self) -> None:
        """The loop stopped running (``run_until_complete`` returned): until it runs again, busy time does
        not grow.  The stretch up to here was busy -- and is a stall if it was long (its last callback
        blocked, and the loop returned without waiting again)."""
        iterations = self._iterations
        if iterations is not None:
            start = iterations.read()[1]
            now = self._clock()
            iterations.restart(True)
            self.busy_now()
            if start is not None and now - start >= min(self.threshold, self.stall_threshold):
                self._long(start, now)
        self._paused = True

    def on_beat(self) -> None:
        """Called on the loop thread at each probe beat: ends a finished exact-timing window (kept out of
        the per-iteration wrapper, which is the hot path)."""
        if self._exact_on and not self._exact_always and self._clock() > self._exact_until:
            self._exact_on = False
            _set_exact(self, False)

    @property
    def parkable(self) -> bool:
        """The clock is the C accelerator's, which arms the watchdog's parking (see ``_accel.Park``)."""
        return hasattr(self._iterations, "park")

    def set_park(self, park: Any) -> None:
        if self.parkable:
            self._iterations.park = park

    def busy_total(self) -> float:
        """Busy seconds as the clock has them (changes with every stretch that ended)."""
        iterations = self._iterations
        return 0.0 if iterations is None else iterations.read()[0]

    def busy_since(self, now: float | None = None) -> float | None:
        """When the busy stretch in progress began, or ``None`` while the loop waits (or is not running)."""
        iterations = self._iterations
        if iterations is None or self._paused:
            return None
        return iterations.read()[1]

    def peek_finished(self) -> list[tuple[float, float]]:
        """What :meth:`finished` would return, left in place."""
        return list(self._finished)

    def finished(self) -> list[tuple[float, float]]:
        """The stretches at least ``stall_threshold`` long that ended since the last call: (start, end)."""
        out = []
        while self._finished:
            out.append(self._finished.popleft())
        return out

    def busy_now(self) -> float:
        """Busy seconds so far, including the stretch in progress (grows live during a stall).

        Read from the scraping thread: the wrapper's two values are read without a lock, so a select()
        between the reads can make the sum come out short by one iteration; it is never reported below
        what was reported before (a counter that goes back is a reset to Prometheus)."""
        iterations = self._iterations
        if iterations is None or self._paused:
            return self._last_busy
        busy, start = iterations.read()
        if start is not None:
            busy += max(0.0, self._clock() - start)
        if busy < self._last_busy:
            return self._last_busy
        self._last_busy = busy
        return busy

    def _long(self, start: float, end: float) -> None:
        """A stretch at least min(slow, stall threshold) long ended (loop thread; never raises)."""
        try:
            busy = end - start
            if busy >= self.stall_threshold:
                self._finished.append((start, end))
            if busy >= self.threshold:
                self._slow_iteration(busy)
        except Exception:  # noqa: BLE001 - never raise into the loop
            pass

    def _slow_iteration(self, busy: float) -> None:
        if self._exact_on:
            exact_seen, self.saw_exact_slow = self.saw_exact_slow, False
            self._exact_until = self._clock() + EXACT_WINDOW
            if exact_seen:
                return  # counted per callback by the Handle._run wrapper (_make_timed_run)
        named = self._stall_label()  # the watchdog saw this one mid-stall: (label, culprit, context)
        self._slow.record(SlowCallback(self.label, busy, named[0] if named else UNATTRIBUTED, "iteration",
                                       culprit=named[1] if named else None, context=named[2] if named else None))
        if not self._exact_on:
            self._exact_on = True
            self._exact_until = self._clock() + EXACT_WINDOW
            _set_exact(self, True)

    def exact_slow(self, handle: asyncio.Handle, elapsed: float) -> None:
        try:
            self.saw_exact_slow = True
            info = describe_callback(handle._callback)  # type: ignore[attr-defined]
            context = self._slow.context.of_task(handle)  # the context the callback (a task step) ran in
            self._slow.record(SlowCallback(self.label, elapsed, info.pop("label"), info.pop("what"),
                                           context=context, **info))
        except Exception:  # noqa: BLE001
            pass


class SlowCallbackMetrics(Component):
    """The slow callbacks / utilization component: its recorder (:class:`SlowCallbacks`, ``slow``),
    ``slow_callbacks_total{loop, callback}``, ``slow_callback_duration_seconds{loop}`` and
    ``event_loop_busy_seconds_total{loop}``."""

    def __init__(self, naming: Naming, probes: Callable[[], Any], *, threshold: float,
                 log: Callable[[SlowCallback], None], clock: Callable[[], float] = time.monotonic,
                 slow: bool = True, context: ContextReader | None = None, report: Report = ignore_error) -> None:
        super().__init__(naming, report=report)
        self._probes = probes
        self._slow = slow  # False with ``disable=slow_callbacks``: only utilization is exported
        self.slow = SlowCallbacks(threshold, observe=self.observe, log=log, clock=clock, context=context)
        self._new_histogram()

    def _new_histogram(self) -> None:
        self.histogram = Histogram(
            "slow_callback_duration_seconds", "Durations of callbacks over slow_callback_threshold.",
            ["service", "loop"], namespace=self.naming.namespace,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))

    def after_fork(self) -> None:
        """The child's own counts (the agent detaches the parent's loops)."""
        self.slow.counts.clear()
        self._new_histogram()

    def observe(self, loop: str, duration: float, exemplar: dict[str, str] | None = None) -> None:
        self.histogram.labels(self.naming.service, loop).observe(duration, exemplar)

    def add_loop(self, loop: str) -> None:
        self.histogram.labels(self.naming.service, loop)

    def families(self) -> list[Metric]:
        counts = self.slow.counts
        service = self.naming.service
        slow = self.naming.family(CounterMetricFamily, "slow_callbacks",
                                    "Callbacks over slow_callback_threshold, by callback (first 20 seen, rest in "
                                    "'other').", ["loop", "callback"])
        for loop, per_loop in list(counts.items()):
            for callback, value in per_loop.items():
                slow.add_metric([service, loop, callback], value)
        busy = self.naming.family(CounterMetricFamily, "event_loop_busy_seconds",
                                    "Time the loop spent running callbacks rather than waiting for I/O; "
                                    "rate() is utilization.", ["loop"])
        loops = self._probes
        closed = dict(getattr(loops, "busy_closed", {}))  # the closed loops' seconds, by label
        for probe in loops():
            activity = getattr(probe, "activity", None)
            value = activity.busy_now() if activity is not None else None
            if value is not None:
                busy.add_metric([service, probe.label], closed.pop(probe.label, 0.0) + value)
        for label in getattr(loops, "idle_labels", list)():
            if label in closed:  # a label whose loops were measured: its total stays
                busy.add_metric([service, label], closed[label])
        return [slow, *self.histogram.collect(), busy] if self._slow else [busy]
