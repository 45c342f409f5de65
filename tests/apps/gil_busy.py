"""Scrapes under GIL contention (``tests/test_scrape.py``).

``python gil_busy.py PORT EXTRA_FDS [TLS_DIR]``: installs loopwatch at its defaults on PORT, opens EXTRA_FDS
more descriptors (a service's client sockets), starts three threads that run Python flat out, and prints
``READY {"url": ..., "exporter_tid": ...}``; it runs until killed (at most ten minutes).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import threading

import loopwatch
from marker import emit_line

PORT, EXTRA_FDS = int(sys.argv[1]), int(sys.argv[2])
done = threading.Event()


def spin() -> None:
    x = 0
    while not done.is_set():
        for _ in range(1000):
            x += 1


async def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if EXTRA_FDS + 64 > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, EXTRA_FDS + 256), hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(EXTRA_FDS)]
    agent = loopwatch.install(metrics_port=PORT)
    exporter = next(t for t in threading.enumerate() if t.name == "loopwatch-exporter")
    for i in range(3):
        threading.Thread(target=spin, name=f"cpu-{i}", daemon=True).start()
    emit_line("READY " + json.dumps({"url": agent.metrics_url, "exporter_tid": exporter.native_id,
                                     "fds": len(os.listdir("/proc/self/fd"))}))
    await asyncio.sleep(600)
    done.set()
    for fd in held:
        os.close(fd)


asyncio.run(main())
