"""The FastAPI example with loopwatch installed at import time -- with ``gunicorn --preload`` that is in
the master, before it forks the workers:

    gunicorn --preload -w 2 -k uvicorn_worker.UvicornWorker --chdir examples/servers \\
        -b 127.0.0.1:8000 preload_app:app

The master's agent binds the first port of the range (it has no loop: it exports only loopwatch's own
counters).  Each worker inherits the agent; when the worker's loop starts, the agent resumes there with a
new watchdog, a new faulthandler file and the next free port, counters from zero (see README, "Servers
and workers").  Installing in the lifespan (``fastapi_app.py``) instead leaves the master out entirely.
"""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI

import loopwatch

# The server logs with the standard logging module: loopwatch's events (logger "loopwatch") show there.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

os.environ.setdefault("LOOPWATCH_METRICS_PORT", "9320-9329")
loopwatch.install(service="preload-example")  # at import: in gunicorn's master with --preload

from fastapi_app import routes  # noqa: E402 - after install(), on purpose

app = FastAPI()
app.include_router(routes)
