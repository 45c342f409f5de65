"""Stall detection logic, driven tick by tick with an injected clock (no threads, no sleeping)."""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from loopwatch._agent import Agent
from loopwatch._config import resolve
from loopwatch._probe import Beat


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProbe:
    """What the watchdog reads from a LoopProbe; the loop is real but never runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, label: str = "main") -> None:
        self.loop = loop
        self.label = label
        self.thread_ident = threading.get_ident()
        self.thread_name = "MainThread"
        self.native_id = threading.get_native_id()
        self.interval = 0.25
        self.running = True
        self.activity = None
        self.stall_callback = None
        self.expected_at = 1000.25
        self.last_delay = 0.0
        self.late_beats: collections.deque[Beat] = collections.deque()
        self.on_beat = None
        self.stopped = False

    @property
    def closed(self) -> bool:
        return self.loop.is_closed()

    def lag(self, now: float) -> float:
        return max(now - self.expected_at, self.last_delay)

    def stop(self) -> None:
        self.stopped = True

    def beat(self, now: float, cpu: float | None = 0.0) -> None:
        delay = now - self.expected_at
        if delay >= 0.5:
            self.late_beats.append(Beat(self.expected_at, delay, cpu))
        self.last_delay = max(0.0, delay)
        self.expected_at = now + 0.25


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def setup(tmp_path: Path, loop: asyncio.AbstractEventLoop):
    clock = Clock()
    registry = CollectorRegistry()
    options = resolve({"registry": registry, "metrics_port": 0, "dump_dir": tmp_path, "dump_cooldown": 30,
                       "faulthandler": False}, environ={})
    agent = Agent(options, clock=clock)
    registry.register(agent.metrics)
    agent.writer.prepare()
    probe = FakeProbe(loop)
    agent._probes = (probe,)  # type: ignore[assignment]
    agent.metrics.add_loop("main")
    return agent, probe, clock, registry, tmp_path


def spikes(registry: CollectorRegistry, threshold: str) -> float | None:
    return registry.get_sample_value("loopwatch_event_loop_lag_spikes_total",
                                     {"service": registry_service(registry), "loop": "main", "threshold": threshold})


def registry_service(registry: CollectorRegistry) -> str:
    for family in registry.collect():
        for sample in family.samples:
            if "service" in sample.labels:
                return sample.labels["service"]
    raise AssertionError("no service label")


def dumps(path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(path.glob("loopwatch-*.json"))]


def test_healthy_loop_counts_nothing(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    for _ in range(50):
        clock.now += 0.1
        if clock.now >= probe.expected_at:
            probe.beat(clock.now)
        agent.watchdog.tick(clock.now)
    assert spikes(registry, "0.5") == 0
    assert dumps(dump_dir) == []


def test_live_stall_counts_each_threshold_once_and_dumps_once(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    clock.now = probe.expected_at + 0.3
    agent.watchdog.tick(clock.now)
    assert spikes(registry, "0.5") == 0
    clock.now = probe.expected_at + 0.6
    agent.watchdog.tick(clock.now)
    assert spikes(registry, "0.5") == 1
    assert spikes(registry, "2.0") == 0
    assert len(dumps(dump_dir)) == 1  # taken while the stall is going on
    for extra in (1.0, 2.1, 3.0, 4.0):
        clock.now = probe.expected_at + extra
        agent.watchdog.tick(clock.now)
    assert spikes(registry, "0.5") == 1
    assert spikes(registry, "2.0") == 1
    assert spikes(registry, "10.0") == 0
    assert len(dumps(dump_dir)) == 1  # one dump per stall, not one per tick
    with capture_logs() as logs:
        probe.beat(clock.now + 0.5, cpu=0.01)
        clock.now += 0.6
        agent.watchdog.tick(clock.now)
    stall = [e for e in logs if e["event"] == "loopwatch.stall"]
    assert len(stall) == 1
    assert stall[0]["duration"] == pytest.approx(4.5)
    assert stall[0]["thresholds"] == [0.5, 2.0]
    assert stall[0]["kind"] == "blocked"
    assert stall[0]["dump"] == str(sorted(dump_dir.glob("loopwatch-*.json"))[0])
    assert spikes(registry, "2.0") == 1  # the late beat does not count again


def test_dump_describes_the_stall(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    clock.now = probe.expected_at + 0.7
    agent.watchdog.tick(clock.now)
    (dump,) = dumps(dump_dir)
    assert dump["reason"] == "event_loop_lag"
    assert dump["source"] == "watchdog"
    assert dump["loop"] == "main"
    assert dump["stall_seconds"] == pytest.approx(0.7)
    assert dump["service"] == agent.options.service
    # The loop thread here is the test's own thread: its innermost application frame is this file.
    assert dump["culprit"]["filename"] == __file__
    assert registry.get_sample_value("loopwatch_dumps_total",
                                     {"service": agent.options.service, "reason": "event_loop_lag"}) == 1


def test_stall_missed_live_is_counted_from_the_late_beat(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    # The watchdog could not run during the stall (GIL held): it only sees the late beat afterwards.
    clock.now = probe.expected_at + 2.5
    probe.beat(clock.now, cpu=2.4)
    clock.now += 0.05
    with capture_logs() as logs:
        agent.watchdog.tick(clock.now, starving=True)
    assert spikes(registry, "0.5") == 1
    assert spikes(registry, "2.0") == 1
    assert dumps(dump_dir) == []  # no stack could be taken (faulthandler is off here)
    (stall,) = [e for e in logs if e["event"] == "loopwatch.stall"]
    assert stall["kind"] == "cpu"
    assert "GIL" in stall["note"]


def test_short_stall_between_two_looks_is_still_counted(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    clock.now = probe.expected_at + 0.4
    agent.watchdog.tick(clock.now)  # lag below the threshold at this look
    probe.beat(probe.expected_at + 0.55, cpu=0.0)
    clock.now = probe.expected_at - 0.2
    with capture_logs() as logs:
        agent.watchdog.tick(clock.now)
    assert spikes(registry, "0.5") == 1
    (stall,) = [e for e in logs if e["event"] == "loopwatch.stall"]
    assert "ended before the watchdog's next look" in stall["note"]


def test_starved_watchdog_defers_the_capture(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    clock.now = probe.expected_at + 0.8
    agent.watchdog.tick(clock.now, starving=True)
    assert spikes(registry, "0.5") == 1
    assert dumps(dump_dir) == []
    clock.now += 0.1
    agent.watchdog.tick(clock.now)
    assert len(dumps(dump_dir)) == 1


class MovingProbe(FakeProbe):
    """Its beat arrives between the watchdog's first and second read of the heartbeat."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.reads = 0
        self._due = 1000.25

    @property  # type: ignore[override]
    def expected_at(self) -> float:
        self.reads += 1
        return self._due if self.reads <= 1 else self._due + 5

    @expected_at.setter
    def expected_at(self, value: float) -> None:
        self._due = value


def test_stack_is_discarded_if_the_stall_ended_during_capture(setup, loop) -> None:
    agent, _, clock, registry, dump_dir = setup
    probe = MovingProbe(loop)
    agent._probes = (probe,)  # type: ignore[assignment]
    clock.now = 1000.25 + 0.9
    agent.watchdog.tick(clock.now)
    assert probe.reads >= 2
    assert dumps(dump_dir) == []
    assert spikes(registry, "0.5") == 1


def test_cooldown_between_automatic_dumps(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    for _ in range(2):
        clock.now = probe.expected_at + 0.6
        agent.watchdog.tick(clock.now)
        probe.beat(clock.now + 0.1)
        clock.now += 0.2
        agent.watchdog.tick(clock.now)
        clock.now += 1.0
    assert spikes(registry, "0.5") == 2
    assert len(dumps(dump_dir)) == 1  # the second stall came within dump_cooldown=30
    clock.now += 30
    probe.expected_at = clock.now
    clock.now += 0.6
    agent.watchdog.tick(clock.now)
    assert len(dumps(dump_dir)) == 2


def test_paused_loop_is_not_stalled(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    probe.running = False
    clock.now = probe.expected_at + 30
    agent.watchdog.tick(clock.now)
    assert spikes(registry, "0.5") == 0
    assert dumps(dump_dir) == []


def test_closed_loop_is_detached_and_its_series_disappear(setup, loop) -> None:
    agent, probe, clock, registry, dump_dir = setup
    service = agent.options.service
    labels = {"service": service, "loop": "main", "threshold": "0.5"}
    assert registry.get_sample_value("loopwatch_event_loop_lag_spikes_total", labels) == 0
    loop.close()
    agent.watchdog.tick(clock.now)
    assert agent.probes() == ()
    assert probe.stopped
    assert registry.get_sample_value("loopwatch_event_loop_lag_spikes_total", labels) is None


def test_lag_gauge_grows_live_during_a_stall(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    labels = {"service": agent.options.service, "loop": "main"}
    values = []
    for extra in (0.0, 1.0, 30.0, 79.0):
        clock.now = probe.expected_at + extra
        values.append(registry.get_sample_value("loopwatch_event_loop_lag_seconds", labels))
    assert values == [0.0, 1.0, 30.0, 79.0]
    probe.beat(clock.now)
    clock.now += 0.1
    assert registry.get_sample_value("loopwatch_event_loop_lag_seconds", labels) == pytest.approx(79.0)
    probe.beat(probe.expected_at + 0.002)
    assert registry.get_sample_value("loopwatch_event_loop_lag_seconds", labels) == pytest.approx(0.002)


def test_culprit_is_logged_even_when_no_dump_is_written(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    agent.writer.disable("testing")
    clock.now = probe.expected_at + 0.6
    agent.watchdog.tick(clock.now)
    with capture_logs() as logs:
        probe.beat(clock.now + 0.1)
        clock.now += 0.2
        agent.watchdog.tick(clock.now)
    (stall,) = [e for e in logs if e["event"] == "loopwatch.stall"]
    assert stall["culprit"].startswith(__file__ + ":")
    assert stall["note"] == "dumps disabled: testing"
    assert "dump" not in stall
    assert dumps(dump_dir) == []


def test_watchdog_sleeps_until_a_beat_could_be_late(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    # Healthy: the next look is when the pending beat would be 0.5 s (the first threshold) late.
    assert agent.watchdog.next_wait(clock.now) == pytest.approx(probe.expected_at + 0.5 - clock.now)
    # A stall in progress: look every watchdog_interval to count thresholds live.
    clock.now = probe.expected_at + 0.6
    agent.watchdog.tick(clock.now)
    assert agent.watchdog.next_wait(clock.now) == agent.options.watchdog_interval
    # No running loop: housekeeping only.
    probe.running = False
    agent.watchdog.tick(clock.now)
    from loopwatch._watchdog import MAX_SLEEP
    assert agent.watchdog.next_wait(clock.now) == MAX_SLEEP


def test_late_beat_waiting_to_be_finished_means_look_soon(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    probe.beat(probe.expected_at + 0.7)
    assert agent.watchdog.next_wait(clock.now) == agent.options.watchdog_interval


def test_a_healthy_loop_does_not_wake_the_watchdog_and_a_stall_does(registry, tmp_path):
    """The beats re-arm a timerfd: no watchdog wake-up while the loop is healthy (each would cost a busy
    loop a GIL hand-off), and one as soon as a beat is a threshold late."""
    import time

    import loopwatch
    from conftest import collected, sample

    async def main():
        agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, probe_interval=0.1,
                                  lag_thresholds=(0.3,))
        assert agent.watchdog.timed, agent.watchdog.timer_note
        ticks = []
        original = agent.watchdog.tick
        agent.watchdog.tick = lambda now, **kw: (ticks.append(now), original(now, **kw))
        await asyncio.sleep(0.5)  # the looks that follow install() (the attach pokes the watchdog)
        start = time.monotonic()
        await asyncio.sleep(3.0)  # 30 beats
        end = time.monotonic()
        time.sleep(0.6)  # a stall: the timer fires at 0.3 s of lag
        await asyncio.sleep(0.3)
        spikes = sample(collected(registry), "loopwatch_event_loop_lag_spikes_total", threshold="0.3")
        assert spikes == 1.0  # counted live, by the wake-up the late beat caused
        return [t for t in ticks if start <= t < end], [t for t in ticks if t >= end]

    healthy, stalled = asyncio.run(main())
    assert healthy == [], healthy  # 30 healthy beats, not one wake-up (MAX_SLEEP_TIMED is 5 s)
    assert stalled, "the stall did not wake the watchdog"


# -- loops whose iterations cannot be timed (uvloop): the watchdog counts the slow callbacks ------------

class NoIterationTiming:
    """What the agent gives a uvloop loop (CpuBusy): it does not count slow callbacks itself."""

    times_iterations = False

    def busy_now(self) -> None:
        return None


async def settle_book() -> None:
    await asyncio.sleep(1)


def stall_and_recover(agent, probe, clock, task=None):
    if task is not None:
        asyncio.tasks._enter_task(probe.loop, task)
    try:
        clock.now = probe.expected_at + 0.7
        agent.watchdog.tick(clock.now)  # mid-stall: the stack, and the task that is running
    finally:
        if task is not None:
            asyncio.tasks._leave_task(probe.loop, task)
    with capture_logs() as logs:
        probe.beat(clock.now + 0.1)
        clock.now += 0.2
        agent.watchdog.tick(clock.now)  # the stall is over: counted
    return [e for e in logs if e["event"] == "loopwatch.slow_callback"]


def test_a_seen_stall_is_a_slow_callback_named_after_the_running_task(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    probe.activity = NoIterationTiming()
    task = probe.loop.create_task(settle_book(), name="settle")
    try:
        events = stall_and_recover(agent, probe, clock, task)
    finally:
        task.cancel()
        probe.loop.run_until_complete(asyncio.sleep(0))
    assert agent.slow.counts["main"].items() == [(f"{__name__}.settle_book", 1.0)]
    (event,) = events
    assert (event["what"], event["task"], event["coro"]) == ("task_step", "settle", "settle_book")
    assert event["duration"] == pytest.approx(0.8)
    assert event["culprit"].startswith(f"{__file__}:")  # the loop thread here is the test's own thread
    assert registry.get_sample_value("loopwatch_slow_callback_duration_seconds_count",
                                     {"service": agent.options.service, "loop": "main"}) == 1


def test_a_seen_stall_without_a_task_is_unattributed_and_stdlib_loops_are_not_counted_twice(setup) -> None:
    agent, probe, clock, registry, dump_dir = setup
    probe.activity = NoIterationTiming()
    (event,) = stall_and_recover(agent, probe, clock)
    assert (event["callback"], event["what"]) == ("unattributed", "stall")
    probe.activity = type("Timer", (), {"times_iterations": True, "busy_now": lambda self: None})()  # stdlib: its timer counts
    assert stall_and_recover(agent, probe, clock) == []
    assert agent.slow.counts["main"].items() == [("unattributed", 1.0)]
