"""The command line: ``main()`` parses the options; ``run_driver`` runs the figures in order, writes the
JSON result and prints the table.  With ``--worker NAME`` the same command line is a worker instead
(``workers.run_worker``): that is what the driver's subprocesses run."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import __doc__ as PACKAGE_DOC  # the methodology: its first paragraph is --help's description
from .callgrind import bench_callgrind
from .harness import (REPO, RESULTS, TARGET_HTTP_COST, TARGET_IDLE_MS, TARGET_STEP_RATIO, BenchError,
                      _progress)
from .hooks import HOOK_VARIANTS, bench_hooks
from .http_wrk import _http_verdict, bench_http
from .http_callgrind import _http_cg_verdict, _http_wrk_estimate, bench_http_callgrind
from .idle import bench_idle
from .report import render
from .scrape import _scrape_verdict, bench_scrape
from .wall import _wall_verdict, bench_wall
from .workers import WORKERS, run_worker


# Sizes per mode.  Everything is sized for 2 shared cores: full ~10 min, quick ~4 min.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "wall": {"pairs": 8, "rounds": 3, "tasks": 100, "steps": 2500, "chains": 20, "chain_len": 5000},
        "callgrind": {"tasks": 100, "small": 100, "large": 400, "repeat": 1},
        "idle": {"seconds": 10.0},
        "hooks": {"sets": 4, "rounds": 3, "callbacks": 60000, "debug_divisor": 20,
                  "cg_small": 4000, "cg_large": 24000},
        "http": {"pairs": 3, "slices": 4, "seconds": 1, "warmup": 2, "connections": 16},
        "httpcg": {"warmup": 160, "load": 1600, "sparse": 300},
        "scrape": {"seconds": 60.0, "scrapes": 60, "pause": 0.1},
    },
    "full": {
        "wall": {"pairs": 24, "rounds": 5, "tasks": 100, "steps": 2500, "chains": 20, "chain_len": 5000},
        "callgrind": {"tasks": 100, "small": 100, "large": 1000, "repeat": 2},
        "idle": {"seconds": 30.0},
        "hooks": {"sets": 6, "rounds": 3, "callbacks": 100000, "debug_divisor": 20,
                  "cg_small": 5000, "cg_large": 25000},
        "http": {"pairs": 6, "slices": 8, "seconds": 1, "warmup": 2, "connections": 16},
        "httpcg": {"warmup": 320, "load": 4800, "sparse": 1000},
        "scrape": {"seconds": 120.0, "scrapes": 200, "pause": 0.1},
    },
}


def run_driver(args: argparse.Namespace) -> int:
    mode = "quick" if args.quick else "full"
    profile = {k: dict(v) for k, v in PROFILES[mode].items()}
    if args.pairs:
        profile["wall"]["pairs"] = args.pairs
    sys.path.insert(0, str(REPO))  # the checkout's loopwatch, as in the workers (PYTHONPATH)
    try:
        import loopwatch
    except ImportError as exc:
        print(f"cannot import loopwatch from {REPO}: {exc!r} (are its dependencies installed? "
              f"pip install -e .)", file=sys.stderr)
        return 2
    started = time.monotonic()
    result: dict[str, Any] = {
        "mode": mode,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": {"loopwatch": loopwatch.__version__, "python": platform.python_version(),
                        "implementation": platform.python_implementation(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), "load_before": list(os.getloadavg())},
        "targets": {"step_ratio_max": TARGET_STEP_RATIO, "idle_cpu_ms_per_s_max": TARGET_IDLE_MS,
                    "http_rps_cost_max": TARGET_HTTP_COST},
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="loopwatch-bench-") as tmp:
        work = Path(tmp)
        dump_dir = work / "dumps"
        dump_dir.mkdir()
        sections = [("callgrind", lambda: bench_callgrind(profile["callgrind"], dump_dir, work)),
                    ("idle", lambda: bench_idle(profile["idle"], dump_dir)),
                    ("hooks", lambda: bench_hooks(profile["hooks"], dump_dir, work)),
                    ("httpcg", lambda: bench_http_callgrind(profile["httpcg"], dump_dir, work)),
                    ("http", lambda: bench_http(profile["http"], dump_dir)),
                    ("wall", lambda: bench_wall(profile["wall"], dump_dir)),
                    ("scrape", lambda: bench_scrape(profile["scrape"], dump_dir))]
        for name, bench in sections:
            if name in args.skip:
                result[name] = "skipped (--skip)"
                continue
            _progress(f"[{time.monotonic() - started:5.0f}s] {name} ...")
            section_started = time.monotonic()
            try:
                result[name] = bench()
            except BenchError as exc:
                failed = True
                result[name] = f"error: {exc}"
                _progress(f"{name} failed: {exc}")
            result.setdefault("section_s", {})[name] = time.monotonic() - section_started
        leftovers = sorted(p.name for p in dump_dir.iterdir())
    result["environment"]["load_after"] = list(os.getloadavg())
    result["dump_dir_leftovers"] = leftovers  # dumps written during a benchmark would be a finding
    result["elapsed_s"] = time.monotonic() - started
    cg, idle = result.get("callgrind"), result.get("idle")
    wall, http, httpcg = result.get("wall"), result.get("http"), result.get("httpcg")
    if isinstance(httpcg, dict):
        httpcg["wrk_estimate"] = _http_wrk_estimate(httpcg, http)
    result["verdicts"] = {
        "wall_ratio": None if not isinstance(wall, dict) else _wall_verdict(wall),
        "step_ratio": None if not isinstance(cg, dict) else cg["ratio"] <= TARGET_STEP_RATIO,
        "idle_cpu": None if not isinstance(idle, dict) else idle["with"]["cpu_ms_per_s"] <= TARGET_IDLE_MS,
        "http_rps": None if not isinstance(http, dict) else _http_verdict(http),
        "http_instructions": None if not isinstance(httpcg, dict) else _http_cg_verdict(httpcg, http),
        "scrape_p95": None if not isinstance(result.get("scrape"), dict) else _scrape_verdict(result["scrape"]),
    }
    json_path = Path(args.json) if args.json else RESULTS
    json_path.parent.mkdir(parents=True, exist_ok=True)
    result["json_path"] = str(json_path)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    if leftovers:
        print(f"note: files were left in the dump directory during the run: {leftovers}")
    if failed:
        return 1
    verdicts = result["verdicts"]
    if args.check and (verdicts["step_ratio"] is False or verdicts["idle_cpu"] is False
                       or verdicts["http_instructions"] is False or verdicts["scrape_p95"] is False
                       or str(verdicts["wall_ratio"]).startswith("MISSED")
                       or str(verdicts["http_rps"]).startswith("MISSED")):
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}", description=PACKAGE_DOC.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (about four minutes)")
    parser.add_argument("--pairs", type=int, default=0, help="number of with/without wall-clock pairs")
    parser.add_argument("--skip", action="append", default=[], choices=("wall", "callgrind", "idle", "hooks", "httpcg", "http", "scrape"),
                        help="skip a figure (repeatable)")
    parser.add_argument("--json", help=f"where to write the JSON result (default {RESULTS.relative_to(REPO)})")
    parser.add_argument("--check", action="store_true",
                        help="exit 3 if a target is missed (wall clock, HTTP: only if the whole IQR misses)")
    # Worker-side options (the driver passes them to its subprocesses).
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--with-loopwatch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dump-dir", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=HOOK_VARIANTS, default="none", help=argparse.SUPPRESS)
    for name, kind in (("rounds", int), ("tasks", int), ("steps", int), ("chains", int), ("chain-len", int),
                       ("seconds", float), ("warmup", float), ("callbacks", int), ("debug-divisor", int),
                       ("cg-small", int), ("cg-large", int), ("marker", int), ("count-iterations", int)):
        parser.add_argument(f"--{name}", type=kind, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    return run_driver(args)
