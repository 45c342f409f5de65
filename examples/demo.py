"""loopwatch demo: a trading bot blocks its event loop with a synchronous HTTP call; loopwatch catches it live.

    make demo                      # or: .venv/bin/python examples/demo.py [--api-delay 3] [--dump-dir DIR]

No server to set up: the demo starts a slow stand-in for the AI API on 127.0.0.1 (it answers after
``--api-delay`` seconds) and loopwatch's /metrics exporter on a free port.  Then, in one asyncio service:

1. the bot's signal handler calls ``query_xai()`` -- a blocking ``urllib`` POST -- straight from a
   coroutine (the bug), while a thread scrapes /metrics *during* the stall;
2. the same signal goes through the fixed handler (``await asyncio.to_thread(query_xai, ...)``).

It prints what loopwatch saw and exits 0, or exits 1 with the reason if loopwatch missed the stall
(so the demo doubles as an end-to-end smoke test).  See examples/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


import structlog

import loopwatch
from metrics_client import Scraper, free_port, scrape, value
from tradingbot.bot import TradingBot
from tradingbot.fake_xai import SlowXAIServer
from tradingbot.handlers.commands import Signal, on_signal, on_signal_fixed

NS = "loopwatch"
THRESHOLDS = (0.5, 2.0, 10.0)
HEALTHY_LAG = 0.1  # what the fixed version should stay under (seconds)


# -- one run of the bot -------------------------------------------------------------------------------
@dataclass
class Phase:
    call_seconds: float = 0.0  # how long the handler took
    lag_during_call: float = 0.0  # highest lag /metrics reported while the handler was running
    scrapes_during_call: int = 0
    lag_max: float = 0.0  # highest lag /metrics reported over the whole phase
    ticks: int = 0
    missed_ticks: int = 0
    spikes: dict[str, float] = field(default_factory=dict)  # threshold -> new spikes in this phase
    dumps: list[Path] = field(default_factory=list)  # new automatic dumps
    scrape_errors: list[str] = field(default_factory=list)


def automatic_dumps(dump_dir: Path) -> set[Path]:
    return set(dump_dir.glob("loopwatch-*-event_loop_lag.json"))


def spike_counts(samples: dict) -> dict[str, float]:
    return {str(float(t)): value(samples, f"{NS}_event_loop_lag_spikes_total", loop="main",
                                 threshold=str(float(t))) for t in THRESHOLDS}


async def run_phase(bot: TradingBot, url: str, dump_dir: Path) -> Phase:
    phase = Phase()
    before_spikes = spike_counts(await asyncio.to_thread(scrape, url))
    before_dumps = automatic_dumps(dump_dir)
    bot.ticker.reset()
    scraper = Scraper(url)
    scraper.start()
    await asyncio.sleep(0.6)  # some healthy ticks first

    started = time.monotonic()
    await bot.submit(Signal("BTC-USD", "BUY", 97_250.0))
    ended = time.monotonic()

    await asyncio.sleep(0.8)  # let the loop recover and the watchdog log the end of the stall
    await asyncio.to_thread(scraper.stop)
    after = await asyncio.to_thread(scrape, url)

    during = [lag for at, lag in scraper.samples if started < at < ended]
    phase.call_seconds = ended - started
    phase.lag_during_call = max(during, default=0.0)
    phase.scrapes_during_call = len(during)
    phase.lag_max = max((lag for _, lag in scraper.samples), default=0.0)
    phase.ticks, phase.missed_ticks = bot.ticker.ticks, bot.ticker.missed
    phase.spikes = {t: n - before_spikes[t] for t, n in spike_counts(after).items()}
    phase.dumps = sorted(automatic_dumps(dump_dir) - before_dumps)
    phase.scrape_errors = scraper.errors
    return phase


STALLS: list[dict] = []  # the loopwatch.stall events, as logged


def keep_stalls(logger: object, method: str, event: dict) -> dict:
    if event.get("event") == "loopwatch.stall":
        STALLS.append(dict(event))
    return event


# -- report -------------------------------------------------------------------------------------------
def show_path(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def row(label: str, text: str) -> None:
    print(f"  {label:<13}{text}", flush=True)


def ticks(n: int) -> str:
    return f"{n} tick" if n == 1 else f"{n} ticks"


def fail(message: str) -> int:
    print(f"\nFAIL: {message}", file=sys.stderr, flush=True)
    return 1


def report_stall(phase: Phase) -> tuple[int, dict | None]:
    """Print what loopwatch saw of the blocking call; (exit status, the dump's culprit)."""
    spikes = "  ".join(f'threshold="{t}" +{n:g}' for t, n in phase.spikes.items())
    row("handler", f"blocked the loop for {phase.call_seconds:.2f} s")
    measured = STALLS[-1]["duration"] if STALLS else None
    row("loopwatch", "no loopwatch.stall event" if measured is None else
        f"loopwatch.stall duration={measured:.2f} s (timed from when the call began)")
    row("/metrics", f"answered {phase.scrapes_during_call} scrapes mid-stall; "
                    f"event_loop_lag_seconds rose to {phase.lag_during_call:.2f} s")
    row("ticker", f"missed {ticks(phase.missed_ticks)} (it should tick every 100 ms)")
    row("spikes", f"event_loop_lag_spikes_total  {spikes}")
    if not phase.dumps:
        row("dump", "none")
        return fail(f"loopwatch did not detect the stall: no dump was written for a "
                    f"{phase.call_seconds:.2f} s blocking call (the dump threshold is {THRESHOLDS[0]} s)"), None
    dump = json.loads(phase.dumps[0].read_text())
    culprit = dump.get("culprit") or {}
    row("dump", f"{phase.dumps[0]}  (kind={dump.get('kind')}, source={dump.get('source')})")
    row("culprit", f"{show_path(culprit.get('filename', '?'))}:{culprit.get('lineno')} in "
                   f"{culprit.get('function')}")
    row("", f"    {culprit.get('line')}")

    if phase.lag_during_call < THRESHOLDS[0]:
        return fail(f"the exporter never reported the stall while it was going on (highest lag read "
                    f"mid-stall: {phase.lag_during_call:.2f} s; "
                    f"scrape errors: {phase.scrape_errors or 'none'})"), None
    if phase.spikes[str(THRESHOLDS[0])] < 1:
        return fail("event_loop_lag_spikes_total did not count the stall"), None
    if measured is None or abs(measured - phase.call_seconds) > 0.05:
        return fail(f"loopwatch.stall measured {measured} s for a {phase.call_seconds:.2f} s blocking call"), None
    named = (str(culprit.get("filename")).endswith("xai_integration.py")
             and "query_xai" in str(culprit.get("function")))
    if not named:
        return fail(f"the dump names the wrong culprit: {culprit}"), None
    return 0, culprit


def report_fixed(phase: Phase) -> int:
    new_spikes = sum(phase.spikes.values())
    row("handler", f"took {phase.call_seconds:.2f} s; the loop kept running meanwhile")
    row("/metrics", f"event_loop_lag_seconds at most {phase.lag_max:.3f} s "
                    f"({'healthy' if phase.lag_max < HEALTHY_LAG else 'above 0.1 s: is the machine busy?'})")
    row("ticker", f"missed {ticks(phase.missed_ticks)}")
    row("loopwatch", f"{len(phase.dumps)} dumps, {new_spikes:g} spikes")
    if phase.dumps or new_spikes:
        return fail("the fixed handler still stalled the loop (see the loopwatch.stall line above)")
    return 0


async def service(args: argparse.Namespace, metrics_url: str, api_url: str) -> int:
    bot = TradingBot(api_url, handler=on_signal)
    await bot.start()
    try:
        print(f"\n[1/2] bug: async on_signal() calls query_xai(), a blocking HTTP POST "
              f"(the API answers in {args.api_delay:g} s)", flush=True)
        bad = await run_phase(bot, metrics_url, args.dump_dir)
        status, culprit = report_stall(bad)
        if status:
            return status

        bot.handler = on_signal_fixed
        print("\n[2/2] fix: await asyncio.to_thread(query_xai, ...)  (same API, same delay)", flush=True)
        good = await run_phase(bot, metrics_url, args.dump_dir)
        status = report_fixed(good)
    finally:
        await bot.stop()

    print("\n                 blocking     fixed")
    print(f"  max loop lag   {bad.lag_max:6.2f} s  {good.lag_max:6.3f} s")
    print(f"  missed ticks   {bad.missed_ticks:6d}    {good.missed_ticks:6d}")
    print(f"  stack dumps    {len(bad.dumps):6d}    {len(good.dumps):6d}", flush=True)
    if status == 0:
        assert culprit is not None
        print(f"\nOK: loopwatch saw the stall live on /metrics and named the line: "
              f"{Path(culprit['filename']).name}:{culprit['lineno']} in {culprit['function']}", flush=True)
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api-delay", type=float, default=3.0, help="seconds the fake AI API takes (3)")
    parser.add_argument("--dump-dir", type=Path, default=None,
                        help="where loopwatch writes its dumps (default: a new temp dir)")
    args = parser.parse_args()
    args.dump_dir = args.dump_dir or Path(tempfile.mkdtemp(prefix="loopwatch-demo-"))
    # The bot logs with structlog (its defaults: the console); loopwatch's events go there too, and the
    # demo keeps the loopwatch.stall events to report what loopwatch measured.
    structlog.configure(processors=[keep_stalls, *structlog.get_config()["processors"]])

    print("loopwatch demo: a trading bot whose async signal handler makes a slow, synchronous AI API call",
          flush=True)
    with SlowXAIServer(delay=args.api_delay) as api:
        agent = loopwatch.install(namespace=NS, service="tradingbot", metrics_port=free_port(),
                                  metrics_addr="127.0.0.1", lag_thresholds=THRESHOLDS, dump_dir=args.dump_dir,
                                  dump_cooldown=1.0)
        try:
            if agent.metrics_url is None:
                return fail(f"loopwatch could not start its /metrics exporter: {agent.snapshot().degraded}")
            print(f"  metrics {agent.metrics_url}   dumps {args.dump_dir}", flush=True)
            return asyncio.run(service(args, agent.metrics_url, api.url))
        finally:
            loopwatch.uninstall()


if __name__ == "__main__":
    sys.exit(main())
