"""Slow callbacks and loop utilization: unit tests (injected clock) and subprocess end-to-end tests."""

from __future__ import annotations

import asyncio
import functools
import math
import re
import selectors
import time
from pathlib import Path
from unittest import mock

import pytest
from conftest import APPS, free_port, sample, scrape

import loopwatch
from loopwatch import _slow
from loopwatch._labels import OTHER, Slots
from loopwatch._slow import SlowCallback, SlowCallbacks, describe_callback

APP = APPS / "slow_app.py"


def marker_line(marker: str) -> int:
    for number, line in enumerate(APP.read_text().splitlines(), 1):
        if f"# {marker}" in line:
            return number
    raise AssertionError(marker)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- bounded labels ------------------------------------------------------------------------------

def test_the_first_keys_keep_their_series_and_the_rest_add_to_other() -> None:
    counts = Slots(2)
    for key, times in (("a", 5), ("b", 3), ("c", 2), ("d", 1)):
        for _ in range(times):
            counts.inc(key)
    assert counts.items() == [("a", 5.0), ("b", 3.0), (OTHER, 3.0)]
    assert sum(v for _, v in counts.items()) == counts.total == 11


def test_a_later_frequent_key_does_not_take_a_slot_while_its_holder_is_counted() -> None:
    """Sticky: moving keys in and out of a top-N by count would drop series and make ``other`` go down
    (a counter reset for Prometheus)."""
    clock = Clock()
    counts = Slots(1, retire_after=60, clock=clock)
    counts.inc("early")
    for second in range(1, 50):
        clock.now = float(second)
        counts.inc("frequent")
        if second % 10 == 0:
            counts.inc("early")
    assert counts.items() == [("early", 5.0), (OTHER, 49.0)]


def test_an_idle_key_gives_its_slot_to_the_next_new_key() -> None:
    clock = Clock()
    counts = Slots(2, retire_after=60, clock=clock)
    for key in ("k1", "k2", "k2"):
        counts.inc(key)
    clock.now = 30.0
    counts.inc("k2")
    counts.inc("k3")  # nobody idle for 60 s yet
    assert counts.items() == [("k2", 3.0), ("k1", 1.0), (OTHER, 1.0)]
    clock.now = 61.0  # k1 idle 61 s, k2 31 s
    counts.inc("k4")
    assert counts.items() == [("k2", 3.0), ("k4", 1.0), (OTHER, 2.0)]  # k1's count moved to other
    assert counts.total == 6.0


def test_days_of_churn_keep_series_bounded_and_every_counter_monotonic() -> None:
    """A week of simulated time, keys drawn from a changing population (a new handler every few minutes,
    bursts of a few hot ones): at most n + 1 series at any scrape, no exported value ever goes down, a
    series disappears only after its key was idle ``retire_after`` s, and the values add up to the total."""
    import random

    rng = random.Random(12)
    clock = Clock()
    counts = Slots(5, retire_after=3600, clock=clock)
    previous: dict[str, float] = {}
    last_counted: dict[str, float] = {}
    for step in range(7 * 24 * 60):  # one step per simulated minute, a scrape at each
        clock.now = step * 60.0
        population = [f"handler{(step // 7 + i) % 400}" for i in range(8)] if step % 500 < 400 else ["hot"]
        for _ in range(rng.randrange(0, 6)):
            key = rng.choice(population)
            counts.inc(key)
            last_counted[key] = clock.now
        now = dict(counts.items())
        assert len(now) <= 6
        assert abs(sum(now.values()) - counts.total) < 1e-6
        for key, value in previous.items():
            if key in now:
                assert now[key] >= value, (key, value, now[key])
            else:
                assert key != OTHER and clock.now - last_counted[key] >= 3600, key
        previous = now


def test_slots_reject_bad_sizes() -> None:
    with pytest.raises(ValueError, match=r"^need n >= 1 and retire_after > 0, got n=0, retire_after=3600.0$"):
        Slots(0)


# -- what ran ------------------------------------------------------------------------------------

async def score(n: int) -> None:
    await asyncio.sleep(0)


def plain(x: int) -> None:
    pass


class Cache:
    def flush(self) -> None:
        pass


def test_describe_task_step() -> None:
    async def main() -> dict:
        task = asyncio.create_task(score(1), name="signal-7")
        info = describe_callback(task._Task__step if hasattr(task, "_Task__step") else _step_of(task))
        await task
        return info

    info = asyncio.run(main())
    assert info["what"] == "task_step"
    assert info["label"] == f"{__name__}.score"
    assert info["task"] == "signal-7"
    assert info["coro"] == "score"
    assert info["source"] == f"{__file__}:{score.__code__.co_firstlineno}"


def _step_of(task: asyncio.Task) -> object:
    """The C Task's step callback, as the loop sees it: the handle scheduled by create_task."""
    loop = task.get_loop()
    for handle in loop._ready:  # type: ignore[attr-defined]
        if getattr(handle._callback, "__self__", None) is task:
            return handle._callback
    raise AssertionError("no step scheduled")


def test_describe_plain_callbacks() -> None:
    assert describe_callback(plain) == {"what": "callback", "label": f"{__name__}.plain",
                                        "source": f"{__file__}:{plain.__code__.co_firstlineno}"}
    assert describe_callback(functools.partial(plain, 1))["label"] == f"{__name__}.plain"
    assert describe_callback(Cache().flush)["label"] == f"{__name__}.Cache.flush"
    loop = asyncio.new_event_loop()
    try:
        info = describe_callback(loop.create_future().set_result)
    finally:
        loop.close()
    assert info["label"].endswith("Future.set_result")
    assert info["source"] is None  # a C method has no Python source


def test_log_is_rate_limited_per_callback_with_injected_clock() -> None:
    clock, logged, observed = Clock(), [], []
    slow = SlowCallbacks(0.1, observe=lambda loop, d, exemplar=None: observed.append(d), log=logged.append, clock=clock)
    event = SlowCallback("main", 0.2, "app.handler", "task_step")
    for now in (0.0, 0.5, 0.99, 1.0, 1.2, 2.5):
        clock.now = now
        slow.record(event)
    assert [e.duration for e in logged] == [0.2, 0.2, 0.2]  # at 0.0, 1.0 and 2.5
    assert len(observed) == 6  # every one is measured
    assert slow.counts["main"].items() == [("app.handler", 6.0)]


def test_exact_mode_wrapper_comes_and_goes(registry, tmp_path: Path) -> None:
    import asyncio.events

    import loopwatch

    original = asyncio.events.Handle._run

    async def main() -> object:
        await asyncio.sleep(0.05)
        time.sleep(0.15)  # a slow step: the first one switches exact timing on
        await asyncio.sleep(0.05)
        return asyncio.events.Handle.__dict__["_run"]

    loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    during = asyncio.run(main())
    assert during.__code__ in _slow._RUN_CODES and during is not original  # ours, while a loop needs it
    loopwatch.uninstall()
    assert asyncio.events.Handle.__dict__["_run"] is original
    assert _slow._exact == {}


# -- the per-iteration selector wrapper, on an injected clock -------------------------------------

class FakeSelector:
    """A selector whose ``select()`` waits ``idle`` seconds of the fake clock unless asked not to wait."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.idle = 0.0
        self.timeouts: list[float | None] = []

    def select(self, timeout: float | None = None) -> list:
        self.timeouts.append(timeout)
        if timeout != 0:
            self.clock.now += self.idle
        return []


class FakeLoop:
    def __init__(self, clock: Clock) -> None:
        self._selector = FakeSelector(clock)


def iteration_timer(clock: Clock, threshold: float = 0.1, named=None):
    recorded: list[SlowCallback] = []
    slow = SlowCallbacks(threshold, observe=lambda loop, d, exemplar=None: None, log=lambda e: None, clock=clock)
    slow.record = recorded.append  # type: ignore[method-assign]
    loop = FakeLoop(clock)
    timer = _slow.IterationTimer(loop, "main", slow, exact_always=False, stall_label=lambda: named,
                                 clock=clock)
    with mock.patch.object(_slow, "KNOWN_SELECTS", _slow.KNOWN_SELECTS | {FakeSelector.select}):
        assert timer.install()  # a test double: recognised only because this test says so
    return loop, timer, recorded


@pytest.mark.parametrize("selector", ["mock", "subclass", "double"])
def test_iteration_timer_leaves_selectors_it_does_not_know_alone(selector: str) -> None:
    class OwnSelect(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
        def select(self, timeout=None):  # noqa: ANN001, ANN202
            return super().select(timeout)

    clock = Clock()
    loop = FakeLoop(clock)
    loop._selector = {"mock": mock.Mock(), "subclass": OwnSelect(), "double": FakeSelector(clock)}[selector]
    before = loop._selector.select
    slow = SlowCallbacks(0.1, observe=lambda loop, d, exemplar=None: None, log=lambda e: None, clock=clock)
    timer = _slow.IterationTimer(loop, "main", slow, exact_always=False, stall_label=lambda: None, clock=clock)
    assert not timer.install()
    assert loop._selector.select == before  # untouched
    assert "select() is left alone" in (timer.not_wrapped or "")
    if selector == "mock":
        loop._selector.select(0)
        loop._selector.select.assert_called_once_with(0)  # what CPython's test_run_forever_pre_stopped checks


def test_a_loop_with_a_mock_selector_runs_with_loopwatch_installed(registry, tmp_path: Path) -> None:
    loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    loop = asyncio.new_event_loop()
    try:
        loop._selector.close()  # type: ignore[attr-defined]
        loop._selector = mock.Mock()  # type: ignore[attr-defined]
        loop._selector.select.return_value = ()
        loop._process_events = mock.Mock()  # type: ignore[method-assign]
        loop.stop()
        loop.run_forever()
        loop._selector.select.assert_called_once_with(0)  # type: ignore[attr-defined]
    finally:
        loop._selector = selectors.DefaultSelector()  # type: ignore[attr-defined]
        loop.close()


def run_iteration(loop: FakeLoop, clock: Clock, busy: float, idle: float, timeout: float | None) -> None:
    clock.now += busy  # callbacks run
    loop._selector.idle = idle
    loop._selector.select(timeout)


def test_iteration_timer_sums_busy_time_and_not_the_wait() -> None:
    clock = Clock()
    loop, timer, recorded = iteration_timer(clock)
    try:
        run_iteration(loop, clock, busy=0.02, idle=0.5, timeout=None)  # waits: idle is not busy
        run_iteration(loop, clock, busy=0.03, idle=0.0, timeout=0)  # callbacks ready: select(0)
        run_iteration(loop, clock, busy=0.01, idle=1.0, timeout=1.0)
        assert loop._selector.timeouts == [None, 0, 1.0]  # the original select() got what asyncio asked
        assert timer.busy_now() == pytest.approx(0.06)
        clock.now += 0.25  # a callback has been running for 0.25 s: busy time grows live
        assert timer.busy_now() == pytest.approx(0.31)
        assert recorded == []  # no iteration crossed 0.1 s yet
    finally:
        timer.uninstall()
        _slow._set_exact(timer, False)


def test_iteration_timer_counts_slow_iterations_blocking_or_not_and_opens_exact_window() -> None:
    clock = Clock()
    loop, timer, recorded = iteration_timer(clock)
    try:
        run_iteration(loop, clock, busy=0.15, idle=0.2, timeout=None)
        assert [(e.duration, e.label, e.what) for e in recorded] == [(pytest.approx(0.15), "unattributed", "iteration")]
        assert _slow._exact.get(timer.key) is timer  # unattributed: exact timing switches on
        run_iteration(loop, clock, busy=0.12, idle=0.0, timeout=0)  # slow, though select() did not wait
        assert len(recorded) == 2 and recorded[1].duration == pytest.approx(0.12)
        timer.on_beat()  # inside the window: stays on
        assert timer.key in _slow._exact
        run_iteration(loop, clock, busy=0.01, idle=_slow.EXACT_WINDOW + 1.0, timeout=None)  # a quiet minute
        run_iteration(loop, clock, busy=0.01, idle=0.0, timeout=0)
        assert len(recorded) == 2
        assert timer.key in _slow._exact  # the hot path never switches it off...
        timer.on_beat()
        assert timer.key not in _slow._exact  # ...the next probe beat does
    finally:
        timer.uninstall()
        _slow._set_exact(timer, False)


def test_iteration_timer_names_a_slow_iteration_the_watchdog_saw() -> None:
    clock = Clock()
    loop, timer, recorded = iteration_timer(clock, named=("app.handler", "app.py:12", None))
    try:
        run_iteration(loop, clock, busy=0.4, idle=0.0, timeout=None)
        assert (recorded[0].label, recorded[0].culprit) == ("app.handler", "app.py:12")
    finally:
        timer.uninstall()
        _slow._set_exact(timer, False)


def test_iteration_timer_does_not_count_time_while_the_loop_is_not_running() -> None:
    clock = Clock()
    loop, timer, _ = iteration_timer(clock, threshold=math.inf)
    try:
        run_iteration(loop, clock, busy=0.05, idle=0.1, timeout=None)
        clock.now += 0.03  # the last callbacks, then run_until_complete() returns
        timer.pause()
        assert timer.busy_now() == pytest.approx(0.08)
        clock.now += 30.0  # the loop is not running: not busy
        assert timer.busy_now() == pytest.approx(0.08)
        timer.reset()  # it runs again
        clock.now += 0.02
        assert timer.busy_now() == pytest.approx(0.10)
        run_iteration(loop, clock, busy=0.01, idle=1.0, timeout=None)
        assert timer.busy_now() == pytest.approx(0.11)
    finally:
        timer.uninstall()


def test_iteration_timer_busy_counter_never_goes_back_and_freezes_on_uninstall() -> None:
    clock = Clock()
    loop, timer, _ = iteration_timer(clock, threshold=math.inf)
    run_iteration(loop, clock, busy=0.05, idle=0.1, timeout=None)
    clock.now += 0.04
    assert timer.busy_now() == pytest.approx(0.09)  # live: 0.04 into the current stretch
    timer.reset()  # e.g. the loop ran again after a pause: the live stretch restarts from now
    assert timer.busy_now() == pytest.approx(0.09)  # not reported lower than before
    timer.uninstall()
    assert "select" not in vars(loop._selector)
    clock.now += 10.0
    assert timer.busy_now() == pytest.approx(0.09)  # frozen: nothing measures any more


# -- end to end ----------------------------------------------------------------------------------

def run_app(app_runner, tmp_path: Path, loop: str, mode: str):
    port = free_port()
    app = app_runner("slow_app", loop, mode, str(port), str(tmp_path))
    url = f"http://127.0.0.1:{port}/metrics"
    app.wait_line("PHASE half-busy-start", timeout=30)
    start_time, start = time.monotonic(), scrape(url)
    app.wait_line("PHASE half-busy-end", timeout=30)
    end_time, end = time.monotonic(), scrape(url)
    app.kill()
    return app, start, end, end_time - start_time


def busy(samples: dict) -> float:
    value = sample(samples, "loopwatch_event_loop_busy_seconds_total", loop="main")
    assert value is not None
    return value


@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_slow_task_steps_and_plain_callbacks_are_named(app_runner, tmp_path: Path, mode: str) -> None:
    app, samples, end, elapsed = run_app(app_runner, tmp_path, "stdlib", mode)
    counts = {dict(labels)["callback"]: value for (name, labels), value in samples.items()
              if name == "loopwatch_slow_callbacks_total"}
    if mode == "auto":  # the first slow step switches exact timing on; the next ones are named
        assert counts == {"unattributed": 1.0, "__main__.score_signal": 2.0, "__main__.flush_cache": 2.0}
    else:
        assert counts == {"__main__.score_signal": 3.0, "__main__.flush_cache": 2.0}
    assert sample(samples, "loopwatch_slow_callback_duration_seconds_count", loop="main") == 5.0
    assert sample(samples, "loopwatch_slow_callback_duration_seconds_bucket", loop="main", le="0.1") == 0.0
    assert sample(samples, "loopwatch_slow_callback_duration_seconds_bucket", loop="main", le="0.5") == 5.0
    output = "\n".join(app.lines)
    steps = [line for line in output.splitlines() if "loopwatch.slow_callback" in line and "task_step" in line]
    assert steps, output
    step = re.sub(r"\x1b\[[0-9;]*m", "", steps[-1])
    assert "callback=__main__.score_signal" in step and "coro=score_signal" in step
    assert re.search(r"task=signal-\d", step)
    assert f"source={APP}:{marker_line('SLOW-STEP') - 2}" in step  # the coroutine's def line
    assert f"at={APP}:{marker_line('SLOW-STEP') + 1}" in step  # where the step stopped: the next await
    callbacks = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in output.splitlines()
                 if "loopwatch.slow_callback" in line and "what=callback" in line]
    assert callbacks and f"source={APP}:{marker_line('SLOW-CALLBACK') - 1}" in callbacks[0]
    utilization = (busy(end) - busy(samples)) / elapsed
    assert 0.3 < utilization < 0.75, utilization


def test_off_mode_counts_no_slow_callbacks_but_still_utilization(app_runner, tmp_path: Path) -> None:
    app, samples, end, elapsed = run_app(app_runner, tmp_path, "stdlib", "off")
    assert not [k for k in samples if k[0] == "loopwatch_slow_callbacks_total"]
    assert 0.3 < (busy(end) - busy(samples)) / elapsed < 0.75


def test_uvloop_utilization_and_slow_callbacks_from_libuv_iterations(app_runner, tmp_path: Path) -> None:
    app, samples, end, elapsed = run_app(app_runner, tmp_path, "uvloop", "auto")
    # uvloop's iterations are timed through libuv's prepare/check handles (the C accelerator): the
    # 0.2-0.25 s slow steps and callbacks are counted (unnamed: uvloop's handles cannot be wrapped to time
    # each callback), and the 1.3 s step, which the watchdog saw mid-stall, is named after its task.
    counts = {dict(labels)["callback"]: value for (name, labels), value in samples.items()
              if name == "loopwatch_slow_callbacks_total"}
    assert counts == {"__main__.settle_book": 1.0, "unattributed": 5.0}, counts
    assert sample(samples, "loopwatch_slow_callback_duration_seconds_bucket", loop="main", le="0.1") == 0.0
    assert sample(samples, "loopwatch_slow_callback_duration_seconds_bucket", loop="main", le="0.5") == 5.0
    assert sample(samples, "loopwatch_slow_callback_duration_seconds_count", loop="main") == 6.0
    events = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in app.lines if "loopwatch.slow_callback" in line]
    events = [line for line in events if "task=settle" in line]
    assert len(events) == 1, events
    assert "task=settle" in events[0] and "coro=settle_book" in events[0] and "what=task_step" in events[0]
    assert f"at={APP}:{marker_line('LONG-STEP')}" in events[0]  # mid-stall: the line the coroutine is on
    assert re.search(r"culprit='?" + re.escape(str(APP)) + r":\d+ in burn", events[0])  # the innermost frame
    assert f"source={APP}:{marker_line('LONG-STEP') - 2}" in events[0]  # the coroutine's def line
    assert 0.3 < (busy(end) - busy(samples)) / elapsed < 0.75


def test_the_running_task_is_read_from_another_thread_through_the_public_api() -> None:
    """Mid-stall, the watchdog asks which task the loop thread is running (``asyncio.current_task(loop)``,
    which also works on 3.14, where ``asyncio.tasks._current_tasks`` is no longer filled)."""
    import threading

    from loopwatch._slow import running_task

    seen: list[object] = []

    async def blocker() -> None:
        loop = asyncio.get_running_loop()
        reader = threading.Thread(target=lambda: seen.append(running_task(loop)))
        reader.start()
        reader.join(5)  # the loop thread blocks in this task's step while the other thread reads

    async def main() -> object:
        task = asyncio.create_task(blocker(), name="the-blocker")
        await task
        return task

    task = asyncio.run(main())
    assert seen == [task]
    assert running_task(None) is None
