"""Which request was blocked: the span and structlog context of the blocked task, in dumps, events and
exemplars (issue 14 items 1 and 2).

Unit level: ``_context.ContextReader`` reads a task's context from another thread while the task blocks
(the C task of 3.11, the Python task, a callback's handle), copies values only for the allowed keys and
never formats an application object; ``_series`` carries exemplars into the OpenMetrics output only.

End to end: ``apps/traced_app.py`` -- FastAPI, the real OpenTelemetry SDK with its FastAPI instrumentation
and an in-memory span exporter, structlog contextvars bound by a middleware -- blocks its loop in a handler;
the dump, the ``loopwatch.stall`` / ``loopwatch.slow_callback`` / ``loopwatch.dump`` events and the
exemplars name the trace the SDK exported, on the stdlib loop and on uvloop, one request after another
and with other requests in flight; a real Prometheus with exemplar storage returns the exemplar.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import structlog
import structlog.testing
from conftest import free_port, prometheus_server, wait_for
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

import loopwatch
from loopwatch import _context, _series
from loopwatch._errors import ConfigError

SECRET = "s3cr3t-t0ken"
ROUTE = "/orders/{order_id}"


# -- the reader ----------------------------------------------------------------------------------------
class Opaque:
    """An application object in the context: its repr must never run on loopwatch's thread."""

    formatted = 0

    def __repr__(self) -> str:
        Opaque.formatted += 1
        return "Opaque()"

    __str__ = __repr__


def _read_mid_step(task_factory, reader: _context.ContextReader, body) -> dict | None:
    """Run ``body`` (sync, blocking) in a task made by ``task_factory``; read its context from another thread
    while it blocks, as the watchdog does."""
    got: dict = {}
    started = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def step() -> None:
            body()
            started.set()
            time.sleep(0.3)  # blocking: the reader runs now

        task = task_factory(loop, step())

        def read() -> None:
            started.wait(5)
            got["context"] = reader.of_task(asyncio.current_task(loop))
            got["running"] = asyncio.current_task(loop) is task

        thread = threading.Thread(target=read)
        thread.start()
        await task
        thread.join()

    asyncio.run(main())
    assert got["running"], "the reader must see the blocked task as the loop's current task"
    return got["context"]


TASK_KINDS = {
    "c_task": lambda loop, coro: loop.create_task(coro),
    "py_task": lambda loop, coro: asyncio.tasks._PyTask(coro, loop=loop),
}


@pytest.fixture(scope="module")
def tracer():
    provider = TracerProvider()
    return provider.get_tracer("test")


@pytest.mark.parametrize("kind", sorted(TASK_KINDS))
def test_reader_sees_the_span_and_only_the_allowed_values(kind: str, tracer) -> None:
    spans = {}

    def body() -> None:
        structlog.contextvars.bind_contextvars(request_id="req-1", tenant="acme", user_token=SECRET,
                                               payload=Opaque(), gone="x", note="n" * 1000,
                                               order=uuid.UUID(int=5), attempt=2)
        structlog.contextvars.unbind_contextvars("gone")
        span = tracer.start_span("GET /orders/{order_id}", attributes={"http.route": ROUTE})
        spans["span"] = span
        trace.context_api.attach(trace.set_span_in_context(span))

    reader = _context.ContextReader(["request_id", "tenant", "payload", "note", "order", "attempt", "absent"])
    context = _read_mid_step(TASK_KINDS[kind], reader, body)
    ids = spans["span"].get_span_context()
    assert context == {
        "trace_id": f"{ids.trace_id:032x}", "span_id": f"{ids.span_id:016x}", "span_name": "GET /orders/{order_id}",
        "route": ROUTE,
        "values": {"attempt": 2, "note": "n" * 256 + "...", "order": "00000000-0000-0000-0000-000000000005",
                   "payload": "<Opaque>", "request_id": "req-1", "tenant": "acme"},
        "other_keys": ["user_token"],
    }
    assert Opaque.formatted == 0, "an application object was formatted on the reader's thread"


def test_reader_without_span_or_keys_and_a_non_recording_span() -> None:
    assert _context.ContextReader().of_task(None) is None
    assert _read_mid_step(TASK_KINDS["c_task"], _context.ContextReader(), lambda: None) is None

    span_context = trace.SpanContext(trace_id=0x1234, span_id=0x99, is_remote=True)
    context = _read_mid_step(TASK_KINDS["c_task"], _context.ContextReader(), lambda: trace.context_api.attach(
        trace.set_span_in_context(trace.NonRecordingSpan(span_context))))
    assert context == {"trace_id": f"{0x1234:032x}", "span_id": f"{0x99:016x}"}  # no name: not a recording span
    invalid = _read_mid_step(TASK_KINDS["c_task"], _context.ContextReader(), lambda: trace.context_api.attach(
        trace.set_span_in_context(trace.INVALID_SPAN)))
    assert invalid is None


def test_reader_reads_a_callback_handle() -> None:
    async def main() -> dict | None:
        structlog.contextvars.bind_contextvars(request_id="cb")
        handle = asyncio.get_running_loop().call_soon(lambda: None)
        return _context.ContextReader(["request_id"]).of_task(handle)
    assert asyncio.run(main()) == {"values": {"request_id": "cb"}}


def test_event_fields_and_exemplar() -> None:
    context = {"trace_id": "a" * 32, "span_id": "b" * 16, "span_name": "GET /x", "route": "/x",
               "values": {"request_id": "r"}, "other_keys": ["t"]}
    assert _context.event_fields(context) == {"trace_id": "a" * 32, "span_id": "b" * 16, "span_name": "GET /x",
                                              "route": "/x", "context": {"request_id": "r"},
                                              "context_other_keys": ["t"]}
    assert _context.exemplar(context) == {"trace_id": "a" * 32, "span_id": "b" * 16}
    assert _context.exemplar({"values": {"request_id": "r"}}) is None
    assert _context.event_fields(None) == {} and _context.exemplar(None) is None


# -- options ---------------------------------------------------------------------------------------------
def test_context_keys_option_from_arguments_and_environment(monkeypatch) -> None:
    from loopwatch._config import resolve
    assert resolve({}).context_keys == ()
    assert resolve({"context_keys": ["request_id", "tenant", "request_id"]}).context_keys == ("request_id", "tenant")
    monkeypatch.setenv("LOOPWATCH_CONTEXT_KEYS", "request_id,tenant")
    assert resolve({}).context_keys == ("request_id", "tenant")
    for bad in ("9lives", "a b;c", ["ok", 3], 7, ["x" * 65], [f"k{n}" for n in range(33)]):
        with pytest.raises(ConfigError) as error:
            resolve({"context_keys": bad})
        assert str(error.value).startswith("context_keys must be a list of at most 32 context key names")
        assert repr(bad)[:40] in str(error.value)
    monkeypatch.setenv("LOOPWATCH_CONTEXT_KEYS", "ok,9bad")
    with pytest.raises(ConfigError, match=r"context_keys \(from LOOPWATCH_CONTEXT_KEYS\) must be"):
        loopwatch.install(metrics_port=0)


# -- exemplars in the exposition --------------------------------------------------------------------------
def test_series_exemplars_only_in_openmetrics() -> None:
    registry = CollectorRegistry()
    counter = _series.Counter("spikes", "h", ["loop"], namespace="t")
    histogram = _series.Histogram("slow_seconds", "h", ["loop"], namespace="t", buckets=(0.1, 1.0))

    class Both:
        def collect(self):
            return [*counter.collect(), *histogram.collect()]
    registry.register(Both())
    counter.labels("main").inc(1.0, {"trace_id": "a" * 32, "span_id": "b" * 16})
    counter.labels("main").inc()  # no span: the last exemplar stays
    histogram.labels("main").observe(0.5, {"trace_id": "c" * 32, "span_id": "d" * 16})
    histogram.labels("main").observe(0.05)
    text = generate_openmetrics(registry).decode()
    assert f't_spikes_total{{loop="main"}} 2.0 # {{span_id="{"b" * 16}",trace_id="{"a" * 32}"}} 1.0 ' in text
    assert f't_slow_seconds_bucket{{le="1.0",loop="main"}} 2.0 # {{span_id="{"d" * 16}",trace_id="{"c" * 32}"}} 0.5 ' \
        in text
    assert 't_slow_seconds_bucket{le="0.1",loop="main"} 1.0\n' in text  # no exemplar for the one without a span
    assert "#" not in "".join(line for line in generate_latest(registry).decode().splitlines()
                              if not line.startswith("#"))


def test_exact_mode_slow_callback_carries_its_span(tracer) -> None:
    """A slow callback below the stall threshold, timed per callback: its event and its histogram exemplar
    name the span it ran in (the handle's context, read on the loop thread after it ran)."""
    registry = CollectorRegistry()
    agent = loopwatch.install(metrics_port=0, registry=registry, slow_callback_mode="exact",
                              context_keys=["request_id"], dump_keep=0)

    async def handler_step() -> trace.SpanContext:
        structlog.contextvars.bind_contextvars(request_id="exact-1")
        with tracer.start_as_current_span("slow work") as span:  # (a request's span: open across awaits)
            time.sleep(0.2)
            await asyncio.sleep(0)  # the slow step ends here, its span still current
            return span.get_span_context()

    async def main() -> trace.SpanContext:
        return await asyncio.create_task(handler_step())
    # loopwatch's events go through structlog once it is configured (another test may have): capture there
    with structlog.testing.capture_logs() as events:
        ids = asyncio.run(main())
    slow = [e for e in events if e.get("event") == "loopwatch.slow_callback"]
    assert slow, events
    assert slow[0]["trace_id"] == f"{ids.trace_id:032x}" and slow[0]["span_name"] == "slow work"
    assert slow[0]["context"] == {"request_id": "exact-1"}
    text = generate_openmetrics(registry).decode()
    assert f'trace_id="{ids.trace_id:032x}"' in text
    assert agent.started


# -- end to end --------------------------------------------------------------------------------------------
def _get(url: str, headers: dict | None = None, timeout: float = 30) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _events(path: Path, name: str) -> list[dict]:
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e.get("event") == name]


@pytest.fixture
def traced(tmp_path: Path, app_runner):
    """Start ``traced_app`` on ``mode``; returns (base URL, metrics URL, dump dir, events file)."""
    def start(mode: str = "asyncio", busy_threads: int = 0):
        http, metrics = free_port(), free_port()
        dumps, events = tmp_path / f"dumps-{mode}", tmp_path / f"events-{mode}.jsonl"
        app = app_runner("traced_app", str(http), str(metrics), str(dumps), str(events), mode,
                         env={"BUSY_THREADS": str(busy_threads)})
        app.wait_line("READY")
        return f"http://127.0.0.1:{http}", f"http://127.0.0.1:{metrics}/metrics", dumps, events
    return start


def _server_spans(base: str) -> dict[str, dict]:
    """The SERVER spans the SDK exported, by the request id the test sent (the order id)."""
    spans = json.loads(_get(f"{base}/spans"))
    return {str(s["attributes"].get("http.target", "")).split("?")[0].rsplit("/", 1)[-1]: s
            for s in spans if s["kind"] == "SERVER" and s["attributes"].get("http.route") == ROUTE}


@pytest.mark.parametrize("mode,busy", [("asyncio", 0), ("uvloop", 0), ("asyncio", 3)],
                         ids=["asyncio", "uvloop", "asyncio-3-busy-threads"])
def test_dumps_events_and_exemplars_name_the_blocked_request(traced, mode: str, busy: int) -> None:
    """Three stalls of different lengths in a row; with ``busy``, three threads fight for the GIL.  Each
    stall, dump and event is matched to its request by the request id the test sent: the app's own
    warm-up (its first request, slow under contention) may stall the loop too, without any of them."""
    base, metrics, dumps, events = traced(mode, busy)
    blocks = {"101": 0.7, "102": 1.1, "103": 0.6}  # one stall per request, different lengths

    def of_request(event_name: str) -> dict[str, dict]:
        found = {}
        for event in _events(events, event_name):
            request_id = (event.get("context") or {}).get("request_id", "")
            if request_id.startswith("req-"):
                found.setdefault(request_id[4:], event)  # the first one of each request
        return found

    _get(f"{base}/orders/1", {"X-Request-ID": "warm-up"})  # FastAPI's first request builds its schemas ...
    time.sleep(2.0)  # ... and the watchdog writes that stall's dump: with 3 busy threads, it takes a while
    for order, block in blocks.items():
        _get(f"{base}/orders/{order}?block={block}", {"X-Request-ID": f"req-{order}"})
        wait_for(lambda: order in of_request("loopwatch.stall"), timeout=30, what=f"the stall of order {order}")
        time.sleep(0.5)
    spans = wait_for(lambda: (s := _server_spans(base)) and len(s) == 4 and s, timeout=30, what="4 server spans")

    stalls = of_request("loopwatch.stall")
    assert sorted(stalls) == sorted(blocks)
    assert len([e for e in _events(events, "loopwatch.stall") if e.get("route") == ROUTE
                and (e.get("culprit") or "").endswith("in get_order")]) == 3, "one stall per blocking request"
    dumped = {}
    for path in dumps.glob("*-event_loop_lag.json"):
        dump = json.loads(path.read_text())
        request_id = ((dump.get("context") or {}).get("values") or {}).get("request_id", "")
        if request_id.startswith("req-"):
            dumped[request_id[4:]] = (path, dump)
    assert sorted(dumped) == sorted(blocks), "every blocking request's stall was dumped, with its context"
    for order, block in blocks.items():
        span, stall = spans[order], stalls[order]
        assert stall["duration"] == pytest.approx(block, abs=0.15)
        path, dump = dumped[order]
        context = dump["context"]
        assert context["trace_id"] == span["trace_id"] and context["span_id"] == span["span_id"], (order, context)
        assert context["route"] == ROUTE and context["span_name"] == f"GET {ROUTE}"
        assert context["values"] == {"request_id": f"req-{order}", "tenant": "acme"}
        assert context["other_keys"] == ["user_token"]
        assert dump["culprit"]["function"] == "get_order"
        text = path.with_suffix(".txt").read_text()
        assert f"trace_id {span['trace_id']}" in text and f"route {ROUTE}" in text and "user_token" in text
        assert stall["trace_id"] == span["trace_id"] and stall["route"] == ROUTE and stall["dump"] == str(path)
        assert stall["context"] == {"request_id": f"req-{order}", "tenant": "acme"}
        assert stall["context_other_keys"] == ["user_token"]
        assert of_request("loopwatch.dump")[order]["trace_id"] == span["trace_id"]
    slow = _events(events, "loopwatch.slow_callback")  # (at most one per second per callback: not all three)
    by_trace = {spans[o]["trace_id"]: o for o in blocks}
    slow = [s for s in slow if s.get("trace_id") in by_trace]
    assert slow and slow[0]["trace_id"] == spans["101"]["trace_id"]
    assert all(s["context"]["request_id"] == f"req-{by_trace[s['trace_id']]}" for s in slow)
    everything = "".join(p.read_text() for p in dumps.iterdir() if p.is_file()) + events.read_text()
    assert SECRET not in everything

    # ``loopwatch dumps``: the culprit's requests, and the trace of its worst stall (the 1.1 s one).
    listed = subprocess.run([sys.executable, "-m", "loopwatch", "dumps", "--json", str(dumps)], capture_output=True,
                            text=True, check=True)
    [culprit] = [c for c in json.loads(listed.stdout)["culprits"]
                 if c["culprit"] and c["culprit"]["function"] == "get_order"]
    assert culprit["routes"] == {ROUTE: 3} and culprit["worst_trace_id"] == spans["102"]["trace_id"]

    # Exemplars: the last stall's trace on the spike counter; each slow callback's in its bucket.
    openmetrics = _get(metrics, {"Accept": "application/openmetrics-text; version=1.0.0"}).decode()
    spike = next(line for line in openmetrics.splitlines()
                 if line.startswith("loopwatch_event_loop_lag_spikes_total{") and 'threshold="0.5"' in line)
    assert f'trace_id="{spans["103"]["trace_id"]}"' in spike and f'span_id="{spans["103"]["span_id"]}"' in spike
    buckets = [line for line in openmetrics.splitlines()
               if line.startswith("loopwatch_slow_callback_duration_seconds_bucket{") and " # {" in line]
    assert f'trace_id="{spans["102"]["trace_id"]}"' in "".join(buckets)  # the 1.1 s one: bucket le=2.5 alone
    plain = _get(metrics).decode()
    assert "trace_id" not in plain  # the classic text format has no exemplars


def test_the_blocked_request_among_requests_in_flight(traced) -> None:
    """Five requests awaiting I/O (``await asyncio.sleep``) while a sixth blocks: the dump names the one
    that blocked, not one of the tasks waiting beside it."""
    base, _, dumps, events = traced("asyncio")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        waiting = [pool.submit(_get, f"{base}/orders/{200 + n}?wait=2", {"X-Request-ID": f"req-{200 + n}"})
                   for n in range(5)]
        time.sleep(0.5)  # the five are awaiting now
        blocking = pool.submit(_get, f"{base}/orders/299?block=0.9", {"X-Request-ID": "req-299"})
        for future in [*waiting, blocking]:
            future.result(timeout=30)
    wait_for(lambda: any(e.get("route") == ROUTE for e in _events(events, "loopwatch.stall")), timeout=30,
             what="the stall")
    spans = wait_for(lambda: (s := _server_spans(base)) and len(s) == 6 and s, timeout=30, what="6 server spans")
    blocked = [d for d in map(lambda p: json.loads(p.read_text()), dumps.glob("*-event_loop_lag.json"))
               if d["culprit"] and d["culprit"]["function"] == "get_order"]
    assert len(blocked) == 1
    assert blocked[0]["context"]["trace_id"] == spans["299"]["trace_id"]
    assert blocked[0]["context"]["values"]["request_id"] == "req-299"
    waiting_tasks = [t for t in blocked[0]["tasks"] if any(f["function"] == "get_order" for f in t["stack"])]
    assert len(waiting_tasks) >= 5, "the five requests were in flight during the stall"


def test_real_prometheus_stores_the_exemplar(traced, tmp_path: Path, prometheus_tools) -> None:
    """Prometheus (exemplar storage on) scrapes the app in OpenMetrics; ``query_exemplars`` returns the
    trace of the request that blocked, on the spike counter and on the slow-callback histogram."""
    base, metrics, _, events = traced("asyncio")
    target = urllib.parse.urlparse(metrics).netloc
    config = ("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: orders\n"
              f"    static_configs:\n      - targets: ['{target}']\n")
    with prometheus_server(prometheus_tools["prometheus"], tmp_path, config,
                           "--enable-feature=exemplar-storage") as prometheus:
        api = f"{prometheus}/api/v1"

        def up() -> bool:
            result = json.loads(_get(f"{api}/query?query=up", timeout=5))["data"]["result"]
            return bool(result) and result[0]["value"][1] == "1"
        wait_for(up, timeout=60, what="prometheus scraping the app")
        start = time.time() - 60
        _get(f"{base}/orders/777?block=0.8", {"X-Request-ID": "req-777"})
        wait_for(lambda: _events(events, "loopwatch.stall"), timeout=30, what="the stall")
        trace_id = _server_spans(base)["777"]["trace_id"]

        def exemplars(metric: str) -> list[dict]:
            query = urllib.parse.urlencode({"query": metric, "start": start, "end": time.time() + 60})
            data = json.loads(_get(f"{api}/query_exemplars?{query}", timeout=5))["data"]
            return [e for series in data for e in series["exemplars"]]
        for metric in ("loopwatch_event_loop_lag_spikes_total", "loopwatch_slow_callback_duration_seconds_bucket"):
            found = wait_for(lambda: exemplars(metric), timeout=30, what=f"an exemplar on {metric}")
            assert {e["labels"]["trace_id"] for e in found} == {trace_id}, (metric, found)
            assert all(len(e["labels"]["span_id"]) == 16 for e in found)


def test_exemplars_stay_bounded_whatever_the_traffic() -> None:
    """Thousands of traced observations: at most one exemplar per series and bucket, the latest."""
    registry = CollectorRegistry()
    histogram = _series.Histogram("slow_seconds", "h", ["loop"], namespace="t", buckets=(0.1, 0.5, 1.0))
    counter = _series.Counter("spikes", "h", ["loop"], namespace="t")

    class Both:
        def collect(self):
            return [*counter.collect(), *histogram.collect()]
    registry.register(Both())
    for n in range(5000):
        ids = {"trace_id": f"{n:032x}", "span_id": f"{n:016x}"}
        histogram.labels("main").observe((n % 13) / 10, ids)
        counter.labels("main").inc(1.0, ids)
    lines = [line for line in generate_openmetrics(registry).decode().splitlines() if " # {" in line]
    assert len(lines) == 1 + 4  # the counter, and the 4 buckets (0.1, 0.5, 1.0, +Inf)
    assert f'trace_id="{4999:032x}"' in lines[0]  # the counter's: the last increment's
    # each bucket's exemplar is the last observation that fell in it
    last_in = {bound: max(n for n in range(5000) if lo < (n % 13) / 10 <= bound)
               for lo, bound in ((-1, 0.1), (0.1, 0.5), (0.5, 1.0), (1.0, float("inf")))}
    for line, bound in zip(lines[1:], last_in):
        assert f'trace_id="{last_in[bound]:032x}"' in line, (line, bound)


def test_every_threshold_a_stall_crosses_carries_its_trace(tracer) -> None:
    """A 2.3 s stall with thresholds 0.5 and 2.0: both spike series get the blocked request's trace."""
    registry = CollectorRegistry()
    agent = loopwatch.install(metrics_port=0, registry=registry, lag_thresholds=(0.5, 2.0), dump_keep=0)

    async def request() -> trace.SpanContext:
        with tracer.start_as_current_span("GET /report") as span:
            await asyncio.sleep(0.05)
            time.sleep(2.3)
            await asyncio.sleep(0.05)
            return span.get_span_context()

    async def main() -> trace.SpanContext:
        return await asyncio.create_task(request())
    ids = asyncio.run(main())
    text = generate_openmetrics(registry).decode()
    spikes = [line for line in text.splitlines() if line.startswith("loopwatch_event_loop_lag_spikes_total{")]
    assert len(spikes) == 2, spikes  # the two thresholds given
    for threshold in ("0.5", "2.0"):
        [line] = [line for line in spikes if f'threshold="{threshold}"' in line]
        assert line.split(" # ")[0].endswith("} 1.0"), line  # the stall counted once at each
        assert f'trace_id="{ids.trace_id:032x}"' in line and f'span_id="{ids.span_id:016x}"' in line, line
    wait_for(lambda: agent.watchdog.recent, timeout=10, what="the ended stall")
    ended = agent.watchdog.recent[-1]  # what the console's lw-stalls lists
    assert ended["trace_id"] == f"{ids.trace_id:032x}" and ended["duration"] == pytest.approx(2.3, abs=0.15)


def test_requested_and_manual_dumps_carry_the_running_request(tracer, tmp_path: Path) -> None:
    """``lw-dump``/``loopwatch dump PID`` mid-stall (another thread asks while the task blocks) and
    ``loopwatch.dump()`` called by a request handler: both dumps name that request."""
    agent = loopwatch.install(metrics_port=0, registry=CollectorRegistry(), dump_dir=tmp_path / "dumps",
                              context_keys=["request_id"], lag_thresholds=(5.0,))
    got: dict = {}

    async def handler() -> trace.SpanContext:
        structlog.contextvars.bind_contextvars(request_id="req-9")
        with tracer.start_as_current_span("GET /export") as span:
            await asyncio.sleep(0.05)
            asker = threading.Thread(target=lambda: (time.sleep(0.3),
                                                     got.update(requested=agent.requests.dump_now("console")[1])))
            asker.start()
            time.sleep(0.8)  # blocking: the request arrives meanwhile
            asker.join()
            got["manual"] = json.loads(loopwatch.dump().read_text())
            return span.get_span_context()

    async def main() -> trace.SpanContext:
        return await asyncio.create_task(handler())
    ids = asyncio.run(main())
    for kind in ("requested", "manual"):
        context = got[kind]["context"]
        assert context["trace_id"] == f"{ids.trace_id:032x}" and context["span_name"] == "GET /export", kind
        assert context["values"] == {"request_id": "req-9"}, kind
    assert got["requested"]["stall_seconds"] > 0.1  # it was asked mid-stall
