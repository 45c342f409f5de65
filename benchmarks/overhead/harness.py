"""What the benchmarks share: constants and targets, running workers in fresh subprocesses and reading
their result line, quantiles, the "with" runs' loopwatch state, callgrind output parsing and verdicts.

The worker-side helpers (``_install``, ``_install_defaults``, ``_loopwatch_state``, ``_stepper``,
``_start_chains``, ``_free_port``) run in the child processes; the rest runs in the driver.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent  # benchmarks/overhead
REPO = HERE.parent.parent
RESULTS = HERE.parent / "results" / "latest.json"
PACKAGE = __package__ or "benchmarks.overhead"  # what the workers run: python -m <PACKAGE> --worker ...

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
MARKER = "getsid"  # callgrind --dump-before=getsid: os.getsid(0) separates the measured segments


# =====================================================================================================
# Worker side (run in fresh subprocesses)
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
    original_run = getattr(_slow, "_STDLIB_RUN", None)  # asyncio's own Handle._run
    if original_run is not None:
        state["exact_on"] = events.Handle.__dict__.get("_run") is not original_run
    try:
        state["slow_callbacks"] = sum(value for counts in agent.slow.counts.values() for _, value in counts.items())
    except Exception:  # noqa: BLE001 - internals of the checkout; the figure does not depend on them
        pass
    return state


async def _stepper(steps: int) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)


def _start_chains(chains: int, length: int) -> asyncio.Future[None]:
    """Start ``chains`` concurrent ``call_soon`` chains of ``length`` trivial callbacks each in the running
    loop (each callback schedules the next); the future is done once the last chain has ended."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
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
        loop.call_soon(link, length)
    return done


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# =====================================================================================================
# Driver side
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
    # -P: nothing before PYTHONPATH (the repository root, from _child_env) on sys.path, not even the current
    # directory: the workers import this package and the checkout's loopwatch, whatever the cwd.
    cmd = [sys.executable, "-P", "-m", PACKAGE, "--worker", worker, "--dump-dir", str(dump_dir)]
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


# -- callgrind output -------------------------------------------------------------------------------

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


# -- report -----------------------------------------------------------------------------------------

def _verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def _parked_text() -> str:
    return ", ".join(f"{k}={v}" for k, v in CALLGRIND_PARKED.items())
