"""The bot's asyncio service: a market-data task and a signal worker that runs the signal handler."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tradingbot.handlers.commands import Decision, Signal, on_signal
from tradingbot.market import TickerStats, market_data_ticker

Handler = Callable[..., Awaitable[Decision]]


class TradingBot:
    def __init__(self, xai_url: str, handler: Handler = on_signal) -> None:
        self.xai_url = xai_url
        self.handler = handler  # swapped for on_signal_fixed to "deploy the fix"
        self.ticker = TickerStats()
        self._queue: asyncio.Queue[tuple[Signal, asyncio.Future[Decision]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(market_data_ticker(self.ticker), name="market-data"),
            asyncio.create_task(self._signal_worker(), name="signal-worker"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def submit(self, signal: Signal) -> Decision:
        """Queue a signal (as the exchange feed would) and wait for the handler's decision."""
        done: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        await self._queue.put((signal, done))
        return await done

    async def _signal_worker(self) -> None:
        while True:
            signal, done = await self._queue.get()
            try:
                done.set_result(await self.handler(signal, xai_url=self.xai_url))
            except Exception as exc:  # noqa: BLE001 - hand the failure to whoever submitted it
                done.set_exception(exc)
