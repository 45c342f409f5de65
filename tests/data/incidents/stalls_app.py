"""A small service that blocks its event loop in three ways, with loopwatch installed, so that its dump
directory holds real dumps of each: ``python stalls_app.py DUMP_DIR``.

* ``read_config`` -- ``time.sleep`` on the loop: the thread waits (kind ``blocked``), 3 times;
* ``score_signals`` -- a pure-Python busy loop: the thread computes (kind ``cpu``), 2 times;
* ``match_symbol`` -- catastrophic regex backtracking, a C call that holds the GIL for the whole stall:
  the loop thread writes its own stack (source ``faulthandler``; kind ``cpu``), once (~2 s).

The other stalls last ~0.9 s, against a 0.3 s dump threshold; the app prints ``DONE`` and exits.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
import time

import loopwatch

STALL = 0.9
BACKTRACK = re.compile(r"(a+)+$")


def read_config(seconds: float) -> None:
    time.sleep(seconds)  # BLOCKED-LINE


def score_signals(seconds: float) -> int:
    end, total = time.monotonic() + seconds, 0
    while time.monotonic() < end:  # CPU-LINE
        total += 1
    return total


def backtracking_input(seconds: float) -> str:
    """A string on which ``BACKTRACK.match`` holds the GIL for about ``seconds`` (each ``a`` doubles it)."""
    n = 16
    while True:
        start = time.perf_counter()
        BACKTRACK.match("a" * n + "b")
        took = time.perf_counter() - start
        if took >= 0.1:
            break
        n += 1
    return "a" * (n + max(0, round(math.log2(seconds / took)))) + "b"


def match_symbol(text: str) -> bool:
    return BACKTRACK.match(text) is not None  # GIL-LINE


async def handle(what: str, text: str) -> None:
    if what == "blocked":
        read_config(STALL)
    elif what == "cpu":
        score_signals(STALL)
    else:
        match_symbol(text)
    await asyncio.sleep(0.6)  # the watchdog ends the stall and writes its dump


async def main(text: str) -> None:
    loopwatch.install(service="stalls-app", dump_dir=sys.argv[1], metrics_port=0, lag_thresholds=(0.3, 5.0),
                      dump_cooldown=0)
    await asyncio.sleep(0.5)
    for what in ("blocked", "cpu", "blocked", "gil", "cpu", "blocked"):
        await asyncio.create_task(handle(what, text), name=f"handler-{what}")
    loopwatch.uninstall()
    print("DONE", flush=True)


if __name__ == "__main__":
    # calibrated before the loop (and loopwatch) start: not a stall of its own; may be off 3x, and a
    # GIL-held stall is seen up to 0.25 s past the threshold
    asyncio.run(main(backtracking_input(2.0)))
