"""aiohttp, watched by loopwatch (installed in ``on_startup``, so inside the running loop).

    python examples/servers/aiohttp_app.py --port 8080
    curl 'localhost:8080/block?seconds=2'    # a sync call in an async handler: the loop stalls
    curl localhost:8080/                      # pid and metrics URL

With several processes (``gunicorn -k aiohttp.GunicornWebWorker``, or several copies behind a balancer)
set ``LOOPWATCH_METRICS_PORT`` to a range: each process binds the first free port in it.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from aiohttp import web

import loopwatch

# The server logs with the standard logging module: loopwatch's events (logger "loopwatch") show there.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

AGENT = web.AppKey("loopwatch", loopwatch.Agent)


async def start_loopwatch(app: web.Application) -> None:
    app[AGENT] = loopwatch.install(service="aiohttp-example")


async def stop_loopwatch(app: web.Application) -> None:
    loopwatch.uninstall()


async def whoami(request: web.Request) -> web.Response:
    snapshot = request.app[AGENT].snapshot()
    return web.json_response({"pid": snapshot.pid, "metrics_url": snapshot.metrics_url,
                              "loops": [loop.label for loop in snapshot.loops]})


async def block(request: web.Request) -> web.Response:
    seconds = float(request.query.get("seconds", "1.0"))
    time.sleep(seconds)  # BLOCKS THE LOOP: what loopwatch is for (use asyncio.sleep / to_thread)
    return web.json_response({"pid": os.getpid(), "blocked_seconds": seconds,
                              "metrics_url": request.app[AGENT].metrics_url})


def make_app() -> web.Application:
    app = web.Application()
    app.on_startup.append(start_loopwatch)
    app.on_cleanup.append(stop_loopwatch)
    app.router.add_get("/", whoami)
    app.router.add_get("/block", block)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port)
