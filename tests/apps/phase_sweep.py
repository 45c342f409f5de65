"""Stalls started at every phase of the probe's beat interval, scraped mid-stall, for tests/test_phases.py.

``python phase_sweep.py DUMP_DIR PORT LOOP KIND N``: LOOP ``stdlib`` or ``uvloop``; KIND ``block``
(``time.sleep``: the GIL is released) or ``gil`` (a C call that holds the GIL); N stalls of
``THRESHOLD + EXTRA`` seconds, the k-th starting k/N of a beat interval after a beat was due.  For each it
prints ``STALL k <start> <end>`` (``time.monotonic()``, measured around the blocking call), and for
``block`` stalls ``GAUGE k <lag>``: ``event_loop_lag_seconds`` scraped by a thread of the app 0.5 s into
the stall, and ``HEALTHY k <lag>`` scraped just before it.  ``LOOPWATCH_ACCELERATOR`` picks the path.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import urllib.request

from marker import emit_line

import loopwatch

DUMP_DIR, PORT, LOOP, KIND, N = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
THRESHOLD = 0.5
EXTRA = 0.2 if KIND == "block" else 0.7  # a GIL-held stall lasts until its stack is written (<= 0.5 s late)


def lag(url: str) -> float:
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    line = next(x for x in body.splitlines() if x.startswith("lwphase_event_loop_lag_seconds{"))
    return float(line.rsplit(" ", 1)[1])


def calibrate() -> int:
    """How many items ``sum(range(n))`` -- a C call that holds the GIL and runs no bytecode -- takes per
    second here."""
    n = 2_000_000
    best = float("inf")
    for _ in range(3):  # the fastest of three: a busy machine makes the stalls longer, never shorter
        start = time.perf_counter()
        sum(range(n))
        best = min(best, time.perf_counter() - start)
    return int(n / best)


PER_SECOND = calibrate() if KIND == "gil" else 0


def block(seconds: float) -> None:
    if KIND == "block":
        time.sleep(seconds)  # BLOCK-LINE
    else:
        sum(range(int(seconds * PER_SECOND)))  # GIL-LINE


async def main() -> None:
    agent = loopwatch.install(namespace="lwphase", metrics_port=PORT, metrics_addr="127.0.0.1", dump_dir=DUMP_DIR,
                              lag_thresholds=(THRESHOLD, 5.0), dump_cooldown=0)
    url = agent.metrics_url
    (probe,) = agent.loops()
    interval = probe.interval
    await asyncio.sleep(1.0)
    for k in range(N):
        due = probe.expected_at  # the next beat
        target = due + k / N * interval
        while target < time.monotonic() + 0.3:
            target += interval
        await asyncio.sleep(target - 0.1 - time.monotonic())
        if KIND == "block":
            emit_line(f"HEALTHY {k} {await asyncio.to_thread(lag, url)}")
        seen: list[float] = []
        await asyncio.sleep(max(0.0, target - time.monotonic()))
        start = time.monotonic()
        if KIND == "block":
            scraper = threading.Timer(max(0.0, start + 0.5 - time.monotonic()), lambda: seen.append(lag(url)))
            scraper.start()
        block(THRESHOLD + EXTRA)
        end = time.monotonic()
        emit_line(f"STALL {k} {start:.6f} {end:.6f}")
        if KIND == "block":
            scraper.join()
            emit_line(f"GAUGE {k} {seen[0] if seen else 'none'}")
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)  # the last stall is logged
    emit_line("DONE")


if LOOP == "uvloop":
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
loopwatch.uninstall()
