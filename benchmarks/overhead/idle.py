"""Figure 3: idle CPU of an app that only sleeps, with loopwatch at its defaults and ``/metrics`` scraped
once a second, versus the same app without loopwatch (CPU ms per wall second of the whole process)."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from .harness import (READY_PREFIX, RESULT_PREFIX, TARGET_IDLE_MS, BenchError, _child_env, _install_defaults,
                      _parse_result, _verdict, _worker_cmd)


def _thread_clocks() -> dict[str, float]:
    """CPU seconds so far of every live Python thread, by name (``pthread_getcpuclockid``)."""
    clocks = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            clocks[thread.name] = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (OSError, AttributeError, OverflowError):
            pass
    return clocks


def worker_idle(args: argparse.Namespace) -> dict[str, Any]:
    """Figure 3: sleep; report the CPU the whole process used per wall second over the window."""

    async def main() -> dict[str, Any]:
        url = None
        if args.with_loopwatch:
            url = _install_defaults(args.dump_dir).metrics_url
        print(READY_PREFIX + json.dumps({"url": url}), flush=True)
        await asyncio.sleep(args.warmup)  # the first scrape and lazy set-up happen before the window
        threads0 = _thread_clocks()
        wall0, cpu0 = time.monotonic(), time.process_time()
        await asyncio.sleep(args.seconds)
        cpu1, wall1 = time.process_time(), time.monotonic()
        threads1 = _thread_clocks()
        wall, cpu = wall1 - wall0, cpu1 - cpu0
        by_thread = {name: threads1[name] - threads0.get(name, 0.0) for name in threads1}
        by_thread["other (short-lived threads)"] = max(0.0, cpu - sum(by_thread.values()))
        return {"wall": wall, "cpu": cpu, "threads": by_thread}

    return asyncio.run(main())


# -- driver -----------------------------------------------------------------------------------------

def bench_idle(cfg: dict[str, Any], dump_dir: Path) -> dict[str, Any]:
    seconds = cfg["seconds"]
    procs = {}
    for with_lw in (False, True):  # both at once: same machine conditions, half the time
        cmd = _worker_cmd("idle", with_lw, dump_dir, seconds=seconds, warmup=1.5)
        procs[with_lw] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          env=_child_env())
    outputs: dict[bool, list[str]] = {False: [], True: []}
    scrapes = {"ok": 0, "failed": 0, "errors": []}
    try:
        proc = procs[True]
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            outputs[True].append(line)
            if line.startswith(READY_PREFIX):
                url = json.loads(line[len(READY_PREFIX):])["url"]
                break
        if url is None:
            raise BenchError("idle with loopwatch: no READY line; output:\n" + "".join(outputs[True])[-3000:])
        window_over = threading.Event()  # set once the app printed its result: it is shutting down

        def read_rest() -> None:
            for rest in proc.stdout:  # type: ignore[union-attr]
                outputs[True].append(rest)
                if rest.startswith(RESULT_PREFIX):
                    window_over.set()
            window_over.set()

        reader = threading.Thread(target=read_rest, daemon=True)
        reader.start()
        next_at = time.monotonic()
        while not window_over.is_set():
            try:
                body = urllib.request.urlopen(url, timeout=5).read().decode()
                if "_event_loop_lag_seconds" not in body:
                    raise ValueError("no event_loop_lag_seconds in the scrape")
                scrapes["ok"] += 1
            except (OSError, ValueError) as exc:
                if window_over.is_set():
                    break  # the app is exiting: not a failure of the exporter
                scrapes["failed"] += 1
                scrapes["errors"].append(repr(exc))
            next_at += 1.0
            window_over.wait(max(0.0, next_at - time.monotonic()))
        proc.wait(timeout=60)
        reader.join(10)
        out_without, _ = procs[False].communicate(timeout=seconds + 60)
        outputs[False].append(out_without)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = {}
    for with_lw, name in ((False, "without"), (True, "with")):
        if procs[with_lw].returncode != 0:
            raise BenchError(f"idle {name}: exit status {procs[with_lw].returncode}; output:\n"
                             + "".join(outputs[with_lw])[-3000:])
        result = _parse_result("".join(outputs[with_lw]), f"idle {name}")
        results[name] = {"cpu_ms_per_s": result["cpu"] / result["wall"] * 1e3, "window_s": result["wall"],
                         "cpu_s": result["cpu"],
                         "threads_ms_per_s": {k: v / result["wall"] * 1e3 for k, v in result["threads"].items()}}
    return {**results, "scrapes": scrapes, "delta_ms_per_s": results["with"]["cpu_ms_per_s"]
            - results["without"]["cpu_ms_per_s"]}


# -- report -----------------------------------------------------------------------------------------

def _render_idle(idle: Any, add: Any) -> None:
    add("3. Idle CPU: app doing `await asyncio.sleep(...)`, whole-process time.process_time() per wall second")
    if not isinstance(idle, dict) or "with" not in idle:
        add(f"   not measured: {idle}")
        return
    s = idle["scrapes"]
    add(f"   {idle['with']['window_s']:.1f} s window; with loopwatch at its defaults (probe 1 s, "
        f"GIL-held fallback on, GIL probe 1/s, exporter) scraped 1/s: {s['ok']} ok, {s['failed']} failed")
    add(f"   without loopwatch  {idle['without']['cpu_ms_per_s']:8.2f} CPU ms/s")
    add(f"   with loopwatch     {idle['with']['cpu_ms_per_s']:8.2f} CPU ms/s   "
        f"(delta {idle['delta_ms_per_s']:+.2f})   target <= {TARGET_IDLE_MS:.0f} ms/s: "
        f"{_verdict(idle['with']['cpu_ms_per_s'] <= TARGET_IDLE_MS)}")
    parts = ", ".join(f"{name} {value:.2f}" for name, value in
                      sorted(idle["with"]["threads_ms_per_s"].items(), key=lambda kv: -kv[1]))
    add(f"   by thread (ms/s): {parts}")
    threads = idle["with"]["threads_ms_per_s"]
    gil = threads.get("loopwatch-gil")
    exporter = threads.get("loopwatch-exporter")
    if gil is not None:
        add(f"   samplers at their default rate, in CPU seconds per hour: GIL probe (1 sample/s) "
            f"{3.6 * gil:.2f}; exporter thread, which reads per-thread CPU, executors and tasks at each "
            f"scrape (1 scrape/s here; Prometheus' default is 1 per 15 s) {3.6 * (exporter or 0.0):.2f}")
