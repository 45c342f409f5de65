"""The probe: a timer on the watched loop that measures how late it fires (``event_loop_delay_seconds``).

It is a ``call_later`` chain, not a task, so it never shows up among the application's tasks and costs
one timer callback per ``probe_interval``.  How late a timer fires is what a timer-driven workload sees
(a ``sleep(0.1)`` that takes 0.3 s), so its distribution is the loop's *delay*.  Stalls are timed by the
loop's iteration clock instead (``_iteration``), from when they began; only where that clock cannot be
read does an overdue beat stand for a stall (``_iteration.BeatActivity``).  The probe also notices a loop
whose clock stops being the real one (a test that fast-forwards it): it is then left alone.  Its state is
plain attributes that the watchdog thread and the scrape read without locks.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _unpatched as _os
from ._labels import OTHER

MAX_LOOP_LABELS = 20  # distinct loop label values, then "other"
CLOCK_TOLERANCE = 0.25  # seconds: a loop clock this far from time.monotonic() is not the real clock
_monotonic = time.monotonic
_real_time_functions = (asyncio.BaseEventLoop.time,)


def _real_time_method(loop: asyncio.AbstractEventLoop) -> bool:
    """True when ``loop.time`` is asyncio's or uvloop's own method, not replaced on the instance."""
    method = loop.time
    if getattr(method, "__self__", None) is not loop:  # a function or a Mock set on the instance
        return False
    function = getattr(method, "__func__", None)
    if function is not None:
        return function in _real_time_functions
    uvloop = sys.modules.get("uvloop")  # a C method: uvloop's, if the class takes it from uvloop.Loop
    return uvloop is not None and getattr(type(loop), "time", None) is getattr(uvloop.Loop, "time", None)


def virtual_clock(loop: asyncio.AbstractEventLoop) -> str | None:
    """Why ``loop``'s ``time()`` is not the real monotonic clock (a test loop that fast-forwards time),
    or ``None`` when it is.  Called in the loop's thread: when it starts running, and at each beat.

    asyncio's and uvloop's own ``time`` are recognised without calling them; any other ``time()`` (a
    subclass's, one patched on the instance) is read and compared with ``time.monotonic()``.
    """
    try:
        if _real_time_method(loop):
            return None
        value = loop.time()
        now = _monotonic()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value - now) <= CLOCK_TOLERANCE:
            return None
        return (f"its clock is not the monotonic clock: {type(loop).__qualname__}.time() reads {value!r}, "
                f"time.monotonic() {now:.3f}")
    except Exception as exc:  # noqa: BLE001 - a loop we cannot read the clock of is left alone too
        return f"its clock cannot be read: {type(loop).__qualname__}.time() raised {exc!r}"


@dataclass(frozen=True)
class Beat:
    """A late beat: the probe fired ``delay`` seconds after ``key`` (its due time)."""

    key: float
    delay: float
    cpu_seconds: float | None  # the loop thread's CPU time between the previous beat and this one


class LoopProbe:
    """Heartbeat of one event loop (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, label: str, *, interval: float,
                 late_threshold: float, observe: Callable[[str, float], None],
                 on_error: Callable[[BaseException], None],
                 on_collected: Callable[[LoopProbe], None] | None = None,
                 on_virtual_clock: Callable[[LoopProbe, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # A weak reference: watching a loop never keeps it alive, and a loop that is closed and dropped
        # (the end of asyncio.run) is forgotten at once, without the watchdog having to wake up.
        self._loop_ref = weakref.ref(loop, None if on_collected is None else (lambda _: on_collected(self)))
        self.label = label
        self.interval = interval
        self.thread_ident = _os.get_ident()
        self.thread_name = _os.current_thread().name
        self.native_id = _os.get_native_id()
        self._late_threshold = late_threshold
        self._observe = observe
        self._on_error = on_error
        self._on_virtual_clock = on_virtual_clock
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._cpu_at_beat = time.thread_time()
        self.expected_at = clock() + interval  # when the next beat is due
        self.last_delay = 0.0
        self.running = False
        self.stopped = False
        self.late_beats: collections.deque[Beat] = collections.deque(maxlen=64)
        self.activity: Any = None  # the loop's iteration clock (_slow, _iteration), set by the agent
        # Set by the watchdog mid-stall: (callback label, culprit, request context).
        self.stall_callback: tuple[str, str | None, dict[str, Any] | None] | None = None

    def take_stall_callback(self) -> tuple[str, str | None, dict[str, Any] | None] | None:
        """The callback the watchdog saw running mid-stall, as (label, culprit, context); read once."""
        named, self.stall_callback = self.stall_callback, None
        return named

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The watched loop, or ``None`` once it has been garbage-collected."""
        return self._loop_ref()

    @property
    def closed(self) -> bool:
        loop = self._loop_ref()
        return loop is None or loop.is_closed()

    def start(self) -> None:
        """Arm the first beat.  Must be called in the loop's thread."""
        self.stopped = False
        self.running = True
        self._schedule(self._clock())

    def resume(self) -> None:
        """The loop starts running again (after ``run_until_complete`` returned): re-arm from now."""
        if self._handle is not None:
            self._handle.cancel()
        self._cpu_at_beat = time.thread_time()
        if self.activity is not None:
            self.activity.reset()
        self.start()

    def pause(self) -> None:
        """The loop stopped running; its heartbeat is not a stall until it runs again.

        Called in the loop's thread.  The pending beat is dropped: it would keep the loop alive.
        """
        self.running = False
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
        if self.activity is not None:
            self.activity.pause()

    def stop(self) -> None:
        """Stop beating; safe from any thread."""
        self.stopped = True
        self.running = False
        handle = self._handle
        if handle is None:
            return
        loop = self.loop
        if _os.get_ident() == self.thread_ident:
            handle.cancel()
        elif loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(handle.cancel)
            except RuntimeError:  # closed in between
                pass

    def lag(self, now: float) -> float:
        """The current lag: how overdue the beat is, or the last beat's lateness if none is overdue."""
        overdue = now - self.expected_at
        return overdue if overdue > self.last_delay else self.last_delay

    def _schedule(self, now: float) -> None:
        self.expected_at = now + self.interval
        loop = self.loop
        if loop is not None:
            self._handle = loop.call_later(self.interval, self._fire)

    def _fire(self) -> None:
        if self.stopped:
            return
        try:
            now = self._clock()
            key = self.expected_at
            delay = now - key
            if self._on_virtual_clock is not None:
                loop = self.loop
                virtual = virtual_clock(loop) if loop is not None else None
                if virtual is not None:
                    # Its time() was replaced while it ran (a test that fast-forwards it): leave it alone,
                    # or our timer becomes the next event such a loop jumps to.
                    self.stopped = True
                    self._on_virtual_clock(self, virtual)
                    return
            if delay < 0.0:
                delay = 0.0
            cpu = time.thread_time()
            if delay >= self._late_threshold:
                self.late_beats.append(Beat(key, delay, cpu - self._cpu_at_beat))
            self._cpu_at_beat = cpu
            self.last_delay = delay
            self._observe(self.label, delay)
            activity = self.activity
            if activity is not None:
                activity.on_beat()
        except Exception as exc:  # noqa: BLE001 - never raise into the loop
            self._on_error(exc)
        finally:
            if not self.stopped:
                try:
                    self._schedule(self._clock())
                except Exception as exc:  # noqa: BLE001 - e.g. the loop is closing
                    self._on_error(exc)


class Loops:
    """The watched loops, one :class:`LoopProbe` each: the agent adds and removes them (under its lock),
    components read them (``loops()``, a tuple replaced whole: no lock to read) and their live lag.

    Loop labels are bounded and their series stay: ``labels`` holds every label given since install (or
    fork) -- at most ``MAX_LOOP_LABELS``, then new ones are ``other`` -- and each label's series are exported
    from its first loop on, whether or not a loop with that label is running (gauges read 0 then; counters
    carry on from where the closed loops of that label left them).  Loops that come and go in numbered
    threads are one label, so no series is created and dropped as they do."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.probes: tuple[LoopProbe, ...] = ()
        self.labels: dict[str, None] = {}  # every label given, in order
        self.busy_closed: dict[str, float] = {}  # busy seconds of the closed loops of each label
        self._clock = clock

    def new_label(self, base: str) -> str:
        """The label for a new loop whose thread's name gives ``base``: ``base``, ``base-2``... while a loop
        with that label is running; ``other`` (``other-2``...) once ``MAX_LOOP_LABELS`` labels were given."""
        taken = {p.label for p in self.probes}
        for name in (base, OTHER):
            label, n = name, 2
            while label in taken:
                label, n = f"{name}-{n}", n + 1
            if label in self.labels or len(self.labels) < MAX_LOOP_LABELS or name == OTHER:
                self.labels[label] = None
                return label
        raise AssertionError("unreachable")

    def retire(self, probe: LoopProbe) -> None:
        """``probe``'s loop is no longer watched: its busy seconds carry over to its label's counter."""
        activity = probe.activity
        busy = activity.busy_now() if activity is not None else None
        if busy is not None:
            self.busy_closed[probe.label] = self.busy_closed.get(probe.label, 0.0) + busy

    def forget(self) -> None:
        """A forked child: the parent's loops' labels and totals are not the child's."""
        self.labels.clear()
        self.busy_closed.clear()

    def idle_labels(self) -> list[str]:
        """The labels given that no watched loop has now (their gauges read 0)."""
        live = {p.label for p in self.probes}
        return [label for label in list(self.labels) if label not in live]

    def __call__(self) -> tuple[LoopProbe, ...]:
        return self.probes

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

    def live_lag(self) -> list[tuple[str, float]]:
        """``(label, lag)`` of every watched loop, now, and 0 for every label no loop has now
        (``event_loop_lag_seconds``)."""
        now = self._clock()
        return [(p.label, self.lag_of(p, now)) for p in self.probes] + [(label, 0.0) for label in self.idle_labels()]

    def stall_of(self, label: str) -> tuple[int, Callable[[], bool]] | None:
        """The stall going on in loop ``label``: its thread's native id, and whether it is still the same
        stall (py-spy's stack is kept only if so)."""
        probe = next((p for p in self.probes if p.label == label), None)
        if probe is None or probe.activity is None:
            return None
        activity, clock = probe.activity, self._clock
        since = activity.busy_since(clock())

        def still_stalled() -> bool:
            return since is not None and probe.running and activity.busy_since(clock()) == since

        return probe.native_id, still_stalled
