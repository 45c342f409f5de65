"""Records every import that happens after ``loopwatch.install()`` returned, and in which thread.

``python no_lazy_imports.py DUMP_DIR PORT``: imports what the scenario itself uses up front, installs
loopwatch, adds an audit hook, then exercises every part of loopwatch -- a stall with a mid-stall dump and
a slow callback, scrapes (text and OpenMetrics), a manual dump, the default executor, a watched executor
and queue, the GIL probe, the exception handler, fork, uninstall -- and prints one line per import made in
one of loopwatch's threads or with loopwatch's code on the stack (``IMPORT <thread> <module>``), then
``DONE``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.thread  # noqa: F401 - the app's own imports, up front
import os
import sys
import threading
import time
import urllib.request

from marker import emit_line

import loopwatch

DUMP_DIR, PORT = sys.argv[1], int(sys.argv[2])
PACKAGE = os.path.dirname(os.path.abspath(loopwatch.__file__)) + os.sep
seen: list[tuple[str, str]] = []


def audit(event: str, args: tuple) -> None:
    if event != "import":
        return
    thread = threading.current_thread().name
    frame = sys._getframe(1)
    ours = thread.startswith("loopwatch")
    while frame is not None and not ours:
        ours = frame.f_code.co_filename.startswith(PACKAGE)
        frame = frame.f_back
    if ours:
        seen.append((thread, str(args[0])))


def scrape(url: str, accept: str | None = None) -> None:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    urllib.request.urlopen(request, timeout=10).read()


async def main(url: str) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.3)
    time.sleep(0.7)  # a stall: live spike, mid-stall dump, slow callback
    await asyncio.sleep(0.5)
    await asyncio.to_thread(time.sleep, 0.01)  # the default executor
    pool = loopwatch.watch_executor(concurrent.futures.ThreadPoolExecutor(2), "jobs")
    await loop.run_in_executor(pool, time.sleep, 0.01)
    loopwatch.watch_queue(asyncio.Queue(), "q")

    async def boom() -> None:
        raise ValueError("boom")

    task = loop.create_task(boom())
    await asyncio.sleep(0.05)
    del task  # "Task exception was never retrieved": the exception handler chain
    await asyncio.to_thread(scrape, url)
    await asyncio.to_thread(scrape, url, "application/openmetrics-text; version=1.0.0")
    loopwatch.dump("manual")
    await asyncio.sleep(1.2)  # a GIL probe sample or two
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    pool.shutdown()


agent = loopwatch.install(metrics_port=PORT, metrics_addr="127.0.0.1", dump_dir=DUMP_DIR, lag_thresholds=(0.4,),
                          dump_cooldown=0, gil_probe_interval=0.5)
sys.addaudithook(audit)
asyncio.run(main(agent.metrics_url))
loopwatch.uninstall()
for thread, module in seen:
    emit_line(f"IMPORT {thread} {module}")
emit_line("DONE")
