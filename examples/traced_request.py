"""From a stall to the request: a FastAPI service traced with OpenTelemetry, whose checkout blocks the loop.

    python examples/traced_request.py [DUMP_DIR]

The service binds ``request_id`` and ``customer`` with structlog's contextvars (and a ``card_token`` that
must never be written anywhere), is traced by the OpenTelemetry SDK and its FastAPI instrumentation, and
runs loopwatch with ``context_keys=["request_id", "customer"]``.  ``POST /checkout/{cart_id}`` calls a
payment client that is synchronous (``time.sleep`` stands for ``requests.post``): it blocks the loop.
``POST /checkout-fixed/{cart_id}`` is the fix -- the same call in a worker thread (``asyncio.to_thread``).

The script calls each once, then prints what loopwatch saw: the stall's dump names the line, the request's
route, its trace id -- the one the SDK exported for that request -- and the allowed context values; the
fixed endpoint causes no stall.  Needs the dev extra (``pip install -e '.[dev]'``: fastapi, uvicorn, the
OpenTelemetry SDK and its FastAPI instrumentation).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import structlog
import uvicorn
from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import loopwatch

spans = InMemorySpanExporter()  # in production: an OTLP exporter to your collector
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(provider)

app = FastAPI()


@app.middleware("http")
async def bind_request(request: Request, call_next):
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request.headers.get("x-request-id", "-"),
                                           customer="acme-42", card_token="tok_live_do_not_log")
    return await call_next(request)


def charge_card(cart_id: int) -> str:
    time.sleep(0.8)  # a synchronous payment client (requests.post) in the loop's thread
    return f"charged cart {cart_id}"


@app.post("/checkout/{cart_id}")
async def checkout(cart_id: int) -> dict:
    return {"result": charge_card(cart_id)}  # blocks the loop for the whole call


@app.post("/checkout-fixed/{cart_id}")
async def checkout_fixed(cart_id: int) -> dict:
    return {"result": await asyncio.to_thread(charge_card, cart_id)}  # the fix: the loop keeps serving


FastAPIInstrumentor.instrument_app(app)


def post(port: int, path: str, request_id: str) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST",
                                     headers={"X-Request-ID": request_id})
    urllib.request.urlopen(request, timeout=30).read()


async def main(dump_dir: Path) -> None:
    loopwatch.install(metrics_port=0, dump_dir=dump_dir, context_keys=["request_id", "customer"],
                      service="shop")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", loop="none"))
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]

    def client() -> None:
        post(port, "/checkout/7", "req-1001")
        post(port, "/checkout-fixed/8", "req-1002")
    thread = threading.Thread(target=client)
    thread.start()
    while thread.is_alive():
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    server.should_exit = True
    await serving


def report(dump_dir: Path) -> None:
    exported = {s.attributes.get("http.route"): f"{s.context.trace_id:032x}" for s in spans.get_finished_spans()
                if s.kind is trace.SpanKind.SERVER}
    dumps = sorted(dump_dir.glob("*-event_loop_lag.json"))
    print(f"stall dumps: {len(dumps)}")
    for path in dumps:
        dump = json.loads(path.read_text())
        context, culprit = dump["context"] or {}, dump["culprit"]
        print(f"  {path.name}")
        print(f"    culprit   {Path(culprit['filename']).name}:{culprit['lineno']} in {culprit['function']}: "
              f"{culprit['line']}")
        print(f"    lasted    {dump.get('duration', dump['stall_seconds']):.2f} s ({dump['kind']})")
        print(f"    request   {context.get('span_name')}  route {context.get('route')}")
        print(f"    trace_id  {context.get('trace_id')}")
        print(f"    context   {context.get('values')}  not shown: {context.get('other_keys')}")
    for route, trace_id in sorted(exported.items()):
        print(f"exported span {route}: trace_id {trace_id}")
    secret_written = any("tok_live" in p.read_text() for p in dump_dir.iterdir() if p.is_file())
    print(f"card_token written anywhere: {secret_written}")


if __name__ == "__main__":
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="traced-"))
    asyncio.run(main(directory))
    loopwatch.uninstall()
    report(directory)
