"""Ordinary churn for the series bound and the soak (``tests/test_soak.py``).

``python churn_app.py PORT STOP_FILE``: prints ``READY <metrics url>``, then churns until STOP_FILE exists:

* threads: a uniquely numbered ``worker-<n>`` thread every 50 ms, doing a little CPU and ending;
* executors: a new ``ThreadPoolExecutor`` every 200 ms (its threads are new each time), watched under one
  name, used, shut down; ``asyncio.to_thread`` on the loop's default executor;
* loops: ``asyncio.run`` in a uniquely named ``loop-thread-<n>`` thread every 300 ms;
* tasks: 20 short tasks every 100 ms, some failing (three exception types), a watched queue filled and drained;
* pools: a Redis pool (the real server on 6379) watched, used and disconnected every second, under one name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import sys
import threading
import time
from pathlib import Path

import redis

import loopwatch
from marker import emit_line

PORT, STOP = int(sys.argv[1]), Path(sys.argv[2])
numbers = itertools.count()


def burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def other_loop() -> None:
    await asyncio.sleep(0.01)
    await asyncio.gather(*(asyncio.sleep(0.001) for _ in range(5)))


def fail(kind: int) -> None:
    raise (ValueError, KeyError, TimeoutError)[kind % 3]("churn")


async def main() -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, _context: None)
    agent = loopwatch.install(metrics_port=PORT, metrics_addr="127.0.0.1")
    emit_line(f"READY {agent.metrics_url}")
    queue = loopwatch.watch_queue(asyncio.Queue(), "jobs")
    tick = 0
    while not STOP.exists():
        tick += 1
        threading.Thread(target=burn, args=(0.002,), name=f"worker-{next(numbers)}").start()
        if tick % 2 == 0:
            for i in range(20):
                task = loop.create_task(asyncio.sleep(0.001))
                if i % 7 == 0:
                    loop.call_soon(fail, i)
                await queue.put(task)
            while not queue.empty():
                await queue.get()
            await asyncio.to_thread(burn, 0.001)
        if tick % 4 == 0:
            with cf.ThreadPoolExecutor(2) as pool:
                loopwatch.watch_executor(pool, "batch")
                await asyncio.wrap_future(pool.submit(burn, 0.001))
        if tick % 6 == 0:
            runner = threading.Thread(target=asyncio.run, args=(other_loop(),), name=f"loop-thread-{next(numbers)}")
            runner.start()
        if tick % 20 == 0:
            cache = redis.ConnectionPool(host="127.0.0.1", port=6379)
            loopwatch.watch_pool(cache, "cache")
            redis.Redis(connection_pool=cache).ping()
            cache.disconnect()
        await asyncio.sleep(0.05)
    emit_line("DONE")
    loopwatch.uninstall()


asyncio.run(main())
