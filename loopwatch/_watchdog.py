"""The watchdog thread: sees stalls while they are still going on, timed from when they began.

Each watched loop has an iteration clock (``_iteration``): when the busy stretch in progress began -- the
moment the loop stopped waiting for I/O -- or that it is waiting.  A stall is a stretch longer than the
first lag threshold, whatever its phase relative to any timer, and its age is how long the loop has been
stuck.  The watchdog sleeps until the earliest moment a stretch in progress could cross a threshold (or,
with every loop idle, for ``SAMPLE_AT`` of the first threshold: a stretch that begins meanwhile cannot
cross it sooner), so it looks at a stall exactly when it crosses each threshold:

* at ``SAMPLE_AT`` of the first threshold it samples the loop thread's clocks (the stall's ``kind`` is
  judged on a window inside it);
* at the first threshold it reads the request context of the task that is running (``_context``: its
  OpenTelemetry span, its structlog keys -- the exemplar of the spike counts), counts the spike, takes the
  loop thread's stack with
  ``sys._current_frames()``, re-checks that the same stretch is still going on (else the stack belongs to
  healthy code and is discarded) and writes the dump -- ``stall_seconds`` is the stall's age then;
* at each further threshold it counts that spike, live;
* when the stretch ends, the clock reports it with its exact start and end: the ``loopwatch.stall`` event
  has its real duration.

Dump requests from outside (``loopwatch dump PID``, see ``_remote``) wake it through a pipe it also sleeps
on; it answers them (``DumpRequests.serve``) before each look.  For the console it keeps the last
``RECENT_STALLS`` stalls that ended (``recent``) and lists the ones going on (``in_progress``).

A stall that holds the GIL stops the watchdog too; the kernel timer of ``_gilheld`` then makes the loop
thread write its own stack, and the watchdog turns it into the dump as soon as it runs again.  A look
much later than planned means the watchdog was starved (the GIL held, the process paused): a stack taken
then would show whatever runs after the blocking call, so it is not taken.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _frames
from . import _unpatched as _os
from ._component import Component
from ._context import ContextReader, event_fields, exemplar
from ._cputime import ThreadClock, ThreadSample, classify
from ._gilheld import FALLBACK_AFTER, REPEAT, GilHeldStacks
from ._iteration import _accel
from ._log import Guard, emit
from ._probe import LoopProbe
from ._slow import (
    UNATTRIBUTED,
    SlowCallback,
    SlowCallbacks,
    describe_task,
    label_from_stack,
    running_task,
)
from ._waker import Waker

RECENT_STALLS = 32  # the ended stalls the console lists (a ring)
SAMPLE_AT = 0.9  # share of the first threshold at which the loop thread's clocks are first sampled
MIN_KIND_WINDOW = 0.02  # seconds: the shortest window inside a stall that its kind is judged on
LATE = 0.1  # seconds: a look this much later than planned was starved (GIL held, process paused)
MAX_SLEEP = 5.0  # the watchdog looks at least this often (closed loops, housekeeping)
KEY_TOLERANCE = 0.002  # seconds: a stretch's start as seen live and as reported at its end (uvloop: ms)
MAX_RESTARTS = 10  # the watchdog thread restarts after an error, at most this many times
MAX_PENDING = 8  # live stalls per loop waiting for their end (a bound, never reached in practice)
_DUMP_FAILED = "the dump could not be written: see loopwatch.error and errors_total{component=\"dump\"}"


@dataclasses.dataclass
class Stall:
    key: float  # when the stall began: the start of the stretch
    counted: set[float] = dataclasses.field(default_factory=set)
    captured: bool = False  # a live capture was attempted (one per stall)
    dump_path: Path | None = None
    culprit: dict[str, Any] | None = None
    source: str | None = None
    note: str | None = None
    task: dict[str, Any] | None = None  # the task step running mid-stall (describe_task), if any
    kind: str | None = None  # as judged for its dump
    before: ThreadSample | None = None  # the loop thread's clocks at the last look before it began
    context: dict[str, Any] | None = None  # the request the blocked task served (``_context``), if seen live


@dataclasses.dataclass
class _ProbeState:
    clock: ThreadClock
    stalls: list[Stall] = dataclasses.field(default_factory=list)  # seen live, waiting for their end
    # The loop thread's clocks sampled inside the stall that began at ``sampled_key`` (first and latest),
    # so that the time before it (busy or not) cannot colour its kind; and the sample of the previous look.
    sampled_key: float | None = None
    samples: list[ThreadSample] = dataclasses.field(default_factory=list)
    previous: ThreadSample | None = None
    blocks: list[tuple[float, str]] = dataclasses.field(default_factory=list)  # (fired at, stack text)
    busy_seen: float | None = None  # the clock's busy total at the last look
    idle: bool = False  # at the last look: waiting, and no stretch ended since the look before
    def pending(self, key: float) -> Stall | None:
        return next((s for s in self.stalls if abs(s.key - key) <= KEY_TOLERANCE), None)

    def sample_stall(self, key: float, now: float) -> None:
        if self.sampled_key is None or abs(self.sampled_key - key) > KEY_TOLERANCE:
            self.sampled_key, self.samples = key, []
        if len(self.samples) < 2:
            self.samples.append(self.clock.sample(now))
        else:
            self.samples[1] = self.clock.sample(now)  # keep the first and the latest

    def before(self, key: float) -> ThreadSample | None:
        """The sample of the last look before ``key``, if the previous look was before it."""
        previous = self.previous
        return previous if previous is not None and previous.wall <= key + KEY_TOLERANCE else None

    def kind(self, key: float, duration: float, now: float,
             before: ThreadSample | None = None) -> tuple[str, float | None]:
        """``(kind, cpu_seconds)`` of the stall that began at ``key``: over samples taken inside it, else
        over the window from the look before it to now (the stall plus some healthy time)."""
        if self.sampled_key is not None and abs(self.sampled_key - key) <= KEY_TOLERANCE and len(self.samples) >= 2:
            first, last = self.samples[0], self.samples[-1]
            if last.wall - first.wall >= MIN_KIND_WINDOW:
                return classify(first, last, last.wall - first.wall)
        before = before or self.before(key)
        if before is not None:
            return classify(before, self.clock.sample(now), duration)
        return "unknown", None


class Watchdog(Component):
    """Stall detection logic plus the thread that drives it (``tick`` is callable directly in tests).  A
    component with no series of its own: it counts spikes in ``LoopLag``'s and writes through ``Dumps``."""

    component = "watchdog"

    def __init__(self, *, options: Any, probes: Callable[[], tuple[LoopProbe, ...]],
                 count_spike: Callable[[str, float], None], writer: Any, guard: Guard, slow: SlowCallbacks,
                 build_dump: Callable[..., dict[str, Any]], write_dump: Callable[[dict[str, Any]], Path | None],
                 update_dump: Callable[[Path, dict[str, Any]], bool] = lambda path, fields: False,
                 detach: Callable[[LoopProbe], None], gilheld: Callable[[LoopProbe], GilHeldStacks | None],
                 gc: Any = None, accelerated: bool = False, requests: Any = None,
                 context: ContextReader | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(report=guard.report)
        self._options = options
        self._thresholds = tuple(options.lag_thresholds)
        self._threshold = options.dump_threshold
        self._probes = probes
        self._count_spike = count_spike
        self._writer = writer
        self._guard = guard
        self._slow = slow
        self._build_dump = build_dump
        self._write_dump = write_dump
        self._update_dump = update_dump
        self._detach = detach
        self._gilheld = gilheld
        self._gc = gc
        self._accelerated = accelerated
        self._context = context or ContextReader()
        # Dump requests from outside (``_remote.DumpRequests``): a pipe this thread also sleeps on, and
        # ``serve(now)``, called at every wake-up.
        self._requests = requests
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_STALLS)
        self.park: Any = None  # _accel.Park: lets this thread sleep while every loop waits (see _park)
        self._parked_since: float | None = None  # this look follows a parked sleep
        self._clock = clock
        self._states: dict[LoopProbe, _ProbeState] = {}
        self.waker: Waker | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.looks = 0  # how many times the watchdog looked (tests count its wake-ups)

    # -- thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self.alive:
            return
        self._stopping = False
        self.waker = Waker()
        self.park = None
        if self._accelerated and _accel is not None:
            try:
                self.park = _accel.Park(self.waker.write_fd)
                self.waker.watch(self.park.timerfd)
            except OSError:  # no timerfd: the watchdog polls
                self.park = None
        request_fd = self._requests.fileno() if self._requests is not None else None
        if request_fd is not None:
            self.waker.watch(request_fd)
        self._thread = threading.Thread(target=self._run, name="loopwatch-watchdog", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Look now (a loop was attached, or closed and dropped)."""
        if self.waker is not None:
            self.waker.poke()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self.poke()
        thread = self._thread
        if thread is not None and thread is not _os.current_thread():
            thread.join(timeout)
        self._thread = None
        if self.waker is not None:
            self.waker.close()
            self.waker = None
        self.park = None  # its timerfd closes with it, once the loops' clocks have let go too (agent.stop)
        self.drain()

    def after_fork(self) -> None:
        """The thread is the parent's; the waker's descriptors are this process's copies: closed.  The
        child starts its own when it resumes.  The parent's recent stalls are not the child's."""
        self._thread = None
        self.recent.clear()
        waker, self.waker = self.waker, None
        if waker is not None:
            waker.close()

    def drain(self) -> None:
        """Finish the stalls whose ends are reported (the agent is stopping)."""
        now = self._clock()
        for probe, state in list(self._states.items()):
            with self._guard("watchdog"):
                if probe.activity is not None:
                    for start, end in probe.activity.finished():
                        self._ended(probe, state, start, end, now, late=False)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def up(self) -> bool:
        return self.alive

    def _run(self) -> None:
        """The thread: :meth:`_watch`, restarted after an error that escaped it (counted and logged as a
        ``watchdog`` error); after ``MAX_RESTARTS`` in a row it gives up, and ``agent_up{part="watchdog"}``
        says so."""
        failures = 0
        while failures < MAX_RESTARTS:
            began = _os.monotonic()
            try:
                self._watch()
                return
            except Exception as exc:  # noqa: BLE001 - never die silently
                self._guard.report("watchdog", exc)
                if self._stopping:
                    return
                failures = failures + 1 if _os.monotonic() - began < 60.0 else 1  # in a row: a minute apart
                _os.sleep(0.1)
        emit("error", "loopwatch.error", component="watchdog",
             error=f"the watchdog thread failed {MAX_RESTARTS} times in a row and stopped: stalls are no longer seen")

    def _watch(self) -> None:
        planned = self._clock()
        parked = False
        while True:
            waker = self.waker
            if waker is None:
                return
            try:
                waker.wait((self._clock() + MAX_SLEEP if parked else planned) - self._clock())
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any error (counted)
                self._guard.report("watchdog", exc)
                _os.sleep(0.1)
            if self._stopping:
                return
            now = self._clock()
            if parked:
                due = self.park.due
                self.park.unpark()
                parked = False
                self._parked_since = now
                late = due is not None and now - due > LATE
            else:
                # Late: woken past the planned look (the GIL was held, the process paused) -- also when a
                # poke (a dump request) is what woke it, once the GIL was free again.
                late = now - planned > LATE
            if self._requests is not None:
                with self._guard("dump"):
                    self._requests.serve(now)  # before the look: the stretch it asked about is still there
            wake = now + SAMPLE_AT * self._threshold
            with self._guard("watchdog"):
                wake = self.tick(now, late=late)
            self._parked_since = None
            with self._guard("gilheld"):
                parked = self._park(now)
                if not parked:
                    self._arm_fallback(wake)
            planned = wake

    def _park(self, now: float) -> bool:
        """Sleep until a loop's stretch needs a look, if every loop waits for I/O and none ran anything
        since the last look: the loops arm the parking's timers (see ``_accel.Park``).  Never parks with
        a loop whose clock cannot arm them (uvloop, the pure-Python clock, the beat fallback)."""
        park = self.park
        if park is None:
            return False
        running = []
        for probe in self._probes():
            activity = probe.activity
            state = self._states.get(probe)
            if not getattr(activity, "parkable", False) or state is None or state.stalls:
                return False
            if probe.running:
                running.append((probe, state))
        if not running or not all(state.idle for _, state in running):
            return False
        gilheld = next((g for g in (self._gilheld(p) for p, _ in running) if g is not None), None)
        if gilheld is not None:
            gilheld.disarm()  # from here the loops' stretches arm it (before park: this call drops the GIL)
        threshold = SAMPLE_AT * self._threshold
        park.park(threshold, threshold + FALLBACK_AFTER, REPEAT, gilheld.timer_value if gilheld else None)
        if any(p.activity.busy_since(now) is not None or p.activity.busy_total() != s.busy_seen for p, s in running):
            park.unpark()  # a stretch began meanwhile: look as planned
            return False
        return True

    def _arm_fallback(self, wake: float) -> None:
        """If this thread cannot look at ``wake`` (the GIL is held), the owner loop writes its own stack."""
        for probe in self._probes():
            gilheld = self._gilheld(probe)
            if gilheld is not None:
                if probe.running:
                    gilheld.arm(wake + FALLBACK_AFTER)
                else:
                    gilheld.disarm()

    # -- what the console reads ----------------------------------------------------------------------
    def in_progress(self, now: float) -> list[dict[str, Any]]:
        """The stalls going on now that the watchdog has seen cross the first threshold (any thread)."""
        out = []
        for probe, state in list(self._states.items()):
            activity = probe.activity
            since = activity.busy_since(now) if activity is not None and probe.running else None
            if since is None:
                continue
            stall = state.pending(since)
            if stall is None:
                continue
            kind = stall.kind
            if kind is None:  # no dump was written for it (cooldown): judged from the samples taken inside it
                try:
                    kind = state.kind(since, now - since, now)[0]
                except Exception:  # noqa: BLE001 - samples replaced by the watchdog meanwhile
                    kind = None
            out.append({"loop": probe.label, "duration": round(now - since, 6), "kind": kind,
                        "culprit": _location(stall.culprit), "dump": str(stall.dump_path) if stall.dump_path else None,
                        "source": stall.source, "note": stall.note, **_request(stall.context)})
        return out

    # -- logic -----------------------------------------------------------------------------------
    def tick(self, now: float, *, late: bool = False) -> float:
        """Look at every loop; returns when to look next."""
        self.looks += 1
        wake = now + min(MAX_SLEEP, SAMPLE_AT * self._threshold)
        live = set()
        for probe in self._probes():
            live.add(probe)
            state = self._states.get(probe)
            if state is None:
                state = self._states[probe] = _ProbeState(ThreadClock(probe.thread_ident, probe.native_id))
            with self._guard("watchdog"):
                due = self._check(probe, state, now, late)
                if due is not None:
                    wake = min(wake, due)
        for gone in [p for p in self._states if p not in live]:
            # Detached (its loop closed) since the last look: a stall that ended just before is still told.
            state = self._states.pop(gone)
            with self._guard("watchdog"):
                if gone.activity is not None:
                    for start, end in gone.activity.finished():
                        self._ended(gone, state, start, end, now, late=late)
        return max(wake, now + 0.001)

    def _check(self, probe: LoopProbe, state: _ProbeState, now: float, late: bool) -> float | None:
        if probe.closed:
            self._detach(probe)
            return None
        activity = probe.activity
        if activity is None:
            return None
        self._take_blocks(probe, state)
        for start, end in activity.finished():
            self._ended(probe, state, start, end, now, late=late)
        since = activity.busy_since(now) if probe.running else None
        due = self._look(probe, state, since, now, late)
        state.previous = state.clock.sample(now, light=True)
        total = activity.busy_total() if getattr(activity, "parkable", False) else None
        state.idle = since is None and total is not None and total == state.busy_seen
        state.busy_seen = total
        if not state.stalls:
            state.blocks = [b for b in state.blocks if since is not None and b[0] >= since - KEY_TOLERANCE]
        return due

    def _look(self, probe: LoopProbe, state: _ProbeState, since: float | None, now: float,
              late: bool) -> float | None:
        """The stretch in progress (``since``): count, sample, capture; returns when to look at it next."""
        if since is None:
            return None
        age = now - since
        threshold = self._threshold
        if age >= SAMPLE_AT * threshold:
            state.sample_stall(since, now)
        if age < SAMPLE_AT * threshold:
            return since + SAMPLE_AT * threshold
        if age < threshold:
            return since + threshold
        stall = state.pending(since)
        if stall is None:
            stall = Stall(key=since, before=state.before(since))
            stall.context = self._context_of(probe, stall)
            state.stalls = [*state.stalls[-(MAX_PENDING - 1):], stall]
        for value in self._thresholds:
            if age >= value and value not in stall.counted:
                stall.counted.add(value)
                self._count_spike(probe.label, value, exemplar(stall.context))
        if not stall.captured:
            stall.captured = True
            block = self._block_for(state, since, now)
            if block is not None:  # the GIL was held when it crossed the threshold: its own stack
                self._dump_from_block(probe, state, stall, block, now)
            elif late:
                stall.note = ("not captured live: the watchdog could not run when the stall crossed the "
                              "threshold (the GIL was held, or the process was paused)")
                gilheld = self._gilheld(probe)
                why = gilheld.unguarded() if gilheld is not None else None
                if why is not None:
                    stall.note += f"; {why}"
            else:
                self._capture(probe, state, stall, now)
        later = [since + value for value in self._thresholds if value not in stall.counted]
        return min(later) if later else None

    def _context_of(self, probe: LoopProbe, stall: Stall) -> dict[str, Any] | None:
        """The request context of the task running ``stall`` -- None if no task runs (a plain callback),
        or if the stall ended while it was read (the task would be another one's)."""
        context = self._context.of_task(running_task(probe.loop))
        return context if context is not None and self._still(probe, stall) else None

    def _take_blocks(self, probe: LoopProbe, state: _ProbeState) -> None:
        """Stacks the owner loop's thread wrote on the fallback timer's signal, dated from its schedule."""
        gilheld = self._gilheld(probe)
        if gilheld is None or not gilheld.has_output():
            return
        first = gilheld.armed_at
        stacks = gilheld.take()
        if first is not None:
            state.blocks.extend((first + n * REPEAT, text) for n, text in enumerate(stacks))
        elif self._parked_since is not None:
            # Armed by the parking, when the stretch in progress began (see _accel.Park): dated from its start.
            since = probe.activity.busy_since(self._clock()) if probe.running else None
            ended = [start for start, _ in getattr(probe.activity, "peek_finished", lambda: [])()]
            start = since if since is not None else (ended[-1] if ended else None)
            if start is not None:
                first = start + SAMPLE_AT * self._threshold + FALLBACK_AFTER
                state.blocks.extend((first + n * REPEAT, text) for n, text in enumerate(stacks))

    def _block_for(self, state: _ProbeState, start: float, end: float) -> tuple[float, str] | None:
        """The stack written inside [start, end]: the first at least a threshold into it, else the last."""
        inside = [b for b in state.blocks if start - KEY_TOLERANCE <= b[0] <= end + KEY_TOLERANCE]
        if not inside:
            return None
        return next((b for b in inside if b[0] - start >= self._threshold), inside[-1])

    def _capture(self, probe: LoopProbe, state: _ProbeState, stall: Stall, now: float) -> None:
        """Take the loop thread's stack mid-stall; dump it unless dumps are off or cooling down."""
        writer = self._writer
        # What must be read while the stall goes on -- the loop thread's stack (its frames are live), the
        # task it runs, that task's context -- is read first, then checked: the stretch still running
        # after it means it was read inside the stall.  The rest (other threads, the tasks) comes after,
        # so a capture slowed down by GIL contention still keeps the stack that matters.
        frames = _frames.current_frames()
        taken = self._clock()
        loop_frame = frames.get(probe.thread_ident)
        locations = _frames.locations_of(loop_frame)  # (source lines after the check: they open files)
        running = label_from_stack(loop_frame)
        del loop_frame
        loop = probe.loop
        task = running_task(loop)
        context = self._context.of_task(task) if stall.context is None and task is not None else None
        if not self._still(probe, stall):
            del frames
            stall.note = "stack discarded: the stall ended while it was being taken"
            emit("debug", "loopwatch.capture_discarded", loop=probe.label)
            return
        loop_stack = _frames.records(locations)
        threads = _frames.all_thread_stacks(frames, {probe.thread_ident: loop_stack}) if writer.enabled else []
        del frames
        tasks = _frames.task_stacks(loop) if writer.enabled and loop is not None else []
        late_note = None if not writer.enabled or self._still(probe, stall) else \
            "the stall ended while the other threads' and the tasks' stacks were being read: they may show " \
            "the moments after it (the loop thread's stack was taken inside it)"
        stall.culprit, stall.source = _frames.culprit_of(loop_stack), "watchdog"
        with self._guard("watchdog"):
            stall.task = describe_task(task) if task is not None else None
        if context is not None:  # read before the check above that the stall still runs
            stall.context = context
        if running is None and stall.task is not None:
            running = stall.task["label"]
        if running is not None:
            probe.stall_callback = (running, _location(stall.culprit), stall.context)
        if not writer.enabled:
            stall.note = f"dumps disabled: {writer.disabled_reason}"
            return
        if not writer.claim_automatic():
            stall.note = f"no dump: another was written less than dump_cooldown={writer.cooldown}s ago"
            return
        if state.sampled_key != stall.key or len(state.samples) < 2 or \
                state.samples[-1].wall - state.samples[0].wall < MIN_KIND_WINDOW:
            _os.sleep(MIN_KIND_WINDOW)  # a window inside this stall long enough to judge its kind on
            state.sample_stall(stall.key, self._clock())
        kind, cpu, extra = self._kind(state, stall.key, taken - stall.key, taken)
        stall.kind = kind
        dump = self._build_dump("event_loop_lag", loop=probe.label, stall_seconds=taken - stall.key,
                                loop_stack=loop_stack, threads=threads, tasks=tasks, source="watchdog",
                                kind=kind, cpu_seconds=cpu, context=stall.context, note=late_note, **extra)
        path = self._write_dump(dump)
        if path is None:
            stall.note = _DUMP_FAILED
            return
        stall.dump_path = path

    def _still(self, probe: LoopProbe, stall: Stall) -> bool:
        """The stretch that began at ``stall.key`` is still the one the loop runs."""
        since = probe.activity.busy_since(self._clock()) if probe.running else None
        return since is not None and abs(since - stall.key) <= KEY_TOLERANCE

    def _kind(self, state: _ProbeState, key: float, duration: float, now: float,
              before: ThreadSample | None = None) -> tuple[str, float | None, dict[str, Any]]:
        """``(kind, cpu_seconds, extra dump fields)``: ``gc`` if collections took most of the stall."""
        kind, cpu = state.kind(key, duration, now, before)
        if self._gc is not None:
            found = self._gc.kind(key, key + duration)
            if found is not None:
                return "gc", cpu, {"gc_seconds": round(found[0], 6), "gc_generation": found[1]}
        return kind, cpu, {}

    def _dump_from_block(self, probe: LoopProbe, state: _ProbeState, stall: Stall, block: tuple[float, str],
                         now: float) -> None:
        """A dump from the stack the loop thread wrote itself while the GIL was held."""
        fired, text = block
        stacks = _frames.parse_faulthandler(text)
        loop_stack = next(iter(stacks.values()), [])
        stall.culprit, stall.source = _frames.culprit_of(loop_stack), "faulthandler"
        writer = self._writer
        if not writer.enabled:
            stall.note = f"dumps disabled: {writer.disabled_reason}"
            return
        if not writer.claim_automatic():
            stall.note = f"no dump: another was written less than dump_cooldown={writer.cooldown}s ago"
            return
        kind, cpu, extra = self._kind(state, stall.key, max(0.0, now - stall.key), now, stall.before)
        stall.kind = kind
        known = _frames.threads_info()
        dump = self._build_dump(
            "event_loop_lag", loop=probe.label, stall_seconds=fired - stall.key, loop_stack=loop_stack,
            threads=[_frames.thread_entry(probe.thread_ident, loop_stack, known)], tasks=[], source="faulthandler",
            kind=kind, cpu_seconds=cpu, context=stall.context,
            note="stack written by the loop thread itself (a signal) while the GIL was held; other threads' "
                 "stacks and task stacks cannot be read without the GIL", **extra)
        path = self._write_dump(dump)
        if path is None:
            stall.note = _DUMP_FAILED
        else:
            stall.dump_path = path

    def _ended(self, probe: LoopProbe, state: _ProbeState, start: float, end: float, now: float, *,
               late: bool) -> None:
        """The loop's clock reports a long stretch that ended: a slow callback, and a stall if long enough."""
        duration = end - start
        stall = state.pending(start)
        if stall is not None:
            state.stalls.remove(stall)
        activity = probe.activity
        counts_slow = (activity is not None and not activity.times_iterations and duration >= self._slow.threshold
                       and self._options.slow_callback_mode != "off")
        if duration < self._threshold:
            if counts_slow:
                self._count_slow(probe, stall, duration)
            return
        if stall is None:
            stall = Stall(key=start, before=state.before(start))
            block = self._block_for(state, start, end)
            if block is not None:
                self._dump_from_block(probe, state, stall, block, end)
            elif late:
                stall.note = ("not seen live: the watchdog could not run during the stall (the GIL was held, "
                              "or the process was paused)")
            else:
                stall.note = "not seen live: it ended before the watchdog's look at the threshold"
        for value in self._thresholds:
            if duration >= value and value not in stall.counted:
                stall.counted.add(value)
                self._count_spike(probe.label, value, exemplar(stall.context))
        if counts_slow:
            self._count_slow(probe, stall, duration)
        kind, cpu, extra = self._kind(state, start, duration, now, stall.before)
        state.blocks = [b for b in state.blocks if b[0] > end + KEY_TOLERANCE]
        if stall.dump_path is not None:  # the dump was taken mid-stall: now it can say how long it lasted
            self._update_dump(stall.dump_path, {"duration": round(duration, 6), "whole_stall": {
                "kind": kind, "cpu_seconds": None if cpu is None else round(cpu, 6)}})
        self.recent.append({
            "ended_at": time.time() - (now - end), "loop": probe.label, "duration": round(duration, 6),
            "kind": kind, "cpu_seconds": None if cpu is None else round(cpu, 6), "culprit": _location(stall.culprit),
            "dump": str(stall.dump_path) if stall.dump_path else None, "source": stall.source, "note": stall.note,
            **_request(stall.context)})
        emit("warning", "loopwatch.stall", loop=probe.label, duration=round(duration, 6),
             thresholds=[t for t in self._thresholds if t in stall.counted], culprit=_location(stall.culprit),
             dump=str(stall.dump_path) if stall.dump_path else None, kind=kind,
             cpu_seconds=None if cpu is None else round(cpu, 6), source=stall.source, note=stall.note, **extra,
             **event_fields(stall.context))

    def _count_slow(self, probe: LoopProbe, stall: Stall | None, duration: float) -> None:
        """A loop whose slow callbacks its clock does not count itself (uvloop, the beat fallback): a long
        stretch is its slow callback, named after the task step seen running mid-stall, if it was seen."""
        info = dict(stall.task) if stall is not None and stall.task else {"what": "stall", "label": UNATTRIBUTED}
        culprit = _location(stall.culprit) if stall is not None else None
        self._slow.record(SlowCallback(probe.label, duration, info.pop("label"), info.pop("what"),
                                       culprit=culprit, context=stall.context if stall is not None else None, **info))


def _location(entry: dict[str, Any] | None) -> str | None:
    if not entry:
        return None
    return f"{entry['filename']}:{entry['lineno']} in {entry['function']}"


def _request(context: dict[str, Any] | None) -> dict[str, Any]:
    """The request a stall blocked, as the console lists it: its trace and route."""
    return {k: context[k] for k in ("trace_id", "route") if k in context} if context else {}
