"""Telling a CPU-bound stall from a blocked one."""

from __future__ import annotations

import threading
import time

from loopwatch._cputime import ThreadClock, ThreadSample, classify


def test_cpu_bound_on_a_shared_core_is_cpu() -> None:
    # 1 s stall; the thread burned only 0.3 s (others had the core) but was runnable all along.
    before, after = ThreadSample(10.0, 5.0, 6.0), ThreadSample(11.3, 5.3, 7.05)
    kind, cpu = classify(before, after, 1.0)
    assert kind == "cpu" and abs(cpu - 0.3) < 1e-9


def test_blocked_is_blocked() -> None:
    before, after = ThreadSample(10.0, 5.0, 6.0), ThreadSample(13.0, 5.001, 6.002)
    kind, cpu = classify(before, after, 2.8)
    assert kind == "blocked" and abs(cpu - 0.001) < 1e-9


def test_without_schedstat_cpu_time_decides() -> None:
    assert classify(ThreadSample(0, 1.0, None), ThreadSample(1, 1.9, None), 0.8)[0] == "cpu"
    assert classify(ThreadSample(0, 1.0, None), ThreadSample(1, 1.1, None), 0.8)[0] == "blocked"


def test_no_clocks_is_unknown() -> None:
    assert classify(None, ThreadSample(1, 1, 1), 1.0) == ("unknown", None)
    assert classify(ThreadSample(0, None, None), ThreadSample(1, None, None), 1.0) == ("unknown", None)


def test_real_thread_clocks_see_burning_and_sleeping() -> None:
    ready, go, done, release = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    info = {}

    def worker() -> None:
        info["ident"], info["native_id"] = threading.get_ident(), threading.get_native_id()
        ready.set()
        go.wait()
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        time.sleep(0.3)
        done.set()
        release.wait()

    thread = threading.Thread(target=worker)
    thread.start()
    ready.wait()
    clock = ThreadClock(info["ident"], info["native_id"])
    first = clock.sample(time.monotonic())
    go.set()
    done.wait()
    second = clock.sample(time.monotonic())
    release.set()
    thread.join()
    assert first.cpu is not None and second.cpu is not None
    assert 0.25 < second.cpu - first.cpu < 0.5
    assert first.wanted is not None and second.wanted is not None  # Linux schedstat
    assert second.wanted - first.wanted >= 0.25
