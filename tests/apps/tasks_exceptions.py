"""Exceptions that reach the loop's exception handler, counted while the app's own handler still runs.

``python tasks_exceptions.py IMPL HANDLER DUMP_DIR METRICS_PORT STOP_FILE``: IMPL is ``asyncio`` or
``uvloop``; HANDLER is ``app`` (the app sets its own handler, *after* install()) or ``none`` (asyncio's
default handler logs).  install() runs before any loop exists.  The app then produces, on its loop:
3 tasks failing with ValueError that nobody awaits, 2 callbacks raising tasks_common.Boom, 1 callback
raising tasks_common.Errors.Timeout and 1 task destroyed while pending; keeps 4 sleeper tasks alive;
prints ``DONE calls=<app handler calls> ...`` and waits for STOP_FILE so the test can scrape.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from pathlib import Path

from tasks_common import Boom, Errors, loop_class, runner, say, sleeper, until

import loopwatch
from marker import emit_line

IMPL, HANDLER, DUMP_DIR, PORT, STOP = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])

agent = loopwatch.install(namespace="lwtasks", service="tasks-app", dump_dir=DUMP_DIR, metrics_port=PORT,
                          metrics_addr="127.0.0.1")
emit_line(f"READY {agent.metrics_url}")


async def fail_with_value_error(n: int) -> None:
    raise ValueError(f"task {n} failed")


def raise_boom() -> None:
    raise Boom("a callback failed")


def raise_timeout() -> None:
    raise Errors.Timeout("a nested error class")


async def main() -> None:
    loop = asyncio.get_running_loop()
    emit_line(f"loop-class {loop_class()}")
    calls: list[dict] = []
    if HANDLER == "app":
        loop.set_exception_handler(lambda _loop, context: calls.append(context))
    sleepers = [asyncio.create_task(sleeper(), name=f"sleeper-{i}") for i in range(4)]
    start = time.time()

    for n in range(3):  # never awaited: "Task exception was never retrieved" when collected
        asyncio.create_task(fail_with_value_error(n))
    loop.call_soon(raise_boom)
    loop.call_soon(raise_boom)
    loop.call_soon(raise_timeout)
    await asyncio.sleep(0.1)

    orphan = loop.create_future()  # nothing references it but the task: the task can be collected
    task = asyncio.create_task(orphan_waiter(orphan), name="destroyed-pending")
    await asyncio.sleep(0.05)
    del task, orphan
    gc.collect()  # "Task was destroyed but it is pending!"
    await asyncio.sleep(0.05)
    gc.collect()

    say(f"DONE calls={len(calls)} start={start:.6f} end={time.time():.6f}")
    messages = sorted(str(c.get("message")) for c in calls)
    emit_line(f"HANDLER-MESSAGES {messages}")
    await until(STOP)
    for t in sleepers:
        t.cancel()
    await asyncio.gather(*sleepers, return_exceptions=True)


async def orphan_waiter(future: asyncio.Future) -> None:
    await future


runner(IMPL)(main())
loopwatch.uninstall()
