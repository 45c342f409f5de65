"""Slow task steps, a slow plain callback and a half-busy phase, scraped by tests/test_slow.py.

argv: loop ("stdlib"|"uvloop"), mode (auto|exact|off), metrics port, dump dir.
Prints PHASE lines with time.time() so the test can scrape at the right moments.
"""

import asyncio
import sys
import time

import loopwatch
from marker import emit_line

LOOP, MODE, PORT, DUMP_DIR = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]


def burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def score_signal(n: int) -> None:
    await asyncio.sleep(0.05)
    burn(0.25)  # SLOW-STEP
    await asyncio.sleep(0)


async def settle_book() -> None:
    await asyncio.sleep(0.05)
    burn(1.3)  # LONG-STEP: a lag of 0.8 s or more, wherever the beat falls in it


def flush_cache() -> None:
    burn(0.2)  # SLOW-CALLBACK


async def main() -> None:
    loopwatch.install(metrics_port=PORT, metrics_addr="127.0.0.1", dump_dir=DUMP_DIR, service="slowapp",
                      slow_callback_mode=MODE, slow_callback_threshold=0.1)
    emit_line(f"PHASE steps {time.time()}")
    for i in range(3):
        await asyncio.create_task(score_signal(i), name=f"signal-{i}")
        await asyncio.sleep(1.1)  # past the per-label log rate limit
    asyncio.get_running_loop().call_soon(flush_cache)
    await asyncio.sleep(1.1)
    asyncio.get_running_loop().call_soon(flush_cache)
    await asyncio.sleep(0.3)
    if LOOP == "uvloop":  # past the first lag threshold (0.5 s): the watchdog sees it mid-stall
        await asyncio.create_task(settle_book(), name="settle")
        await asyncio.sleep(0.6)  # the beat after the stall: the watchdog counts it
    emit_line(f"PHASE half-busy-start {time.time()}")
    end = time.monotonic() + 4.0
    while time.monotonic() < end:
        burn(0.02)
        await asyncio.sleep(0.02)
    emit_line(f"PHASE half-busy-end {time.time()}")
    await asyncio.sleep(30)  # the test kills us


if LOOP == "uvloop":
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
