"""A trading bot's sessions database: sync psycopg2 in async handlers (the bug), an asyncpg pool (the fix).

    .venv/bin/python examples/sessions_db.py       # about 11 s, exits 0; needs PostgreSQL
    .venv/bin/python examples/sessions_db.py --dsn postgresql://user@host:5432/db [--dump-dir DIR]

A production audit of a Telegram trading bot found its database layer (``servos/db.py``) doing this:

* ``get_connection()`` opens a new ``psycopg2`` connection for every operation: no pool;
* ``load_all_sessions()`` and friends are synchronous, and the bot's async command handlers call them
  directly, so every query blocks the event loop, market data included.

This example is that bot in miniature, against a real PostgreSQL (default
``postgresql://postgres@127.0.0.1:5432/postgres``; it creates its own ``loopwatch_demo_sessions_<pid>``
table and drops it at the end).  A market-data ticker must tick every 100 ms while users send commands:

1. **the bug**: two users send ``/sessions`` at once.  The handler calls the psycopg2 ``load_all_sessions()``,
   a 1.2 s query (``pg_sleep`` stands in for the slow un-indexed scan).  loopwatch's watchdog writes a stack
   dump mid-stall that names the line in ``load_all_sessions``; ``/metrics``, scraped from a thread, shows
   the lag climbing while the loop is stuck.
2. **the fix**: the same handlers on an ``asyncpg`` pool (``min_size=1, max_size=3``) watched with
   ``loopwatch.watch_pool(pool, "sessions")``.  Eight ``/sessions`` at once drive it past its size, and a
   ``/status`` command that waits at most 0.1 s for a connection gives up.  ``/metrics`` shows the pool
   full (``db_client_connection_count{state="used"}`` == ``_max`` == 3), the commands waiting for it
   (``_pending_requests``), the wait and use times, the timeout; the loop's lag stays near 0.

PostgreSQL is required: if it cannot be reached the example says so and exits 1.  It also exits 1 if
loopwatch missed the stall or the fix still stalled the loop, so it doubles as a smoke test
(``tests/test_example_sessions_db.py``).  See examples/README.md.
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
from typing import Any

import asyncpg
import psycopg2

import structlog

import loopwatch
from metrics_client import Samples, Scraper, free_port, scrape, value
from tradingbot.market import TickerStats, market_data_ticker

NS = "loopwatch"
THRESHOLDS = (0.5, 2.0)
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
QUERY_SECONDS = 1.2  # how long load_all_sessions()'s query takes
SESSIONS = 40  # rows in the table
BUG_COMMANDS = 2  # /sessions sent at once in the bug phase
FIX_COMMANDS = 8  # ... and in the fix phase
POOL_MIN, POOL_MAX = 1, 3
STATUS_TIMEOUT = 0.1  # /status waits at most this long for a pooled connection

DATABASE_URL = DEFAULT_DSN  # set from --dsn
TABLE = f"loopwatch_demo_sessions_{os.getpid()}"  # the bot's `sessions` table; one per run


# == servos/db.py, as the audit found it: psycopg2, a new connection per operation ==========================
CONNECTIONS_OPENED = 0


def get_connection() -> Any:
    global CONNECTIONS_OPENED
    CONNECTIONS_OPENED += 1
    return psycopg2.connect(DATABASE_URL, connect_timeout=5)  # production: sslmode='require'


def load_all_sessions() -> dict[str, dict[str, Any]]:
    conn = get_connection()  # a new connection (TCP, auth, a backend process) for one query
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT chat_id, config FROM {TABLE} CROSS JOIN pg_sleep(%s)", (QUERY_SECONDS,))
            return {chat_id: config for chat_id, config in cur.fetchall()}
    finally:
        conn.close()


# == servos/db_async.py: the fix -- asyncpg and one pool for the whole bot ====================================
async def init_pool() -> asyncpg.Pool:
    pool = await asyncpg.create_pool(DATABASE_URL, min_size=POOL_MIN, max_size=POOL_MAX)
    return loopwatch.watch_pool(pool, "sessions")  # db_client_connection_*{pool_name="sessions"}


async def load_all_sessions_async(pool: asyncpg.Pool) -> dict[str, dict[str, Any]]:
    async with pool.acquire() as conn:  # waits (without blocking the loop) while all connections are in use
        rows = await conn.fetch(f"SELECT chat_id, config FROM {TABLE} CROSS JOIN pg_sleep($1)", QUERY_SECONDS)
    return {row["chat_id"]: json.loads(row["config"]) for row in rows}


# == handlers/commands.py: Telegram-style command handlers ===================================================
@dataclass
class Update:
    chat_id: str
    text: str


def _sessions_reply(sessions: dict[str, dict[str, Any]]) -> str:
    running = sum(1 for config in sessions.values() if config.get("running"))
    return f"{len(sessions)} sessions, {running} running"


async def cmd_sessions(update: Update) -> str:
    """/sessions -- the bug: a synchronous DB call straight from the coroutine."""
    return _sessions_reply(load_all_sessions())


async def cmd_sessions_fixed(update: Update, pool: asyncpg.Pool) -> str:
    """/sessions -- the fix: the same query through the pool."""
    return _sessions_reply(await load_all_sessions_async(pool))


async def cmd_status(update: Update, pool: asyncpg.Pool) -> str:
    """/status must answer at once: it waits at most STATUS_TIMEOUT for a connection, then says so."""
    try:
        async with pool.acquire(timeout=STATUS_TIMEOUT) as conn:
            return f"ok, {await conn.fetchval(f'SELECT count(*) FROM {TABLE}')} sessions"
    except asyncio.TimeoutError:
        return "database busy, try again in a moment"


# == the table: created for this run, dropped at the end =====================================================
class DatabaseUnreachable(Exception):
    pass


def create_table() -> None:
    try:
        conn = psycopg2.connect(DATABASE_URL, connect_timeout=5)
    except psycopg2.Error as exc:
        raise DatabaseUnreachable(str(exc).strip()) from exc
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {TABLE} (chat_id VARCHAR(50) PRIMARY KEY, api_key TEXT, api_secret TEXT, "
                        f"config JSONB, updated_at TIMESTAMP DEFAULT now())")
            cur.executemany(
                f"INSERT INTO {TABLE} (chat_id, api_key, api_secret, config) VALUES (%s, %s, %s, %s::jsonb)",
                [(str(100_000 + i), f"enc:key{i:04d}", f"enc:secret{i:04d}",
                  json.dumps({"exchange": "binance", "strategies": ["grid", "dca"][: 1 + i % 2],
                              "running": i % 3 != 0, "risk": 0.01 * (1 + i % 5)}))
                 for i in range(SESSIONS)])
    finally:
        conn.close()


def drop_table() -> None:
    try:
        conn = psycopg2.connect(DATABASE_URL, connect_timeout=5)
        with conn, conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.close()
    except psycopg2.Error as exc:
        print(f"  (could not drop table {TABLE}: {exc})", file=sys.stderr, flush=True)


# == /metrics, read from outside the event loop, as Prometheus would ==========================================


def pool_value(samples: Samples, suffix: str, **labels: str) -> float:
    return value(samples, f"{NS}_db_client_connection_{suffix}", pool_name="sessions", **labels)


def stall_dumps(dump_dir: Path) -> set[Path]:
    return set(dump_dir.glob("loopwatch-*-event_loop_lag.json"))


def spike_counts(samples: Samples) -> dict[str, float]:
    return {str(float(t)): value(samples, f"{NS}_event_loop_lag_spikes_total", loop="main",
                                 threshold=str(float(t))) for t in THRESHOLDS}


# == the two phases ==========================================================================================
@dataclass
class Phase:
    commands: int = 0
    seconds: float = 0.0  # from sending the commands to the last reply
    replies: list[str] = field(default_factory=list)
    lag_during: float = 0.0  # highest lag /metrics reported while the commands ran
    scrapes_during: int = 0
    lag_max: float = 0.0  # over the whole phase
    ticks: int = 0
    missed_ticks: int = 0
    spikes: dict[str, float] = field(default_factory=dict)
    dumps: list[Path] = field(default_factory=list)
    connections: int = 0  # DB connections opened
    scrape_errors: list[str] = field(default_factory=list)
    # the fix only: the pool, mid-flight and after
    mid: dict[str, float] = field(default_factory=dict)
    status_reply: str = ""
    status_seconds: float = 0.0
    timeouts_after_status: float = 0.0
    after: dict[str, float] = field(default_factory=dict)
    acquires: int = 0  # the app's own count of pool.acquire() calls


class Run:
    def __init__(self, url: str, dump_dir: Path) -> None:
        self.url = url
        self.dump_dir = dump_dir
        self.ticker = TickerStats()

    async def start(self) -> tuple[Phase, Scraper, dict[str, float], set[Path]]:
        phase = Phase()
        spikes = spike_counts(await asyncio.to_thread(scrape, self.url))
        dumps = stall_dumps(self.dump_dir)
        self.ticker.reset()
        scraper = Scraper(self.url)
        scraper.start()
        await asyncio.sleep(0.6)  # some healthy ticks first
        return phase, scraper, spikes, dumps

    async def finish(self, phase: Phase, scraper: Scraper, spikes: dict[str, float], dumps: set[Path]) -> None:
        await asyncio.sleep(0.8)  # let the loop settle and the watchdog log the end of any stall
        await asyncio.to_thread(scraper.stop)
        after = await asyncio.to_thread(scrape, self.url)
        phase.lag_max = scraper.max_lag()[0]
        phase.ticks, phase.missed_ticks = self.ticker.ticks, self.ticker.missed
        phase.spikes = {t: n - spikes[t] for t, n in spike_counts(after).items()}
        phase.dumps = sorted(stall_dumps(self.dump_dir) - dumps)
        phase.scrape_errors = scraper.errors

    async def bug(self) -> Phase:
        phase, scraper, spikes, dumps = await self.start()
        opened = CONNECTIONS_OPENED
        started = time.monotonic()
        phase.commands = BUG_COMMANDS
        phase.replies = await asyncio.gather(*(cmd_sessions(Update(str(100_000 + i), "/sessions"))
                                               for i in range(BUG_COMMANDS)))
        ended = time.monotonic()
        phase.seconds = ended - started
        phase.connections = CONNECTIONS_OPENED - opened
        await self.finish(phase, scraper, spikes, dumps)
        phase.lag_during, phase.scrapes_during = scraper.max_lag(started, ended)
        return phase

    async def fix(self) -> Phase:
        pool = await init_pool()
        try:
            phase, scraper, spikes, dumps = await self.start()
            started = time.monotonic()
            phase.commands = FIX_COMMANDS
            burst = asyncio.gather(*(cmd_sessions_fixed(Update(str(100_000 + i), "/sessions"), pool)
                                     for i in range(FIX_COMMANDS)))
            phase.mid = await asyncio.to_thread(mid_flight, self.url, FIX_COMMANDS - POOL_MAX)
            status_started = time.monotonic()
            phase.status_reply = await cmd_status(Update("100999", "/status"), pool)
            phase.status_seconds = time.monotonic() - status_started
            phase.timeouts_after_status = pool_value(await asyncio.to_thread(scrape, self.url), "timeouts_total")
            phase.replies = await burst
            ended = time.monotonic()
            phase.seconds = ended - started
            phase.acquires = FIX_COMMANDS + 1  # the /sessions commands and /status
            phase.connections = pool.get_size()
            await self.finish(phase, scraper, spikes, dumps)
            phase.lag_during, phase.scrapes_during = scraper.max_lag(started, ended)
            samples = await asyncio.to_thread(scrape, self.url)
            phase.after = {name: pool_value(samples, suffix) for name, suffix in (
                ("wait_count", "wait_time_seconds_count"), ("wait_sum", "wait_time_seconds_sum"),
                ("use_count", "use_time_seconds_count"), ("use_sum", "use_time_seconds_sum"),
                ("timeouts", "timeouts_total"), ("pending", "pending_requests"))}
            phase.after["used"] = pool_value(samples, "count", state="used")
            phase.after["idle"] = pool_value(samples, "count", state="idle")
        finally:
            await pool.close()
        return phase


def mid_flight(url: str, pending: int) -> dict[str, float]:
    """Scrape until the burst is all in -- 3 commands hold the connections (the pool opens 2 of them on
    demand: min_size=1), the rest wait -- and return that scrape."""
    deadline = time.monotonic() + 5
    while True:
        samples = scrape(url)
        values = {"used": pool_value(samples, "count", state="used"),
                  "idle": pool_value(samples, "count", state="idle"),
                  "max": pool_value(samples, "max"),
                  "pending": pool_value(samples, "pending_requests"),
                  "lag": value(samples, f"{NS}_event_loop_lag_seconds", loop="main")}
        if (values["used"] == POOL_MAX and values["pending"] == pending) or time.monotonic() > deadline:
            return values
        time.sleep(0.02)


# == report ==================================================================================================
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


def report_bug(phase: Phase) -> tuple[int, dict[str, Any]]:
    spikes = "  ".join(f'threshold="{t}" +{n:g}' for t, n in phase.spikes.items())
    row("commands", f"{phase.commands} x /sessions took {phase.seconds:.2f} s, one after the other, with the loop "
                    f"blocked all along ({phase.connections} new psycopg2 connections)")
    row("/metrics", f"answered {phase.scrapes_during} scrapes mid-stall; "
                    f"event_loop_lag_seconds rose to {phase.lag_during:.2f} s")
    row("ticker", f"missed {ticks(phase.missed_ticks)} (it should tick every 100 ms)")
    row("spikes", f"event_loop_lag_spikes_total  {spikes}")
    if not phase.dumps:
        row("dump", "none")
        return fail(f"loopwatch wrote no stall dump for a {phase.seconds:.2f} s blocking call"), {}
    dump = json.loads(phase.dumps[0].read_text())
    culprit = dump.get("culprit") or {}
    row("dump", str(phase.dumps[0]))
    row("stall", f"kind={dump.get('kind')}  source={dump.get('source')}  "
                 f"stall_seconds={dump.get('stall_seconds') or 0:.2f}  cpu_seconds={dump.get('cpu_seconds') or 0:.3f}")
    row("culprit", f"{show_path(str(culprit.get('filename', '?')))}:{culprit.get('lineno')} in "
                   f"{culprit.get('function')}")
    row("", f"    {culprit.get('line')}")
    if culprit.get("function") != "load_all_sessions":
        return fail(f"the dump names the wrong culprit: {culprit}"), {}
    if phase.lag_during < THRESHOLDS[0]:
        return fail(f"/metrics never showed the stall while it was going on (highest lag read mid-stall "
                    f"{phase.lag_during:.2f} s; scrape errors: {phase.scrape_errors or 'none'})"), {}
    return 0, dump


def report_fix(phase: Phase) -> int:
    mid, after = phase.mid, phase.after
    print(f'  what loopwatch shows mid-flight, db_client_connection_*{{pool_name="sessions"}}:', flush=True)
    row("count", f"used {mid['used']:g}, idle {mid['idle']:g}   (_count{{state=...}})")
    row("max", f"{mid['max']:g}   (_max: every connection is in use)")
    row("pending", f"{mid['pending']:g}   (_pending_requests: commands waiting for a connection, not blocking "
                   f"the loop)")
    row("/status", f"acquire(timeout={STATUS_TIMEOUT:g}) gave up after {phase.status_seconds:.2f} s -> "
                   f"{phase.status_reply!r}; timeouts_total is now {phase.timeouts_after_status:g}")
    print("  after the burst:", flush=True)
    wait_mean = after["wait_sum"] / after["wait_count"] if after["wait_count"] else 0.0
    use_mean = after["use_sum"] / after["use_count"] if after["use_count"] else 0.0
    row("wait time", f"mean {wait_mean:.3f} s, count {after['wait_count']:g}   (_wait_time_seconds; the app "
                     f"made {phase.acquires} acquires)")
    row("use time", f"mean {use_mean:.3f} s, count {after['use_count']:g}   (_use_time_seconds)")
    row("timeouts", f"{after['timeouts']:g}   (_timeouts_total)")
    row("now", f"used {after['used']:g}, idle {after['idle']:g}, pending {after['pending']:g}")
    row("commands", f"{phase.commands} x /sessions answered in {phase.seconds:.2f} s, {POOL_MAX} at a time, over "
                    f"{phase.connections} pooled connections")
    row("/metrics", f"event_loop_lag_seconds at most {phase.lag_max:.3f} s (mid-flight {mid['lag']:.3f} s)")
    row("ticker", f"missed {ticks(phase.missed_ticks)}")
    row("loopwatch", f"{len(phase.dumps)} stall dumps, {sum(phase.spikes.values()):g} spikes")
    if phase.dumps or sum(phase.spikes.values()):
        return fail("the fixed handlers still stalled the loop (see the loopwatch.stall line above)")
    if not (mid["used"] == mid["max"] == POOL_MAX and mid["pending"] > 0):
        return fail(f"the pool was not seen full mid-flight: {mid}")
    if after["timeouts"] != 1 or after["wait_count"] != phase.acquires:
        return fail(f"the pool's counters are off: {after} (expected 1 timeout and {phase.acquires} waits)")
    return 0


async def service(url: str, dump_dir: Path) -> int:
    run = Run(url, dump_dir)
    ticker = asyncio.create_task(market_data_ticker(run.ticker), name="market-data")
    try:
        print(f"\n[1/2] bug: {BUG_COMMANDS} users send /sessions; the async handler calls load_all_sessions() -- "
              f"psycopg2, a new connection per call, a {QUERY_SECONDS:g} s query", flush=True)
        bug = await run.bug()
        status, dump = report_bug(bug)
        if status:
            return status

        print(f"\n[2/2] fix: asyncpg.create_pool(min_size={POOL_MIN}, max_size={POOL_MAX}) watched as "
              f'"sessions"; {FIX_COMMANDS} users send /sessions, and a /status waits at most '
              f"{STATUS_TIMEOUT:g} s for a connection", flush=True)
        fix = await run.fix()
        status = report_fix(fix)
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)

    print("\n                          bug (psycopg2)   fix (asyncpg pool)", flush=True)
    print(f"  /sessions served        {bug.commands:8d} in {bug.seconds:.1f} s   "
          f"{fix.commands:12d} in {fix.seconds:.1f} s")
    print(f"  max loop lag (s)        {bug.lag_max:14.3f}   {fix.lag_max:18.3f}")
    print(f"  missed ticks            {bug.missed_ticks:14d}   {fix.missed_ticks:18d}")
    print(f"  stall dumps             {len(bug.dumps):14d}   {len(fix.dumps):18d}")
    print(f"  DB connections opened   {f'{bug.connections} (1 per query)':>14}   {f'{fix.connections} (pooled)':>18}",
          flush=True)
    if status == 0:
        culprit = dump["culprit"]
        print(f"\nOK: loopwatch named {Path(culprit['filename']).name}:{culprit['lineno']} in "
              f"{culprit['function']} (kind={dump['kind']}) as the line that blocked the loop; with asyncpg and a "
              f"watched pool the loop stayed free and /metrics showed the pool full "
              f"({fix.mid['used']:g}/{fix.mid['max']:g} used, {fix.mid['pending']:g} waiting).", flush=True)
    return status


def main() -> int:
    global DATABASE_URL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN, help=f"PostgreSQL to use ({DEFAULT_DSN})")
    parser.add_argument("--dump-dir", type=Path, default=None,
                        help="where loopwatch writes its dumps (default: a new temp dir)")
    args = parser.parse_args()
    DATABASE_URL = args.dsn
    dump_dir = args.dump_dir or Path(tempfile.mkdtemp(prefix="loopwatch-sessions-"))
    structlog.configure()  # the bot logs with structlog (its defaults: the console); loopwatch's events go there too

    print("loopwatch example: a trading bot's sessions database -- sync psycopg2 in async handlers, then an "
          "asyncpg pool", flush=True)
    try:
        create_table()
    except DatabaseUnreachable as exc:
        return fail(f"PostgreSQL is not reachable at {DATABASE_URL}: {exc}\n"
                    f"This example needs a real PostgreSQL: start one, or pass --dsn postgresql://USER@HOST:PORT/DB.")
    try:
        print(f"  postgres {DATABASE_URL}   table {TABLE} ({SESSIONS} sessions)", flush=True)
        agent = loopwatch.install(namespace=NS, service="nexus", metrics_port=free_port(), metrics_addr="127.0.0.1",
                                  lag_thresholds=THRESHOLDS, dump_dir=dump_dir, dump_cooldown=0)
        try:
            if agent.metrics_url is None:
                return fail(f"loopwatch could not start its /metrics exporter: {agent.snapshot().degraded}")
            print(f"  metrics {agent.metrics_url}   dumps {dump_dir}", flush=True)
            return asyncio.run(service(agent.metrics_url, dump_dir))
        finally:
            loopwatch.uninstall()
    finally:
        drop_table()


if __name__ == "__main__":
    sys.exit(main())
