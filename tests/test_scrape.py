"""Scrapes of a busy service are fast (issue 12): the exporter keeps the GIL for the whole exchange.

Under GIL contention every system call that releases the GIL costs a wait to get it back, up to a switch
interval per busy thread.  The property: the exporter's thread gives the GIL up a small, fixed number of
times per scrape -- not once per file, thread or open descriptor -- counted as the voluntary context
switches of its thread (``/proc/<pid>/task/<tid>/status``); and the latency bound follows from it.
"""

from __future__ import annotations

import gzip
import json
import os
import statistics
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.process_collector import ProcessCollector

from loopwatch import _scrape
from loopwatch._iteration import _accel
from conftest import free_port

PROMETHEUS_HEADERS = {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
                      "Accept-Encoding": "gzip"}  # what a Prometheus server sends

pytestmark = pytest.mark.skipif(_accel is None, reason="the C accelerator is not built")


def _scrape_once(url: str) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers=PROMETHEUS_HEADERS), timeout=30) as answer:
        body = answer.read()
        return gzip.decompress(body) if answer.headers.get("Content-Encoding") == "gzip" else body


def _switches(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


@pytest.mark.parametrize("extra_fds", [0, 3000])
def test_a_scrape_hands_the_gil_over_a_few_times_whatever_the_descriptors(app_runner, extra_fds):
    app = app_runner("gil_busy", str(free_port()), str(extra_fds))
    ready = json.loads(app.wait_line("READY ")[len("READY "):])
    assert ready["fds"] > extra_fds
    url, tid = ready["url"], ready["exporter_tid"]
    _scrape_once(url)  # lazy set-up on the first scrape is not counted
    scrapes, per_scrape, latencies = 20, [], []
    for _ in range(scrapes):
        before = _switches(app.proc.pid, tid)
        started = time.perf_counter()
        body = _scrape_once(url)
        latencies.append(time.perf_counter() - started)
        per_scrape.append(_switches(app.proc.pid, tid) - before)
        assert b"process_open_fds" in body and b"loopwatch_thread_cpu_seconds_total" in body
        time.sleep(0.05)
    # Waiting for the request (epoll), at most one wait for its bytes and one for the socket's buffer, a
    # forced switch or two while collecting: about 5.  Reading /proc through Python, or one socket call
    # releasing the GIL each, made it 40 + one per open descriptor.
    # (Median bound 12, not 8: this machine class saw a median of 9 in about one run in ten, with three
    # threads spinning on two cores; the old way's median was 40 or more, 116 with 3,000 descriptors.)
    assert statistics.median(per_scrape) <= 12, per_scrape
    # An odd scrape may wait more (a loaded CI machine: one saw 59 once among twenty, another 3 scrapes of
    # 27-53 among twenty); the old way, every scrape made 40 or more.
    assert sum(n > 20 for n in per_scrape) <= 4, per_scrape
    # measured: p95 ~35-45 ms (make bench: figure 7); before, p95 0.32 s and every scrape over 0.1 s
    assert sum(t > 0.25 for t in latencies) <= 2, sorted(latencies)


def test_process_metrics_are_prometheus_clients_own():
    """The process families collected holding the GIL are ProcessCollector's: names, help, types, values."""
    registry = CollectorRegistry()
    collector = ProcessCollector(registry=registry, namespace="svc")
    fast = {m.name: m for m in _scrape.FastProcess(collector).collect()}
    slow = {m.name: m for m in collector.collect()}
    assert sorted(fast) == sorted(slow) and len(slow) == 6
    for name, family in slow.items():
        other = fast[name]
        assert (other.documentation, other.type) == (family.documentation, family.type)
        assert [s.name for s in other.samples] == [s.name for s in family.samples]
        value, expected = other.samples[0].value, family.samples[0].value
        if name in ("svc_process_cpu_seconds", "svc_process_resident_memory_bytes", "svc_process_virtual_memory_bytes"):
            assert abs(value - expected) <= max(0.5, 0.05 * expected), (name, value, expected)
        elif name == "svc_process_open_fds":
            assert abs(value - expected) <= 2
        else:
            assert value == expected, name


def test_collect_yields_what_the_registry_does():
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    Gauge("app_things", "things", registry=registry).set(3)
    registry.set_target_info({"service": "svc"})
    assert _scrape.supported(registry)
    ours = [(m.name, m.type, [(s.name, s.labels) for s in m.samples]) for m in _scrape.collect(registry)]
    theirs = [(m.name, m.type, [(s.name, s.labels) for s in m.samples]) for m in registry.collect()]
    assert ours == theirs
    assert any(isinstance(c, ProcessCollector) for c in registry._collector_to_names)


def test_another_registry_type_is_collected_as_it_is():
    class Custom(CollectorRegistry):
        def collect(self):
            yield from super().collect()
            self.seen = True

    registry = Custom()
    Gauge("app_things", "things", registry=registry).set(1)
    assert not _scrape.supported(registry)
    assert [m.name for m in _scrape.collect(registry)] == ["app_things"]
    assert registry.seen


def test_a_missing_proc_file_is_an_empty_family_list_as_upstream():
    collector = ProcessCollector(registry=None, pid=lambda: 2**22 + 12345)  # no such process
    assert _scrape.FastProcess(collector).collect() == collector.collect() == []


def test_accel_io_calls_never_block(tmp_path):
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    assert _accel.accept(server.fileno()) is None  # nothing pending: no wait
    client = socket.create_connection(server.getsockname())
    deadline = time.monotonic() + 5
    fd = None
    while fd is None and time.monotonic() < deadline:
        fd = _accel.accept(server.fileno())
    assert fd is not None
    try:
        assert _accel.recv(fd, 100) is None  # nothing sent yet: None, no wait
        client.sendall(b"GET")
        deadline = time.monotonic() + 5
        got = None
        while got is None and time.monotonic() < deadline:
            got = _accel.recv(fd, 100)
        assert got == b"GET"
        sent = 0
        while True:  # fill the socket's buffer: send says 0 instead of waiting
            n = _accel.send(fd, b"x" * 65536)
            if n == 0:
                break
            sent += n
        assert sent > 0
        client.close()
        assert _accel.count_dir(str(tmp_path)) == 0
        (tmp_path / "a").write_text("hello")
        assert _accel.count_dir(str(tmp_path)) == 1
        assert _accel.read_file(str(tmp_path / "a"), 3) == b"hel"
        with pytest.raises(OSError):
            _accel.read_file(str(tmp_path / "missing"), 10)
        assert gzip.decompress(_accel.gzip(b"abc" * 1000, 6)) == b"abc" * 1000
    finally:
        _accel.close(fd)
        server.close()
    with pytest.raises(OSError):
        os.fstat(fd)
