"""A FastAPI service traced with the real OpenTelemetry SDK and its FastAPI instrumentation, logging with
structlog's contextvars, and a handler that blocks the loop.

    traced_app.py HTTP_PORT METRICS_PORT DUMP_DIR EVENTS_FILE [MODE]

* ``GET /orders/{order_id}`` blocks the loop for ``?block=`` seconds (``time.sleep``: a sync client);
  a middleware binds ``request_id`` (from ``X-Request-ID``), ``tenant`` and ``user_token`` with
  ``structlog.contextvars.bind_contextvars`` -- loopwatch is installed with ``context_keys=request_id,tenant``,
  so ``user_token`` must appear by name only;
* ``GET /spans``: the spans the SDK exported so far (an ``InMemorySpanExporter``), as JSON;
* loopwatch's events go, as JSON lines, to EVENTS_FILE (a logging handler on the ``loopwatch`` logger).

MODE ``uvloop`` runs uvicorn on uvloop (stalls named by the watchdog alone); default: the stdlib loop.
``BUSY_THREADS=N`` in the environment starts N threads running Python code (GIL contention).
Prints ``READY`` when the server listens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time

import structlog
import uvicorn
from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import loopwatch

http_port, metrics_port, dump_dir, events_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
mode = sys.argv[5] if len(sys.argv) > 5 else "asyncio"

exported = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exported))
trace.set_tracer_provider(provider)


class JsonLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        with open(events_file, "a") as out:
            out.write(json.dumps(getattr(record, "loopwatch", {"event": record.getMessage()}), default=str) + "\n")


logging.getLogger("loopwatch").addHandler(JsonLines())
logging.getLogger("loopwatch").setLevel(logging.INFO)

app = FastAPI()


@app.middleware("http")
async def bind_request(request: Request, call_next):
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request.headers.get("x-request-id", "-"), tenant="acme",
                                           user_token="s3cr3t-t0ken")
    return await call_next(request)


@app.get("/orders/{order_id}")
async def get_order(order_id: int, block: float = 0.0, wait: float = 0.0) -> dict:
    if wait:
        await asyncio.sleep(wait)  # I/O: the loop serves others meanwhile
    time.sleep(block)  # a sync client in an async handler
    return {"order": order_id}


@app.get("/spans")
async def spans() -> list:
    return [{"name": s.name, "trace_id": f"{s.context.trace_id:032x}", "span_id": f"{s.context.span_id:016x}",
             "kind": s.kind.name, "attributes": dict(s.attributes or {})} for s in exported.get_finished_spans()]


FastAPIInstrumentor.instrument_app(app)


def spin() -> None:
    while True:
        sum(range(2000))


async def main() -> None:
    for n in range(int(os.environ.get("BUSY_THREADS", "0"))):
        threading.Thread(target=spin, name=f"busy-{n}", daemon=True).start()
    loopwatch.install(metrics_port=metrics_port, metrics_addr="127.0.0.1", dump_dir=dump_dir, dump_cooldown=0,
                      context_keys="request_id,tenant", service="orders")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=http_port, log_level="warning",
                                           loop="none", lifespan="off"))
    serving = server.serve()
    task = asyncio.ensure_future(serving)
    while not server.started:
        await asyncio.sleep(0.02)
    print("READY", flush=True)
    await task


if __name__ == "__main__":
    if mode == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
