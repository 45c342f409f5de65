"""FastAPI under uvicorn -- or gunicorn with N uvicorn workers -- watched by loopwatch.

    uvicorn fastapi_app:app --app-dir examples/servers --port 8000
    gunicorn -w 2 -k uvicorn_worker.UvicornWorker --chdir examples/servers -b 127.0.0.1:8000 fastapi_app:app

    curl 'localhost:8000/block?seconds=2'    # a sync call in an async handler: the worker's loop stalls
    curl localhost:8000/                      # which worker answered, and where its metrics are

loopwatch is installed in the lifespan, so inside each worker's running loop; every worker binds the
first free port of ``LOOPWATCH_METRICS_PORT`` (``9320-9329`` here unless set), so each worker is its own
Prometheus target.  Other options come from ``LOOPWATCH_*`` too (``LOOPWATCH_DUMP_DIR``, ...).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

import loopwatch

# The server logs with the standard logging module: loopwatch's events (logger "loopwatch") show there.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

os.environ.setdefault("LOOPWATCH_METRICS_PORT", "9320-9329")  # one port per worker

routes = APIRouter()


@routes.get("/")
async def whoami() -> dict[str, object]:
    snapshot = loopwatch.install().snapshot()  # install() returns the running agent
    return {"pid": snapshot.pid, "metrics_url": snapshot.metrics_url,
            "loops": [loop.label for loop in snapshot.loops]}


@routes.get("/block")
async def block(seconds: float = 1.0) -> dict[str, object]:
    time.sleep(seconds)  # BLOCKS THE LOOP: what loopwatch is for (use asyncio.sleep / to_thread)
    return {"pid": os.getpid(), "blocked_seconds": seconds, "metrics_url": loopwatch.install().metrics_url}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    loopwatch.install(service="fastapi-example")  # in the worker, inside its running loop
    yield
    loopwatch.uninstall()


app = FastAPI(lifespan=lifespan)
app.include_router(routes)
