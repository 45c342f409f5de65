"""Two event loops in two threads: the main thread's loop and one in a thread named "worker-loop".

``python tasks_multiloop.py IMPL DUMP_DIR METRICS_PORT CTL_DIR``: IMPL is ``asyncio`` or ``uvloop`` (both
loops).  install() runs before any loop exists.  The test drives the app with files in CTL_DIR:
``stall-worker`` (the worker loop blocks 2.5 s in ``worker_block``), ``stall-main`` (the main loop blocks
2.5 s in ``main_block``), ``close-worker`` (the worker loop finishes and is closed), ``stop``.
The main loop runs 1 + 3 tasks, the worker loop 1 + 5.  Each loop has one callback that raises:
KeyError on the main loop (default handler), LookupError on the worker (its own handler).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

from tasks_common import loop_class, runner, say, sleeper, until

import loopwatch
from marker import emit_line

IMPL, DUMP_DIR, PORT, CTL = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
STALL_SECONDS = 2.5

agent = loopwatch.install(namespace="lwmulti", service="multi-app", dump_dir=DUMP_DIR, metrics_port=PORT,
                          metrics_addr="127.0.0.1", lag_thresholds=(0.3, 1.0, 10.0), dump_cooldown=0)
emit_line(f"READY {agent.metrics_url}")


def worker_block() -> None:
    time.sleep(STALL_SECONDS)  # WORKER-BLOCK


def main_block() -> None:
    time.sleep(STALL_SECONDS)  # MAIN-BLOCK


def raise_lookup() -> None:
    raise LookupError("worker callback failed")


def raise_key() -> None:
    raise KeyError("main callback failed")


async def worker() -> None:
    loop = asyncio.get_running_loop()
    calls: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: calls.append(context))
    sleepers = [asyncio.create_task(sleeper(), name=f"worker-sleeper-{i}") for i in range(5)]
    loop.call_soon(raise_lookup)
    await asyncio.sleep(0.05)
    say(f"WORKER-UP {loop_class()}")
    await until(CTL / "stall-worker")
    say("WORKER-STALL-START")
    worker_block()
    say("WORKER-STALL-END")
    await until(CTL / "close-worker")
    for task in sleepers:
        task.cancel()
    await asyncio.gather(*sleepers, return_exceptions=True)
    emit_line(f"WORKER-HANDLER-CALLS {len(calls)}")


def worker_thread() -> None:
    runner(IMPL)(worker())
    say("WORKER-CLOSED")


async def main() -> None:
    loop = asyncio.get_running_loop()
    sleepers = [asyncio.create_task(sleeper(), name=f"main-sleeper-{i}") for i in range(3)]
    loop.call_soon(raise_key)
    await asyncio.sleep(0.05)
    say(f"MAIN-UP {loop_class()}")
    thread = threading.Thread(target=worker_thread, name="worker-loop")
    thread.start()
    await until(CTL / "stall-main")
    say("MAIN-STALL-START")
    main_block()
    say("MAIN-STALL-END")
    await until(CTL / "stop")
    await asyncio.to_thread(thread.join)
    for task in sleepers:
        task.cancel()
    await asyncio.gather(*sleepers, return_exceptions=True)


runner(IMPL)(main())
loopwatch.uninstall()
