"""Signal handlers: ask the AI API for a second opinion, then decide.

``on_signal`` is the bug: ``query_xai`` is synchronous, so while the API thinks (seconds), the whole
event loop waits -- market data, other signals, health checks, everything.
``on_signal_fixed`` is the same call moved off the loop with ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from tradingbot.servos.xai_integration import query_xai


@dataclass(frozen=True)
class Signal:
    symbol: str
    side: str
    price: float


@dataclass(frozen=True)
class Decision:
    signal: Signal
    execute: bool
    confidence: float


def _prompt(signal: Signal) -> str:
    return f"Rate this signal from 0 to 1: {signal.side} {signal.symbol} at {signal.price}"


def _decide(signal: Signal, answer: dict[str, Any]) -> Decision:
    confidence = float(answer.get("confidence", 0.0))
    return Decision(signal, execute=confidence >= 0.7, confidence=confidence)


async def on_signal(signal: Signal, *, xai_url: str) -> Decision:
    """BUG: a blocking HTTP call inside a coroutine stalls the event loop until the API answers."""
    answer = query_xai(_prompt(signal), base_url=xai_url)
    return _decide(signal, answer)


async def on_signal_fixed(signal: Signal, *, xai_url: str) -> Decision:
    """FIX: the same call in a worker thread; the loop keeps serving everything else meanwhile."""
    answer = await asyncio.to_thread(query_xai, _prompt(signal), base_url=xai_url)
    return _decide(signal, answer)
