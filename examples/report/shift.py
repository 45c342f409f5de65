"""A short trading session of the demo's bot, with loopwatch installed: the dumps ``loopwatch report`` shows.

    python examples/report/shift.py DUMP_DIR

The bot of ``examples/demo.py`` (``tradingbot/``), with three of the problems its production twin had:

* ``on_signal`` calls ``query_xai`` -- a synchronous HTTP POST -- from a coroutine; the AI API answers in
  1 s, then 2 s (kind ``blocked``: the loop thread waits on a socket);
* ``rescore_book`` re-scores the order book in pure Python on the loop, twice (kind ``cpu``);
* ``valid_symbol`` checks a malformed symbol with a regex that backtracks catastrophically: one C call that
  holds the GIL for the whole stall (~2 s), so no Python thread can run (kind ``cpu``; the loop thread writes its
  own stack, ``source: faulthandler``).

Each stall is dumped while it goes on (``dump_cooldown=0``: every one).  ``make_report.py`` runs this after
the demo and then ``loopwatch report``.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/: the demo's tradingbot package

import loopwatch  # noqa: E402
from tradingbot.bot import TradingBot  # noqa: E402
from tradingbot.fake_xai import SlowXAIServer  # noqa: E402
from tradingbot.handlers.commands import Signal  # noqa: E402

SYMBOL = re.compile(r"^([A-Z]+-?)+$")  # "BTC-USD"; nested quantifiers: exponential on a near miss


def rescore_book(levels: int, seconds: float) -> float:
    """Pure-Python scoring of every price level, repeated until ``seconds`` have passed (CPU-bound)."""
    score, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        score = 0.0
        for i in range(levels):
            score += math.log1p(i) / (1 + i % 7)  # CPU on the loop
    return score


def valid_symbol(text: str) -> bool:
    return SYMBOL.match(text) is not None  # one C call; holds the GIL while it backtracks


def near_miss(seconds: float) -> str:
    """A malformed symbol on which ``valid_symbol`` takes about ``seconds`` here (each letter doubles it)."""
    n = 14
    while True:
        start = time.perf_counter()
        valid_symbol("A" * n + "!")
        took = time.perf_counter() - start
        if took >= 0.1:
            return "A" * (n + max(0, round(math.log2(seconds / took)))) + "!"
        n += 1


async def session(apis: dict[float, str], bad_symbol: str) -> None:
    await asyncio.sleep(0.5)
    for step in ("xai:1.0", "rescore", "xai:2.0", "symbol", "rescore"):
        if step.startswith("xai:"):  # one trading signal through the buggy handler
            bot = TradingBot(apis[float(step[4:])])
            await bot.start()
            await bot.submit(Signal("BTC-USD", "BUY", 97_250.0))
            await bot.stop()
        elif step == "rescore":
            rescore_book(20_000, 1.0)
        else:
            valid_symbol(bad_symbol)
        await asyncio.sleep(0.7)  # healthy again: the watchdog ends the stall


def main() -> int:
    dump_dir = sys.argv[1]
    bad_symbol = near_miss(2.0)  # measured before the service starts (not a stall of its own); may be off 3x
    # The stand-ins for the AI API start and stop outside the service (stopping one waits up to 0.5 s).
    with SlowXAIServer(delay=1.0) as fast, SlowXAIServer(delay=2.0) as slow:
        loopwatch.install(service="tradingbot", metrics_port=0, dump_dir=dump_dir, lag_thresholds=(0.5, 2.0, 10.0),
                          dump_cooldown=0)
        try:
            asyncio.run(session({1.0: fast.url, 2.0: slow.url}, bad_symbol))
        finally:
            loopwatch.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
