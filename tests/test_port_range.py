"""``metrics_port`` ranges (one port per worker), the exporter's scrape gate, the components' ``after_fork`` and the
parent's side of the fork handlers -- in process.  The children's side is end to end in test_fork.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

import loopwatch
from conftest import collected, sample, scrape, wait_for
from loopwatch import _fork
from loopwatch._config import resolve
from loopwatch._exporter import Exporter
from procs import port_range

RANGE_WHAT = "a port range 'FIRST-LAST' with 1 <= FIRST <= LAST <= 65535"


@pytest.mark.parametrize(("value", "expected", "ports", "text"), [
    ("9320-9329", (9320, 9329), range(9320, 9330), "9320-9329"),
    (" 9320 - 9321 ", (9320, 9321), range(9320, 9322), "9320-9321"),
    ("9320-9320", (9320, 9320), range(9320, 9321), "9320-9320"),
    ((9320, 9323), (9320, 9323), range(9320, 9324), "9320-9323"),
    ("9320", 9320, range(9320, 9321), "9320"),
    (9320, 9320, range(9320, 9321), "9320"),
    (0, 0, range(0), "0"),
])
def test_valid_ports_and_ranges(value: object, expected: object, ports: range, text: str) -> None:
    options = resolve({"metrics_port": value}, environ={})
    assert options.metrics_port == expected
    assert options.metrics_ports == ports
    assert options.metrics_port_text == text


def test_range_from_the_environment() -> None:
    options = resolve({}, environ={"LOOPWATCH_METRICS_PORT": "9320-9329"})
    assert options.metrics_port == (9320, 9329)


@pytest.mark.parametrize(("value", "message"), [
    ("9329-9320", f"^metrics_port must be {re.escape(RANGE_WHAT)}, got '9329-9320'$"),
    ("0-10", f"^metrics_port must be {re.escape(RANGE_WHAT)}, got '0-10'$"),
    ("9320-70000", f"^metrics_port must be {re.escape(RANGE_WHAT)}, got '9320-70000'$"),
    ("9320-", f"^metrics_port must be {re.escape(RANGE_WHAT)}, got '9320-'$"),
    ("a-b", f"^metrics_port must be {re.escape(RANGE_WHAT)}, got 'a-b'$"),
    ("9320-9325-9329", f"^metrics_port must be {re.escape(RANGE_WHAT)}, got '9320-9325-9329'$"),
    ((9320,), f"^metrics_port must be {re.escape(RANGE_WHAT)}, got \\(9320,\\)$"),
    ((9320.0, 9321), f"^metrics_port must be {re.escape(RANGE_WHAT)}, got \\(9320\\.0, 9321\\)$"),
    ("-1", r"^metrics_port must be an integer port in 0\.\.65535 \(0 = no built-in exporter\), got '-1'$"),
    ("port", r"^metrics_port must be an integer port in 0\.\.65535 \(0 = no built-in exporter\), got 'port'$"),
])
def test_invalid_ranges(value: object, message: str) -> None:
    with pytest.raises(loopwatch.ConfigError, match=message):
        resolve({"metrics_port": value}, environ={})


def test_invalid_range_from_the_environment_names_the_variable() -> None:
    with pytest.raises(loopwatch.ConfigError, match=re.escape(
            f"metrics_port (from LOOPWATCH_METRICS_PORT) must be {RANGE_WHAT}, got '9321-9320'")):
        resolve({}, environ={"LOOPWATCH_METRICS_PORT": "9321-9320"})


def squat(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_exporter_binds_the_first_free_port_of_the_range(registry: CollectorRegistry, tmp_path: Path) -> None:
    first, last = port_range(3)
    with squat(first):
        agent = loopwatch.install(registry=registry, metrics_port=f"{first}-{last}", metrics_addr="127.0.0.1",
                                  dump_dir=tmp_path)
        assert agent.metrics_url == f"http://127.0.0.1:{first + 1}/metrics"
        assert agent.snapshot().degraded == ()
        assert agent.snapshot().pid == os.getpid()
        assert sample(scrape(agent.metrics_url), "loopwatch_errors_total", component="exporter") == 0


def test_no_free_port_in_the_range_degrades_naming_the_range(registry: CollectorRegistry,
                                                            tmp_path: Path) -> None:
    first, last = port_range(2)
    with squat(first), squat(last), structlog.testing.capture_logs() as logs:
        agent = loopwatch.install(registry=registry, metrics_port=f"{first}-{last}", metrics_addr="127.0.0.1",
                                  dump_dir=tmp_path)
    expected = (f"cannot serve /metrics on 127.0.0.1:{first}-{last}: no free port in the range {first}-{last} "
                f"(Address already in use); metrics are still collected in the registry")
    assert agent.started and agent.metrics_url is None
    assert agent.snapshot().degraded == (f"exporter: {expected}",)
    assert [e["reason"] for e in logs if e["event"] == "loopwatch.degraded"] == [expected]
    assert sample(collected(registry), "loopwatch_errors_total", component="exporter") == 1
    assert not [t for t in threading.enumerate() if t.name == "loopwatch-exporter"]


def test_a_bad_address_is_not_tried_on_every_port(registry: CollectorRegistry) -> None:
    exporter = Exporter("192.0.2.1", range(20000, 20010), registry)  # TEST-NET: not this host's address
    started = time.monotonic()
    with pytest.raises(OSError) as raised:
        exporter.start()
    assert raised.value.errno not in (None, 98), raised.value  # not "in use": stopped at the first error
    assert time.monotonic() - started < 5
    assert exporter.url is None and exporter.port is None


def test_scrapes_collect_under_the_gate(registry: CollectorRegistry) -> None:
    """The fork handler holds the gate across fork(): no scrape can be half-way through a collection."""
    first, _ = port_range(1)
    Counter("things", "x", registry=registry).inc()
    Gauge("other_gauge", "y", registry=registry).set(2)
    exporter = Exporter("127.0.0.1", first, registry)
    exporter.start()
    try:
        assert exporter.port == first
        answers: list[bytes] = []
        with exporter.gate:
            thread = threading.Thread(target=lambda: answers.append(urllib.request.urlopen(exporter.url).read()))
            thread.start()
            time.sleep(0.5)
            assert answers == [], "a scrape must wait for the gate"
        thread.join(10)
        assert len(answers) == 1
        assert b"things_total 1.0" in answers[0] and b"other_gauge 2.0" in answers[0]
        # name[] filters go through the gate too (restricted_registry)
        body = urllib.request.urlopen(exporter.url + "?name[]=things_total").read()
        assert b"things_total 1.0" in body and b"other_gauge" not in body
    finally:
        exporter.close()


def test_after_fork_starts_each_component_from_zero_with_fresh_objects(registry: CollectorRegistry,
                                                                        tmp_path: Path) -> None:
    """What a forked child runs, component by component (the real fork is in test_fork.py)."""
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    agent.lag.add_loop("main")
    agent.lag.count_spike("main", 0.5)
    agent.dumps.count("manual")
    agent.errors.count("probe")
    old_spikes = agent.lag.spikes
    before = collected(registry)
    assert sample(before, "loopwatch_event_loop_lag_spikes_total", loop="main", threshold="0.5") == 1
    assert sample(before, "loopwatch_dumps_total", reason="manual") == 1
    for component in (agent.lag, agent.dumps, agent.errors):
        component.after_fork()
    after = collected(registry)
    assert agent.lag.spikes is not old_spikes, "new objects: the child's own"
    assert sample(after, "loopwatch_event_loop_lag_spikes_total", loop="main", threshold="0.5") is None
    assert sample(after, "loopwatch_dumps_total", reason="manual") == 0
    assert sample(after, "loopwatch_dumps_total", reason="event_loop_lag") == 0
    assert sample(after, "loopwatch_errors_total", component="probe") == 0
    assert sample(after, "loopwatch_errors_total", component="fork") == 0


def test_fork_handlers_in_the_parent_hold_and_release_the_locks(registry: CollectorRegistry,
                                                               tmp_path: Path) -> None:
    """Before fork: the gate and the agent's lock are held (no scrape or attach half-done in the copy);
    after fork (parent): all released, and stalls that hold the GIL still get their stack."""
    structlog.configure()  # the app logs with structlog: loopwatch's events go through its PrintLogger
    agent = loopwatch.install(registry=registry, metrics_port=port_range(1)[0], metrics_addr="127.0.0.1",
                              dump_dir=tmp_path, lag_thresholds=(0.3, 5.0), probe_interval=0.1)
    assert _fork._current is agent

    async def main() -> None:
        (probe,) = agent.loops()
        gilheld = agent.fallback.for_probe(probe)
        assert gilheld is not None, "the loop owns the fallback for stalls that hold the GIL"
        _fork._before()
        try:
            assert agent.exporter is not None and agent.exporter.server.gate.locked()
            assert not lock_free(agent._lock), "no attach/detach across fork()"
            log_locks = _fork._log_write_locks()
            assert log_locks and all(lock.locked() for lock in log_locks), "no log line half-written"
        finally:
            _fork._after_in_parent()
        assert not agent.exporter.server.gate.locked()
        assert lock_free(agent._lock)
        assert not any(lock.locked() for lock in log_locks)
        assert _fork._held is None
        # A stall that holds the GIL and starts right now is still written by the loop thread mid-stall.
        hold_the_gil(1.2)
        await asyncio.sleep(0.3)

    asyncio.run(main())
    # The loop thread wrote its own stack on the fallback timer's signal; the watchdog made it the dump.
    (dump,) = [json.loads(p.read_text()) for p in tmp_path.glob("loopwatch-*-event_loop_lag.json")]
    assert dump["source"] == "faulthandler" and dump["culprit"]["function"] == "hold_the_gil", dump
    structlog.reset_defaults()
    loopwatch.uninstall()
    assert _fork._current is None
    _fork._before()  # no agent: nothing to do, nothing held
    assert _fork._held is None


def hold_the_gil(seconds: float) -> None:
    """A C call that keeps the GIL for about ``seconds``: ``sum()`` over a ``range`` runs no bytecode."""
    n = 1_000_000
    start = time.perf_counter()
    sum(range(n))
    per_item = (time.perf_counter() - start) / n
    sum(range(int(seconds / per_item)))


def lock_free(lock: threading.RLock) -> bool:
    """Can another thread take ``lock`` right now?"""
    got: list[bool] = []

    def take() -> None:
        got.append(lock.acquire(blocking=False))
        if got[0]:
            lock.release()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    return got[0]
