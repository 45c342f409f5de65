"""Stall detection logic, driven look by look with an injected clock (no threads, no sleeping).

A fake iteration clock stands for the loop: the test says when each busy stretch begins and ends, and
the watchdog is called at the moments it asks for (``tick`` returns when to look next), as its thread
would.  Edge cases (a stall ending exactly at the threshold, back-to-back stalls, a stall spanning a beat,
a loop attached mid-stall, a starved look) and a long simulated churn of random stretches.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from loopwatch import _iteration, _slow
from loopwatch._agent import Agent
from loopwatch._config import resolve
from loopwatch._gilheld import FALLBACK_AFTER, REPEAT
from loopwatch._iteration import BeatActivity
from loopwatch._probe import Beat
from loopwatch._watchdog import KEY_TOLERANCE, MAX_SLEEP, SAMPLE_AT

T0 = 1000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FakeActivity:
    """The loop's iteration clock, driven by the test: ``begin(t)`` / ``end(t)`` a busy stretch."""

    exact = True

    def __init__(self, *, times_iterations: bool = True, report_from: float = 0.1) -> None:
        self.times_iterations = times_iterations
        self.report_from = report_from  # stretches at least this long are reported when they end
        self.since: float | None = None
        self.reads = 0
        self._finished: list[tuple[float, float]] = []

    def begin(self, t: float) -> None:
        self.since = t

    def end(self, t: float) -> None:
        if self.since is not None and t - self.since >= self.report_from:
            self._finished.append((self.since, t))
        self.since = None

    def busy_since(self, now: float) -> float | None:
        self.reads += 1
        return self.since

    def finished(self) -> list[tuple[float, float]]:
        out, self._finished = self._finished, []
        return out

    def busy_now(self) -> None:
        return None

    def reset(self) -> None:
        pass

    def pause(self) -> None:
        pass

    def on_beat(self) -> None:
        pass

    def uninstall(self) -> None:
        pass


class FakeProbe:
    """What the watchdog reads from a LoopProbe; the loop is real but never runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, activity: object) -> None:
        self.loop = loop
        self.label = "main"
        self.thread_ident = threading.get_ident()
        self.thread_name = "MainThread"
        self.native_id = threading.get_native_id()
        self.interval = 0.5
        self.running = True
        self.activity = activity
        self.stall_callback = None
        self.expected_at = T0 + 0.5
        self.last_delay = 0.0
        self.late_beats: collections.deque[Beat] = collections.deque()
        self.stopped = False

    @property
    def closed(self) -> bool:
        return self.loop.is_closed()

    def lag(self, now: float) -> float:
        return max(now - self.expected_at, self.last_delay)

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make(tmp_path: Path, loop: asyncio.AbstractEventLoop, *, activity: object | None = None, **options: object):
    clock = Clock()
    registry = CollectorRegistry()
    settings = {"registry": registry, "metrics_port": 0, "dump_dir": tmp_path, "dump_cooldown": 30,
                "faulthandler": False}
    settings.update(options)
    agent = Agent(resolve(settings, environ={}), clock=clock)
    agent.register()
    agent.writer.prepare()
    probe = FakeProbe(loop, activity if activity is not None else FakeActivity())
    agent.loops.probes = (probe,)  # type: ignore[assignment]
    agent.lag.add_loop("main")
    agent.slow_metrics.add_loop("main")
    return agent, probe, clock, registry


@pytest.fixture
def setup(tmp_path: Path, loop: asyncio.AbstractEventLoop):
    return (*make(tmp_path, loop), tmp_path)


def spikes(agent: Agent, registry: CollectorRegistry, threshold: str) -> float | None:
    return registry.get_sample_value("loopwatch_event_loop_lag_spikes_total",
                                     {"service": agent.options.service, "loop": "main", "threshold": threshold})


def lag(agent: Agent, registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("loopwatch_event_loop_lag_seconds", {"service": agent.options.service, "loop": "main"})


def dumps(path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(path.glob("loopwatch-*.json"))]


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def run_until(agent: Agent, clock: Clock, until: float, wake: float | None = None) -> float:
    """Look whenever the watchdog asks to, up to ``until``; returns its next planned look."""
    wake = clock.now if wake is None else wake
    while wake <= until:
        clock.now = wake
        wake = agent.watchdog.tick(clock.now)
    clock.now = until
    return wake


# -- the basic stall --------------------------------------------------------------------------------

def test_healthy_loop_counts_nothing(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    activity = probe.activity
    for n in range(500):  # 10 ms stretches, 10 ms waits
        activity.begin(T0 + n * 0.02)
        activity.end(T0 + n * 0.02 + 0.01)
        if n % 25 == 0:
            clock.now = T0 + n * 0.02 + 0.005
            agent.watchdog.tick(clock.now)
    assert spikes(agent, registry, "0.5") == 0
    assert dumps(dump_dir) == []


def test_a_stall_is_seen_as_it_crosses_each_threshold_and_ends_with_its_real_duration(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    start = T0 + 0.123
    probe.activity.begin(start)
    clock.now = start + 0.01
    wake = agent.watchdog.tick(clock.now)
    assert wake == pytest.approx(start + SAMPLE_AT * 0.5)  # the first look at this stretch: to sample it
    wake = run_until(agent, clock, start + 0.5 - 1e-9, wake)
    assert spikes(agent, registry, "0.5") == 0 and dumps(dump_dir) == []
    assert wake == pytest.approx(start + 0.5)  # ... then exactly when it crosses the first threshold
    wake = run_until(agent, clock, start + 0.5, wake)
    assert spikes(agent, registry, "0.5") == 1 and spikes(agent, registry, "2.0") == 0
    (dump,) = dumps(dump_dir)  # taken while it is going on
    assert dump["stall_seconds"] == pytest.approx(0.5)
    assert dump["source"] == "watchdog" and dump["loop"] == "main" and dump["reason"] == "event_loop_lag"
    assert dump["culprit"]["filename"] == __file__  # the loop thread here is the test's own thread
    # The next threshold is at start + 2.0; the watchdog still looks every SAMPLE_AT of the first threshold
    # meanwhile: this stall may end and another begin, and cross the threshold, before that.
    assert wake == pytest.approx(clock.now + SAMPLE_AT * 0.5)
    wake = run_until(agent, clock, start + 3.0, wake)
    assert spikes(agent, registry, "2.0") == 1 and spikes(agent, registry, "10.0") == 0
    assert len(dumps(dump_dir)) == 1  # one dump per stall
    probe.activity.end(start + 3.0)
    with capture_logs() as logs:
        agent.watchdog.tick(clock.now + 0.001)
    (stall,) = events(logs, "loopwatch.stall")
    assert stall["duration"] == pytest.approx(3.0)
    assert stall["thresholds"] == [0.5, 2.0]
    assert stall["dump"] == str(sorted(dump_dir.glob("loopwatch-*.json"))[0])
    assert spikes(agent, registry, "0.5") == 1 and spikes(agent, registry, "2.0") == 1  # not twice


@pytest.mark.parametrize("phase", [i / 10 for i in range(10)])
def test_phase_does_not_matter(tmp_path: Path, loop, phase: float) -> None:
    """A 0.7 s stall with a 0.5 s threshold, starting anywhere in the probe's beat interval and anywhere in
    the watchdog's idle cycle: one stall of 0.70 s, counted, dumped at 0.50 s of age."""
    agent, probe, clock, registry = make(tmp_path, loop, dump_cooldown=0)
    wake = run_until(agent, clock, T0 + 3.0)  # idle looks, on the watchdog's own schedule
    start = T0 + 3.0 + phase * 0.5
    probe.activity.begin(start)
    wake = run_until(agent, clock, start + 0.7, wake)
    probe.activity.end(start + 0.7)
    with capture_logs() as logs:
        run_until(agent, clock, start + 2.0, wake)
    (stall,) = events(logs, "loopwatch.stall")
    assert stall["duration"] == pytest.approx(0.7)
    assert spikes(agent, registry, "0.5") == 1
    (dump,) = dumps(tmp_path)
    assert dump["stall_seconds"] == pytest.approx(0.5)


def test_a_stall_ending_exactly_at_the_threshold_is_counted_once(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    start = T0 + 0.2
    probe.activity.begin(start)
    wake = run_until(agent, clock, start + 0.5 - 1e-9)
    probe.activity.end(start + 0.5)  # ended just as the look at the threshold came
    with capture_logs() as logs:
        run_until(agent, clock, start + 1.5, wake)
    (stall,) = events(logs, "loopwatch.stall")
    assert stall["duration"] == pytest.approx(0.5) and stall["thresholds"] == [0.5]
    assert "ended before the watchdog's look" in stall["note"]
    assert spikes(agent, registry, "0.5") == 1
    assert dumps(dump_dir) == []  # no stack: it was over

    probe.activity.begin(T0 + 3.0)  # and one just under it is not a stall
    run_until(agent, clock, T0 + 3.4999, wake=clock.now)
    probe.activity.end(T0 + 3.4999)
    with capture_logs() as logs:
        run_until(agent, clock, T0 + 5.0, wake=clock.now)
    assert events(logs, "loopwatch.stall") == []
    assert spikes(agent, registry, "0.5") == 1


def test_back_to_back_stalls_are_two_stalls(tmp_path: Path, loop) -> None:
    agent, probe, clock, registry = make(tmp_path, loop, dump_cooldown=0)
    activity = probe.activity
    with capture_logs() as logs:
        activity.begin(T0 + 0.1)
        wake = run_until(agent, clock, T0 + 0.8)
        activity.end(T0 + 0.8)
        activity.begin(T0 + 0.8)  # the next stretch starts the moment the first one ends
        wake = run_until(agent, clock, T0 + 1.7, wake)
        activity.end(T0 + 1.7)
        run_until(agent, clock, T0 + 3.0, wake)
    assert [round(e["duration"], 6) for e in events(logs, "loopwatch.stall")] == [0.7, 0.9]
    assert spikes(agent, registry, "0.5") == 2
    assert [d["stall_seconds"] for d in dumps(tmp_path)] == [pytest.approx(0.5), pytest.approx(0.5)]


def test_a_stall_spanning_a_beat_is_one_stall_timed_by_the_iteration_clock(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    probe.activity.begin(T0 + 0.3)
    wake = run_until(agent, clock, T0 + 1.2)
    probe.late_beats.append(Beat(T0 + 0.5, 0.7, 0.0))  # the beat due mid-stall came 0.7 s late
    probe.activity.end(T0 + 1.2)
    with capture_logs() as logs:
        run_until(agent, clock, T0 + 2.0, wake)
    (stall,) = events(logs, "loopwatch.stall")
    assert stall["duration"] == pytest.approx(0.9)  # from when it began, not from the beat's due time
    assert spikes(agent, registry, "0.5") == 1


def test_the_beat_fallback_times_a_stall_from_the_overdue_beat(tmp_path: Path, loop) -> None:
    """Where iterations cannot be timed: a lower bound, from the beat that was due mid-stall."""
    agent, probe, clock, registry = make(tmp_path, loop)
    probe.activity = BeatActivity(probe)
    probe.expected_at = T0 + 0.5  # the stall began at T0 + 0.3; the beat was due at T0 + 0.5
    wake = run_until(agent, clock, T0 + 1.2)
    assert spikes(agent, registry, "0.5") == 1  # counted live, 0.5 s after the beat was due
    (dump,) = dumps(tmp_path)
    assert dump["stall_seconds"] == pytest.approx(0.5)
    probe.late_beats.append(Beat(T0 + 0.5, 0.7, 0.0))
    probe.expected_at = T0 + 1.7
    with capture_logs() as logs:
        run_until(agent, clock, T0 + 1.5, wake)
    (stall,) = events(logs, "loopwatch.stall")
    assert stall["duration"] == pytest.approx(0.7)  # short of the real 0.9 s by the beat's phase
    assert spikes(agent, registry, "0.5") == 1


def test_a_loop_attached_mid_stall_is_timed_from_the_attach(tmp_path: Path) -> None:
    """The iteration clock starts when loopwatch attaches: a stretch already running is measured from then."""

    class Selector:
        def select(self, timeout=None):  # noqa: ANN001, ANN202
            return []

    class Loop:
        def __init__(self) -> None:
            self._selector = Selector()

    clock = Clock()
    clock.now = T0 + 5.0  # the loop has been busy since T0 when install() runs inside it
    slow = _slow.SlowCallbacks(0.1, observe=lambda loop, d, exemplar=None: None, log=lambda e: None, clock=clock)
    the_loop = Loop()
    timer = _slow.IterationTimer(the_loop, "main", slow, exact_always=False, stall_threshold=0.5,
                                 stall_label=lambda: None, clock=clock)
    known = _iteration.KNOWN_SELECTS
    try:
        _slow.KNOWN_SELECTS = known | {Selector.select}  # type: ignore[misc] - a test double, recognised
        assert timer.install()
    finally:
        _slow.KNOWN_SELECTS = known  # type: ignore[misc]
    assert timer.busy_since() == T0 + 5.0
    clock.now = T0 + 5.8
    the_loop._selector.select(1.0)  # the loop waits again: the stretch ends
    assert timer.finished() == [(T0 + 5.0, T0 + 5.8)]
    timer.uninstall()


# -- what the watchdog does not trust or cannot do --------------------------------------------------

def test_a_starved_look_does_not_take_a_stack(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    probe.activity.begin(T0 + 0.1)
    clock.now = T0 + 1.4
    agent.watchdog.tick(clock.now, late=True)  # the GIL was held: this look comes 0.8 s after its time
    assert spikes(agent, registry, "0.5") == 1  # counted
    assert dumps(dump_dir) == []  # but the stack now may show whatever ran after the blocking call
    probe.activity.end(T0 + 1.5)
    with capture_logs() as logs:
        agent.watchdog.tick(T0 + 1.6)
    (stall,) = events(logs, "loopwatch.stall")
    assert "could not run when the stall crossed the threshold" in stall["note"]
    assert stall["duration"] == pytest.approx(1.4)


def test_a_stall_seen_only_at_its_end_is_counted_with_each_threshold(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    probe.activity.begin(T0 + 0.1)
    probe.activity.end(T0 + 2.6)  # the watchdog could not look during it (GIL held)
    with capture_logs() as logs:
        agent.watchdog.tick(T0 + 2.7, late=True)
    (stall,) = events(logs, "loopwatch.stall")
    assert stall["thresholds"] == [0.5, 2.0] and stall["duration"] == pytest.approx(2.5)
    assert "the watchdog could not run during the stall" in stall["note"]
    assert spikes(agent, registry, "0.5") == 1 and spikes(agent, registry, "2.0") == 1


def test_stack_is_discarded_if_the_stall_ended_during_capture(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup

    class Ending(FakeActivity):
        def busy_since(self, now: float) -> float | None:  # the second read, after the stack: it moved on
            self.reads += 1
            return self.since if self.reads <= 1 else T0 + 5

    probe.activity = Ending()
    probe.activity.begin(T0 + 0.1)
    agent.watchdog.tick(T0 + 0.6)
    assert probe.activity.reads >= 2
    assert dumps(dump_dir) == []
    assert spikes(agent, registry, "0.5") == 1


def test_cooldown_between_automatic_dumps(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    for n in range(2):
        probe.activity.begin(T0 + n * 2)
        run_until(agent, clock, T0 + n * 2 + 0.7, wake=T0 + n * 2)
        probe.activity.end(T0 + n * 2 + 0.7)
    assert spikes(agent, registry, "0.5") == 2
    assert len(dumps(dump_dir)) == 1  # the second stall came within dump_cooldown=30
    probe.activity.begin(T0 + 40)
    run_until(agent, clock, T0 + 40.6, wake=T0 + 40)
    assert len(dumps(dump_dir)) == 2


def test_culprit_is_logged_even_when_no_dump_is_written(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    agent.writer.disable("testing")
    probe.activity.begin(T0)
    run_until(agent, clock, T0 + 0.6)
    probe.activity.end(T0 + 0.6)
    with capture_logs() as logs:
        agent.watchdog.tick(T0 + 0.7)
    (stall,) = events(logs, "loopwatch.stall")
    assert stall["culprit"].startswith(__file__ + ":")
    assert stall["note"] == "dumps disabled: testing"
    assert "dump" not in stall
    assert dumps(dump_dir) == []


def test_paused_loop_is_not_stalled(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    probe.running = False
    probe.activity.begin(T0)
    run_until(agent, clock, T0 + 30)
    assert spikes(agent, registry, "0.5") == 0
    assert dumps(dump_dir) == []


def test_closed_loop_is_detached_and_its_series_stay_at_rest(setup, loop) -> None:
    agent, probe, clock, registry, dump_dir = setup
    assert spikes(agent, registry, "0.5") == 0
    loop.close()
    agent.watchdog.tick(clock.now)
    assert agent.loops() == ()
    assert probe.stopped
    assert spikes(agent, registry, "0.5") == 0  # the label's counters stay (no series created and dropped)


# -- the gauge and the schedule -----------------------------------------------------------------

def test_lag_gauge_is_how_long_the_loop_has_been_stuck_right_now(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    assert lag(agent, registry) == 0.0  # waiting for I/O
    probe.activity.begin(T0 + 0.2)
    values = []
    for at in (0.2, 0.7, 30.2, 79.2):
        clock.now = T0 + at
        values.append(lag(agent, registry))
    assert values == [pytest.approx(v) for v in (0.0, 0.5, 30.0, 79.0)]
    probe.activity.end(T0 + 79.2)
    assert lag(agent, registry) == 0.0  # over: not the last stall's length
    probe.activity.begin(clock.now - 0.002)
    assert lag(agent, registry) == pytest.approx(0.002)  # healthy and busy: about 0
    probe.running = False
    assert lag(agent, registry) == 0.0


def test_the_watchdog_sleeps_until_a_stretch_could_cross_a_threshold(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    watchdog = agent.watchdog
    # Idle: a stretch that starts meanwhile cannot cross the threshold before the next look.
    assert watchdog.tick(clock.now) == pytest.approx(clock.now + SAMPLE_AT * 0.5)
    probe.activity.begin(T0 + 0.1)
    assert watchdog.tick(T0 + 0.2) == pytest.approx(T0 + 0.1 + SAMPLE_AT * 0.5)
    assert watchdog.tick(T0 + 0.1 + SAMPLE_AT * 0.5) == pytest.approx(T0 + 0.6)
    # Past the first threshold: at the next one (T0 + 2.1), or sooner -- SAMPLE_AT of the first threshold
    # -- in case this stall ends and another one begins.
    assert watchdog.tick(T0 + 0.6) == pytest.approx(T0 + 0.6 + SAMPLE_AT * 0.5)
    assert watchdog.tick(T0 + 1.9) == pytest.approx(T0 + 2.1)
    assert watchdog.tick(T0 + 2.1) == pytest.approx(min(T0 + 2.1 + MAX_SLEEP, T0 + 2.1 + SAMPLE_AT * 0.5))
    probe.running = False
    assert watchdog.tick(T0 + 3.0) == pytest.approx(T0 + 3.0 + SAMPLE_AT * 0.5)


# -- slow callbacks where the clock does not count them (uvloop) --------------------------------------

async def settle_book() -> None:
    await asyncio.sleep(1)


def test_a_seen_stall_is_a_slow_callback_named_after_the_running_task(tmp_path: Path, loop) -> None:
    agent, probe, clock, registry = make(tmp_path, loop, activity=FakeActivity(times_iterations=False))
    task = loop.create_task(settle_book(), name="settle")
    probe.activity.begin(T0 + 0.1)
    asyncio.tasks._enter_task(loop, task)
    try:
        run_until(agent, clock, T0 + 0.7)  # mid-stall: the stack, and the task that is running
    finally:
        asyncio.tasks._leave_task(loop, task)
    probe.activity.end(T0 + 0.9)
    with capture_logs() as logs:
        agent.watchdog.tick(T0 + 1.0)
    task.cancel()
    loop.run_until_complete(asyncio.sleep(0))
    assert agent.slow.counts["main"].items() == [(f"{__name__}.settle_book", 1.0)]
    (event,) = events(logs, "loopwatch.slow_callback")
    assert (event["what"], event["task"], event["coro"]) == ("task_step", "settle", "settle_book")
    assert event["duration"] == pytest.approx(0.8)
    assert event["culprit"].startswith(f"{__file__}:")


def test_short_slow_stretches_are_unattributed_and_stdlib_loops_are_not_counted_twice(tmp_path: Path, loop) -> None:
    agent, probe, clock, registry = make(tmp_path, loop, activity=FakeActivity(times_iterations=False))
    probe.activity.begin(T0 + 0.1)
    probe.activity.end(T0 + 0.35)  # 0.25 s: a slow callback, not a stall
    with capture_logs() as logs:
        agent.watchdog.tick(T0 + 0.4)
    (event,) = events(logs, "loopwatch.slow_callback")
    assert (event["callback"], event["what"]) == ("unattributed", "stall")
    assert event["duration"] == pytest.approx(0.25)
    assert events(logs, "loopwatch.stall") == []
    probe.activity.times_iterations = True  # stdlib: its timer counts them itself
    probe.activity.begin(T0 + 1.0)
    probe.activity.end(T0 + 1.3)
    with capture_logs() as logs:
        agent.watchdog.tick(T0 + 1.4)
    assert events(logs, "loopwatch.slow_callback") == []
    assert agent.slow.counts["main"].items() == [("unattributed", 1.0)]


# -- garbage collection and stalls that hold the GIL ------------------------------------------------

class FakeGc:
    def __init__(self, passes: list[tuple[float, float, int]]) -> None:
        self.passes = passes

    def kind(self, start: float, end: float) -> tuple[float, int] | None:
        seconds = sum(max(0.0, min(e, end) - max(s, start)) for s, e, _ in self.passes)
        generations = [g for s, e, g in self.passes if min(e, end) > max(s, start)]
        return (seconds, max(generations)) if generations and seconds >= 0.5 * (end - start) else None


def test_a_stall_that_is_mostly_a_collection_is_kind_gc(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    agent.watchdog._gc = FakeGc([(T0 + 0.15, T0 + 0.95, 2)])
    probe.activity.begin(T0 + 0.1)
    run_until(agent, clock, T0 + 0.7)
    (dump,) = dumps(dump_dir)
    assert (dump["kind"], dump["gc_generation"]) == ("gc", 2)
    assert dump["gc_seconds"] == pytest.approx(0.45)  # of the 0.5 s the stall had lasted when it was taken
    probe.activity.end(T0 + 1.0)
    with capture_logs() as logs:
        agent.watchdog.tick(T0 + 1.1)
    (stall,) = events(logs, "loopwatch.stall")
    assert (stall["kind"], stall["gc_generation"], stall["gc_seconds"]) == ("gc", 2, pytest.approx(0.8))


def test_a_collection_that_is_a_small_part_of_the_stall_does_not_make_it_gc(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    agent.watchdog._gc = FakeGc([(T0 + 0.2, T0 + 0.3, 0)])
    probe.activity.begin(T0 + 0.1)
    run_until(agent, clock, T0 + 1.0)
    probe.activity.end(T0 + 1.0)
    with capture_logs() as logs:
        agent.watchdog.tick(T0 + 1.1)
    (stall,) = events(logs, "loopwatch.stall")
    assert stall["kind"] != "gc" and "gc_generation" not in stall


class FakeGilHeld:
    """The fallback's file, as the loop thread leaves it after stacks written on its timer's signal."""

    def __init__(self, armed_at: float, stacks: list[str]) -> None:
        self.armed_at = armed_at
        self._stacks = stacks

    def has_output(self) -> bool:
        return bool(self._stacks)

    def take(self) -> list[str]:
        out, self._stacks = self._stacks, []
        return out

    def arm(self, at: float) -> None:
        self.armed_at = at

    def disarm(self) -> None:
        self.armed_at = None


STACK = f'Stack (most recent call first):\n  File "{__file__}", line 7 in match_order_id\n'


def test_a_gil_held_stall_is_dumped_from_the_stack_the_loop_thread_wrote(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    # The watchdog planned to look at T0 + 0.45 but could not (GIL held from T0 + 0.4 to T0 + 1.8): the
    # timer fired at T0 + 0.7, 0.95, 1.2, 1.45 and 1.7, and the loop thread wrote its stack each time.
    fallback = FakeGilHeld(T0 + 0.7, [STACK] * 5)
    agent.watchdog._gilheld = lambda p: fallback
    probe.activity.begin(T0 + 0.4)
    probe.activity.end(T0 + 1.8)
    with capture_logs() as logs:
        agent.watchdog.tick(T0 + 1.85, late=True)
    (dump,) = dumps(dump_dir)
    assert dump["source"] == "faulthandler"
    assert dump["stall_seconds"] == pytest.approx(0.55)  # the first stack written past the threshold
    assert dump["culprit"]["function"] == "match_order_id" and dump["culprit"]["lineno"] == 7
    (stall,) = events(logs, "loopwatch.stall")
    assert stall["source"] == "faulthandler" and stall["duration"] == pytest.approx(1.4)
    assert fallback.take() == []


@pytest.mark.parametrize("threshold", [0.1, 0.5, 2.0])
def test_a_gil_held_stall_at_any_phase_has_a_stack_within_a_quarter_second_past_the_threshold(tmp_path: Path, loop,
                                                                                   threshold: float) -> None:
    """Sweep the moment a GIL-held stall begins across the watchdog's look interval: the watchdog looks as
    it plans (and arms the fallback FALLBACK_AFTER after each planned look, as its thread does) until the
    stall starts; then it cannot run, and the timer writes a stack at its armed time and every REPEAT s.
    The dump's stack is always one written between the threshold and 0.25 s past it."""
    steps = 40
    for k in range(steps):
        (tmp_path / f"{threshold}-{k}").mkdir()
        agent, probe, clock, registry = make(tmp_path / f"{threshold}-{k}", loop, dump_cooldown=0,
                                             lag_thresholds=(threshold, 60.0))
        fallback = FakeGilHeld(None, [])  # type: ignore[arg-type]
        agent.watchdog._gilheld = lambda p, f=fallback: f
        start = T0 + 1.0 + k / steps * SAMPLE_AT * threshold
        end = start + threshold + REPEAT + 0.3
        wake = clock.now = T0
        while wake <= start:  # healthy: the loop waits, the watchdog looks as planned
            clock.now = wake
            wake = agent.watchdog.tick(wake)
            fallback.arm(wake + FALLBACK_AFTER)
        probe.activity.begin(start)
        fired = [fallback.armed_at + n * REPEAT for n in range(100) if fallback.armed_at + n * REPEAT < end]
        assert fired, "the fallback must fire during the stall"
        fallback._stacks = [STACK] * len(fired)
        probe.activity.end(end)
        agent.watchdog.tick(end + 0.01, late=True)
        (dump,) = dumps(tmp_path / f"{threshold}-{k}")
        assert dump["source"] == "faulthandler"
        assert threshold <= dump["stall_seconds"] <= threshold + 0.25 + 1e-6, (k, dump["stall_seconds"])


def test_stacks_written_outside_any_stall_are_dropped(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    fallback = FakeGilHeld(T0 + 0.7, [STACK])  # the watchdog was starved while the loop was idle
    agent.watchdog._gilheld = lambda p: fallback
    agent.watchdog.tick(T0 + 1.0, late=True)
    probe.activity.begin(T0 + 2.0)
    run_until(agent, clock, T0 + 2.7, wake=T0 + 2.0)
    (dump,) = dumps(dump_dir)
    assert dump["source"] == "watchdog"  # its own live stack, not the stale one


# -- a long simulated churn ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_hours_of_random_stretches_every_stall_counted_once_per_threshold(tmp_path: Path, loop, seed: int) -> None:
    """Six simulated hours of random stretches and waits (most short, some long, a few very long), the
    watchdog looking when it asks to: every stall is counted once per threshold it crossed, seen live as it
    crossed the first one, and logged with its exact duration."""
    rng = random.Random(seed)
    agent, probe, clock, registry = make(tmp_path, loop, dump_keep=0, lag_thresholds=(0.5, 2.0, 10.0))
    activity = probe.activity
    expected = {0.5: 0, 2.0: 0, 10.0: 0}
    durations: list[float] = []
    t, wake = T0, T0
    logged: list[dict] = []
    captured = []
    original = agent.watchdog._capture

    def capture(probe_, state, stall, now):  # noqa: ANN001, ANN202 - spy: the age at which it was taken
        captured.append(now - stall.key)
        return original(probe_, state, stall, now)

    agent.watchdog._capture = capture  # type: ignore[method-assign]
    with capture_logs() as logs:
        while t < T0 + 6 * 3600:
            roll = rng.random()
            busy = (rng.uniform(0.0, 0.05) if roll < 0.97 else rng.uniform(0.3, 3.0) if roll < 0.999
                    else rng.uniform(5.0, 15.0))
            activity.begin(t)
            wake = run_until(agent, clock, t + busy, wake)
            activity.end(t + busy)
            if busy >= 0.5:
                durations.append(busy)
                for value in expected:
                    expected[value] += busy >= value
            t += busy + rng.uniform(0.0, 1.0)
            wake = run_until(agent, clock, t, wake)
        logged = events(logs, "loopwatch.stall")
    assert [spikes(agent, registry, str(v)) for v in expected] == [float(n) for n in expected.values()]
    assert [e["duration"] for e in logged] == [pytest.approx(d, abs=1e-6) for d in durations]
    assert len(captured) == len(durations) > 100
    assert all(abs(age - 0.5) < KEY_TOLERANCE for age in captured), max(captured)
