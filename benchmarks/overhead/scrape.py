"""Figure 7: how long a scrape of ``/metrics`` takes while three CPU-bound Python threads fight for the GIL
(issue 12: p95 <= 100 ms).  Every GIL hand-over during a scrape (a system call that releases it) costs a
wait behind the busy threads, up to a switch interval each, so a scrape that reads a file per thread from
Python is slow exactly when the service is busiest."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from .harness import READY_PREFIX, BenchError, _child_env, _install_defaults, _verdict, _worker_cmd

TARGET_SCRAPE_P95 = 0.100  # seconds, with 3 CPU-bound threads (issue 12)
BUSY_THREADS = 3
# What a Prometheus server sends: OpenMetrics preferred, the answer gzipped.
PROMETHEUS_HEADERS = {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
                      "Accept-Encoding": "gzip"}


def _scrape(url: str) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, headers=PROMETHEUS_HEADERS), timeout=10) as answer:
        answer.read()


def worker_scrape(args: argparse.Namespace) -> dict[str, Any]:
    """An app whose loop idles while ``BUSY_THREADS`` threads run Python flat out; loopwatch at its defaults."""
    done = threading.Event()

    def spin() -> None:
        x = 0
        while not done.is_set():
            for _ in range(1000):
                x += 1

    async def main() -> dict[str, Any]:
        url = _install_defaults(args.dump_dir).metrics_url
        for i in range(BUSY_THREADS):
            threading.Thread(target=spin, name=f"cpu-{i}", daemon=True).start()
        print(READY_PREFIX + json.dumps({"url": url}), flush=True)
        # Until the bench closes our stdin (at most args.seconds): then loopwatch uninstalls as at any exit,
        # and leaves no in-flight dump file behind.
        reader = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        try:
            await asyncio.wait_for(asyncio.shield(reader), args.seconds)
        except asyncio.TimeoutError:
            pass
        done.set()
        return {"busy_threads": BUSY_THREADS}

    return asyncio.run(main())


def bench_scrape(cfg: dict[str, Any], dump_dir: Path) -> dict[str, Any]:
    cmd = _worker_cmd("scrape", True, dump_dir, seconds=cfg["seconds"])
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_child_env())
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            if line.startswith(READY_PREFIX):
                url = json.loads(line[len(READY_PREFIX):])["url"]
                break
        if url is None:
            raise BenchError("scrape: no READY line")
        time.sleep(1.0)  # the busy threads are running; the first scrape's lazy set-up is not measured
        _scrape(url)
        latencies = []
        for _ in range(cfg["scrapes"]):
            started = time.perf_counter()
            _scrape(url)
            latencies.append(time.perf_counter() - started)
            time.sleep(cfg["pause"])
    finally:
        try:
            proc.communicate(timeout=30)  # closes its stdin: the worker ends as an app does
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=30)
    if proc.returncode != 0:
        raise BenchError(f"scrape: the worker exited with {proc.returncode}")
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {"scrapes": len(ordered), "busy_threads": BUSY_THREADS, "p50_s": statistics.median(ordered),
            "p95_s": p95, "max_s": ordered[-1], "target_p95_s": TARGET_SCRAPE_P95}


def _scrape_verdict(scrape: dict[str, Any]) -> bool:
    return scrape["p95_s"] <= TARGET_SCRAPE_P95


def _render_scrape(scrape: Any, add: Any) -> None:
    add(f"7. Scrape latency with {BUSY_THREADS} CPU-bound Python threads fighting for the GIL (wall clock)")
    if not isinstance(scrape, dict):
        add(f"   not measured: {scrape}")
        return
    add(f"   {scrape['scrapes']} scrapes of /metrics as Prometheus asks (OpenMetrics, gzip), loopwatch at its defaults: p50 {1000 * scrape['p50_s']:.1f} ms, "
        f"p95 {1000 * scrape['p95_s']:.1f} ms, max {1000 * scrape['max_s']:.1f} ms   target p95 <= "
        f"{1000 * TARGET_SCRAPE_P95:.0f} ms: {_verdict(_scrape_verdict(scrape))}")
