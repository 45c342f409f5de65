"""A stall that is a garbage collection: millions of live containers, then a full collection on the loop.

``python gc_stall.py DUMP_DIR PORT``: builds ~9 million small lists (alive: the collector must traverse
them all), then a handler calls ``gc.collect()`` -- a pass that holds the GIL for about a second here --
and prints ``GC-PASS <start> <end>`` around it.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time

from marker import emit_line

import loopwatch

DUMP_DIR, PORT = sys.argv[1], int(sys.argv[2])
KEEP = [[i] for i in range(9_000_000)]


async def handler() -> None:
    start = time.monotonic()
    gc.collect()  # GC-LINE
    emit_line(f"GC-PASS {start:.6f} {time.monotonic():.6f}")


async def main() -> None:
    loopwatch.install(metrics_port=PORT, metrics_addr="127.0.0.1", dump_dir=DUMP_DIR, lag_thresholds=(0.1,),
                      dump_cooldown=0)
    await asyncio.sleep(0.7)
    await asyncio.create_task(handler())
    await asyncio.sleep(1.0)
    emit_line("DONE")


asyncio.run(main())
loopwatch.uninstall()
