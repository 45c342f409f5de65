"""The watchdog thread: sees stalls while they are still going on.

It sleeps until a heartbeat is overdue by the first threshold -- woken by the beats' timerfd (see
``_waker``), so a healthy loop does not wake it: every wake-up of a Python thread costs a busy loop some
GIL hand-offs -- then reads each probe's heartbeat.  A beat that is overdue by more than the first threshold is a stall
in progress (checked every ``watchdog_interval`` until it ends): the watchdog counts each threshold as
the lag crosses it, cancels faulthandler's fallback timer (it runs, so the GIL is free: see ``_native``),
and once per stall takes the loop thread's stack (``sys._current_frames()``), re-checks the heartbeat
(if the stall ended meanwhile the stack belongs to healthy code and is discarded) and writes the dump.
When the probe finally beats, the stall is over: the watchdog logs ``loopwatch.stall`` with its
duration, culprit, dump path and kind.  Stalls it could not see live -- the GIL was held the whole
time -- are finished from the probe's late beat and the faulthandler in-flight stack.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _frames
from . import _unpatched as _os
from ._cputime import CPU_KIND_RATIO, ThreadClock, ThreadSample, classify
from ._log import emit
from ._native import FIRE_AT, NativeWatch
from ._probe import Beat, LoopProbe
from ._slow import UNATTRIBUTED, SlowCallback, describe_task, label_from_stack, running_task
from ._waker import Waker

if TYPE_CHECKING:
    from ._agent import Agent


MIN_KIND_WINDOW = 0.02  # seconds: the shortest window inside a stall that its kind is judged on
MAX_SLEEP = 2.0  # the watchdog looks at least this often (closed loops, housekeeping) ...
MAX_SLEEP_TIMED = 5.0  # ... or this often when the beats' timer wakes it (see _waker)
OWNER_SLACK = 0.95  # a late beat owns faulthandler's text when its delay reaches this share of the fire time
_DUMP_FAILED = "the dump could not be written: see loopwatch.error and errors_total{component=\"dump\"}"


@dataclasses.dataclass
class Stall:
    key: float  # the probe's due time when the stall began: identifies the stall
    counted: set[float] = dataclasses.field(default_factory=set)
    captured: bool = False  # a live capture was attempted (one per stall)
    dump_path: Path | None = None
    culprit: dict[str, Any] | None = None
    source: str | None = None
    note: str | None = None
    task: dict[str, Any] | None = None  # the task step running mid-stall (describe_task), if any


@dataclasses.dataclass
class _ProbeState:
    clock: ThreadClock
    stall: Stall | None = None
    fired_key: float | None = None  # the beat faulthandler fired for, while it is not yet a stall
    # The loop thread's clocks sampled while the beat ``sampled_key`` was overdue: windows that lie
    # entirely inside the stall, so the time before it (busy or not) cannot colour its kind.
    sampled_key: float | None = None
    samples: list[ThreadSample] = dataclasses.field(default_factory=list)

    def sample_stall(self, key: float, now: float) -> None:
        if self.sampled_key != key:
            self.sampled_key, self.samples = key, []
        if len(self.samples) < 2:
            self.samples.append(self.clock.sample(now))
        else:
            self.samples[1] = self.clock.sample(now)  # keep the first and the latest

    def kind(self, key: float) -> tuple[str, float | None]:
        """``(kind, cpu_seconds)`` over the samples taken inside the stall of ``key``."""
        if self.sampled_key != key or len(self.samples) < 2:
            return "unknown", None
        first, last = self.samples[0], self.samples[-1]
        if last.wall - first.wall < MIN_KIND_WINDOW:
            return "unknown", None
        return classify(first, last, last.wall - first.wall)


class Watchdog:
    """Stall detection logic plus the thread that drives it (``tick`` is callable directly in tests)."""

    def __init__(self, agent: Agent, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._agent = agent
        self._clock = clock
        self._options = agent.options
        self._states: dict[LoopProbe, _ProbeState] = {}
        self.waker: Waker | None = None
        self.waker_note: str | None = None  # why faulthandler cannot wake us, if it cannot
        self.timer_note: str | None = None  # why the beats' timer cannot wake us, if it cannot
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- thread ----------------------------------------------------------------------------------
    def start(self, native: NativeWatch | None = None) -> None:
        self._stopping = False
        self.waker = Waker()
        # The beats' timer runs on the real monotonic clock: with an injected clock (tests), deadlines.
        self.timer_note = (self.waker.start_timer() if self._clock is time.monotonic
                           else "the watchdog runs on an injected clock")
        if native is not None:
            self.waker_note = self.waker.watch_file(str(native.path), native.rewrite_header)
        self._thread = threading.Thread(target=self._run, name="loopwatch-watchdog", daemon=True)
        self._thread.start()

    def poke(self, *, always: bool = False) -> None:
        """Look now (a loop was attached or resumed): its deadline may be earlier than the planned one.

        With the beats' timer there is nothing to do: the probe's first beat re-armed it (waking a thread
        here would make the loop thread wait for the GIL just as it starts running), unless ``always``."""
        if self.waker is not None and (always or not self.waker.timed):
            self.waker.poke()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self.poke(always=True)
        thread = self._thread
        if thread is not None and thread is not _os.current_thread():
            thread.join(timeout)
        self._thread = None
        if self.waker is not None:
            self.waker.close()
            self.waker = None

    def drain(self) -> None:
        """Finish the stalls whose late beats are queued (the agent is stopping)."""
        for probe, state in list(self._states.items()):
            with self._agent.guard("watchdog"):
                while probe.late_beats:
                    self._finish(probe, state, probe.late_beats.popleft(), False)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        interval = self._options.watchdog_interval
        margin = max(0.05, 2 * interval)
        last = self._clock()
        wait = interval
        while True:
            waker = self.waker
            if waker is None:
                return
            try:
                woke = waker.wait(wait)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any error (counted)
                self._agent.guard.report("watchdog", exc)
                _os.sleep(min(wait, 1.0))
                woke = "timeout"
            if self._stopping:
                return
            now = self._clock()
            # A stack taken by a watchdog that was itself starved (the GIL was held, or the process
            # was paused) would show whatever ran after the stall: detect that and do not trust it.
            if woke == "timeout":
                starving = now - last > wait + margin
            elif woke == "file":
                starving = self._fired_long_ago(margin)
            elif woke == "timer":  # woken long after the beat was due: we could not run (GIL held)
                deadline = waker.deadline
                starving = deadline is not None and now - deadline > margin
            else:
                starving = False
            last = now
            with self._agent.guard("watchdog"):
                self.tick(now, starving=starving)
            wait = interval
            with self._agent.guard("watchdog"):
                wait = self.next_wait(now)

    def _fired_long_ago(self, margin: float) -> bool:
        native = self._agent.native
        written = native.written_at() if native is not None else None
        return written is not None and time.time() - written > margin

    @property
    def timed(self) -> bool:
        """True if the beats' timer wakes the watchdog (see ``_waker``)."""
        waker = self.waker
        return waker is not None and waker.timed

    def arm(self) -> None:
        """Set the timer to the moment the earliest due beat would be a threshold late (a probe calls this
        on the loop thread each time it schedules a beat; the watchdog before it sleeps).  Never raises."""
        waker = self.waker
        if waker is None or not waker.timed:
            return
        due = [p.expected_at for p in self._agent.probes() if p.running]
        if due:
            waker.arm_at(min(due) + self._options.dump_threshold)

    def next_wait(self, now: float) -> float:
        """Seconds until the next look: soon during a stall, else when the first beat could be late.

        The watchdog must look before faulthandler's fallback timer fires (see ``_native``).  With the
        beats' timer (see ``_waker``) that look costs nothing until a beat is actually late; without it
        the watchdog wakes on deadlines, about once per beat.
        """
        interval = self._options.watchdog_interval
        timed = self.timed
        longest = MAX_SLEEP_TIMED if timed else MAX_SLEEP
        deadline = now + longest
        for probe in self._agent.probes():
            state = self._states.get(probe)
            if probe.late_beats or (state is not None and state.stall is not None):
                return interval
            native = self._agent.native_for(probe)
            if native is not None and native.has_output():
                return interval  # faulthandler fired: a stall may be starting
            if not probe.running or timed:
                continue
            deadline = min(deadline, probe.expected_at + self._options.dump_threshold)
        if timed:
            self.arm()
        return min(longest, max(interval / 2, deadline - now))

    # -- logic -----------------------------------------------------------------------------------
    def tick(self, now: float, *, starving: bool = False) -> None:
        live = set()
        for probe in self._agent.probes():
            live.add(probe)
            state = self._states.get(probe)
            if state is None:
                state = self._states[probe] = _ProbeState(ThreadClock(probe.thread_ident, probe.native_id))
            with self._agent.guard("watchdog"):
                self._check(probe, state, now, starving)
        for gone in [p for p in self._states if p not in live]:
            del self._states[gone]

    def _check(self, probe: LoopProbe, state: _ProbeState, now: float, starving: bool) -> None:
        if probe.closed:
            self._agent.detach(probe)
            return
        while probe.late_beats:
            self._finish(probe, state, probe.late_beats.popleft(), starving)
        if not probe.running:
            state.stall = None
            state.sampled_key = None
            return
        key = probe.expected_at
        lag = now - key
        if lag >= FIRE_AT * self._options.dump_threshold / 2:
            state.sample_stall(key, now)  # late already: sample the loop thread from inside the stall
        if lag < self._options.dump_threshold:
            if state.stall is not None and state.stall.key != key:
                state.stall = None  # the beat came back without a late record (loop restarted)
            self._early_fire(probe, state, key)
            return
        stall = state.stall
        if stall is None or stall.key != key:
            stall = state.stall = Stall(key=key)
        for threshold in self._options.lag_thresholds:
            if lag >= threshold and threshold not in stall.counted:
                stall.counted.add(threshold)
                self._agent.metrics.count_spike(probe.label, threshold)
        if not stall.captured and not starving:
            stall.captured = True
            native = self._agent.native_for(probe)
            if native is not None and not native.has_output():
                # We run, so the GIL is free and other threads may run Python: faulthandler must not walk
                # their frames now (see _native).  The probe re-arms it at its next beat.
                native.cancel()
            self._capture(probe, state, stall, now)

    def _early_fire(self, probe: LoopProbe, state: _ProbeState, key: float) -> None:
        """faulthandler fires just before the threshold; if the beat then came in time, forget it."""
        native = self._agent.native_for(probe)
        if native is None or not native.has_output():
            state.fired_key = None
        elif state.fired_key is None:
            state.fired_key = key
        elif state.fired_key != key:
            native.take()
            state.fired_key = None

    def _capture(self, probe: LoopProbe, state: _ProbeState, stall: Stall, now: float) -> None:
        """Take the loop thread's stack mid-stall; dump it unless dumps are off or cooling down."""
        writer = self._agent.writer
        frames = _frames.current_frames()
        taken = self._clock()
        loop_frame = frames.get(probe.thread_ident)
        loop_stack = _frames.stack_of(loop_frame)
        running = label_from_stack(loop_frame)
        del loop_frame
        loop = probe.loop
        task = running_task(loop)
        threads = _frames.all_thread_stacks(frames) if writer.enabled else []
        del frames
        tasks = _frames.task_stacks(loop) if writer.enabled and loop is not None else []
        if probe.expected_at != stall.key or not probe.running:
            stall.note = "stack discarded: the stall ended while it was being taken"
            emit("debug", "loopwatch.capture_discarded", loop=probe.label)
            return
        stall.culprit, stall.source = _frames.culprit_of(loop_stack), "watchdog"
        with self._agent.guard("watchdog"):
            stall.task = describe_task(task) if task is not None else None
        if running is None and stall.task is not None:
            running = stall.task["label"]
        if running is not None:
            probe.stall_callback = (running, _frames_location(stall.culprit))
        if not writer.enabled:
            stall.note = f"dumps disabled: {writer.disabled_reason}"
            return
        if not writer.claim_automatic():
            stall.note = f"no dump: another was written less than dump_cooldown={writer.cooldown}s ago"
            return
        if state.sampled_key != stall.key or len(state.samples) < 2:
            _os.sleep(MIN_KIND_WINDOW)  # first look at this stall: a short window inside it
            state.sample_stall(stall.key, self._clock())
        kind, cpu = state.kind(stall.key)
        dump = self._agent.build_dump(
            "event_loop_lag", loop=probe.label, stall_seconds=taken - stall.key,
            loop_stack=loop_stack, threads=threads, tasks=tasks, source="watchdog",
            kind=kind, cpu_seconds=cpu)
        path = self._agent.write_dump(dump)
        if path is None:
            stall.note = _DUMP_FAILED
            return
        stall.dump_path = path

    def _finish(self, probe: LoopProbe, state: _ProbeState, beat: Beat, starving: bool) -> None:
        """The probe beat again after a stall of ``beat.delay`` seconds."""
        stall = state.stall if state.stall is not None and state.stall.key == beat.key else None
        if stall is None:
            stall = Stall(key=beat.key)
            stall.note = ("not seen live: the watchdog could not run during the stall (the GIL was held, "
                          "or the process was paused)" if starving else
                          "not seen live: the stall ended before the watchdog's next look")
        else:
            state.stall = None
        for threshold in self._options.lag_thresholds:
            if beat.delay >= threshold and threshold not in stall.counted:
                stall.counted.add(threshold)
                self._agent.metrics.count_spike(probe.label, threshold)
        kind, _ = state.kind(beat.key)
        if kind == "unknown" and beat.cpu_seconds is not None:  # not seen from inside (GIL held)
            kind = "cpu" if beat.cpu_seconds >= CPU_KIND_RATIO * beat.delay else "blocked"
        native = self._agent.native_for(probe)
        state.fired_key = None
        with self._agent.guard("faulthandler"):
            if native is not None and beat.delay >= OWNER_SLACK * native.lag_when_fired and native.has_output():
                # Only a beat this late can have let faulthandler fire: with several late beats queued
                # (the watchdog starved through them), a short one must not take a long one's stack.
                text = native.take()
                if stall.source is None and beat.delay >= self._options.dump_threshold:
                    self._dump_from_faulthandler(probe, stall, text, beat, kind)
        culprit = stall.culprit
        if probe.activity is not None and not probe.activity.times_iterations:
            self._count_slow(probe, stall, beat.delay)
        emit(
            "warning", "loopwatch.stall", loop=probe.label, duration=round(beat.delay, 6),
            thresholds=[t for t in self._options.lag_thresholds if t in stall.counted],
            culprit=_frames_location(culprit), dump=str(stall.dump_path) if stall.dump_path else None,
            kind=kind, cpu_seconds=None if beat.cpu_seconds is None else round(beat.cpu_seconds, 6),
            source=stall.source, note=stall.note)

    def _count_slow(self, probe: LoopProbe, stall: Stall, duration: float) -> None:
        """A loop whose iterations cannot be timed (uvloop): a stall the watchdog saw is its slow callback,
        named after the task step that was running mid-stall (``unattributed`` for a plain callback)."""
        slow = self._agent.slow
        if self._options.slow_callback_mode == "off" or duration < slow.threshold:
            return
        with self._agent.guard("watchdog"):
            info = dict(stall.task) if stall.task else {"what": "stall", "label": UNATTRIBUTED}
            slow.record(SlowCallback(probe.label, duration, info.pop("label"), info.pop("what"),
                                     culprit=_frames_location(stall.culprit), **info))

    def _dump_from_faulthandler(self, probe: LoopProbe, stall: Stall, text: str, beat: Beat,
                                kind: str) -> None:
        writer = self._agent.writer
        if not writer.enabled or not writer.claim_automatic():
            return
        native = self._agent.native_for(probe)
        assert native is not None
        blocks = _frames.split_faulthandler(text)
        stacks = _frames.parse_faulthandler(blocks[0]) if blocks else {}
        dump = self._agent.build_dump(
            "event_loop_lag", loop=probe.label, stall_seconds=native.lag_when_fired,
            loop_stack=stacks.get(probe.thread_ident, []),
            threads=_threads_from_faulthandler(stacks), tasks=[], source="faulthandler",
            kind=kind, cpu_seconds=beat.cpu_seconds,
            note="stack written by faulthandler's C thread while the GIL was held; task stacks "
                 "cannot be taken without the GIL")
        path = self._agent.write_dump(dump)
        stall.culprit, stall.source = dump["culprit"], "faulthandler"
        if path is None:
            stall.note = _DUMP_FAILED
        else:
            stall.dump_path = path


def _threads_from_faulthandler(stacks: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    known = _frames.threads_info()
    return [_frames.thread_entry(ident, stack, known) for ident, stack in sorted(stacks.items())]


def _frames_location(entry: dict[str, Any] | None) -> str | None:
    if not entry:
        return None
    return f"{entry['filename']}:{entry['lineno']} in {entry['function']}"
