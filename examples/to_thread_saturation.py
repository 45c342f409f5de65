"""A saturated ``asyncio.to_thread`` pool: requests queue for a thread, and so does everything else.

    .venv/bin/python examples/to_thread_saturation.py        # about 12 s, exits 0

The other pattern production audits keep finding: a service wraps a synchronous driver (psycopg2, a sync
Redis or S3 client) in ``await asyncio.to_thread(...)``.  That is the right first step, but ``to_thread``
uses the loop's *default executor*: a ``ThreadPoolExecutor`` of ``min(32, os.cpu_count() + 4)`` threads --
6 on a 2-core container.  A burst of 40 requests, each holding a thread for a 1 s query, fills those 6
threads; the other 34 calls wait in the executor's queue, invisible: the event loop is healthy (lag ~0),
CPU is idle, and latency climbs in steps of one second.  Worse, the default executor is shared:
``loop.getaddrinfo()`` (every outgoing connection's DNS lookup), ``loop.run_in_executor(None, ...)`` in
libraries, file I/O helpers -- they all wait behind the burst.

What loopwatch shows (this example scrapes its own /metrics mid-burst, as Prometheus would):

* ``loopwatch_to_thread_executor_queue_depth{executor="default"}``: calls waiting for a thread;
* ``..._threads`` == ``..._max_workers`` and ``..._busy_threads`` == both: the pool is at its limit;
* ``..._queue_wait_seconds`` (histogram): how long calls waited between submit and start;
* a structlog warning ``loopwatch.executor_saturated`` once a call waited ``executor_wait_threshold``
  (0.5 s) or more.

The fix: give the blocking driver its own ``ThreadPoolExecutor``, sized to what the database can take at
once (its connection pool), watched with ``loopwatch.watch_executor(db_pool, "db")``, and bound the
concurrency with an ``asyncio.Semaphore`` of the same size: excess requests wait *in asyncio*, where they
can time out or be shed, instead of in an invisible queue; the default executor stays free for the rest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

import loopwatch
from metrics_client import Samples, free_port, scrape, value

NS = "loopwatch"
REQUESTS = 40  # the burst
QUERY_SECONDS = 1.0  # each request's blocking call
DB_POOL_SIZE = 20  # what the database takes at once (its connection pool): the fix's threads
MID_BURST = 0.5  # when the mid-burst scrape happens (s after the burst starts)
WAIT_THRESHOLD = 0.5  # executor_wait_threshold: a longer submit-to-start wait logs executor_saturated


# -- the application ------------------------------------------------------------------------------------
def fetch_account(request_id: int) -> dict[str, Any]:
    """Stands in for a synchronous DB driver call (``cursor.execute(...); cursor.fetchone()``)."""
    time.sleep(QUERY_SECONDS)
    return {"id": request_id, "balance": 100}


async def handle_buggy(request_id: int) -> dict[str, Any]:
    return await asyncio.to_thread(fetch_account, request_id)  # the loop's shared default executor


class FixedHandler:
    """The fix: the driver's own pool, and at most ``DB_POOL_SIZE`` calls handed to it at once."""

    def __init__(self, db_pool: cf.ThreadPoolExecutor) -> None:
        self.db_pool = db_pool
        self.limit = asyncio.Semaphore(DB_POOL_SIZE)
        self.waiting = 0  # requests waiting for the semaphore: in the open, where a timeout can shed them

    async def __call__(self, request_id: int) -> dict[str, Any]:
        self.waiting += 1
        try:
            await self.limit.acquire()
        finally:
            self.waiting -= 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.db_pool, fetch_account, request_id)
        finally:
            self.limit.release()


async def dns_lookup() -> float:
    """Something else that needs the default executor: ``loop.getaddrinfo`` (what every connect does)."""
    started = time.monotonic()
    await asyncio.get_running_loop().getaddrinfo("localhost", 443, type=socket.SOCK_STREAM)
    return time.monotonic() - started


# -- loopwatch's log events, seen by the app's structlog set-up -----------------------------------------------
SATURATED: list[dict[str, Any]] = []


def remember_saturation(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    if event.get("event") == "loopwatch.executor_saturated":
        SATURATED.append(dict(event))
    return event


def configure_logging() -> None:
    structlog.configure(processors=[
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="%H:%M:%S"),
        remember_saturation,
        structlog.dev.ConsoleRenderer(colors=False),
    ])


# -- /metrics, read from outside the event loop -----------------------------------------------------------


def slowest_bucket(before: Samples, after: Samples, name: str, **labels: str) -> tuple[float, float]:
    """The histogram bucket (low, high] holding the longest observation between two scrapes: the last
    bucket whose (cumulative) count grew more than the one below it."""
    buckets = sorted((float(dict(ls)["le"]), v - before.get((n, ls), 0.0)) for (n, ls), v in after.items()
                     if n == f"{name}_bucket" and set(labels.items()) <= set(ls))
    result, low, below = (0.0, 0.0), 0.0, 0.0
    for bound, count in buckets:
        if count > below:
            result = (low, bound)
        low, below = bound, count
    return result


@dataclass
class Phase:
    executor: str = ""
    queue_depth: float = 0.0
    threads: float = 0.0
    max_workers: float = 0.0
    busy: float = 0.0
    waiting_on_semaphore: int = 0
    wait_mean: float = 0.0
    wait_slowest: tuple[float, float] = (0.0, 0.0)
    waits: float = 0.0
    dns_seconds: float = 0.0
    burst_seconds: float = 0.0
    saturated: list[dict[str, Any]] | None = None


async def run_phase(handler: Callable[[int], Awaitable[Any]], executor: str, url: str,
                    scraper: cf.Executor) -> Phase:
    loop = asyncio.get_running_loop()
    phase = Phase(executor=executor)
    # The scrapes get a thread of their own: through to_thread they would queue behind the burst too.
    before = await loop.run_in_executor(scraper, scrape, url)
    logged = len(SATURATED)

    started = time.monotonic()
    requests = [asyncio.create_task(handler(i)) for i in range(REQUESTS)]
    await asyncio.sleep(0.1)
    dns = asyncio.create_task(dns_lookup())
    await asyncio.sleep(MID_BURST - 0.1)
    mid = await loop.run_in_executor(scraper, scrape, url)
    phase.waiting_on_semaphore = getattr(handler, "waiting", 0)
    await asyncio.gather(*requests)
    phase.burst_seconds = time.monotonic() - started
    phase.dns_seconds = await dns
    after = await loop.run_in_executor(scraper, scrape, url)

    metric = f"{NS}_to_thread_executor"
    phase.queue_depth = value(mid, f"{metric}_queue_depth", executor=executor)
    phase.threads = value(mid, f"{metric}_threads", executor=executor)
    phase.max_workers = value(mid, f"{metric}_max_workers", executor=executor)
    phase.busy = value(mid, f"{metric}_busy_threads", executor=executor)
    count = value(after, f"{metric}_queue_wait_seconds_count", executor=executor) - \
        value(before, f"{metric}_queue_wait_seconds_count", executor=executor)
    total = value(after, f"{metric}_queue_wait_seconds_sum", executor=executor) - \
        value(before, f"{metric}_queue_wait_seconds_sum", executor=executor)
    phase.waits = count
    phase.wait_mean = total / count if count else 0.0
    phase.wait_slowest = slowest_bucket(before, after, f"{metric}_queue_wait_seconds", executor=executor)
    phase.saturated = SATURATED[logged:]
    return phase


# -- report -------------------------------------------------------------------------------------------------
def row(label: str, text: str) -> None:
    print(f"  {label:<24}{text}", flush=True)


def report(phase: Phase) -> None:
    name = phase.executor
    print(f"  what loopwatch shows, mid-burst ({MID_BURST:g} s in), executor=\"{name}\":", flush=True)
    row("queue depth", f"{phase.queue_depth:g}   (to_thread_executor_queue_depth)")
    full = phase.threads >= phase.max_workers
    note = ("   (at its limit, calls queued: saturated)" if full and phase.queue_depth
            else "   (all in use, nothing queued)" if full else "")
    row("threads / max_workers", f"{phase.threads:g} / {phase.max_workers:g}{note}")
    row("busy threads", f"{phase.busy:g}")
    if phase.waiting_on_semaphore:
        row("waiting on semaphore", f"{phase.waiting_on_semaphore}   (the app's own count: the excess waits in "
                                    f"asyncio, not in the pool's queue)")
    low, high = phase.wait_slowest
    print("  after the burst:", flush=True)
    row("queue wait", f"mean {phase.wait_mean:.4f} s over {phase.waits:g} calls, slowest in the "
                      f"({low:g}, {high:g}] s bucket   (to_thread_executor_queue_wait_seconds)")
    events = phase.saturated or []
    if events:
        e = events[0]
        row("logged", f"loopwatch.executor_saturated executor={e.get('executor')} "
                      f"queue_wait={e.get('queue_wait')} threshold={e.get('threshold')}")
    else:
        row("logged", "no loopwatch.executor_saturated")
    row("the service", f"{REQUESTS} requests took {phase.burst_seconds:.1f} s; a DNS lookup "
                       f"(loop.getaddrinfo, default executor) took {phase.dns_seconds:.3f} s")


async def service(url: str) -> int:
    scraper = cf.ThreadPoolExecutor(1, thread_name_prefix="scraper")
    print(f"\n[1/2] bug: {REQUESTS} concurrent requests, each `await asyncio.to_thread(fetch_account, ...)` "
          f"(a {QUERY_SECONDS:g} s sync DB call)", flush=True)
    bug = await run_phase(handle_buggy, "default", url, scraper)
    report(bug)

    db_pool = loopwatch.watch_executor(cf.ThreadPoolExecutor(DB_POOL_SIZE, thread_name_prefix="db"), "db")
    print(f"\n[2/2] the fix: a dedicated ThreadPoolExecutor({DB_POOL_SIZE}) watched as \"db\" + "
          f"asyncio.Semaphore({DB_POOL_SIZE})", flush=True)
    try:
        fix = await run_phase(FixedHandler(db_pool), "db", url, scraper)
        report(fix)
    finally:
        db_pool.shutdown()
        scraper.shutdown()

    print("\n                               bug (default)   fix (db)", flush=True)
    print(f"  queue depth mid-burst        {bug.queue_depth:10g}   {fix.queue_depth:10g}")
    print(f"  threads / max_workers        {f'{bug.threads:g}/{bug.max_workers:g}':>10}   "
          f"{f'{fix.threads:g}/{fix.max_workers:g}':>10}")
    print(f"  queue wait mean (s)          {bug.wait_mean:10.4f}   {fix.wait_mean:10.4f}")
    print(f"  executor_saturated events    {len(bug.saturated or []):10d}   {len(fix.saturated or []):10d}")
    print(f"  DNS lookup (s)               {bug.dns_seconds:10.3f}   {fix.dns_seconds:10.3f}")
    print(f"  burst of {REQUESTS} took (s)         {bug.burst_seconds:10.1f}   {fix.burst_seconds:10.1f}",
          flush=True)
    if bug.queue_depth > 0 and bug.saturated and fix.wait_mean < bug.wait_mean:
        print(f"\nOK: loopwatch showed the default executor saturated ({bug.threads:g}/{bug.max_workers:g} "
              f"threads, {bug.queue_depth:g} calls queued, executor_saturated logged); with its own pool and a "
              f"semaphore the calls waited {fix.wait_mean:.4f} s on average instead of {bug.wait_mean:.3f} s, and "
              f"the default executor stayed free.", flush=True)
    else:
        print("\nNOTE: the default executor did not saturate as expected (more than "
              f"{REQUESTS} threads in it?)", flush=True)
    return 0


def main() -> int:
    configure_logging()
    dump_dir = tempfile.mkdtemp(prefix="loopwatch-to-thread-")
    print("loopwatch example: a burst of blocking calls saturates asyncio.to_thread's default executor",
          flush=True)
    agent = loopwatch.install(namespace=NS, service="accounts", metrics_port=free_port(),
                              metrics_addr="127.0.0.1", dump_dir=dump_dir, executor_wait_threshold=WAIT_THRESHOLD)
    try:
        if agent.metrics_url is None:
            print(f"FAIL: loopwatch could not start its /metrics exporter: {agent.snapshot().degraded}",
                  file=sys.stderr)
            return 1
        print(f"  metrics {agent.metrics_url}   dumps {dump_dir}", flush=True)
        return asyncio.run(service(agent.metrics_url))
    finally:
        loopwatch.uninstall()


if __name__ == "__main__":
    sys.exit(main())
