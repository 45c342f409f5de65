"""Market data: a ticker that must run every 100 ms (a stand-in for a websocket price stream)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class TickerStats:
    interval: float = 0.1
    ticks: int = 0
    missed: int = 0  # 100 ms slots that passed without a tick
    max_late: float = 0.0  # seconds

    def reset(self) -> None:
        self.ticks = self.missed = 0
        self.max_late = 0.0


async def market_data_ticker(stats: TickerStats) -> None:
    """Tick on a fixed 100 ms schedule and count the slots missed because the loop was busy."""
    loop = asyncio.get_running_loop()
    next_at = loop.time() + stats.interval
    while True:
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        late = max(0.0, loop.time() - next_at)
        skipped = int(late // stats.interval)
        stats.ticks += 1
        stats.missed += skipped
        stats.max_late = max(stats.max_late, late)
        next_at += (skipped + 1) * stats.interval
