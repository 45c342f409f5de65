"""Threads, GIL contention and executors (issue 4): unit tests with injected data, and real threads and
executors in subprocess apps (``apps/threads_app.py``) scraped over HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import re
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import collected, free_port, sample, scrape

import loopwatch
from loopwatch._executors import Executors
from loopwatch._gil import WINDOW, GilContention
from loopwatch._component import Naming
from loopwatch._threads import ThreadCpu

NS = "lwthreads"
Thread = namedtuple("Thread", "id user_time system_time")
Times = namedtuple("Times", "user system")


def _metrics() -> Naming:
    return Naming("t", "svc")


def _samples(families) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


class FakeProcess:
    """What ThreadCpu reads from psutil, set by the test."""

    def __init__(self) -> None:
        self.pid = __import__("os").getpid()
        self.cpu = {}  # tid -> cpu seconds
        self.total = 0.0

    def threads(self):
        return [Thread(tid, cpu, 0.0) for tid, cpu in self.cpu.items()]

    def cpu_times(self):
        return Times(self.total, 0.0)


def _cpu_series(samples: dict) -> dict[str, float]:
    return {dict(labels)["thread_name"]: v for (name, labels), v in samples.items()
            if name == "t_thread_cpu_seconds_total"}


# -- per-thread CPU: bounded labels, other, ended threads, process cores (injected clock) ------------
def test_one_series_per_kind_of_thread_that_never_goes_down_and_never_disappears() -> None:
    process = FakeProcess()
    names = {1: "MainThread", 2: "worker-1", 3: "worker-2"}
    cpu = ThreadCpu(_metrics(), process=process, top=2, clock=lambda: 100.0, names=lambda: names,
                    kernel_name=lambda tid: f"native-{tid}")
    process.cpu = {1: 1.0, 2: 5.0, 3: 3.0, 4: 0.5}
    samples = _samples(cpu.collect())
    # worker-1 and worker-2 are one kind; the third kind (native-4) is past top=2: "other".
    assert _cpu_series(samples) == {"MainThread": 1.0, "worker-N": 8.0, "other": 0.5}
    assert sample(samples, "t_thread_cpu_seconds_total", thread_name="worker-N", native_id="2") == 8.0

    # worker-2 ends, worker-7 starts: the kind's counter keeps what worker-2 used and grows on.
    names.update({7: "worker-7"})
    process.cpu = {1: 1.2, 2: 6.0, 4: 0.6, 7: 0.5}
    assert _cpu_series(_samples(cpu.collect())) == pytest.approx({"MainThread": 1.2, "worker-N": 9.5, "other": 0.6})

    # Every worker ends: the series stays (no series dropped and created again with churn).
    process.cpu = {1: 1.5}
    samples = _samples(cpu.collect())
    assert _cpu_series(samples) == pytest.approx({"MainThread": 1.5, "worker-N": 9.5, "other": 0.6})
    assert sample(samples, "t_threads_total") == 1.0

    # A thread id reused by a new thread (its CPU starts again from ~0) is a new thread, not a decrease.
    names[2] = "worker-9"
    process.cpu = {1: 1.5, 2: 0.25}
    assert _cpu_series(_samples(cpu.collect()))["worker-N"] == pytest.approx(9.75)


def test_an_unnamed_native_thread_gets_its_kernel_name_and_native_id() -> None:
    process = FakeProcess()
    process.cpu = {10: 2.0, 11: 1.0}
    cpu = ThreadCpu(_metrics(), process=process, names=lambda: {10: "MainThread"},
                    kernel_name=lambda tid: "librdkafka")
    samples = _samples(cpu.collect())
    assert sample(samples, "t_thread_cpu_seconds_total", thread_name="librdkafka") == 1.0
    assert sample(samples, "t_thread_cpu_seconds_total", native_id="10") == 2.0
    assert sample(samples, "t_thread_cpu_seconds_total", thread_name="other") is None  # nothing folded


def _letters(tid: int) -> str:  # a name without digits: a kind of its own
    return "".join(chr(ord("a") + int(d)) for d in str(tid))


def test_labels_stay_bounded_with_many_kinds_of_thread() -> None:
    process = FakeProcess()
    process.cpu = {tid: float(tid) for tid in range(1, 501)}
    cpu = ThreadCpu(_metrics(), process=process, top=20, names=dict, kernel_name=_letters)
    series = _cpu_series(_samples(cpu.collect()))
    assert len(series) == 21 and "other" in series
    assert sum(series.values()) == sum(range(1, 501))


def test_hours_of_thread_churn_create_no_new_series_and_no_counter_goes_down() -> None:
    """Simulated: 8 hours, a scrape every 5 s, threads starting and ending all the time -- uniquely numbered
    workers, a thread per request, kinds of thread never seen before -- with an injected clock."""
    now = [0.0]
    process = FakeProcess()
    names: dict[int, str] = {1: "MainThread", 2: "loopwatch-watchdog", 3: "loopwatch-exporter"}
    cpu = ThreadCpu(_metrics(), process=process, clock=lambda: now[0], names=lambda: names, kernel_name=_letters)
    live = {1: 0.0, 2: 0.0, 3: 0.0}
    next_tid, seen_series, last = 10, set(), {}
    for scrape in range(8 * 3600 // 5):
        now[0] += 5.0
        for tid in list(live):
            live[tid] += 0.01
            if tid > 3 and (tid + scrape) % 3 == 0:
                del live[tid]  # ended
        for _ in range(4):  # four new threads per scrape
            kind = next_tid % 4
            names[next_tid] = (f"worker-{next_tid}", f"Thread-{next_tid} (process_request_thread)",
                               f"ThreadPoolExecutor-{next_tid % 7}_{next_tid}", "")[kind]
            if kind == 3 and next_tid % 400 == 3:
                names[next_tid] = f"rare-{_letters(next_tid)}"  # now and then a kind never seen before
            live[next_tid] = 0.0
            next_tid += 1
        process.cpu = dict(live)
        series = {(name, dict(labels)["thread_name"], dict(labels)["native_id"]): v
                  for (name, labels), v in _samples(cpu.collect()).items() if name == "t_thread_cpu_seconds_total"}
        seen_series |= set(series)
        for key, value in series.items():
            assert value >= last.get(key, 0.0) - 1e-9, key  # a counter never goes down
        assert set(last) <= set(series), "no series disappears"
        last = series
    assert len(seen_series) <= 21, sorted(seen_series)  # the top 20 kinds and other, ever
    assert next_tid > 20_000


def test_process_cores_over_a_window_of_at_least_a_second() -> None:
    now = [0.0]
    process = FakeProcess()
    process.cpu = {1: 0.0}
    cpu = ThreadCpu(_metrics(), process=process, clock=lambda: now[0], names=dict, kernel_name=str)
    now[0], process.total = 2.0, 3.0
    assert sample(_samples(cpu.collect()), "t_cpu_process_cores") == 1.5
    now[0], process.total = 2.5, 4.0  # half a second later: too short a window, the value stays
    assert sample(_samples(cpu.collect()), "t_cpu_process_cores") == 1.5
    now[0], process.total = 4.0, 4.5
    assert sample(_samples(cpu.collect()), "t_cpu_process_cores") == pytest.approx(0.75)


# -- GIL contention: the arithmetic, and no invented numbers without a GIL ----------------------------
def test_contention_is_the_wait_beyond_one_switch_interval() -> None:
    gil = GilContention(_metrics(), switch_interval=lambda: 0.005, enabled=True)
    assert gil.contention() is None
    for wait in (0.0001, 0.0052, 0.015, 0.025):  # free, one busy thread, 2 ahead, 4 ahead
        gil.record(wait)
    assert gil.contention() == pytest.approx((0 + 0.04 + 2 + 4) / 4)
    samples = _samples(gil.collect())
    assert sample(samples, "t_gil_enabled") == 1.0
    assert sample(samples, "t_gil_wait_seconds_count") == 4.0
    assert sample(samples, "t_gil_switch_interval_seconds") == 0.005
    for _ in range(WINDOW):
        gil.record(0.0)  # the window slides: old samples age out
    assert gil.contention() == 0.0


def test_without_a_gil_only_gil_enabled_0_is_exported() -> None:
    gil = GilContention(_metrics(), enabled=False)
    samples = _samples(gil.collect())
    assert samples == {("t_gil_enabled", (("service", "svc"),)): 0.0}


# -- executors: validation, shim, shutdown ------------------------------------------------------------
@pytest.mark.parametrize("bad", [object(), asyncio.Queue, "pool"])
def test_watch_executor_refuses_what_it_cannot_watch(registry, tmp_path, bad) -> None:
    loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    with pytest.raises(loopwatch.ConfigError, match=r"^watch_executor\(\) watches concurrent\.futures\."
                       r"ThreadPoolExecutor and ProcessPoolExecutor \(and their subclasses\), got "):
        loopwatch.watch_executor(bad, "x")
    with cf.ThreadPoolExecutor(1) as pool:
        with pytest.raises(loopwatch.ConfigError, match=r"name must be a non-empty printable string"):
            loopwatch.watch_executor(pool, " spaced ")


def test_watch_executor_needs_an_agent(tmp_path) -> None:
    loopwatch.uninstall()
    with cf.ThreadPoolExecutor(1) as pool, pytest.raises(RuntimeError, match="not installed"):
        loopwatch.watch_executor(pool, "x")


def test_queue_wait_is_timed_with_the_injected_clock_and_logged_past_the_threshold(caplog) -> None:
    now = [0.0]
    errors = []
    executors = Executors(_metrics(), threshold=1.0, clock=lambda: now[0], on_error=errors.append)
    ran = []
    pool = cf.ThreadPoolExecutor(1)
    executors.watch(pool, "inline")
    gate = threading.Event()
    busy = pool.submit(gate.wait, 10)  # the one worker is busy: the next item waits in the queue
    queued = pool.submit(ran.append, "a")  # submitted at 0.0 on the test's clock
    now[0] = 2.5
    gate.set()
    busy.result(10)
    queued.result(10)
    assert ran == ["a"] and errors == []
    samples = _samples(executors.collect())
    assert sample(samples, "t_to_thread_executor_queue_wait_seconds_sum", executor="inline") == 2.5
    assert sample(samples, "t_to_thread_executor_max_workers", executor="inline") == 1.0
    executors.stop()
    assert "submit" not in vars(pool)  # the instance attribute is gone: the class's method is back
    pool.shutdown()


def test_an_executor_whose_class_has_its_own_submit_is_not_patched_but_its_gauges_are_read() -> None:
    class Recording(cf.ThreadPoolExecutor):
        def __init__(self) -> None:
            super().__init__(3)
            self.calls: list[object] = []

        def submit(self, fn, /, *args, **kwargs):
            self.calls.append(fn)
            return super().submit(fn, *args, **kwargs)

    errors = []
    executors = Executors(_metrics(), threshold=1.0, on_error=errors.append)
    pool = Recording()
    executors.watch(pool, "own")
    assert "submit" not in vars(pool)  # left alone: the subclass's method runs untouched
    pool.submit(len, "abc").result(10)
    assert pool.calls == [len]  # its own submit saw the caller's function, not a loopwatch shim
    samples = _samples(executors.collect())
    assert sample(samples, "t_to_thread_executor_max_workers", executor="own") == 3.0
    assert sample(samples, "t_to_thread_executor_queue_wait_seconds_count", executor="own") == 0.0
    assert errors == []
    executors.stop()
    pool.shutdown()


def test_a_shut_down_executors_gauges_go_its_wait_histogram_stays(registry, tmp_path) -> None:
    async def main():
        loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
        pool = loopwatch.watch_executor(cf.ThreadPoolExecutor(2), "jobs")
        assert sample(collected(registry), "loopwatch_to_thread_executor_threads", executor="jobs") == 0.0
        assert sample(collected(registry), "loopwatch_to_thread_executor_threads", executor="default") is None
        await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.05) for _ in range(3)),
                             asyncio.get_running_loop().run_in_executor(pool, time.sleep, 0.05))
        samples = collected(registry)
        assert sample(samples, "loopwatch_to_thread_executor_queue_wait_seconds_count", executor="default") == 3
        assert sample(samples, "loopwatch_to_thread_executor_queue_wait_seconds_count", executor="jobs") == 1
        assert sample(samples, "loopwatch_to_thread_executor_threads", executor="default") == 3
        pool.shutdown()
        samples = collected(registry)
        assert {k[0] for k in samples if ("executor", "jobs") in k[1]} == {
            f"loopwatch_to_thread_executor_queue_wait_seconds_{s}" for s in ("bucket", "count", "sum")}
        again = loopwatch.watch_executor(cf.ThreadPoolExecutor(1), "jobs")  # the same name: carries on
        await asyncio.get_running_loop().run_in_executor(again, time.sleep, 0.01)
        samples = collected(registry)
        assert sample(samples, "loopwatch_to_thread_executor_queue_wait_seconds_count", executor="jobs") == 2
        assert sample(samples, "loopwatch_to_thread_executor_threads", executor="jobs") == 1
        again.shutdown()
        loop = asyncio.get_running_loop()
        assert "run_in_executor" in vars(loop)
        loopwatch.uninstall()
        assert "run_in_executor" not in vars(loop)

    asyncio.run(main())


# -- end to end: real threads and executors in a subprocess, scraped over HTTP -----------------------
def _start(app_runner, tmp_path, *args: str):
    stop = tmp_path / "stop"
    app = app_runner("threads_app", args[0], str(free_port()), str(stop), *args[1:])
    url = app.wait_line("READY").split()[1]
    app.wait_line("RUNNING")
    return app, url, stop


def _finish(app, stop: Path) -> str:
    stop.touch()
    out = app.finish(timeout=60)
    assert app.proc.returncode == 0, out
    return out


def _thread_cpu(samples: dict) -> dict[str, float]:
    return {dict(labels)["thread_name"]: v for (name, labels), v in samples.items()
            if name == f"{NS}_thread_cpu_seconds_total"}


def test_three_cpu_bound_threads_of_one_kind_share_one_cpu_series(app_runner, tmp_path) -> None:
    app, url, stop = _start(app_runner, tmp_path, "cpu")
    first = _thread_cpu(scrape(url))
    time.sleep(3.0)
    samples = scrape(url)
    later = _thread_cpu(samples)
    _finish(app, stop)
    # cpu-worker-0, -1 and -2: one kind of thread, one series, with the CPU of all three
    assert later["cpu-worker-N"] - first.get("cpu-worker-N", 0.0) > 3 * 0.2, (first, later)
    ids = {dict(labels)["native_id"] for (name, labels), _ in samples.items()
           if name == f"{NS}_thread_cpu_seconds_total" and dict(labels)["thread_name"] == "cpu-worker-N"}
    assert len(ids) == 1 and ids.pop().isdigit()
    assert {"MainThread", "loopwatch-exporter", "loopwatch-gil"} <= set(later)
    assert sample(samples, f"{NS}_threads_total") >= 7
    assert 0.5 < sample(samples, f"{NS}_cpu_process_cores") < 2.5  # the GIL lets ~1 core run Python


def _contention(app_runner, tmp_path, threads: int) -> tuple[float, float]:
    tmp_path.mkdir()
    app, url, stop = _start(app_runner, tmp_path, "gil", str(threads))
    time.sleep(3.0)  # > the 2 s window at gil_probe_interval=0.02
    samples = scrape(url)
    _finish(app, stop)
    mean_wait = (sample(samples, f"{NS}_gil_wait_seconds_sum") / sample(samples, f"{NS}_gil_wait_seconds_count"))
    return sample(samples, f"{NS}_gil_contention"), mean_wait


def test_gil_contention_is_higher_with_four_busy_threads_than_with_one(app_runner, tmp_path) -> None:
    one = _contention(app_runner, tmp_path / "one", 1)
    four = _contention(app_runner, tmp_path / "four", 4)
    assert one[0] < 1.0, one  # one busy thread: about one switch interval of wait, nothing more
    assert four[0] > one[0] + 1.0, (one, four)  # about three threads ahead of the probe
    assert four[1] > 2 * one[1], (one, four)


def test_forty_to_thread_calls_fill_the_default_executor(app_runner, tmp_path) -> None:
    app, url, stop = _start(app_runner, tmp_path, "to_thread")
    samples = scrape(url)
    workers = sample(samples, f"{NS}_to_thread_executor_max_workers", executor="default")
    assert workers == min(32, (__import__("os").cpu_count() or 1) + 4)
    assert sample(samples, f"{NS}_to_thread_executor_threads", executor="default") == workers
    assert sample(samples, f"{NS}_to_thread_executor_busy_threads", executor="default") == workers
    assert sample(samples, f"{NS}_to_thread_executor_queue_depth", executor="default") >= 40 - 2 * workers
    app.wait_line("ALL-DONE", timeout=60)
    samples = scrape(url)
    out = _finish(app, stop)
    assert sample(samples, f"{NS}_to_thread_executor_queue_depth", executor="default") == 0
    assert sample(samples, f"{NS}_to_thread_executor_queue_wait_seconds_count", executor="default") == 40
    waited = sample(samples, f"{NS}_to_thread_executor_queue_wait_seconds_sum", executor="default")
    rounds = -(-40 // int(workers))  # the last work items waited (rounds - 1) seconds
    assert waited > 0.5 * sum(range(rounds)) * workers * 0.8, waited
    slow = sample(samples, f"{NS}_to_thread_executor_queue_wait_seconds_bucket", executor="default", le="0.5")
    assert slow <= workers + 2  # the first round started at once; the others waited >= ~1 s
    assert re.search(r"loopwatch\.executor_saturated .*executor=default", out), out


def test_a_watched_executors_gauges_go_after_shutdown_and_a_process_pool_is_shown(app_runner, tmp_path) -> None:
    app, url, stop = _start(app_runner, tmp_path, "watched")
    samples = scrape(url)
    assert sample(samples, f"{NS}_to_thread_executor_threads", executor="jobs") == 2
    assert sample(samples, f"{NS}_to_thread_executor_queue_depth", executor="jobs") >= 2
    assert sample(samples, f"{NS}_to_thread_executor_max_workers", executor="procs") == 2
    assert sample(samples, f"{NS}_to_thread_executor_threads", executor="procs") == 2
    assert sample(samples, f"{NS}_to_thread_executor_queue_depth", executor="procs") >= 1
    app.wait_line("SHUTDOWN")
    samples = scrape(url)
    _finish(app, stop)
    # its gauges are gone; only its wait histogram stays (it never goes down)
    assert {k[0] for k in samples if ("executor", "jobs") in k[1]} <= {
        f"{NS}_to_thread_executor_queue_wait_seconds_{s}" for s in ("bucket", "count", "sum")}
    assert sample(samples, f"{NS}_to_thread_executor_threads", executor="jobs") is None
    assert sample(samples, f"{NS}_to_thread_executor_max_workers", executor="procs") == 2
    assert sample(samples, f"{NS}_errors_total", component="executor") == 0

