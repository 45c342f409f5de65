"""Many short stalls that release the GIL while other threads keep running Python.

``python stall_churn.py DUMP_DIR METRICS_PORT STOP_FILE STALLS``: the regression test for a crash of the
host process: faulthandler's ``dump_traceback_later`` walking the frames of threads that run Python (the
fallback that loopwatch/_gilheld.py replaced it with only lets the loop thread read its own frames).
Three threads call small Python functions in a loop (frames pushed and popped all the time) and two
start short-lived threads one after another, while the
loop blocks STALLS times for 1.5 s in ``time.sleep`` (GIL released).  Prints ``CHURN-DONE <stalls>``.
"""

from __future__ import annotations

import asyncio
import threading
import time

from stall_common import argv, install, say, wait_for_stop

done = threading.Event()


def leaf(x: int) -> int:
    return x + 1


def middle(x: int) -> int:
    return leaf(x) + leaf(x)


def churn() -> None:
    x = 0
    while not done.is_set():
        x = middle(x) % 1000


def spawner() -> None:
    """Threads that start and end all the time (like an HTTP server's per-request threads): a thread
    being created has a half-initialised frame for a moment."""
    while not done.is_set():
        thread = threading.Thread(target=middle, args=(1,), daemon=True)
        thread.start()
        thread.join()


def blocking_call() -> None:
    time.sleep(1.5)  # CHURN-BLOCK


async def main() -> None:
    dump_dir, port, stop, extra = argv()
    install(dump_dir, port, lag_thresholds=(0.3, 5.0), dump_cooldown=0, dump_keep=5)
    threads = [threading.Thread(target=churn, daemon=True) for _ in range(3)]
    threads += [threading.Thread(target=spawner, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    stalls = int(extra[0])
    for _ in range(stalls):
        await asyncio.sleep(0.6)  # a few beats: faulthandler re-armed
        blocking_call()
    done.set()
    say(f"CHURN-DONE {stalls}")
    await wait_for_stop(stop)


asyncio.run(main())
