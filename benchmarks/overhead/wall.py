"""Figure 1: wall clock of a callback-heavy workload (``sleep(0)`` task steps plus ``call_soon`` chains),
in interleaved with/without pairs of fresh processes: median ratio and spread."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from .harness import (TARGET_STEP_RATIO, _install_defaults, _loopwatch_state, _parse_result, _progress,
                      _quantiles, _run, _start_chains, _state_notes, _stepper, _summarize_states,
                      _worker_cmd)


async def callback_heavy(tasks: int, steps: int, chains: int, chain_len: int) -> None:
    """``tasks`` tasks doing ``steps`` ``sleep(0)`` steps, interleaved with ``chains`` call_soon chains."""
    done = _start_chains(chains, chain_len + 1)  # chain_len + 1 callbacks per chain
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


# -- driver -----------------------------------------------------------------------------------------

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


# -- report -----------------------------------------------------------------------------------------

def _wall_verdict(wall: dict[str, Any]) -> str:
    """Wall time is noisy: a verdict only when the whole interquartile range is on one side."""
    if wall["ratio"]["q3"] <= TARGET_STEP_RATIO:
        return "OK"
    if wall["ratio"]["q1"] > TARGET_STEP_RATIO:
        return "MISSED (whole IQR above)"
    return "inconclusive (IQR straddles it)"


def _render_wall(wall: Any, add: Any) -> None:
    add("1. Wall clock, callback-heavy workload (noisy: shared machine; read the spread)")
    if not isinstance(wall, dict) or "ratio" not in wall:
        add(f"   not measured: {wall}")
        return
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
