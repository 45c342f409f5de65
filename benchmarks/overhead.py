#!/usr/bin/env python3
"""loopwatch overhead benchmark: the same workloads with and without ``loopwatch.install()``, side by side.

    python benchmarks/overhead.py            # full run (about 10 minutes on 2 cores)
    python benchmarks/overhead.py --quick    # short run (about 4 minutes)

Six figures, each a comparison measured in the same run (see benchmarks/README.md):

1. wall clock of a callback-heavy workload (tasks doing ``await asyncio.sleep(0)`` plus ``call_soon``
   chains), in interleaved with/without pairs, each run in a fresh process: median ratio and spread;
2. instructions per await-step on the loop thread, counted by ``valgrind --tool=callgrind
   --separate-threads=yes`` as the difference between two workload sizes (start-up cancels), with the
   periodic parts parked (valgrind slows time ~50x and the probe's work is time-based) and the
   per-iteration selector wrapper active;
3. idle CPU: an app that only sleeps, with loopwatch at its defaults and ``/metrics`` scraped once a
   second, versus the same app without loopwatch (CPU ms per wall second of the whole process);
4. the slow-callback hook's cost per callback (trivial ``call_soon`` callbacks, 1 and 20 per loop
   iteration): callgrind instructions and wall ns per callback without loopwatch, with its defaults
   (``slow_callback_mode="auto"``: selector wrapper), with ``slow_callback_mode="exact"``
   (``Handle._run`` wrapped) and under asyncio debug mode;
5. requests/s of a small aiohttp JSON service on loopback, loaded by ``wrk`` from a separate process,
   with and without loopwatch, in interleaved pairs of fresh server processes (plus the loop iterations
   per request at that load, from a separate counting server);
6. the same service's instructions per request on the loop thread under callgrind, at capacity and at
   low load, with loop iterations per request (``epoll_wait`` calls): the ≤ 1% HTTP verdict.

The table goes to stdout (progress to stderr); the JSON result to ``benchmarks/results/latest.json``.
``--check`` makes the exit status 3 when a target is missed (the wall-clock ones only when their whole
interquartile range is on the wrong side).  The script is also its own
worker: ``--worker wall|steps|idle|hooks|http`` is what the subprocesses run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "latest.json"
RESULT_PREFIX = "RESULT "
READY_PREFIX = "READY "

# Targets from DESIGN.md section 7.
TARGET_STEP_RATIO = 1.02  # default install: <= 2% on the callback-heavy benchmark
TARGET_IDLE_MS = 3.0  # idle app, scraped once a second: <= 3 ms of CPU per wall second (goal 2; issue 10)
TARGET_ONE_CALLBACK = 0.05  # one trivial callback per loop iteration: <= 5% instructions (goal 2%; issue 10)
TARGET_HTTP_COST = 0.01  # HTTP service under load: defaults cost <= 1% of requests/s (issue 3)

# Valgrind slows time ~50x, and loopwatch's periodic and time-based parts would fire ~50x more often per
# step than in real life: under callgrind they are parked (the probe) or scaled by 50 (the slow-callback
# threshold, so that an iteration slowed by valgrind does not switch exact timing on).  The per-iteration
# selector wrapper stays active: it is what figures 2 and 4 measure.
CALLGRIND_PARKED: dict[str, Any] = {"probe_interval": 60, "faulthandler": False, "slow_callback_threshold": 5.0,
                                    "gil_probe_interval": 60}
# auto-py: without the C accelerator; timer: no loopwatch, one timer pending far in the future (as the probe's
# is): asyncio then checks its timer heap on every iteration -- part of what "auto" pays, and what any app
# with a pending sleep or timeout pays anyway
HOOK_VARIANTS = ("none", "timer", "auto", "auto-py", "exact", "debug")
HOOK_SHAPES = (1, 20)  # concurrent call_soon chains = callbacks per loop iteration
MARKER = "getsid"  # callgrind --dump-before=getsid: os.getsid(0) separates the measured segments

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
    },
    "full": {
        "wall": {"pairs": 24, "rounds": 5, "tasks": 100, "steps": 2500, "chains": 20, "chain_len": 5000},
        "callgrind": {"tasks": 100, "small": 100, "large": 1000, "repeat": 2},
        "idle": {"seconds": 30.0},
        "hooks": {"sets": 6, "rounds": 3, "callbacks": 100000, "debug_divisor": 20,
                  "cg_small": 5000, "cg_large": 25000},
        "http": {"pairs": 6, "slices": 8, "seconds": 1, "warmup": 2, "connections": 16},
        "httpcg": {"warmup": 320, "load": 4800, "sparse": 1000},
    },
}


# =====================================================================================================
# Workers (run in fresh subprocesses)
# =====================================================================================================

def _install(**options: Any) -> Any:
    import loopwatch

    return loopwatch.install(**options)


def _install_defaults(dump_dir: str) -> Any:
    """``install()`` at its defaults, the HTTP exporter included (its thread wakes every 0.5 s to poll
    for shutdown), on a free loopback port instead of 0.0.0.0:9320."""
    import loopwatch

    for _ in range(20):  # a free port can be taken between finding and binding it: retry
        agent = _install(metrics_port=_free_port(), metrics_addr="127.0.0.1", dump_dir=dump_dir)
        if agent.metrics_url is not None:
            return agent
        loopwatch.uninstall()
    raise RuntimeError("could not start the loopwatch exporter on a free port")


def _loopwatch_state(agent: Any, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    """What the run measured: is the selector wrapped (the default per-iteration hook), is exact timing
    (``Handle._run`` wrapped) on, and how many slow callbacks were recorded (each one switches exact
    timing on for a while in ``auto`` mode).  ``None`` where this loopwatch has no such part."""
    import asyncio.events as events

    state: dict[str, Any] = {"selector_wrapped": None, "exact_on": None, "slow_callbacks": None}
    try:
        from loopwatch import _slow
    except ImportError:
        return state
    selector = getattr(loop, "_selector", None)
    select_method = getattr(selector, "select", None)
    state["selector_wrapped"] = (type(getattr(selector, "_selector", None)).__name__ == "PollClock"  # C: epoll
                                 or type(select_method).__name__ == "SelectClock"  # C: select()
                                 or "PySelectClock" in getattr(select_method, "__qualname__", ""))
    state["exact_on"] = events.Handle.__dict__.get("_run") is not _slow._original_run
    try:
        state["slow_callbacks"] = sum(value for counts in agent.slow.counts.values() for _, value in counts.items())
    except Exception:  # noqa: BLE001 - internals of the checkout; the figure does not depend on them
        pass
    return state


async def _stepper(steps: int) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)


async def callback_heavy(tasks: int, steps: int, chains: int, chain_len: int) -> None:
    """``tasks`` tasks doing ``steps`` ``sleep(0)`` steps, interleaved with ``chains`` call_soon chains."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    remaining = chains

    def link(n: int) -> None:
        nonlocal remaining
        if n:
            loop.call_soon(link, n - 1)
            return
        remaining -= 1
        if not remaining:
            done.set_result(None)

    for _ in range(chains):
        loop.call_soon(link, chain_len)
    await asyncio.gather(*(_stepper(steps) for _ in range(tasks)))
    if chains:
        await done


def worker_wall(args: argparse.Namespace) -> dict[str, Any]:
    """One run of figure 1: install (or not), warm up, then time ``rounds`` rounds of the workload."""

    async def main() -> dict[str, Any]:
        agent = _install_defaults(args.dump_dir) if args.with_loopwatch else None
        await callback_heavy(args.tasks, max(1, args.steps // 10), args.chains, max(1, args.chain_len // 10))
        walls, cpus = [], []
        for _ in range(args.rounds):
            w0, c0 = time.perf_counter(), time.process_time()
            await callback_heavy(args.tasks, args.steps, args.chains, args.chain_len)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        state = _loopwatch_state(agent, asyncio.get_running_loop()) if agent is not None else None
        return {"wall": walls, "cpu": cpus, "state": state}

    return asyncio.run(main())


def worker_steps(args: argparse.Namespace) -> dict[str, Any]:
    """One run of figure 2 (under callgrind): ``tasks`` x ``steps`` await-steps, periodic parts parked."""

    async def main() -> dict[str, Any] | None:
        agent = None
        if args.with_loopwatch:
            # Valgrind slows time ~50x: park everything periodic that can be parked, so that the count
            # is the per-step cost (the watchdog thread still ticks, on its own thread).  The selector
            # wrapper (per loop iteration) stays: it is part of the per-step cost.
            agent = _install(metrics_port=0, dump_dir=args.dump_dir, **CALLGRIND_PARKED)
        await asyncio.gather(*(_stepper(args.steps) for _ in range(args.tasks)))
        return _loopwatch_state(agent, asyncio.get_running_loop()) if agent is not None else None

    state = asyncio.run(main())
    return {"steps": args.tasks * args.steps, "state": state}


async def call_soon_chains(chains: int, callbacks: int) -> int:
    """``chains`` concurrent ``call_soon`` chains of trivial callbacks, ``callbacks`` in all.

    Every loop iteration runs one callback of each chain: ``chains`` callbacks per iteration.  Returns
    the number of chain callbacks run."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    per_chain = max(1, callbacks // chains)
    remaining = chains

    def link(n: int) -> None:
        nonlocal remaining
        if n > 1:
            loop.call_soon(link, n - 1)
            return
        remaining -= 1
        if not remaining:
            done.set_result(None)

    for _ in range(chains):
        loop.call_soon(link, per_chain)
    await done
    return chains * per_chain


def _hook_variant(variant: str, dump_dir: str, under_valgrind: bool) -> Any:
    """Set up figure 4's variant in the running loop; the agent for loopwatch variants."""
    if variant in ("auto", "auto-py", "exact"):
        options: dict[str, Any] = {"metrics_port": 0, "dump_dir": dump_dir}
        if under_valgrind:
            options.update(CALLGRIND_PARKED)
        if variant == "exact":
            options["slow_callback_mode"] = "exact"
        if variant == "auto-py":
            options["accelerator"] = False
        return _install(**options)  # no exporter: this figure is about the per-callback hooks
    if variant == "timer":
        asyncio.get_running_loop().call_later(3600, lambda: None)
        return None
    if variant == "debug":
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        if under_valgrind:  # same scaling as loopwatch's threshold: no slow-callback warnings from valgrind
            loop.slow_callback_duration = CALLGRIND_PARKED["slow_callback_threshold"]
    elif variant != "none":
        raise ValueError(f"unknown variant {variant!r}")
    return None


def worker_hooks(args: argparse.Namespace) -> dict[str, Any]:
    """Figure 4: trivial call_soon callbacks at 1 and 20 per iteration, in one variant.

    Wall mode: ns per callback (median of ``rounds`` rounds) per shape.  Marker mode (under callgrind
    with ``--dump-before=getsid``): segments of ``cg_small`` and ``cg_large`` callbacks per shape, each
    followed by ``os.getsid(0)``, so that callgrind dumps the count of each segment separately."""
    divisor = args.debug_divisor if args.variant == "debug" and args.debug_divisor else 1

    async def main() -> dict[str, Any]:
        agent = _hook_variant(args.variant, args.dump_dir, under_valgrind=bool(args.marker))
        loop = asyncio.get_running_loop()
        out: dict[str, Any] = {"variant": args.variant, "divisor": divisor}
        if args.marker:
            marks = 0

            def mark() -> None:
                nonlocal marks
                os.getsid(0)
                marks += 1

            for chains in HOOK_SHAPES:  # warm-up, counted in the first dump with start-up
                await call_soon_chains(chains, args.cg_small // divisor)
            mark()
            segments = []
            for chains in HOOK_SHAPES:
                for size in (args.cg_small, args.cg_large):
                    done = await call_soon_chains(chains, size // divisor)
                    mark()
                    segments.append({"chains": chains, "callbacks": done})
            out.update(segments=segments, marks=marks)
        else:
            ns: dict[str, float] = {}
            for chains in HOOK_SHAPES:
                n = args.callbacks // divisor
                await call_soon_chains(chains, n // 10)
                per_callback = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    done = await call_soon_chains(chains, n)
                    per_callback.append((time.perf_counter() - t0) / done)
                ns[str(chains)] = statistics.median(per_callback) * 1e9
            out["ns_per_callback"] = ns
        out["state"] = _loopwatch_state(agent, loop) if agent is not None else None
        return out

    return asyncio.run(main())


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_http(args: argparse.Namespace) -> dict[str, Any]:
    """Figures 5 and 6: an aiohttp app answering ``GET /`` with a small JSON body, until a line on stdin.

    Prints ``READY {"port", "metrics_url"}`` once it listens on 127.0.0.1.  With loopwatch: installed at
    its defaults, the exporter on a free loopback port.  With ``--marker 1`` (figure 6, under callgrind):
    ``GET /mark`` calls ``os.getsid(0)`` to cut callgrind's count, and loopwatch's periodic parts are
    parked as in figure 2 (no exporter: nothing scrapes it)."""
    from aiohttp import web

    async def main() -> dict[str, Any]:
        agent, metrics_url = None, None
        if args.with_loopwatch and args.marker:
            agent = _install(metrics_port=0, dump_dir=args.dump_dir, **CALLGRIND_PARKED)
        elif args.with_loopwatch:
            agent = _install_defaults(args.dump_dir)
            metrics_url = agent.metrics_url
        body = {"status": "ok", "service": "bench", "items": [1, 2, 3]}

        async def handle(request: web.Request) -> web.Response:
            return web.json_response(body)

        async def mark(request: web.Request) -> web.Response:
            os.getsid(0)
            return web.json_response({"mark": True})

        iterations = [0]

        async def count(request: web.Request) -> web.Response:
            return web.json_response({"iterations": iterations[0]})

        app = web.Application()
        app.router.add_get("/", handle)
        if args.marker:
            app.router.add_get("/mark", mark)
        if args.count_iterations:  # figure 5's calibration server (never with loopwatch): counts select() calls
            selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
            original = selector.select

            def select(timeout: float | None = None) -> Any:
                iterations[0] += 1
                return original(timeout)

            selector.select = select
            app.router.add_get("/iterations", count)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(runner, sock, backlog=1024)
        await site.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def wait_for_stop() -> None:  # blocked in read(): holds no GIL, never wakes the loop
            sys.stdin.readline()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_stop, name="bench-stdin", daemon=True).start()
        print(READY_PREFIX + json.dumps({"port": sock.getsockname()[1], "metrics_url": metrics_url}), flush=True)
        await stop.wait()
        state = _loopwatch_state(agent, loop) if agent is not None else None
        await runner.cleanup()
        return {"state": state}

    return asyncio.run(main())


WORKERS = {"wall": worker_wall, "steps": worker_steps, "idle": worker_idle, "hooks": worker_hooks,
           "http": worker_http}


def run_worker(args: argparse.Namespace) -> int:
    result = WORKERS[args.worker](args)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# =====================================================================================================
# Driver
# =====================================================================================================

class BenchError(RuntimeError):
    pass


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _worker_cmd(worker: str, with_loopwatch: bool, dump_dir: Path, **params: Any) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--dump-dir", str(dump_dir)]
    if with_loopwatch:
        cmd.append("--with-loopwatch")
    for name, value in params.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def _parse_result(output: str, what: str) -> dict[str, Any]:
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise BenchError(f"{what}: no result line; output:\n{output[-3000:]}")


def _run(cmd: list[str], what: str, timeout: float, env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, env=env or _child_env())
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: timed out after {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise BenchError(f"{what}: exit status {proc.returncode}; output:\n{proc.stdout[-3000:]}")
    return proc.stdout


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1]}


def _summarize_states(states: list[dict[str, Any] | None]) -> dict[str, Any]:
    """How many "with" runs measured the default per-iteration hook, and how many saw exact timing."""
    known = [st for st in states if st]
    return {"runs": len(states),
            "selector_wrapped": sum(1 for st in known if st.get("selector_wrapped")),
            "exact_on_at_end": sum(1 for st in known if st.get("exact_on")),
            "with_slow_callbacks": sum(1 for st in known if st.get("slow_callbacks"))}


def _state_notes(name: str, summary: dict[str, Any] | None) -> list[str]:
    if not summary:
        return []
    notes = []
    if summary["selector_wrapped"] < summary["runs"]:
        notes.append(f"note: {summary['runs'] - summary['selector_wrapped']} of {summary['runs']} {name} runs "
                     f"had no selector wrapper (not the default per-iteration hook)")
    if summary["with_slow_callbacks"] or summary["exact_on_at_end"]:
        notes.append(f"note: {summary['with_slow_callbacks']} of {summary['runs']} {name} runs saw a slow "
                     f"iteration (> slow_callback_threshold), which switches exact timing on for 60 s; "
                     f"{summary['exact_on_at_end']} ended with it on")
    return notes


# -- figure 1 ---------------------------------------------------------------------------------------

def bench_wall(cfg: dict[str, Any], dump_dir: Path) -> dict[str, Any]:
    params = {k: cfg[k] for k in ("rounds", "tasks", "steps", "chains", "chain_len")}
    pairs = []
    states: list[dict[str, Any] | None] = []
    for i in range(cfg["pairs"]):
        order = (False, True) if i % 2 == 0 else (True, False)  # alternate who goes first
        runs: dict[bool, dict[str, Any]] = {}
        for with_lw in order:
            what = f"wall pair {i + 1} {'with' if with_lw else 'without'}"
            runs[with_lw] = _parse_result(_run(_worker_cmd("wall", with_lw, dump_dir, **params), what, 120), what)
        without_wall, with_wall = (statistics.median(runs[w]["wall"]) for w in (False, True))
        without_cpu, with_cpu = (statistics.median(runs[w]["cpu"]) for w in (False, True))
        pairs.append({"first": "with" if order[0] else "without",
                      "without_s": without_wall, "with_s": with_wall, "ratio": with_wall / without_wall,
                      "without_cpu_s": without_cpu, "with_cpu_s": with_cpu,
                      "cpu_ratio": with_cpu / without_cpu if without_cpu > 0 else None})
        _progress(f"  pair {i + 1:2d}/{cfg['pairs']}: without {without_wall * 1e3:7.1f} ms  "
                  f"with {with_wall * 1e3:7.1f} ms  ratio {with_wall / without_wall:.3f}")
        states.append(runs[True].get("state"))
    callbacks = cfg["tasks"] * cfg["steps"] + cfg["chains"] * (cfg["chain_len"] + 1)
    cpu_ratios = [p["cpu_ratio"] for p in pairs if p["cpu_ratio"] is not None]
    return {
        "workload": params,
        "with_state": _summarize_states(states),
        "pairs": pairs,
        "callbacks_per_round": callbacks,
        "without_s": _quantiles([p["without_s"] for p in pairs]),
        "with_s": _quantiles([p["with_s"] for p in pairs]),
        "ratio": _quantiles([p["ratio"] for p in pairs]),
        "cpu_ratio": _quantiles(cpu_ratios) if cpu_ratios else None,
    }


# -- figure 2 ---------------------------------------------------------------------------------------

_THREAD_FILE = re.compile(r"^callgrind\.out\.(\d+)-(\d+)$")
_TOTAL_LINE = re.compile(r"^(?:summary|totals):\s+(\d+)")


def parse_callgrind_dir(directory: Path) -> dict[int, int]:
    """{thread number: instructions} from ``callgrind.out.<pid>-<thread>`` files (thread 1 = main)."""
    per_thread: dict[int, int] = {}
    for path in directory.iterdir():
        match = _THREAD_FILE.match(path.name)
        if not match:
            continue
        per_thread[int(match.group(2))] = _callgrind_total(path)
    return per_thread


def _callgrind_total(path: Path) -> int:
    """The instruction count of one callgrind output file (its ``totals:`` or ``summary:`` line)."""
    total = None
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            found = _TOTAL_LINE.match(line)
            if found:
                total = int(found.group(1))
                if line.startswith("totals:"):
                    break
    if total is None:
        raise BenchError(f"{path}: no summary:/totals: line")
    return total


def _callgrind_run(with_lw: bool, steps: int, tasks: int, dump_dir: Path, work: Path, tag: str) -> dict[str, Any]:
    out_dir = work / tag
    out_dir.mkdir()
    cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes",
           f"--callgrind-out-file={out_dir}/callgrind.out.%p",
           *_worker_cmd("steps", with_lw, dump_dir, tasks=tasks, steps=steps)]
    what = f"callgrind {tag}"
    result = _parse_result(_run(cmd, what, 600, env=_child_env(PYTHONHASHSEED="0")), what)
    _check_parked_state(result.get("state"), what, exact=False)
    threads = parse_callgrind_dir(out_dir)
    if 1 not in threads:
        raise BenchError(f"{what}: no callgrind file for thread 1 (the loop thread) in {out_dir}")
    return {"with": with_lw, "steps_per_task": steps, "tasks": tasks, "main_thread_instructions": threads[1],
            "other_threads_instructions": {str(k): v for k, v in sorted(threads.items()) if k != 1}}


def _check_parked_state(state: dict[str, Any] | None, what: str, exact: bool) -> None:
    """Under callgrind the figure must measure the per-iteration hook, and exactly one timing mode."""
    if not state:
        return
    if state["selector_wrapped"] is False:
        raise BenchError(f"{what}: the loop's selector was not wrapped: the run did not measure loopwatch's "
                         f"default per-iteration hook")
    if state["exact_on"] is not None and state["exact_on"] != exact:
        raise BenchError(f"{what}: exact timing (Handle._run wrapped) was {'off' if exact else 'on'} at the end "
                         f"of the run ({state['slow_callbacks']} slow callbacks recorded): the count mixes modes")
    if not exact and state["slow_callbacks"]:
        raise BenchError(f"{what}: {state['slow_callbacks']} slow callbacks recorded under valgrind "
                         f"(threshold {CALLGRIND_PARKED['slow_callback_threshold']} s): exact timing was on "
                         f"for part of the run")


def bench_callgrind(cfg: dict[str, Any], dump_dir: Path, work: Path) -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        raise BenchError("valgrind not found on PATH (make bench installs it: tools/system-packages bench)")
    jobs = []
    for rep in range(cfg["repeat"]):
        for with_lw in (False, True):
            for size in ("small", "large"):
                tag = f"{'with' if with_lw else 'without'}-{size}-{rep}"
                jobs.append((with_lw, cfg[size], cfg["tasks"], dump_dir, work, tag))
    # Instruction counts do not depend on timing, so two runs at a time is fine on 2 cores.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _callgrind_run(*job), jobs))
    by_key = {(r["with"], r["steps_per_task"], i // 4): r for i, r in enumerate(results)}
    delta_steps = (cfg["large"] - cfg["small"]) * cfg["tasks"]
    out: dict[str, Any] = {"workload": cfg, "delta_steps": delta_steps, "runs": results}
    for with_lw, name in ((False, "without"), (True, "with")):
        per_step = [(by_key[(with_lw, cfg["large"], rep)]["main_thread_instructions"]
                     - by_key[(with_lw, cfg["small"], rep)]["main_thread_instructions"]) / delta_steps
                    for rep in range(cfg["repeat"])]
        out[f"{name}_per_step"] = statistics.median(per_step)
        out[f"{name}_per_step_all"] = per_step
    out["ratio"] = out["with_per_step"] / out["without_per_step"]
    out["extra_per_step"] = out["with_per_step"] - out["without_per_step"]
    return out


# -- figure 3 ---------------------------------------------------------------------------------------

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


# -- figure 4 ---------------------------------------------------------------------------------------

_DUMP_FILE = re.compile(r"^callgrind\.out\.(\d+)\.(\d+)-(\d+)$")  # <pid>.<dump number>-<thread>


def _hooks_callgrind_run(variant: str, cfg: dict[str, Any], dump_dir: Path, work: Path) -> dict[str, Any]:
    """One variant under callgrind; instructions per callback from the segments between markers."""
    out_dir = work / f"hooks-{variant}"
    out_dir.mkdir()
    params = {"variant": variant, "marker": 1, "cg_small": cfg["cg_small"], "cg_large": cfg["cg_large"],
              "debug_divisor": cfg["debug_divisor"]}
    cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--dump-before={MARKER}",
           f"--callgrind-out-file={out_dir}/callgrind.out.%p", *_worker_cmd("hooks", False, dump_dir, **params)]
    what = f"callgrind hooks {variant}"
    result = _parse_result(_run(cmd, what, 600, env=_child_env(PYTHONHASHSEED="0")), what)
    if variant in ("auto", "auto-py", "exact"):
        _check_parked_state(result.get("state"), what, exact=variant == "exact")
    dumps: dict[int, int] = {}
    for path in out_dir.iterdir():
        match = _DUMP_FILE.match(path.name)
        if match and int(match.group(3)) == 1:  # thread 1: the loop thread
            dumps[int(match.group(2))] = _callgrind_total(path)
    if sorted(dumps) != list(range(1, result["marks"] + 1)):
        raise BenchError(f"{what}: expected {result['marks']} dumps before {MARKER}() on thread 1, found "
                         f"{sorted(dumps)} (does something else call {MARKER}()?)")
    segments = result["segments"]
    for i, segment in enumerate(segments):
        segment["instructions"] = dumps[i + 2]  # dump 1 is start-up and warm-up
    per_callback = {}
    for chains in HOOK_SHAPES:
        small, large = (seg for seg in segments if seg["chains"] == chains)
        per_callback[str(chains)] = ((large["instructions"] - small["instructions"])
                                     / (large["callbacks"] - small["callbacks"]))
    return {"variant": variant, "divisor": result["divisor"], "segments": segments,
            "per_callback": per_callback, "state": result.get("state")}


def bench_hooks(cfg: dict[str, Any], dump_dir: Path, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"workload": cfg, "shapes": list(HOOK_SHAPES), "variants": list(HOOK_VARIANTS)}
    if shutil.which("valgrind") is None:
        out["callgrind"] = "error: valgrind not found on PATH (make bench installs it: tools/system-packages bench)"
    else:
        # Instruction counts do not depend on timing, so two runs at a time is fine on 2 cores.
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            try:
                runs = list(pool.map(lambda v: _hooks_callgrind_run(v, cfg, dump_dir, work), HOOK_VARIANTS))
            except BenchError as exc:
                runs = None
                out["callgrind"] = f"error: {exc}"
                _progress(f"hooks callgrind failed: {exc}")
        if runs is not None:
            base = runs[0]["per_callback"]
            out["callgrind"] = {
                "runs": runs,
                "per_callback": {r["variant"]: r["per_callback"] for r in runs},
                "extra_per_callback": {r["variant"]: {k: r["per_callback"][k] - base[k] for k in base}
                                       for r in runs},
            }
    sets = []
    states: list[dict[str, Any] | None] = []
    params = {k: cfg[k] for k in ("rounds", "callbacks", "debug_divisor")}
    for i in range(cfg["sets"]):
        shift = i % len(HOOK_VARIANTS)
        order = HOOK_VARIANTS[shift:] + HOOK_VARIANTS[:shift]  # rotate who goes first
        runs_ns: dict[str, dict[str, float]] = {}
        for variant in order:
            what = f"hooks set {i + 1} {variant}"
            result = _parse_result(_run(_worker_cmd("hooks", False, dump_dir, variant=variant, **params),
                                        what, 120), what)
            runs_ns[variant] = result["ns_per_callback"]
            if variant == "auto":
                states.append(result.get("state"))
        sets.append({"order": list(order), "ns_per_callback": runs_ns})
        _progress(f"  set {i + 1:2d}/{cfg['sets']}: " + "  ".join(
            f"{v} " + "/".join(f"{runs_ns[v][str(c)]:,.0f}" for c in HOOK_SHAPES) for v in HOOK_VARIANTS)
            + " ns/callback")
    ns = {v: {str(c): _quantiles([st["ns_per_callback"][v][str(c)] for st in sets]) for c in HOOK_SHAPES}
          for v in HOOK_VARIANTS}
    delta = {v: {str(c): _quantiles([st["ns_per_callback"][v][str(c)] - st["ns_per_callback"]["none"][str(c)]
                                     for st in sets]) for c in HOOK_SHAPES} for v in HOOK_VARIANTS}
    out["wall"] = {"sets": sets, "ns_per_callback": ns, "delta_ns": delta, "auto_state": _summarize_states(states)}
    return out


# -- figure 5 ---------------------------------------------------------------------------------------

_WRK_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_WRK_REQUESTS = re.compile(r"(\d+) requests in ")
_WRK_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_BUSY_SAMPLE = re.compile(r'^\w+_event_loop_busy_seconds_total\{[^}]*loop="main"[^}]*\} (\S+)$', re.M)


def ensure_wrk() -> str:
    """The ``wrk`` executable (installed by ``make bench``'s setup step, ``tools/system-packages``)."""
    path = shutil.which("wrk")
    if path:
        return path
    raise BenchError("wrk (the HTTP load generator) is needed for this figure and is not on PATH: run "
                     "`make bench` (its setup step installs it: tools/system-packages bench), or "
                     "`apt-get install wrk`; or leave the figure out with --skip http")


class _HttpServer:
    """A figure-5 server process (``--worker http``): started, read in the background, stopped via stdin."""

    def __init__(self, with_lw: bool, dump_dir: Path, prefix: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, **params: Any) -> None:
        self.name = "with" if with_lw else "without"
        self.lines: list[str] = []
        self.ready: dict[str, Any] | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen([*prefix, *_worker_cmd("http", with_lw, dump_dir, **params)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env or _child_env())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)
            if self.ready is None and line.startswith(READY_PREFIX):
                self.ready = json.loads(line[len(READY_PREFIX):])
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        self._ready.wait(timeout)
        if self.ready is None:
            raise BenchError(f"http server {self.name}: no READY line; output:\n" + "".join(self.lines)[-3000:])
        return self.ready

    def stop(self, timeout: float = 30) -> dict[str, Any]:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"http server {self.name}: did not stop") from None
        self._reader.join(10)
        output = "".join(self.lines)
        if self.proc.returncode != 0:
            raise BenchError(f"http server {self.name}: exit status {self.proc.returncode}; output:\n{output[-3000:]}")
        return _parse_result(output, f"http server {self.name}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _wrk_cmd(wrk: str, port: int, seconds: int, connections: int) -> list[str]:
    return [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", f"http://127.0.0.1:{port}/"]


def _wrk(wrk: str, port: int, cfg: dict[str, Any], what: str) -> dict[str, Any]:
    output = _run(_wrk_cmd(wrk, port, cfg["seconds"], cfg["connections"]), what, cfg["seconds"] + 60)
    rps, requests = _WRK_RPS.search(output), _WRK_REQUESTS.search(output)
    if rps is None or requests is None:
        raise BenchError(f"{what}: cannot read wrk's output:\n{output[-2000:]}")
    errors = _WRK_SOCKET_ERRORS.search(output)
    socket_errors = sum(int(n) for n in errors.groups()) if errors else 0
    non2xx = _WRK_NON2XX.search(output)
    bad = int(non2xx.group(1)) if non2xx else 0
    if bad or socket_errors > int(requests.group(1)) // 1000:
        raise BenchError(f"{what}: {bad} non-2xx responses, {socket_errors} socket errors:\n{output[-2000:]}")
    return {"rps": float(rps.group(1)), "requests": int(requests.group(1)), "socket_errors": socket_errors}


def _scrape_busy(url: str) -> float | None:
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    found = _BUSY_SAMPLE.search(body)
    return float(found.group(1)) if found else None


def _process_cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds so far of every thread of ``pid`` (``/proc/<pid>/task/*/schedstat``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that just exited
            pass
    return total


def _slice_order(pair: int, slices: int) -> list[bool]:
    """ABBA ABBA ... (B first in odd pairs): who is loaded in each slice; True = with loopwatch."""
    first = pair % 2 == 1
    return [first if k % 4 in (0, 3) else not first for k in range(slices)]


def _http_iterations_per_request(wrk: str, cfg: dict[str, Any], dump_dir: Path) -> dict[str, Any]:
    """Loop iterations per request under this figure's wrk load, natively: a separate server without
    loopwatch that counts its selector's select() calls (kept out of the pairs: counting costs a little).
    Figure 6 multiplies it by its extra instructions per iteration."""
    server = _HttpServer(False, dump_dir, count_iterations=1)
    try:
        port = server.wait_ready(60)["port"]
        url = f"http://127.0.0.1:{port}/iterations"

        def iterations() -> int:
            return int(json.loads(urllib.request.urlopen(url, timeout=10).read())["iterations"])

        _run(_wrk_cmd(wrk, port, cfg["warmup"], cfg["connections"]), "http calibration warm-up", cfg["warmup"] + 60)
        before = iterations()
        load = _wrk(wrk, port, {**cfg, "seconds": cfg["seconds"] * 2}, "http calibration")
        after = iterations()
        server.stop()
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"http calibration: {exc!r}") from None
    finally:
        server.kill()
    return {"requests": load["requests"], "iterations": after - before,
            "iterations_per_request": (after - before) / load["requests"]}


def bench_http(cfg: dict[str, Any], dump_dir: Path) -> dict[str, Any]:
    if importlib.util.find_spec("aiohttp") is None:
        raise BenchError(f"aiohttp is not installed for {sys.executable} (it is in the dev extra: "
                         f"pip install -e '.[dev]')")
    if not Path("/proc/self/task").is_dir():
        raise BenchError("needs Linux's /proc/<pid>/task/*/schedstat for the servers' CPU time")
    wrk = ensure_wrk()
    pairs = []
    states = []
    for i in range(cfg["pairs"]):
        servers: dict[bool, _HttpServer] = {}
        try:
            for with_lw in (False, True):  # fresh processes for every pair; the idle one costs nothing
                servers[with_lw] = _HttpServer(with_lw, dump_dir)
            ports = {w: servers[w].wait_ready(60)["port"] for w in (False, True)}
            warm = [subprocess.Popen(_wrk_cmd(wrk, ports[w], cfg["warmup"], cfg["connections"]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for w in (False, True)]
            for proc in warm:  # both warm up at once: specialization, lazy imports, connection set-up
                proc.wait(timeout=cfg["warmup"] + 60)
            slices = []
            busy = 0.0
            busy_wall = 0.0
            metrics_url = servers[True].ready["metrics_url"]  # type: ignore[index]
            for k, with_lw in enumerate(_slice_order(i, cfg["slices"])):
                what = f"http pair {i + 1} slice {k + 1} {'with' if with_lw else 'without'}"
                busy0 = _scrape_busy(metrics_url) if with_lw else None  # scrapes stay outside the window
                t0 = time.monotonic()
                cpu0 = _process_cpu_ns(servers[with_lw].proc.pid)
                load = _wrk(wrk, ports[with_lw], cfg, what)
                load["server_cpu_s"] = (_process_cpu_ns(servers[with_lw].proc.pid) - cpu0) / 1e9
                if busy0 is not None:
                    busy1 = _scrape_busy(metrics_url)
                    if busy1 is not None:
                        busy += busy1 - busy0
                        busy_wall += time.monotonic() - t0
                slices.append({"with": with_lw, **load})
            results = {w: servers[w].stop() for w in (False, True)}
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"http pair {i + 1}: {exc!r}") from None
        finally:
            for server in servers.values():
                server.kill()
        states.append(results[True].get("state"))
        side = {}
        for with_lw in (False, True):
            mine = [sl for sl in slices if sl["with"] == with_lw]
            requests = sum(sl["requests"] for sl in mine)
            side[with_lw] = {"rps": statistics.fmean(sl["rps"] for sl in mine),
                             "cpu_us_per_request": sum(sl["server_cpu_s"] for sl in mine) / requests * 1e6}
        ratio = side[True]["rps"] / side[False]["rps"]
        cpu_ratio = side[True]["cpu_us_per_request"] / side[False]["cpu_us_per_request"]
        pairs.append({"slices": slices, "without_rps": side[False]["rps"], "with_rps": side[True]["rps"],
                      "ratio": ratio, "without_cpu_us_per_request": side[False]["cpu_us_per_request"],
                      "with_cpu_us_per_request": side[True]["cpu_us_per_request"], "cpu_ratio": cpu_ratio,
                      "with_utilization": busy / busy_wall if busy_wall else None})
        _progress(f"  pair {i + 1:2d}/{cfg['pairs']}: without {side[False]['rps']:8,.0f} req/s  "
                  f"with {side[True]['rps']:8,.0f} req/s  ratio {ratio:.3f}  CPU/request ratio {cpu_ratio:.3f}")
    utilizations = [p["with_utilization"] for p in pairs if p["with_utilization"] is not None]
    calibration = _http_iterations_per_request(wrk, cfg, dump_dir)
    _progress(f"  calibration: {calibration['iterations_per_request']:.2f} loop iterations per request under this load")
    return {
        "calibration": calibration,
        "workload": cfg,
        "with_state": _summarize_states(states),
        "pairs": pairs,
        "without_rps": _quantiles([p["without_rps"] for p in pairs]),
        "with_rps": _quantiles([p["with_rps"] for p in pairs]),
        "ratio": _quantiles([p["ratio"] for p in pairs]),
        "without_cpu_us_per_request": _quantiles([p["without_cpu_us_per_request"] for p in pairs]),
        "with_cpu_us_per_request": _quantiles([p["with_cpu_us_per_request"] for p in pairs]),
        "cpu_ratio": _quantiles([p["cpu_ratio"] for p in pairs]),
        "with_utilization": _quantiles(utilizations) if utilizations else None,
    }


# -- figure 6 ---------------------------------------------------------------------------------------

# Two load shapes for the callgrind HTTP figure.  Under valgrind the server is ~50x slower than the
# client, so each shape's batching is fixed by the client, and the counts repeat from run to run.
HTTP_CG_SHAPES: dict[str, dict[str, Any]] = {
    "load": {"connections": 16, "pause": 0.0,
             "text": "16 keep-alive connections, 16 requests sent at once and answered before the next 16: "
                     "the loop always has requests waiting (capacity: requests/s)"},
    "sparse": {"connections": 1, "pause": 0.02,
               "text": "1 connection, 20 ms pause after each answer: every request wakes an idle loop "
                       "(CPU per request at low load; no effect on capacity)"},
}
_CG_PART = re.compile(r"^callgrind\.out\.(\d+)\.(\d+)-(\d+)$")
_EPOLL_CALLS = re.compile(r"^cfn=(?:.*:)?epoll_wait(?:\s|$)")


class _HttpConnection:
    """A keep-alive HTTP/1.1 client connection that reads whole responses (Content-Length framing)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=300)
        self.buffer = b""

    def send(self, path: str) -> None:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())

    def response(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 200"):
            raise BenchError(f"HTTP client: unexpected response {lines[0]!r}")
        length = next((int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:")),
                      None)
        if length is None:
            raise BenchError(f"HTTP client: no Content-Length in {head!r}")
        while len(self.buffer) < length:
            self._read()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return body

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise BenchError("HTTP client: the server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def _drive_http(port: int, connections: int, pause: float, warmup: int, requests: int) -> None:
    """Warm up, ``GET /mark``, ``requests`` requests in rounds of ``connections``, ``GET /mark``."""
    conns = [_HttpConnection(port) for _ in range(connections)]
    try:
        def rounds(total: int) -> None:
            done = 0
            while done < total:
                batch = conns[:min(connections, total - done)]
                for conn in batch:
                    conn.send("/")
                for conn in batch:
                    conn.response()
                done += len(batch)
                if pause:
                    time.sleep(pause)

        def mark() -> None:
            conns[0].send("/mark")
            conns[0].response()

        rounds(warmup)
        mark()
        rounds(requests)
        mark()
    finally:
        for conn in conns:
            conn.close()


def _callgrind_part(directory: Path, part: int, thread: int = 1) -> Path:
    for path in directory.iterdir():
        match = _CG_PART.match(path.name)
        if match and int(match.group(2)) == part and int(match.group(3)) == thread:
            return path
    raise BenchError(f"no callgrind part {part} of thread {thread} in {directory}: "
                     f"{sorted(p.name for p in directory.iterdir())}")


def count_epoll_waits(path: Path) -> int:
    """Calls to ``epoll_wait`` in a callgrind file written with ``--compress-strings=no``: one per loop
    iteration (each ``select()`` of the loop's selector makes exactly one)."""
    calls = 0
    expect_calls = False
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if expect_calls and line.startswith("calls="):
                calls += int(line[6:].split()[0])
                expect_calls = False
            elif line.startswith("cfn="):
                expect_calls = bool(_EPOLL_CALLS.match(line))
    return calls


def _http_callgrind_run(with_lw: bool, shape: str, cfg: dict[str, Any], dump_dir: Path, work: Path) -> dict[str, Any]:
    tag = f"http-{shape}-{'with' if with_lw else 'without'}"
    what = f"callgrind {tag}"
    out_dir = work / tag
    out_dir.mkdir()
    prefix = ("valgrind", "--tool=callgrind", "--separate-threads=yes", f"--dump-before={MARKER}",
              "--compress-strings=no", f"--callgrind-out-file={out_dir}/callgrind.out.%p")
    spec = HTTP_CG_SHAPES[shape]
    server = _HttpServer(with_lw, dump_dir, prefix=prefix, env=_child_env(PYTHONHASHSEED="0"), marker=1)
    try:
        port = server.wait_ready(600)["port"]
        _drive_http(port, spec["connections"], spec["pause"], cfg["warmup"], cfg[shape])
        result = server.stop(timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{what}: {exc!r}") from None
    finally:
        server.kill()
    _check_parked_state(result.get("state"), what, exact=False)
    part = _callgrind_part(out_dir, 2)  # between the two GET /mark
    instructions = _callgrind_total(part)
    iterations = count_epoll_waits(part)
    return {"with": with_lw, "shape": shape, "requests": cfg[shape], "instructions": instructions,
            "iterations": iterations, "per_request": instructions / cfg[shape],
            "iterations_per_request": iterations / cfg[shape]}


def bench_http_callgrind(cfg: dict[str, Any], dump_dir: Path, work: Path) -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        raise BenchError("valgrind not found on PATH (make bench installs it: tools/system-packages bench)")
    if importlib.util.find_spec("aiohttp") is None:
        raise BenchError(f"aiohttp is not installed for {sys.executable} (it is in the dev extra)")
    jobs = [(with_lw, shape) for shape in HTTP_CG_SHAPES for with_lw in (False, True)]
    # Counts do not depend on timing (see HTTP_CG_SHAPES): the with/without runs of a shape go side by side.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda job: _http_callgrind_run(job[0], job[1], cfg, dump_dir, work), jobs))
    out: dict[str, Any] = {"workload": cfg, "runs": runs}
    for shape in HTTP_CG_SHAPES:
        side = {r["with"]: r for r in runs if r["shape"] == shape}
        without, with_ = side[False], side[True]
        out[shape] = {
            "without_per_request": without["per_request"], "with_per_request": with_["per_request"],
            "extra_per_request": with_["per_request"] - without["per_request"],
            "ratio": with_["per_request"] / without["per_request"],
            "without_iterations_per_request": without["iterations_per_request"],
            "with_iterations_per_request": with_["iterations_per_request"],
        }
    return out


def _http_wrk_estimate(cg: Any, http: Any) -> dict[str, float] | None:
    """Figure 6's per-iteration cost scaled to the iteration rate figure 5's wrk load makes natively."""
    if not isinstance(cg, dict) or not isinstance(http, dict) or not http.get("calibration"):
        return None
    sparse = cg["sparse"]
    per_iteration = sparse["extra_per_request"] / sparse["with_iterations_per_request"]
    iterations = http["calibration"]["iterations_per_request"]
    return {"iterations_per_request": iterations, "extra_per_iteration": per_iteration,
            "cost": iterations * per_iteration / cg["load"]["without_per_request"]}


def _http_cg_verdict(cg: dict[str, Any], http: Any) -> bool:
    """Requests/s at capacity is instructions per request under load: <= 1% more, in the load shape and,
    when figure 5 ran, at its native iteration rate."""
    estimate = _http_wrk_estimate(cg, http)
    return cg["load"]["ratio"] - 1 <= TARGET_HTTP_COST and (estimate is None or estimate["cost"] <= TARGET_HTTP_COST)


# -- report -----------------------------------------------------------------------------------------

def _verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def _wall_verdict(wall: dict[str, Any]) -> str:
    """Wall time is noisy: a verdict only when the whole interquartile range is on one side."""
    if wall["ratio"]["q3"] <= TARGET_STEP_RATIO:
        return "OK"
    if wall["ratio"]["q1"] > TARGET_STEP_RATIO:
        return "MISSED (whole IQR above)"
    return "inconclusive (IQR straddles it)"


def _parked_text() -> str:
    return ", ".join(f"{k}={v}" for k, v in CALLGRIND_PARKED.items())


_VARIANT_LABELS = {"none": "no loopwatch", "timer": "no loopwatch, 1 pending timer", "auto": "loopwatch defaults (auto)",
                   "auto-py": "defaults, pure Python (no C)",
                   "exact": 'slow_callback_mode="exact"', "debug": "asyncio debug mode"}


def _http_verdict(http: dict[str, Any]) -> str:
    """requests/s under wall-clock noise: a verdict only when the whole IQR is on one side."""
    floor = 1 - TARGET_HTTP_COST
    if http["ratio"]["q1"] >= floor:
        return "OK"
    if http["ratio"]["q3"] < floor:
        return "MISSED (whole IQR below)"
    return "inconclusive (IQR straddles it)"


def _render_hooks(hooks: Any, add: Any) -> None:
    add("4. Slow-callback hook cost per callback: trivial call_soon callbacks (chains), 1 and 20 per loop iteration")
    if not isinstance(hooks, dict):
        add(f"   not measured: {hooks}")
        return
    w = hooks["workload"]
    head = f"   {'':30}" + "".join(f"{f'{c} cb/iteration':>30}" for c in HOOK_SHAPES)
    cg = hooks.get("callgrind")
    if isinstance(cg, dict):
        add(f"   callgrind, loop thread, instructions/callback: difference of {w['cg_large']:,} and {w['cg_small']:,} "
            f"callbacks (debug mode: 1/{w['debug_divisor']} of that); {_parked_text()}")
        add(head)
        base = cg["per_callback"]["none"]
        for variant in HOOK_VARIANTS:
            cells = []
            for c in HOOK_SHAPES:
                value, extra = cg["per_callback"][variant][str(c)], cg["extra_per_callback"][variant][str(c)]
                cells.append(f"{value:,.0f}" if variant == "none"
                             else f"{value:,.0f} ({extra:+,.0f}, {100 * extra / base[str(c)]:+.1f}%)")
            add(f"   {_VARIANT_LABELS[variant]:30}" + "".join(f"{cell:>30}" for cell in cells))
    else:
        add(f"   callgrind not measured: {cg}")
    wall = hooks.get("wall")
    if isinstance(wall, dict):
        add(f"   wall clock, ns/callback: {w['callbacks']:,} callbacks/round (debug mode: 1/{w['debug_divisor']}), "
            f"median of {w['rounds']} rounds per run; {len(wall['sets'])} sets of {len(HOOK_VARIANTS)} fresh processes, "
            f"order rotated;")
        add("   no loopwatch: median [min..max]; others: extra ns per callback vs. the same set's run, median [IQR]")
        add(head)
        for variant in HOOK_VARIANTS:
            cells = []
            for c in HOOK_SHAPES:
                if variant == "none":
                    q = wall["ns_per_callback"]["none"][str(c)]
                    cells.append(f"{q['median']:,.0f} [{q['min']:,.0f}..{q['max']:,.0f}]")
                else:
                    q = wall["delta_ns"][variant][str(c)]
                    cells.append(f"{q['median']:+,.0f} [{q['q1']:+,.0f}..{q['q3']:+,.0f}]")
            add(f"   {_VARIANT_LABELS[variant]:30}" + "".join(f"{cell:>30}" for cell in cells))
        for note in _state_notes("auto", wall.get("auto_state")):
            add("   " + note)


def _render_http(http: Any, add: Any) -> None:
    add("5. HTTP service under load: aiohttp JSON endpoint on 127.0.0.1, wrk from a separate process (noisy)")
    if not isinstance(http, dict) or "ratio" not in http:
        add(f"   not measured: {http}")
        return
    w = http["workload"]
    add(f"   {len(http['pairs'])} pairs of fresh server processes (with: install() defaults + exporter), "
        f"{w['warmup']} s warm-up (both at once), then {w['slices']} slices of wrk -t1 -c{w['connections']} -d{w['seconds']}s alternating ABBA")
    add(f"   {'':28}{'median':>10}{'q1':>10}{'q3':>10}{'min':>10}{'max':>10}")
    for key, label, fmt in (("without_rps", "without (requests/s)", "{:10,.0f}"),
                            ("with_rps", "with    (requests/s)", "{:10,.0f}"),
                            ("ratio", "ratio with/without", "{:10.3f}"),
                            ("without_cpu_us_per_request", "without (server CPU us/req)", "{:10.1f}"),
                            ("with_cpu_us_per_request", "with    (server CPU us/req)", "{:10.1f}"),
                            ("cpu_ratio", "CPU/request ratio", "{:10.3f}")):
        q = http[key]
        add(f"   {label:28}" + "".join(fmt.format(q[k]) for k in ("median", "q1", "q3", "min", "max")))
    r = http["ratio"]
    add(f"   => median cost {100 * (1 - r['median']):+.1f}% of requests/s; IQR {100 * (1 - r['q3']):+.1f}% .. "
        f"{100 * (1 - r['q1']):+.1f}%   target <= {100 * TARGET_HTTP_COST:.0f}%: {_http_verdict(http)}")
    c = http["cpu_ratio"]
    add(f"   => server CPU per request (all its threads, schedstat): median {100 * (c['median'] - 1):+.1f}%; "
        f"IQR {100 * (c['q1'] - 1):+.1f}% .. {100 * (c['q3'] - 1):+.1f}%")
    calibration = http.get("calibration")
    if calibration:
        add(f"   loop iterations per request at this load, natively: {calibration['iterations_per_request']:.2f} "
            f"(a separate server without loopwatch counting its select() calls; used by figure 6)")
    util = http.get("with_utilization")
    if util:
        add(f"   loop utilization under load, as loopwatch reports it (rate of event_loop_busy_seconds_total): "
            f"median {util['median']:.2f} [{util['min']:.2f}..{util['max']:.2f}]")
    for note in _state_notes("with", http.get("with_state")):
        add("   " + note)


def _render_http_callgrind(cg: Any, add: Any, http: Any) -> None:
    add("6. HTTP service, instructions per request on the loop thread (callgrind; stable): same server, "
        "a Python client in a separate process")
    if not isinstance(cg, dict) or "load" not in cg:
        add(f"   not measured: {cg}")
        return
    w = cg["workload"]
    add(f"   with: defaults, selector wrapper on; periodic parts parked ({_parked_text()}); "
        f"{w['warmup']} warm-up requests, then counted between two GET /mark")
    add(f"   {'':10}{'requests':>9}{'without':>12}{'with':>12}{'extra':>9}{'ratio':>9}"
        f"{'loop iterations/request':>26}")
    for shape, spec in HTTP_CG_SHAPES.items():
        r = cg[shape]
        iters = f"{r['without_iterations_per_request']:.2f} / {r['with_iterations_per_request']:.2f}"
        add(f"   {shape:10}{w[shape]:>9,}{r['without_per_request']:>12,.0f}{r['with_per_request']:>12,.0f}"
            f"{r['extra_per_request']:>+9,.0f}{r['ratio']:>9.4f}{iters:>26}")
    for shape, spec in HTTP_CG_SHAPES.items():
        add(f"   {shape}: {spec['text']}")
    load = cg["load"]
    add(f"   => under load: {100 * (load['ratio'] - 1):+.2f}% instructions per request, i.e. of requests/s at "
        f"capacity")
    sparse = cg["sparse"]
    add(f"   => at low load: {sparse['extra_per_request']:+,.0f} instructions ({100 * (sparse['ratio'] - 1):+.1f}%) "
        f"per request, {sparse['with_iterations_per_request']:.1f} loop iterations each: CPU the idle loop had "
        f"to spare")
    estimate = _http_wrk_estimate(cg, http)
    if estimate is not None:
        add(f"   => at figure 5's wrk load ({estimate['iterations_per_request']:.2f} iterations/request natively, "
            f"{estimate['extra_per_iteration']:,.0f} extra instructions per iteration as at low load): "
            f"{100 * estimate['cost']:+.2f}% instructions per request")
    add(f"   target: loopwatch's defaults cost <= {100 * TARGET_HTTP_COST:.0f}% of requests/s under load "
        f"(both lines above): {_verdict(_http_cg_verdict(cg, http))}")


def _render_headline(result: dict[str, Any], add: Any) -> None:
    """The three figures the defaults are judged on, without and with loopwatch, side by side."""
    add("Headline: the cost of loopwatch's defaults, measured side by side in this run")
    add(f"   {'':62}{'without':>12}{'with':>12}{'cost':>10}   target")
    cg = result.get("callgrind")
    if isinstance(cg, dict) and "ratio" in cg:
        add(f"   {'100 ready task steps per iteration (callgrind instructions/step)':62}"
            f"{cg['without_per_step']:12,.0f}{cg['with_per_step']:12,.0f}{100 * (cg['ratio'] - 1):+9.2f}%"
            f"   <= +{100 * (TARGET_STEP_RATIO - 1):.0f}%: {_verdict(cg['ratio'] <= TARGET_STEP_RATIO)}")
    else:
        add(f"   100 ready task steps per iteration: not measured ({cg})")
    hooks = result.get("hooks")
    hcg = hooks.get("callgrind") if isinstance(hooks, dict) else None
    if isinstance(hcg, dict):
        for variant, label in (("auto", "one trivial callback per iteration (instructions/callback)"),
                               ("auto-py", "  the same, pure Python (no C accelerator)"),
                               ("timer", "  (no loopwatch, one pending asyncio timer)")):
            base, value = hcg["per_callback"]["none"]["1"], hcg["per_callback"][variant]["1"]
            cost = value / base - 1
            verdict = (_verdict(cost <= TARGET_ONE_CALLBACK) if variant == "auto" else
                       "(fallback)" if variant == "auto-py" else "(reference: any app with a pending timer)")
            add(f"   {label:62}{base:12,.0f}{value:12,.0f}{100 * cost:+9.2f}%"
                f"   <= +{100 * TARGET_ONE_CALLBACK:.0f}% (goal +2%): {verdict}")
    else:
        add(f"   one trivial callback per iteration: not measured ({hcg})")
    idle = result.get("idle")
    if isinstance(idle, dict):
        with_ms = idle["with"]["cpu_ms_per_s"]
        add(f"   {'idle app scraped once a second (CPU ms per second)':62}{idle['without']['cpu_ms_per_s']:12.2f}"
            f"{with_ms:12.2f}{idle['delta_ms_per_s']:+9.2f}    <= {TARGET_IDLE_MS:.0f} ms/s (goal 2): "
            f"{_verdict(with_ms <= TARGET_IDLE_MS)}")
    else:
        add(f"   idle app scraped once a second: not measured ({idle})")


def render(result: dict[str, Any]) -> str:
    lines = []
    add = lines.append
    env = result["environment"]
    add(f"loopwatch overhead benchmark ({result['mode']})  loopwatch {env['loopwatch']}  "
        f"python {env['python']}  {env['cpus']} CPUs  load {env['load_before'][0]:.2f} -> {env['load_after'][0]:.2f}")
    rule = "=" * 100
    add(rule)
    _render_headline(result, add)
    add(rule)

    wall = result.get("wall")
    add("1. Wall clock, callback-heavy workload (noisy: shared machine; read the spread)")
    if isinstance(wall, dict) and "ratio" in wall:
        w = wall["workload"]
        add(f"   workload: {w['tasks']} tasks x {w['steps']} sleep(0) steps + {w['chains']} call_soon chains x "
            f"{w['chain_len']} = {wall['callbacks_per_round']:,} callbacks/round; median of {w['rounds']} rounds "
            f"per run; {len(wall['pairs'])} interleaved pairs, fresh process per run")
        add("   with: install() defaults (probe 1 s, GIL-held fallback, watchdog, iteration clock, GIL probe 1/s, exporter on a "
            "loopback port)")
        add(f"   {'':28}{'median':>10}{'q1':>10}{'q3':>10}{'min':>10}{'max':>10}")
        for key, label, scale, fmt in (("without_s", "without (ms/round)", 1e3, "{:10.1f}"),
                                       ("with_s", "with    (ms/round)", 1e3, "{:10.1f}"),
                                       ("ratio", "ratio with/without", 1, "{:10.3f}"),
                                       ("cpu_ratio", "CPU-time ratio", 1, "{:10.3f}")):
            q = wall.get(key)
            if q:
                add(f"   {label:28}" + "".join(fmt.format(q[k] * scale) for k in ("median", "q1", "q3", "min", "max")))
        per_cb = (wall["ratio"]["median"] - 1) * wall["without_s"]["median"] / wall["callbacks_per_round"] * 1e9
        add(f"   => median overhead {100 * (wall['ratio']['median'] - 1):+.1f}% "
            f"({per_cb:+.0f} ns/callback); IQR {100 * (wall['ratio']['q1'] - 1):+.1f}% .. "
            f"{100 * (wall['ratio']['q3'] - 1):+.1f}%   target <= {TARGET_STEP_RATIO:.2f}: "
            f"{_wall_verdict(wall)}")
        for note in _state_notes("with", wall.get("with_state")):
            add("   " + note)
    else:
        add(f"   not measured: {wall}")
    add("")

    cg = result.get("callgrind")
    add("2. Instructions per await-step on the loop thread (callgrind; stable)")
    if isinstance(cg, dict) and "ratio" in cg:
        w = cg["workload"]
        add(f"   workload: {w['tasks']} tasks x ({w['large']} - {w['small']}) sleep(0) steps = "
            f"{cg['delta_steps']:,} steps of difference; {w['repeat']} run(s) each")
        add(f"   with: defaults, selector wrapper on; periodic parts parked for valgrind's ~50x slowdown "
            f"({_parked_text()})")
        def runs(name: str) -> str:
            values = cg[f"{name}_per_step_all"]
            return "" if len(values) < 2 else "   runs: " + " / ".join(f"{v:,.1f}" for v in values)

        add(f"   without loopwatch  {cg['without_per_step']:12,.1f} instructions/step{runs('without')}")
        add(f"   with loopwatch     {cg['with_per_step']:12,.1f} instructions/step   "
            f"({cg['extra_per_step']:+,.1f}){runs('with')}")
        add(f"   ratio with/without {cg['ratio']:12.4f}  ({100 * (cg['ratio'] - 1):+.2f}%)   "
            f"target <= {TARGET_STEP_RATIO:.2f}: {_verdict(cg['ratio'] <= TARGET_STEP_RATIO)}")
    else:
        add(f"   not measured: {cg}")
    add("")

    idle = result.get("idle")
    add("3. Idle CPU: app doing `await asyncio.sleep(...)`, whole-process time.process_time() per wall second")
    if isinstance(idle, dict) and "with" in idle:
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
    else:
        add(f"   not measured: {idle}")
    add("")
    _render_hooks(result.get("hooks"), add)
    add("")
    _render_http(result.get("http"), add)
    add("")
    _render_http_callgrind(result.get("httpcg"), add, result.get("http"))
    add(rule)
    sections = ", ".join(f"{k} {v:.0f}" for k, v in result.get("section_s", {}).items())
    add(f"total {result['elapsed_s']:.0f} s{f' ({sections})' if sections else ''}; "
        f"JSON: {result.get('json_path', '-')}")
    return "\n".join(lines)


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
                    ("wall", lambda: bench_wall(profile["wall"], dump_dir))]
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
                       or verdicts["http_instructions"] is False
                       or str(verdicts["wall_ratio"]).startswith("MISSED")
                       or str(verdicts["http_rps"]).startswith("MISSED")):
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (about four minutes)")
    parser.add_argument("--pairs", type=int, default=0, help="number of with/without wall-clock pairs")
    parser.add_argument("--skip", action="append", default=[], choices=("wall", "callgrind", "idle", "hooks", "httpcg", "http"),
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


if __name__ == "__main__":
    sys.exit(main())
