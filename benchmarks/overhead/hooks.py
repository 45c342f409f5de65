"""Figure 4: the slow-callback hook's cost per callback (trivial ``call_soon`` callbacks, 1 and 20 per
loop iteration): callgrind instructions and wall ns per callback without loopwatch, with its defaults
(``slow_callback_mode="auto"``: selector wrapper), with ``slow_callback_mode="exact"`` (``Handle._run``
wrapped) and under asyncio debug mode."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from .harness import (CALLGRIND_PARKED, MARKER, BenchError, _callgrind_total, _check_parked_state, _child_env,
                      _install, _loopwatch_state, _parked_text, _parse_result, _progress, _quantiles, _run,
                      _start_chains, _state_notes, _summarize_states, _worker_cmd)


# auto-py: without the C accelerator; timer: no loopwatch, one timer pending far in the future (as the probe's
# is): asyncio then checks its timer heap on every iteration -- part of what "auto" pays, and what any app
# with a pending sleep or timeout pays anyway
HOOK_VARIANTS = ("none", "timer", "auto", "auto-py", "exact", "debug")
HOOK_SHAPES = (1, 20)  # concurrent call_soon chains = callbacks per loop iteration


async def call_soon_chains(chains: int, callbacks: int) -> int:
    """``chains`` concurrent ``call_soon`` chains of trivial callbacks, ``callbacks`` in all.

    Every loop iteration runs one callback of each chain: ``chains`` callbacks per iteration.  Returns
    the number of chain callbacks run."""
    per_chain = max(1, callbacks // chains)
    await _start_chains(chains, per_chain)
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


# -- driver -----------------------------------------------------------------------------------------

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


# -- report -----------------------------------------------------------------------------------------

_VARIANT_LABELS = {"none": "no loopwatch", "timer": "no loopwatch, 1 pending timer", "auto": "loopwatch defaults (auto)",
                   "auto-py": "defaults, pure Python (no C)",
                   "exact": 'slow_callback_mode="exact"', "debug": "asyncio debug mode"}


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
