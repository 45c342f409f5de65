"""The seeds' "alerts" service in miniature, for the real-Prometheus end-to-end test.

``python oraculo_app.py PORT DUMP_DIR CTL_DIR``: loopwatch with ``namespace="oraculo", service="alerts"``
on 127.0.0.1:PORT.  It keeps every part of the catalogue busy -- ``asyncio.to_thread`` work (the default
executor), a watched Redis pool (the machine's Redis), a watched queue, a task whose exception nobody
retrieves, three CPU-bound threads -- and blocks its loop for 3 s with a sync call each time a file
``stall-<n>`` appears in CTL_DIR.  Prints ``READY <url>`` and ``STALLED <n>``; exits when CTL_DIR/stop exists.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import redis.asyncio as aioredis

import loopwatch
from marker import emit_line

PORT, DUMP_DIR, CTL = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
done = threading.Event()


def score_depth_updates() -> None:
    x = 0
    while not done.is_set():
        for _ in range(1000):
            x += 1
        time.sleep(0.001)  # CPU-bound, but not all of it: the loop still runs


def load_all_sessions() -> None:
    time.sleep(3.0)  # a sync DB call in an async handler (seed 001)


async def failing_job() -> None:
    raise ValueError("lost update")


async def main() -> None:
    agent = loopwatch.install(namespace="oraculo", service="alerts", metrics_port=PORT, metrics_addr="127.0.0.1",
                              dump_dir=DUMP_DIR, dump_cooldown=0, gil_probe_interval=0.05)
    queue = loopwatch.watch_queue(asyncio.Queue(maxsize=100), "depth")
    pool = aioredis.BlockingConnectionPool(host="127.0.0.1", port=6379, max_connections=4, timeout=5)
    client = aioredis.Redis(connection_pool=pool)
    loopwatch.watch_pool(pool, "cache")
    threads = [threading.Thread(target=score_depth_updates, name=f"depth-worker-{i}", daemon=True)
               for i in range(3)]
    for thread in threads:
        thread.start()
    emit_line(f"READY {agent.metrics_url}")
    stalls = 0
    while not (CTL / "stop").exists():
        await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.05) for _ in range(8)))
        await client.set("loopwatch:e2e", "1")
        await client.get("loopwatch:e2e")
        queue.put_nowait(time.time())
        if queue.qsize() > 10:
            queue.get_nowait()
        task = asyncio.ensure_future(failing_job())
        await asyncio.sleep(0.05)
        del task  # never retrieved: "Task exception was never retrieved" when it is collected
        if (CTL / f"stall-{stalls + 1}").exists():
            stalls += 1
            load_all_sessions()
            emit_line(f"STALLED {stalls}")
        await asyncio.sleep(0.1)
    done.set()
    await client.aclose()
    await pool.aclose()


asyncio.run(main())
