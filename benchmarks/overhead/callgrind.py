"""Figure 2: instructions per await-step on the loop thread, counted by ``valgrind --tool=callgrind
--separate-threads=yes`` as the difference between two workload sizes (start-up cancels), with
loopwatch's periodic parts parked and the per-iteration selector wrapper active."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import shutil
import statistics
from pathlib import Path
from typing import Any

from .harness import (CALLGRIND_PARKED, TARGET_STEP_RATIO, BenchError, _check_parked_state, _child_env,
                      _install, _loopwatch_state, _parked_text, _parse_result, _run, _stepper, _verdict,
                      _worker_cmd, parse_callgrind_dir)


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


# -- driver -----------------------------------------------------------------------------------------

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


# -- report -----------------------------------------------------------------------------------------

def _render_callgrind(cg: Any, add: Any) -> None:
    add("2. Instructions per await-step on the loop thread (callgrind; stable)")
    if not isinstance(cg, dict) or "ratio" not in cg:
        add(f"   not measured: {cg}")
        return
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
