"""An app with loopwatch's aiomonitor console: ``python console_app.py DUMP_DIR CONTROL_DIR [NAME=VALUE...]``.

It installs loopwatch with the ``NAME=VALUE`` options (``console=...`` among them; no exporter, thresholds
0.3/1/10 s, no dump cooldown), watches a thread pool (``work``) and a Redis connection pool (``cache``, the
real Redis on 127.0.0.1:6379), and prints ``READY <pid> <console port or none>`` once the console listens (or
could not start, or after 10 s), then ``TASK-FACTORY <the loop's task factory>``.  Then it waits on a healthy loop for
the test to create a file in CONTROL_DIR: ``sleep-S`` (``time.sleep(S)`` on the loop, SLEEP-LINE, between
``SLEEP-START`` and ``SLEEP-END``), ``regex`` (holds the GIL about ``REGEX_SECONDS``, REGEX-LINE), ``stop``
(uninstall, ``UNINSTALLED``, exit).  ``HIDE_AIOMONITOR=1``: aiomonitor cannot be imported, as if not installed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import time
from pathlib import Path

if os.environ.get("HIDE_AIOMONITOR"):
    sys.modules["aiomonitor"] = None  # type: ignore[assignment]

import redis.asyncio

from marker import emit_line
from stall_common import BACKTRACK, backtracking_input

import loopwatch

DUMP_DIR, CONTROL = sys.argv[1], Path(sys.argv[2])
OPTIONS = dict(arg.split("=", 1) for arg in sys.argv[3:])
REGEX_TEXT = backtracking_input(float(os.environ["REGEX_SECONDS"])) if os.environ.get("REGEX_SECONDS") else ""


def block_in_sleep(seconds: float) -> None:
    time.sleep(seconds)  # SLEEP-LINE


def match_order_id(text: str) -> bool:
    return BACKTRACK.match(text) is not None  # REGEX-LINE


async def main() -> None:
    agent = loopwatch.install(metrics_port=0, dump_dir=DUMP_DIR, lag_thresholds=(0.3, 1.0, 10.0), dump_cooldown=0,
                              **OPTIONS)
    work = loopwatch.watch_executor(concurrent.futures.ThreadPoolExecutor(max_workers=3), "work")
    await asyncio.get_running_loop().run_in_executor(work, time.sleep, 0.01)
    cache = loopwatch.watch_pool(redis.asyncio.ConnectionPool.from_url("redis://127.0.0.1:6379", max_connections=7),
                                 "cache")
    client = redis.asyncio.Redis(connection_pool=cache)
    await client.ping()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and agent.console is not None and agent.console.port is None \
            and agent.console.failed is None:
        await asyncio.sleep(0.05)
    port = agent.console.port if agent.console is not None else None
    emit_line(f"READY {os.getpid()} {port or 'none'}")
    factory = asyncio.get_running_loop().get_task_factory()
    emit_line(f"TASK-FACTORY {getattr(factory, '__qualname__', factory)}")
    while True:
        await asyncio.sleep(0.05)
        for entry in sorted(CONTROL.iterdir()):
            entry.unlink()
            if entry.name == "stop":
                await client.aclose()
                await cache.disconnect()
                work.shutdown()
                loopwatch.uninstall()
                emit_line("UNINSTALLED")
                return
            if entry.name.startswith("sleep-"):
                emit_line(f"SLEEP-START {time.time():.6f}")
                block_in_sleep(float(entry.name.split("-", 1)[1]))
                emit_line(f"SLEEP-END {time.time():.6f}")
            elif entry.name == "regex":
                emit_line(f"REGEX-START {time.time():.6f}")
                match_order_id(REGEX_TEXT)
                emit_line(f"REGEX-END {time.time():.6f}")


asyncio.run(main())
