"""A FastAPI app that knows nothing of loopwatch, for uvicorn and gunicorn under ``loopwatch run``.

    loopwatch run -- uvicorn run_asgi:app --workers 2
    loopwatch run -- gunicorn -k uvicorn.workers.UvicornWorker -w 2 run_asgi:app

``GET /`` answers ``{"pid": ...}``; ``GET /block?seconds=S`` runs ``time.sleep(S)`` on the worker's event
loop (the blocking line is marked ``BLOCKS THE LOOP``).  uvicorn's workers import this module (and
FastAPI: about half a second on a busy machine) inside their running loop, at start-up.
"""

from __future__ import annotations

import os
import time

from fastapi import FastAPI

app = FastAPI()


def block(seconds: float) -> None:
    time.sleep(seconds)  # BLOCKS THE LOOP


@app.get("/")
async def whoami() -> dict[str, object]:
    return {"pid": os.getpid()}


@app.get("/block")
async def blocking(seconds: float = 1.0) -> dict[str, object]:
    block(seconds)
    return {"pid": os.getpid(), "blocked_seconds": seconds}
