"""Install never harms the host (issue 12): it works with thousands of open descriptors, it is
transactional (a failure leaves no thread, descriptor, patch or series behind), and ``agent_up`` says
which part is alive -- a watchdog thread that keeps failing is restarted, then reported."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import socket
import threading
import time
import warnings
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import loopwatch
from loopwatch._agent import Agent
from loopwatch._config import resolve
from loopwatch._hooks import LoopHooks

from conftest import free_port, sample, scrape


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def loopwatch_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("loopwatch-")}


def test_install_works_with_more_than_1024_open_descriptors(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    held = [socket.socketpair() for _ in range(1100)]  # a service with many client connections
    try:
        assert max(s.fileno() for pair in held for s in pair) > 2048
        before = open_fds()
        registry = CollectorRegistry()

        async def main() -> dict:
            agent = loopwatch.install(registry=registry, metrics_port=free_port(), metrics_addr="127.0.0.1",
                                      dump_dir=tmp_path, lag_thresholds=(0.5,))
            await asyncio.sleep(0.1)
            time.sleep(0.7)  # a stall: counted and dumped mid-stall, by a watchdog whose fds are > 1024
            await asyncio.sleep(0.3)
            return await asyncio.to_thread(scrape, agent.metrics_url)

        samples = asyncio.run(main())
        loopwatch.uninstall()
        assert sample(samples, "loopwatch_event_loop_lag_spikes_total", loop="main", threshold="0.5") == 1
        (dump,) = [json.loads(p.read_text()) for p in tmp_path.glob("loopwatch-*-event_loop_lag.json")]
        assert dump["culprit"]["function"].endswith("main") and dump["culprit"]["lineno"] > 0
        assert open_fds() == before, "uninstall() closes every descriptor it opened"
    finally:
        for pair in held:
            for s in pair:
                s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_failing_install_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    fds, threads = open_fds(), loopwatch_threads()

    def broken(self: LoopHooks) -> None:
        raise OSError("simulated failure while patching")

    monkeypatch.setattr(LoopHooks, "install", broken)
    with pytest.raises(RuntimeError, match="nothing was left installed"):
        loopwatch.install(registry=registry, metrics_port=free_port(), metrics_addr="127.0.0.1", dump_dir=tmp_path)
    assert list(registry._collector_to_names) == []
    assert loopwatch_threads() == threads
    for _ in range(50):  # joined threads' descriptors are closed by then
        if open_fds() == fds:
            break
        time.sleep(0.02)
    assert open_fds() == fds
    assert not list(tmp_path.glob("loopwatch-inflight-*"))
    monkeypatch.undo()
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)  # and it installs again
    assert agent.started
    loopwatch.uninstall()


def test_agent_up_says_each_part_is_alive_and_a_failing_watchdog_is_restarted_then_reported(tmp_path: Path) -> None:
    broken = threading.Event()

    def clock() -> float:
        if broken.is_set():
            raise RuntimeError("the clock broke")
        return time.monotonic()

    registry = CollectorRegistry()
    options = resolve({"registry": registry, "metrics_port": free_port(), "metrics_addr": "127.0.0.1",
                       "dump_dir": tmp_path}, environ={})
    agent = Agent(options, clock=clock)
    with capture_logs() as logs:
        agent.start()
        try:
            up = {p: registry.get_sample_value("loopwatch_agent_up", {"service": options.service, "part": p})
                  for p in ("watchdog", "exporter", "gil", "faulthandler", "dump")}
            assert up == dict.fromkeys(up, 1.0), up
            broken.set()  # every look of the watchdog now fails before it starts: restarted, then given up
            deadline = time.monotonic() + 10
            while agent.watchdog.alive and time.monotonic() < deadline:
                time.sleep(0.05)
            broken.clear()
            assert not agent.watchdog.alive
            labels = {"service": options.service}
            assert registry.get_sample_value("loopwatch_agent_up", {**labels, "part": "watchdog"}) == 0.0
            assert registry.get_sample_value("loopwatch_agent_up", {**labels, "part": "exporter"}) == 1.0
            assert registry.get_sample_value("loopwatch_errors_total", {**labels, "component": "watchdog"}) >= 10
        finally:
            agent.stop()
    errors = [e for e in logs if e["event"] == "loopwatch.error" and e.get("component") == "watchdog"]
    assert any("stopped" in str(e.get("error")) for e in errors), errors


def test_a_loop_collected_in_a_thread_that_holds_a_loopwatch_lock_does_not_deadlock(tmp_path: Path) -> None:
    """The weakref callback of a collected loop runs wherever the collection happens -- here, in a thread
    that holds one of loopwatch's (non-reentrant) locks.  It takes none: the watchdog detaches the loop."""
    agent = loopwatch.install(registry=CollectorRegistry(), metrics_port=0, dump_dir=tmp_path)
    try:
        def worker() -> None:
            loop = asyncio.new_event_loop()
            loop.run_until_complete(asyncio.sleep(0))  # watched: the hooks attached it
            assert [p.label for p in agent.loops()] == ["worker"]
            with agent.lag.delay._lock, agent.errors.errors._lock, warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)  # "unclosed event loop": on purpose
                del loop  # an unclosed loop is in a reference cycle (its self-pipe's handle): freed by the
                gc.collect()  # collector -- here, in this thread, which holds those locks

        thread = threading.Thread(target=worker, name="worker")
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "deadlocked in the weakref callback"
        deadline = time.monotonic() + 10
        while agent.loops() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.loops() == ()  # detached by the watchdog, in its own thread
    finally:
        loopwatch.uninstall()
