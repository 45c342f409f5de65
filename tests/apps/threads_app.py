"""Threads, the GIL and executors, for ``tests/test_threads.py``.

``python threads_app.py MODE PORT STOP_FILE [N]``; prints ``READY <metrics url>``, then ``RUNNING`` once
the workload is going, and exits when STOP_FILE exists.  MODE:

  cpu       three CPU-bound Python threads named cpu-worker-0..2
  gil N     N CPU-bound Python threads (the GIL probe at 20 ms, so its window is 2 s)
  to_thread 40 ``asyncio.to_thread(time.sleep, 1)`` calls at once on the loop's default executor
  watched   a watched ThreadPoolExecutor(2, "jobs") given 6 sleeps of 0.5 s, then shut down
            (prints ``SHUTDOWN``), and a watched ProcessPoolExecutor(2, "procs")
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import sys
import threading
import time
from pathlib import Path

import loopwatch
from marker import emit_line

MODE, PORT, STOP = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
N = int(sys.argv[4]) if len(sys.argv) > 4 else 0
done = threading.Event()


def spin() -> None:
    x = 0
    while not done.is_set():
        for _ in range(1000):
            x += 1


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


async def until_stop() -> None:
    while not STOP.exists():
        await asyncio.sleep(0.05)


async def main() -> None:
    agent = loopwatch.install(namespace="lwthreads", service="threads-app", metrics_port=PORT,
                              metrics_addr="127.0.0.1", gil_probe_interval=0.02, executor_wait_threshold=0.5,
                              lag_thresholds=(5.0, 10.0, 30.0))
    emit_line(f"READY {agent.metrics_url}")
    loop = asyncio.get_running_loop()
    threads: list[threading.Thread] = []
    if MODE in ("cpu", "gil"):
        count = 3 if MODE == "cpu" else N
        threads = [threading.Thread(target=spin, name=f"cpu-worker-{i}", daemon=True) for i in range(count)]
        for thread in threads:
            thread.start()
        emit_line("RUNNING")
        await until_stop()
    elif MODE == "to_thread":
        calls = [asyncio.ensure_future(asyncio.to_thread(nap, 1.0)) for _ in range(40)]
        await asyncio.sleep(0)
        emit_line("RUNNING")
        await asyncio.gather(*calls)
        emit_line("ALL-DONE")
        await until_stop()
    elif MODE == "watched":
        jobs = loopwatch.watch_executor(cf.ThreadPoolExecutor(2, thread_name_prefix="jobs"), "jobs")
        procs = loopwatch.watch_executor(cf.ProcessPoolExecutor(2), "procs")
        work = [loop.run_in_executor(jobs, nap, 0.5) for _ in range(6)]
        remote = [loop.run_in_executor(procs, nap, 1.0) for _ in range(5)]
        await asyncio.sleep(0.2)
        emit_line("RUNNING")
        await asyncio.gather(*work)
        jobs.shutdown(wait=True)
        emit_line("SHUTDOWN")
        await asyncio.gather(*remote)
        await until_stop()
        procs.shutdown()
    else:
        raise SystemExit(f"unknown mode {MODE!r}")
    done.set()
    for thread in threads:
        thread.join()


asyncio.run(main())
