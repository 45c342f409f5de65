"""The GIL contention curve: what loopwatch's GIL probe reports with 0, 1, 2, 4 and 8 CPU-bound threads.

    python benchmarks/gil_curve.py [--seconds 4] [--threads 0,1,2,4,8] [--interval 0.02]

Each point is a fresh process: ``loopwatch.install()`` (``gil_probe_interval`` = ``--interval``, so the
window fills in seconds rather than the default minute), N threads spinning in pure Python, and an idle
asyncio loop; after ``--seconds`` it reads ``gil_contention`` and the mean of ``gil_wait_seconds`` from
the registry, exactly what a scrape would return.  The table is what README's "GIL contention" shows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worker(threads: int, seconds: float, interval: float) -> dict[str, float]:
    sys.path.insert(0, str(REPO))
    import tempfile

    from prometheus_client import CollectorRegistry

    import loopwatch

    done = threading.Event()

    def spin() -> None:
        x = 0
        while not done.is_set():
            for _ in range(1000):
                x += 1

    async def main() -> dict[str, float]:
        registry = CollectorRegistry()
        loopwatch.install(registry=registry, metrics_port=0, dump_dir=tempfile.mkdtemp(),
                          gil_probe_interval=interval, lag_thresholds=(30.0,))
        spinners = [threading.Thread(target=spin, daemon=True) for _ in range(threads)]
        for thread in spinners:
            thread.start()
        await asyncio.sleep(seconds)
        values = {s.name: s.value for family in registry.collect() for s in family.samples
                  if s.name.startswith("loopwatch_gil_") and not s.name.endswith("_bucket")}
        done.set()
        for thread in spinners:
            thread.join()
        loopwatch.uninstall()
        return {"threads": threads, "contention": values.get("loopwatch_gil_contention", float("nan")),
                "mean_wait_ms": 1000 * values["loopwatch_gil_wait_seconds_sum"] / max(1.0, values["loopwatch_gil_wait_seconds_count"]),
                "samples": values["loopwatch_gil_wait_seconds_count"],
                "switch_interval_ms": 1000 * values["loopwatch_gil_switch_interval_seconds"]}

    return asyncio.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", default="0,1,2,4,8")
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.seconds, args.interval)))
        return 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    print(f"GIL probe every {args.interval * 1000:.0f} ms, {args.seconds:.0f} s per point, python "
          f"{sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"{'busy threads':>12}  {'gil_contention':>14}  {'mean gil_wait_seconds':>21}  {'samples':>7}")
    for count in [int(n) for n in args.threads.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--worker", str(count), "--seconds", str(args.seconds),
                              "--interval", str(args.interval)], capture_output=True, text=True, env=env,
                             timeout=args.seconds + 60)
        if out.returncode != 0:
            print(f"{count:>12}  failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        point = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{count:>12}  {point['contention']:>14.2f}  {point['mean_wait_ms']:>18.2f} ms  {point['samples']:>7.0f}")
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
