"""OpenTelemetry metrics export (``otel_metrics``): a real OTLP/HTTP receiver started here decodes the
protobuf an application's loopwatch sends, and every instrument is checked -- name, unit, kind,
attributes, and a value that fits what the application did (a stall, a slow callback, an executor, a real
PostgreSQL pool with connections held, threads).  Also the application's own (global) provider, the DB
opt-in, the option's validation, the degraded path without the SDK, and Prometheus names unchanged."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch import _otel
from loopwatch._config import resolve

PG = "postgresql://postgres@127.0.0.1:5432/postgres"
LOOP = "asyncio.eventloop.name"
POOL = "db.client.connection.pool.name"
EXEC = "loopwatch.executor.name"

# name -> (unit, kind, attribute keys); kind: gauge, counter (monotonic sum), updowncounter, histogram
EXPECTED: dict[str, tuple[str, str, set[str]]] = {
    "loopwatch.eventloop.lag": ("s", "gauge", {LOOP}),
    "loopwatch.eventloop.stalls": ("{stall}", "counter", {LOOP, "loopwatch.eventloop.threshold"}),
    "loopwatch.eventloop.slow_callbacks": ("{callback}", "counter", {LOOP, "code.function.name"}),
    "loopwatch.eventloop.tasks": ("{task}", "updowncounter", {LOOP}),
    "loopwatch.task.exceptions": ("{exception}", "counter", {"exception.type"}),
    "loopwatch.task.last_exception.time": ("s", "gauge", set()),
    "loopwatch.task.destroyed_pending": ("{task}", "counter", set()),
    "loopwatch.queue.depth": ("{item}", "updowncounter", {"loopwatch.queue.name"}),
    "loopwatch.queue.limit": ("{item}", "updowncounter", {"loopwatch.queue.name"}),
    "process.thread.count": ("{thread}", "updowncounter", set()),
    "loopwatch.thread.cpu.time": ("s", "counter", {"thread.name", "loopwatch.thread.native_id"}),
    "loopwatch.gil.enabled": ("1", "gauge", set()),
    "loopwatch.gil.contention": ("{thread}", "gauge", set()),
    "loopwatch.gil.switch_interval": ("s", "gauge", set()),
    "loopwatch.executor.queue.depth": ("{work_item}", "updowncounter", {EXEC}),
    "loopwatch.executor.thread.count": ("{thread}", "updowncounter", {EXEC}),
    "loopwatch.executor.thread.limit": ("{thread}", "updowncounter", {EXEC}),
    "loopwatch.executor.thread.busy": ("{thread}", "updowncounter", {EXEC}),
    "db.client.connection.count": ("{connection}", "updowncounter", {POOL, "db.client.connection.state"}),
    "db.client.connection.limit": ("{connection}", "updowncounter", {POOL}),
    "db.client.connection.pending_requests": ("{request}", "updowncounter", {POOL}),
    "db.client.connection.timeouts": ("{timeout}", "counter", {POOL}),
    "loopwatch.dumps": ("{dump}", "counter", {"loopwatch.dump.reason"}),
    "loopwatch.agent.up": ("1", "gauge", {"loopwatch.agent.part"}),
    "loopwatch.errors": ("{error}", "counter", {"loopwatch.component"}),
    **{f"asyncio.eventloop.delay.{s}": ("s", "gauge", {LOOP}) for s in _otel.DELAY_STATS},
    "asyncio.eventloop.utilization": ("1", "gauge", {LOOP}),
    "asyncio.eventloop.time": ("s", "counter", {LOOP, "asyncio.eventloop.state"}),
    "process.cpu.time": ("s", "counter", {"cpu.mode"}),
    "process.memory.usage": ("By", "updowncounter", set()),
    "process.memory.virtual": ("By", "updowncounter", set()),
    "process.unix.file_descriptor.count": ("{file_descriptor}", "updowncounter", set()),
    "loopwatch.eventloop.delay": ("s", "histogram", {LOOP}),
    "loopwatch.eventloop.slow_callback.duration": ("s", "histogram", {LOOP}),
    "loopwatch.executor.queue.wait_time": ("s", "histogram", {EXEC}),
    "loopwatch.gil.wait": ("s", "histogram", set()),
    "db.client.connection.wait_time": ("s", "histogram", {POOL}),
    "db.client.connection.use_time": ("s", "histogram", {POOL}),
}
# Instruments that exist but have no data point in this application, each for a stated reason.
NOT_HERE = {"loopwatch.db.client.connection.overflow": "SQLAlchemy pools only (psycopg_pool has no overflow)"}
OLD_DB = {"db.client.connections.usage", "db.client.connections.max", "db.client.connection.max",
          "db.client.connections.pending_requests",
          "db.client.connections.timeouts", "db.client.connections.wait_time", "db.client.connections.use_time"}

APP = r'''
import asyncio, os, sys, threading, time
import loopwatch
import psycopg_pool

def spin(stop):
    while not stop.is_set():
        sum(range(1000))
        time.sleep(0.001)

async def main():
    loopwatch.install(metrics_port=0, probe_interval=0.1, lag_thresholds=(0.5, 2.0), dump_dir=sys.argv[1],
                      dump_cooldown=0, slow_callback_threshold=0.1)
    stop = threading.Event()
    spinner = threading.Thread(target=spin, args=(stop,), name="spinner-1")
    spinner.start()
    queue = loopwatch.watch_queue(asyncio.Queue(maxsize=10), "jobs")
    for i in range(3):
        queue.put_nowait(i)
    pool = psycopg_pool.AsyncConnectionPool(%(dsn)r, min_size=1, max_size=4, open=False)
    await pool.open(wait=True)
    loopwatch.watch_pool(pool, "orders")
    held = [await pool.getconn(), await pool.getconn()]
    async with pool.connection():  # one acquired and given back: a use time
        await asyncio.sleep(0.05)
    await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.05) for _ in range(8)))
    asyncio.get_running_loop().call_soon(lambda: 1 / 0)  # reaches the loop's exception handler
    await asyncio.sleep(0.3)
    time.sleep(0.25)  # a slow callback, not a stall
    await asyncio.sleep(0.3)
    time.sleep(0.8)  # the stall: 0.8 s over the 0.5 s threshold
    await asyncio.sleep(1.5)  # exports every 0.5 s
    print("HELD", len(held), flush=True)
    loopwatch.uninstall()  # the last export, with the connections still held
    for conn in held:
        await pool.putconn(conn)
    await pool.close()
    stop.set()

asyncio.run(main())
'''


class Receiver:
    """An OTLP/HTTP receiver on 127.0.0.1: POST /v1/metrics, protobuf, gzip or deflate or plain."""

    def __init__(self) -> None:
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                request = metrics_service_pb2.ExportMetricsServiceRequest()
                request.ParseFromString(body)
                receiver.paths.append(self.path)
                receiver.requests.append(request)
                reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def last(self) -> tuple[dict[str, dict], dict[str, object]]:
        """The last data seen of each metric: ``{name: {unit, kind, points}}``, and the resource's attributes."""
        metrics: dict[str, dict] = {}
        resource: dict[str, object] = {}
        for request in self.requests:
            for rm in request.resource_metrics:
                resource = {kv.key: _any(kv.value) for kv in rm.resource.attributes}
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        metrics[m.name] = _metric(m)
        return metrics, resource


def _any(value: object) -> object:
    return getattr(value, value.WhichOneof("value"))  # type: ignore[attr-defined]


def _metric(m: object) -> dict:
    which = m.WhichOneof("data")  # type: ignore[attr-defined]
    data = getattr(m, which)
    if which == "sum":
        kind = "counter" if data.is_monotonic else "updowncounter"
    else:
        kind = which
    points = []
    for p in data.data_points:
        attrs = {kv.key: _any(kv.value) for kv in p.attributes}
        if which == "histogram":
            value = {"count": p.count, "sum": p.sum, "bounds": list(p.explicit_bounds)}
        else:
            value = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
        points.append((attrs, value))
    return {"unit": m.unit, "kind": kind, "points": points}  # type: ignore[attr-defined]


def _points(metric: dict, **match: object) -> list:
    return [v for attrs, v in metric["points"] if all(attrs.get(k.replace("__", ".")) == x for k, x in match.items())]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LOOPWATCH_"))}
    env.update(extra)
    return env


def test_otlp_export_every_instrument(receiver: Receiver, tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(APP % {"dsn": PG})
    env = _env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_METRIC_EXPORT_INTERVAL="500",
               LOOPWATCH_OTEL_METRICS="otlp", LOOPWATCH_SERVICE="shop")
    done = subprocess.run([sys.executable, str(app), str(tmp_path / "dumps")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HELD 2" in done.stdout
    assert receiver.requests, "no OTLP request arrived"
    assert set(receiver.paths) == {"/v1/metrics"}
    metrics, resource = receiver.last()
    assert resource["service.name"] == "shop"  # loopwatch's service, since OTEL_SERVICE_NAME is not set
    assert isinstance(resource["process.pid"], int)

    missing = set(EXPECTED) - set(metrics)
    assert not missing, f"instruments that never arrived: {sorted(missing)}"
    assert not (OLD_DB & set(metrics)), "old DB names without OTEL_SEMCONV_STABILITY_OPT_IN=database/dup"
    for name in NOT_HERE:
        assert name not in metrics or not metrics[name]["points"]
    for name, (unit, kind, keys) in EXPECTED.items():
        metric = metrics[name]
        assert metric["unit"] == unit, name
        assert metric["kind"] == kind, name
        assert metric["points"], f"{name}: no data point"
        for attrs, _ in metric["points"]:
            assert set(attrs) == keys, (name, attrs)
    assert set(metrics) - set(EXPECTED) <= set(NOT_HERE), sorted(set(metrics) - set(EXPECTED))

    # plausible values after the stall
    m = metrics
    assert _points(m["loopwatch.eventloop.stalls"], loopwatch__eventloop__threshold=0.5) == [1]
    assert _points(m["loopwatch.eventloop.stalls"], loopwatch__eventloop__threshold=2.0) == [0]
    assert 0 <= _points(m["loopwatch.eventloop.lag"], asyncio__eventloop__name="main")[0] < 0.5
    slow = dict((a["code.function.name"], v) for a, v in m["loopwatch.eventloop.slow_callbacks"]["points"])
    assert sum(slow.values()) >= 2 and slow.get("__main__.main", 0) >= 1  # the 0.25 s callback and the stall
    durations = _points(m["loopwatch.eventloop.slow_callback.duration"], asyncio__eventloop__name="main")[0]
    assert durations["count"] >= 2 and durations["sum"] >= 1.0
    assert durations["bounds"][:3] == [0.01, 0.025, 0.05]  # the Prometheus buckets
    delay = _points(m["loopwatch.eventloop.delay"], asyncio__eventloop__name="main")[0]
    assert delay["count"] >= 10 and delay["sum"] >= 0.3
    assert _points(m["loopwatch.eventloop.tasks"], asyncio__eventloop__name="main")[0] >= 1
    assert _points(m["loopwatch.task.exceptions"], exception__type="ZeroDivisionError") == [1], m["loopwatch.task.exceptions"]
    assert _points(m["loopwatch.task.last_exception.time"])[0] > 1.7e9
    assert _points(m["loopwatch.queue.depth"], loopwatch__queue__name="jobs") == [3]
    assert _points(m["loopwatch.queue.limit"], loopwatch__queue__name="jobs") == [10]
    assert _points(m["process.thread.count"])[0] >= 3
    kinds = {a["thread.name"] for a, _ in m["loopwatch.thread.cpu.time"]["points"]}
    assert {"MainThread", "spinner-N", "loopwatch-watchdog"} <= kinds
    assert _points(m["loopwatch.thread.cpu.time"], thread__name="MainThread")[0] > 0
    assert _points(m["loopwatch.gil.enabled"]) == [1.0]
    assert _points(m["loopwatch.gil.switch_interval"]) == [0.005]
    assert _points(m["loopwatch.executor.thread.limit"], loopwatch__executor__name="default")[0] >= 1
    wait = _points(m["loopwatch.executor.queue.wait_time"], loopwatch__executor__name="default")[0]
    assert wait["count"] == 8
    assert _points(m["db.client.connection.count"], db__client__connection__pool__name="orders",
                   db__client__connection__state="used") == [2]
    assert _points(m["db.client.connection.limit"], db__client__connection__pool__name="orders") == [4]
    assert _points(m["db.client.connection.pending_requests"], db__client__connection__pool__name="orders") == [0]
    assert _points(m["db.client.connection.timeouts"], db__client__connection__pool__name="orders") == [0]
    pool_wait = _points(m["db.client.connection.wait_time"], db__client__connection__pool__name="orders")[0]
    assert pool_wait["count"] == 3 and pool_wait["bounds"][0] == 0.0005
    pool_use = _points(m["db.client.connection.use_time"], db__client__connection__pool__name="orders")[0]
    assert pool_use["count"] == 1 and 0.04 <= pool_use["sum"] < 1.0
    assert _points(m["loopwatch.dumps"], loopwatch__dump__reason="event_loop_lag") == [1]
    assert _points(m["loopwatch.agent.up"], loopwatch__agent__part="otel") == [1.0]
    assert _points(m["loopwatch.agent.up"], loopwatch__agent__part="watchdog") == [1.0]
    assert _points(m["loopwatch.errors"], loopwatch__component="otel") == [0]
    assert sum(v for _, v in m["loopwatch.errors"]["points"]) == 0
    # Node's set: the last interval has no stall; the one with the stall was exported earlier
    peak = max(v for r in receiver.requests for rm in r.resource_metrics for sm in rm.scope_metrics
               for metric in sm.metrics if metric.name == "asyncio.eventloop.delay.max"
               for v in [p.as_double for p in metric.gauge.data_points])
    assert 0.3 <= peak <= 1.0
    busiest = max(v for r in receiver.requests for rm in r.resource_metrics for sm in rm.scope_metrics
                  for metric in sm.metrics if metric.name == "asyncio.eventloop.utilization"
                  for v in [p.as_double for p in metric.gauge.data_points])
    assert 0.5 <= busiest <= 1.0
    for stat in _otel.DELAY_STATS:
        assert 0 <= _points(m[f"asyncio.eventloop.delay.{stat}"], asyncio__eventloop__name="main")[0] <= 1.0
    state = {a["asyncio.eventloop.state"]: v for a, v in m["asyncio.eventloop.time"]["points"]}
    assert state["active"] >= 1.0 and state["idle"] >= 1.0  # >= 1.05 s blocked, >= 1.5 s asleep
    assert 0 <= _points(m["asyncio.eventloop.utilization"], asyncio__eventloop__name="main")[0] <= 1
    cpu = {a["cpu.mode"]: v for a, v in m["process.cpu.time"]["points"]}
    assert set(cpu) == {"user", "system"} and cpu["user"] > 0
    assert _points(m["process.memory.usage"])[0] > 10e6
    assert _points(m["process.memory.virtual"])[0] >= _points(m["process.memory.usage"])[0]
    assert _points(m["process.unix.file_descriptor.count"])[0] >= 3


GLOBAL_APP = r'''
import asyncio, json, os, sys, time
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
import loopwatch
import psycopg_pool

reader = InMemoryMetricReader()
if sys.argv[2] == "sdk":
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

async def main():
    agent = loopwatch.install(metrics_port=0, probe_interval=0.1, dump_dir=sys.argv[1], otel_metrics=sys.argv[3])
    pool = psycopg_pool.AsyncConnectionPool(%(dsn)r, min_size=1, max_size=3, open=False)
    await pool.open(wait=True)
    loopwatch.watch_pool(pool, "orders")
    async with pool.connection():
        time.sleep(0.6)
        await asyncio.sleep(0.3)
        out = {}
        for rm in reader.get_metrics_data().resource_metrics if sys.argv[2] == "sdk" else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out[m.name] = [m.unit, [[dict(p.attributes), getattr(p, "value", None),
                                             getattr(p, "count", None), getattr(p, "sum", None)]
                                            for p in m.data.data_points]]
    up = {s.labels["part"]: s.value for f in agent.up.collect() for s in f.samples}
    print(json.dumps({"metrics": out, "degraded": agent.snapshot().degraded, "up": up}))
    loopwatch.uninstall()
    await pool.close()

asyncio.run(main())
'''


def _run_global(tmp_path: Path, provider: str, mode: str, **env: str) -> dict:
    app = tmp_path / "global_app.py"
    app.write_text(GLOBAL_APP % {"dsn": PG})
    done = subprocess.run([sys.executable, str(app), str(tmp_path / "dumps"), provider, mode], env=_env(**env),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_global_provider_gets_the_instruments(tmp_path: Path) -> None:
    result = _run_global(tmp_path, "sdk", "global")
    metrics = result["metrics"]
    assert result["degraded"] == []
    assert "otel" not in result["up"]  # the application's reader: not loopwatch's to report
    assert set(EXPECTED) - set(metrics) <= {"loopwatch.queue.depth", "loopwatch.queue.limit",
                                            "loopwatch.task.exceptions", "loopwatch.executor.queue.wait_time",
                                            "loopwatch.executor.queue.depth", "loopwatch.executor.thread.count",
                                            "loopwatch.executor.thread.limit", "loopwatch.executor.thread.busy",
                                            "asyncio.eventloop.utilization", "db.client.connection.use_time",
                                            "loopwatch.gil.wait", "loopwatch.gil.contention"}
    # (this app has no queue, executor or exception, reads once -- no interval for utilization -- holds its
    # one connection, and ends before the GIL probe's first sample at 1 s)
    used = [p[1] for p in metrics["db.client.connection.count"][1]
            if p[0] == {"db.client.connection.pool.name": "orders", "db.client.connection.state": "used"}]
    assert used == [1]
    stalls = {p[0]["loopwatch.eventloop.threshold"]: p[1] for p in metrics["loopwatch.eventloop.stalls"][1]}
    assert stalls[0.5] == 1
    assert not (OLD_DB & set(metrics))


def test_db_opt_in_emits_the_old_names_too(tmp_path: Path) -> None:
    result = _run_global(tmp_path, "sdk", "auto", OTEL_SEMCONV_STABILITY_OPT_IN="http,database/dup")
    metrics = result["metrics"]
    assert {"db.client.connections.usage", "db.client.connections.max", "db.client.connections.pending_requests",
            "db.client.connections.timeouts", "db.client.connections.wait_time", "db.client.connection.max"} \
        <= set(metrics)
    assert {"db.client.connection.count", "db.client.connection.limit"} <= set(metrics)  # both, with database/dup
    limits = [metrics[name][1] for name in ("db.client.connection.limit", "db.client.connection.max",
                                             "db.client.connections.max")]
    assert [[p[1] for p in points if "orders" in p[0].values()] for points in limits] == [[3], [3], [3]]
    usage = {p[0]["state"]: p[1] for p in metrics["db.client.connections.usage"][1] if p[0]["pool.name"] == "orders"}
    assert usage["used"] == 1
    assert metrics["db.client.connections.wait_time"][0] == "ms"
    assert metrics["db.client.connection.wait_time"][0] == "s"
    old = metrics["db.client.connections.wait_time"][1][0]
    new = metrics["db.client.connection.wait_time"][1][0]
    assert old[2] == new[2] >= 1 and old[3] == pytest.approx(new[3] * 1000)
    assert set(old[0]) == {"pool.name"}


def test_global_without_an_sdk_provider_degrades(tmp_path: Path) -> None:
    result = _run_global(tmp_path, "none", "global")
    assert any(note.startswith("otel: otel_metrics='global' but the application has set no OpenTelemetry SDK")
               for note in result["degraded"]), result["degraded"]
    assert result["up"]["otel"] == 0.0


def test_auto_with_nothing_to_export_to_is_off(tmp_path: Path) -> None:
    result = _run_global(tmp_path, "none", "auto")
    assert result["degraded"] == [] and "otel" not in result["up"]


BLOCKED_APP = r'''
import json, sys
sys.modules["opentelemetry"] = None  # the extra is not installed: every import of it fails
import loopwatch
agent = loopwatch.install(metrics_port=0, dump_dir=sys.argv[1], otel_metrics="otlp")
up = {s.labels["part"]: s.value for f in agent.up.collect() for s in f.samples}
print(json.dumps({"degraded": agent.snapshot().degraded, "up": up, "otel": "opentelemetry.sdk" in sys.modules}))
loopwatch.uninstall()
'''


def test_without_the_extra_the_feature_degrades(tmp_path: Path) -> None:
    app = tmp_path / "blocked.py"
    app.write_text(BLOCKED_APP)
    done = subprocess.run([sys.executable, str(app), str(tmp_path / "dumps")], env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    notes = [n for n in result["degraded"] if n.startswith("otel:")]
    assert len(notes) == 1 and "pip install 'loopwatch[otel]'" in notes[0]
    assert result["up"]["otel"] == 0.0
    assert "loopwatch.degraded" in done.stderr and "loopwatch[otel]" in done.stderr


def test_import_loopwatch_does_not_import_opentelemetry() -> None:
    code = "import sys, loopwatch; print(any(m.startswith('opentelemetry') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("value", ["sometimes", "", 1, True])
def test_bad_values_are_refused(value: object) -> None:
    with pytest.raises(loopwatch.ConfigError) as info:
        resolve({"otel_metrics": value}, environ={})
    assert str(info.value) == f"otel_metrics must be one of 'off', 'auto', 'global', 'otlp', got {value!r}"


def test_environment_and_flag() -> None:
    assert resolve({}, environ={"LOOPWATCH_OTEL_METRICS": " OTLP "}).otel_metrics == "otlp"
    assert resolve({}, environ={}).otel_metrics == "off"
    with pytest.raises(loopwatch.ConfigError, match=r"otel_metrics \(from LOOPWATCH_OTEL_METRICS\) must be"):
        resolve({}, environ={"LOOPWATCH_OTEL_METRICS": "yes"})
    from loopwatch.__main__ import build_parser
    from loopwatch._run import command_environment
    parser = build_parser()
    args = parser.parse_args(["run", "--otel-metrics", "auto", "--", "python", "-c", "pass"])
    assert command_environment(args, {})["LOOPWATCH_OTEL_METRICS"] == "auto"
    bad = parser.parse_args(["run", "--otel-metrics", "maybe", "--", "python"])
    with pytest.raises(loopwatch.ConfigError, match=r"otel_metrics \(from --otel-metrics\) must be one of"):
        command_environment(bad, {})


def _names(registry: CollectorRegistry) -> list[tuple[str, tuple[str, ...]]]:
    return sorted({(s.name, tuple(sorted(s.labels))) for f in registry.collect() for s in f.samples})


def test_prometheus_names_do_not_change(receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = {}
    for mode in ("off", "otlp"):
        registry = CollectorRegistry()
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
        agent = loopwatch.install(metrics_port=0, registry=registry, dump_dir=tmp_path / "d", otel_metrics=mode)
        try:
            assert (agent.otel is None) == (mode == "off")
            names[mode] = _names(registry)
        finally:
            loopwatch.uninstall()
    assert names["off"] == names["otlp"]
    assert receiver.requests  # the otlp run did export (its last export at uninstall)


FORK_APP = r'''
import asyncio, os, sys, time, urllib.request
import loopwatch

async def stall(seconds):
    time.sleep(seconds)
    await asyncio.sleep(1.2)

loopwatch.install(metrics_port=0, probe_interval=0.1, lag_thresholds=(0.5, 2.0), dump_dir=sys.argv[1],
                  otel_metrics="otlp")
asyncio.run(stall(0.7))  # the parent's stall, exported by the parent
pid = os.fork()
if pid == 0:
    time.sleep(1.0)  # the reader thread the SDK restarted in this child ticks on the parent's provider
    asyncio.run(stall(0.0))  # the child resumes: its own provider, its counts from zero
    loopwatch.uninstall()
    os._exit(0)
loopwatch.uninstall()  # the parent's last export
urllib.request.urlopen(sys.argv[2] + "/parent-done").read()
_, status = os.waitpid(pid, 0)
print("PIDS", os.getpid(), pid, status, flush=True)
'''


def test_a_forked_child_exports_its_own(receiver: Receiver, tmp_path: Path) -> None:
    app = tmp_path / "fork_app.py"
    app.write_text(FORK_APP)
    marks: list[int] = []
    handler = receiver.server.RequestHandlerClass

    def do_get(self: http.server.BaseHTTPRequestHandler) -> None:
        marks.append(len(receiver.requests))  # requests that had arrived when the parent was done
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    handler.do_GET = do_get  # type: ignore[attr-defined]
    env = _env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_METRIC_EXPORT_INTERVAL="300")
    done = subprocess.run([sys.executable, str(app), str(tmp_path / "dumps"), receiver.url], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    parent, child, status = (int(x) for x in done.stdout.split("PIDS", 1)[1].split())
    assert status == 0 and marks
    by_pid: dict[int, list[dict]] = {}
    for index, request in enumerate(receiver.requests):
        for rm in request.resource_metrics:
            pid = {kv.key: _any(kv.value) for kv in rm.resource.attributes}["process.pid"]
            stalls = [p.as_double for sm in rm.scope_metrics for m in sm.metrics
                      if m.name == "loopwatch.eventloop.stalls" for p in m.sum.data_points
                      if {kv.key: _any(kv.value) for kv in p.attributes}["loopwatch.eventloop.threshold"] == 0.5]
            by_pid.setdefault(pid, []).append({"index": index, "stalls": stalls})
    assert set(by_pid) == {parent, child}
    # nothing with the parent's pid after the parent was done: the child never sent through the parent's provider
    assert max(r["index"] for r in by_pid[parent]) < marks[0]
    assert by_pid[parent][-1]["stalls"] == [1.0]
    assert by_pid[child][-1]["stalls"] == [0.0]  # the child's own counts, from zero
