"""Every stall past the threshold is caught, whatever moment it starts (issue: "measure what the user
means").  Real apps (tests/apps/phase_sweep.py) block their loop ten times for the threshold plus 0.2 s,
the starts spread evenly across the probe's beat interval; on the stdlib loop with and without the C
accelerator, and on uvloop.  Each stall must be counted, dumped as it crosses the threshold, named, logged
with its real duration, and visible live on ``/metrics``.  Stalls that hold the GIL must have their stack
on disk no later than half a second after they cross the threshold, whatever their phase.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import APPS, free_port, marker
from procs import fields

from loopwatch._gilheld import REPEAT

APP = APPS / "phase_sweep.py"
THRESHOLD = 0.5
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def line_of(marker: str) -> int:
    return next(n for n, text in enumerate(APP.read_text().splitlines(), 1) if text.rstrip().endswith(f"# {marker}"))


def run(app_runner, tmp_path: Path, loop: str, kind: str, n: int, accelerator: str) -> tuple[str, list[dict], list]:
    dump_dir = tmp_path / "dumps"
    app = app_runner("phase_sweep", str(dump_dir), str(free_port()), loop, kind, str(n),
                     env={"LOOPWATCH_ACCELERATOR": accelerator})
    app.wait_line("DONE", timeout=120)
    out = ANSI.sub("", app.finish(timeout=30))
    stalls = [tuple(float(x) for x in line.split()[2:4]) for line in out.splitlines() if line.startswith("STALL ")]
    assert len(stalls) == n, out
    dumps = [json.loads(p.read_text()) for p in sorted(dump_dir.glob("loopwatch-*-event_loop_lag.json"))]
    return out, dumps, stalls


def spikes(out: str) -> list[dict]:
    return [fields(line) for line in out.splitlines() if "loopwatch.stall" in line]


@pytest.mark.parametrize("loop, accelerator", [("stdlib", "1"), ("stdlib", "0"), ("uvloop", "1")])
def test_ten_stalls_at_every_phase_are_all_counted_dumped_named_and_timed(app_runner, tmp_path: Path,
                                                                        loop: str, accelerator: str) -> None:
    n = 10
    out, dumps, stalls = run(app_runner, tmp_path, loop, "block", n, accelerator)
    assert len(dumps) == n, out  # every one dumped (dump_cooldown=0)
    for dump in dumps:
        assert dump["source"] == "watchdog", dump
        assert THRESHOLD <= dump["stall_seconds"] <= THRESHOLD + 0.05, dump["stall_seconds"]  # goal: 10 ms
        assert dump["culprit"]["lineno"] == line_of("BLOCK-LINE") and dump["culprit"]["function"] == "block"
        assert dump["kind"] == "blocked", dump
    events = spikes(out)
    assert len(events) == n, out
    for event, (start, end) in zip(events, stalls):
        assert abs(float(event["duration"]) - (end - start)) <= 0.01, (event, end - start)
        assert event["thresholds"] == "[0.5]"
        assert f"{APP}:{line_of('BLOCK-LINE')} in block" in event["culprit"]
    gauges = [line.split()[2] for line in out.splitlines() if line.startswith("GAUGE ")]
    assert len(gauges) == n and all(float(g) >= 0.45 for g in gauges), gauges  # live, 0.5 s into each stall
    healthy = [float(line.split()[2]) for line in out.splitlines() if line.startswith("HEALTHY ")]
    assert len(healthy) == n and all(h < 0.05 for h in healthy), healthy  # ~0 while the loop is healthy
    final = out.splitlines()
    assert not [line for line in final if "loopwatch.error" in line], out


@pytest.mark.parametrize("loop", ["stdlib", "uvloop"])
def test_stalls_that_hold_the_gil_have_their_stack_on_disk_within_half_a_second_of_the_threshold(
        app_runner, tmp_path: Path, loop: str) -> None:
    n = 6
    out, dumps, stalls = run(app_runner, tmp_path, loop, "gil", n, "1")
    assert len(dumps) == n, out
    for dump, (start, end) in zip(dumps, stalls):
        assert dump["source"] == "faulthandler", dump  # the loop thread wrote its own stack, mid-stall
        age = dump["stall_seconds"]
        assert age < end - start  # written while the stall was still going on
        if end - start >= THRESHOLD + REPEAT + 0.05:  # long enough for a stack past the threshold
            assert THRESHOLD <= age <= THRESHOLD + REPEAT + 0.02, (age, end - start)
        else:
            assert age <= THRESHOLD + 0.5, (age, end - start)
        assert dump["culprit"]["lineno"] == line_of("GIL-LINE") and dump["culprit"]["function"] == "block"
    events = spikes(out)
    assert len(events) == n, out
    for event, (start, end) in zip(events, stalls):
        assert abs(float(event["duration"]) - (end - start)) <= 0.01, (event, end - start)
        assert event["source"] == "faulthandler" and event["kind"] == "cpu"


def test_a_stall_that_is_a_garbage_collection_is_kind_gc_with_its_generation(app_runner, tmp_path: Path) -> None:
    dump_dir = tmp_path / "dumps"
    app = app_runner("gc_stall", str(dump_dir), str(free_port()))
    app.wait_line("DONE", timeout=120)
    out = ANSI.sub("", app.finish(timeout=30))
    (gc_line,) = [found for line in out.splitlines() if (found := marker(line, "GC-PASS "))]
    start, end = (float(x) for x in gc_line.split()[1:3])
    assert end - start >= 0.4, "the collection must outlast the 0.1 s threshold and the fallback's first signal"
    (event,) = spikes(out)
    assert event["kind"] == "gc" and event["gc_generation"] == "2", event
    assert float(event["gc_seconds"]) >= 0.5 * (end - start)
    (path,) = dump_dir.glob("loopwatch-*-event_loop_lag.json")
    dump = json.loads(path.read_text())
    assert dump["kind"] == "gc" and dump["gc_generation"] == 2, dump
    assert dump["culprit"]["function"] == "handler"  # the line that triggered it: gc.collect()


def test_the_watchdog_parks_while_the_loop_waits_and_still_looks_at_a_stall_on_time(tmp_path: Path) -> None:
    """Idle: the watchdog sleeps (its looks cost a wake-up each); a stall that begins while it is parked
    wakes it through the loop's clock exactly when the stall crosses the threshold."""
    import asyncio
    import time

    from prometheus_client import CollectorRegistry

    import loopwatch

    agent = loopwatch.install(registry=CollectorRegistry(), metrics_port=0, dump_dir=tmp_path, dump_cooldown=0)
    assert agent.watchdog.park is not None, "the accelerator's parking is built here"

    async def main() -> tuple[int, float]:
        await asyncio.sleep(1.5)
        before = agent.watchdog.looks
        await asyncio.sleep(4.0)  # idle, but for the probe's beats (1/s)
        looks = agent.watchdog.looks - before
        time.sleep(0.7)  # a stall that begins while the watchdog is parked
        await asyncio.sleep(0.5)
        return looks, 0.0

    looks, _ = asyncio.run(main())
    loopwatch.uninstall()
    assert looks <= 3, f"{looks} looks in 4 idle seconds (polling would be ~9)"
    (dump,) = [json.loads(p.read_text()) for p in tmp_path.glob("loopwatch-*-event_loop_lag.json")]
    assert THRESHOLD <= dump["stall_seconds"] <= THRESHOLD + 0.05, dump["stall_seconds"]
