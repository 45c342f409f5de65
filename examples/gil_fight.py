"""CPU-bound work in threads: the threads fight over the GIL, the event loop waits its turn.

    .venv/bin/python examples/gil_fight.py        # about 12 s, exits 0

A pattern that shows up in almost every production audit of an asyncio service: a handler has some
CPU-heavy pure-Python work (scoring orders, hashing a batch, building a report), someone knows it must not
run on the event loop, so it goes to ``await asyncio.to_thread(...)``.  The loop is no longer *blocked*, but
the work still needs the GIL, and only one thread holds it at a time.  With four requests in flight, four
executor threads take turns on the GIL (CPython hands it over every ``sys.getswitchinterval()``, 5 ms), and
every other thread that wakes up -- the event-loop thread included, after each ``select()`` -- queues
behind them.  The process never uses more than about one core, whatever the thread count, and the loop's
latency grows with the number of busy threads.  Nothing is logged; CPU looks "fine" (one core of many).

What loopwatch shows (this example scrapes its own /metrics, as Prometheus would):

* ``loopwatch_gil_contention`` ~3: a thread that wakes up waits behind about three others for the GIL;
  ``loopwatch_gil_wait_seconds`` gives the raw wait;
* ``loopwatch_thread_cpu_seconds_total{thread_name="asyncio_N"}``: the executor threads doing the work, each
  with a quarter of a core, and ``loopwatch_cpu_process_cores`` ~1: four busy threads, one core;
* ``loopwatch_event_loop_delay_seconds``: the loop's wake-ups are late by a few GIL turns.

The fix: CPU-bound Python goes to processes -- here a ``concurrent.futures.ProcessPoolExecutor`` sized to the
cores and watched with ``loopwatch.watch_executor(pool, "cpu")``.  Same requests, same work: contention
drops to ~0, the loop's delay to about a millisecond, and the work runs on every core.  (Arguments and
results are pickled to and from the worker processes: send ids or small inputs, not 100 MB lists.)  The
other fixes are C code that releases the GIL (numpy, hashlib on big buffers) or a free-threaded build.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

import structlog

import loopwatch
from metrics_client import Samples, free_port, scrape, value

NS = "loopwatch"
# One GIL probe every 20 ms instead of the default 1 s: gil_contention is the mean of the last WINDOW probes
# (loopwatch/_gil.py: 60, a minute at the default interval), i.e. 1.2 s here, so the scrape at the end of a
# 4 s phase reads a window filled by that phase's samples only, not the previous phase's.  In production
# keep the default: each probe costs a busy loop a little (see the README's Limitations).  The mean of
# gil_wait_seconds (sum/count over the phase), also printed, does not depend on the window at all.
GIL_PROBE_INTERVAL = 0.02
PHASE_SECONDS = 4.0  # well over the window (60 x 20 ms = 1.2 s)
CONCURRENCY = 4  # requests in flight: four threads fighting over the GIL
ORDERS_PER_REQUEST = 500_000  # ~80 ms of pure Python per request on one core


# -- the application ----------------------------------------------------------------------------------
def score_orders(seed: int, count: int) -> int:
    """The CPU-bound handler body: a rolling hash over ``count`` synthetic orders, in pure Python.

    It holds the GIL the whole time (it only lets go when CPython forces a switch every 5 ms).
    """
    h = seed
    for order_id in range(count):
        h = (h * 31 + order_id) & 0xFFFFFFFF
    return h


Offload = Callable[..., Awaitable[Any]]  # asyncio.to_thread, or a run_in_executor on a pool


@dataclass
class Traffic:
    served: int = 0
    latencies: list[float] = field(default_factory=list)


async def handle_request(seed: int, offload: Offload) -> int:
    """The request handler: the score is computed off the loop, by ``offload``."""
    return await offload(score_orders, seed, ORDERS_PER_REQUEST)


async def client(offload: Offload, stop: asyncio.Event, traffic: Traffic, first_seed: int) -> None:
    seed = first_seed
    while not stop.is_set():
        started = time.monotonic()
        await handle_request(seed, offload)
        traffic.latencies.append(time.monotonic() - started)
        traffic.served += 1
        seed += CONCURRENCY


# -- /metrics, read from outside the event loop -----------------------------------------------------------


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def histogram_quantile(q: float, before: Samples, after: Samples, name: str, **labels: str) -> float:
    """Like PromQL's histogram_quantile() over the increase between two scrapes (linear in the bucket)."""
    buckets = sorted((float(dict(ls)["le"]), v - before.get((n, ls), 0.0)) for (n, ls), v in after.items()
                     if n == f"{name}_bucket" and set(labels.items()) <= set(ls))
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return 0.0
    rank, low, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return low
            return low + (bound - low) * (rank - below) / max(count - below, 1e-9)
        low, below = bound, count
    return low


@dataclass
class Figures:
    contention: float = 0.0
    gil_wait_ms: float = 0.0  # mean over the phase
    cores: float = 0.0
    threads: float = 0.0
    busiest: list[tuple[str, float]] = field(default_factory=list)  # (thread name, cores)
    loop_p99_ms: float = 0.0
    loop_mean_ms: float = 0.0
    served: int = 0
    latency_ms: float = 0.0
    pool: dict[str, float] = field(default_factory=dict)
    pool_cores: float = 0.0


def thread_cpu(samples: Samples) -> dict[tuple[str, str], float]:
    return {(dict(ls)["thread_name"], dict(ls)["native_id"]): v for (n, ls), v in samples.items()
            if n == f"{NS}_thread_cpu_seconds_total"}


def figures(before: Samples, after: Samples, seconds: float, traffic: Traffic) -> Figures:
    f = Figures()
    f.contention = value(after, f"{NS}_gil_contention")
    probes = delta(before, after, f"{NS}_gil_wait_seconds_count")
    f.gil_wait_ms = 1000 * delta(before, after, f"{NS}_gil_wait_seconds_sum") / probes if probes else 0.0
    f.cores = value(after, f"{NS}_cpu_process_cores")
    f.threads = value(after, f"{NS}_threads_total")
    cpu0, cpu1 = thread_cpu(before), thread_cpu(after)
    used = {key: (v - cpu0.get(key, 0.0)) / seconds for key, v in cpu1.items()}
    f.busiest = [(name, c) for (name, _), c in sorted(used.items(), key=lambda kv: -kv[1])[:5]]
    f.loop_p99_ms = 1000 * histogram_quantile(0.99, before, after, f"{NS}_event_loop_delay_seconds", loop="main")
    beats = delta(before, after, f"{NS}_event_loop_delay_seconds_count", loop="main")
    f.loop_mean_ms = 1000 * delta(before, after, f"{NS}_event_loop_delay_seconds_sum", loop="main") / beats \
        if beats else 0.0
    f.served = traffic.served
    f.latency_ms = 1000 * sum(traffic.latencies) / len(traffic.latencies) if traffic.latencies else 0.0
    return f


def children_cpu() -> float:
    """CPU seconds of this process's children (the pool's workers): outside loopwatch's view."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


async def run_phase(offload: Offload, url: str, scraper: cf.Executor) -> Figures:
    loop = asyncio.get_running_loop()
    traffic, stop = Traffic(), asyncio.Event()
    before = await loop.run_in_executor(scraper, scrape, url)
    children_before = await loop.run_in_executor(scraper, children_cpu)  # psutil reads /proc: not on the loop
    started = time.monotonic()
    clients = [asyncio.create_task(client(offload, stop, traffic, i)) for i in range(CONCURRENCY)]
    await asyncio.sleep(PHASE_SECONDS)
    after = await loop.run_in_executor(scraper, scrape, url)  # mid-traffic, as Prometheus would see it
    seconds = time.monotonic() - started
    pool_cores = (await loop.run_in_executor(scraper, children_cpu) - children_before) / seconds
    stop.set()
    await asyncio.gather(*clients)  # let the requests in flight finish
    result = figures(before, after, seconds, traffic)
    result.pool_cores = pool_cores
    result.pool = {key: value(after, f"{NS}_to_thread_executor_{key}", executor="cpu")
                   for key in ("queue_depth", "threads", "max_workers")}
    return result


# -- report -------------------------------------------------------------------------------------------------
def row(label: str, text: str) -> None:
    print(f"  {label:<22}{text}", flush=True)


def report(f: Figures, *, fixed: bool) -> None:
    print("  what loopwatch shows:", flush=True)
    row("gil_contention", f"{f.contention:.2f}   (other threads a waking thread waits behind for the GIL)")
    row("gil_wait_seconds", f"mean {f.gil_wait_ms:.2f} ms per probe over the phase "
                            f"(switch interval {sys.getswitchinterval() * 1000:g} ms)")
    row("cpu_process_cores", f"{f.cores:.2f}   threads_total {f.threads:g}")
    busiest = ", ".join(f"{name} {cores:.2f}" for name, cores in f.busiest)
    row("busiest threads", f"{busiest}   (cores, from thread_cpu_seconds_total)")
    row("event loop delay", f"p99 {f.loop_p99_ms:.1f} ms, mean {f.loop_mean_ms:.1f} ms "
                            f"(event_loop_delay_seconds)")
    if fixed:
        p = f.pool
        row('executor="cpu"', f"processes {p['threads']:g} / max_workers {p['max_workers']:g}, "
                              f"queue depth {p['queue_depth']:g}   (to_thread_executor_*)")
        row("pool processes", f"{f.pool_cores:.2f} cores   (psutil: the work now runs outside this process)")
    row("the service", f"{f.served} requests in {PHASE_SECONDS:g} s, mean latency {f.latency_ms:.0f} ms")


async def service(url: str) -> int:
    loop = asyncio.get_running_loop()
    # The scrapes get a thread of their own: they must not queue behind the app's work.
    scraper = cf.ThreadPoolExecutor(1, thread_name_prefix="scraper")
    await asyncio.sleep(0.5)  # let the probes settle

    print(f"\n[1/2] bug: {CONCURRENCY} requests in flight, each `await asyncio.to_thread(score_orders, ...)` "
          f"(pure Python)", flush=True)
    bug = await run_phase(asyncio.to_thread, url, scraper)
    report(bug, fixed=False)

    workers = max(1, min(CONCURRENCY, os.cpu_count() or 1))
    # spawn: a fresh interpreter per worker (fork() from a process that has threads is unsafe and
    # deprecated since Python 3.12); the `if __name__ == "__main__"` guard keeps the workers from running main().
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    loopwatch.watch_executor(pool, "cpu")
    try:
        await asyncio.gather(*(loop.run_in_executor(pool, os.getpid) for _ in range(workers)))  # start them now

        def in_processes(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            return loop.run_in_executor(pool, fn, *args)

        print(f"\n[2/2] the fix: the same requests, `await loop.run_in_executor(pool, score_orders, ...)` with a "
              f"ProcessPoolExecutor({workers}) watched as \"cpu\"", flush=True)
        fix = await run_phase(in_processes, url, scraper)
        report(fix, fixed=True)
    finally:
        await asyncio.to_thread(pool.shutdown)  # it joins the workers: not on the loop
        scraper.shutdown()

    print("\n                          bug (threads)   fix (processes)", flush=True)
    print(f"  gil_contention          {bug.contention:10.2f}      {fix.contention:10.2f}")
    print(f"  gil wait mean (ms)      {bug.gil_wait_ms:10.2f}      {fix.gil_wait_ms:10.2f}")
    print(f"  process cores           {bug.cores:10.2f}      {fix.cores:10.2f}")
    print(f"  loop delay mean (ms)    {bug.loop_mean_ms:10.1f}      {fix.loop_mean_ms:10.1f}")
    print(f"  loop delay p99 (ms)     {bug.loop_p99_ms:10.1f}      {fix.loop_p99_ms:10.1f}")
    print(f"  requests served         {bug.served:10d}      {fix.served:10d}", flush=True)
    if bug.contention > fix.contention + 0.5:
        print(f"\nOK: moving the CPU-bound work to processes took GIL contention from {bug.contention:.2f} "
              f"to {fix.contention:.2f}.", flush=True)
    else:
        print("\nNOTE: the contention did not drop as expected; is the machine very busy?", flush=True)
    return 0


def main() -> int:
    dump_dir = tempfile.mkdtemp(prefix="loopwatch-gil-")
    structlog.configure()  # the service logs with structlog (its defaults: the console); loopwatch's events go there too
    print("loopwatch example: CPU-bound pure-Python work offloaded to threads fights over the GIL", flush=True)
    agent = loopwatch.install(namespace=NS, service="scoring", metrics_port=free_port(), metrics_addr="127.0.0.1",
                              dump_dir=dump_dir, probe_interval=0.05, gil_probe_interval=GIL_PROBE_INTERVAL)
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
