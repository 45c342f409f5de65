"""Several loops in several threads (tests/apps/tasks_multiloop.py, scraped over HTTP): each loop is watched
and told apart by the ``loop`` label (its thread's name), a stall in one is attributed to that loop only
(live lag, spike counters, the dump's ``loop`` and culprit, the ``loopwatch.stall`` event), each loop's
exception handler is chained, and when one loop is closed its series stay at rest (gauges 0, counters kept) and the other's go on.

Mid-stall observations are stamped with ``time.time()`` and compared with the stamps the app prints
around its stall, so "seen while the stall was going on" is proven by the clock.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from conftest import APPS, free_port, sample, scrape, wait_for

NS = "lwmulti"
APP = APPS / "tasks_multiloop.py"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
THRESHOLDS = ("0.3", "1.0", "10.0")
LOOPS = ("main", "worker-loop")


def marker_line(marker: str) -> int:
    (line,) = [n for n, text in enumerate(APP.read_text().splitlines(), 1) if text.rstrip().endswith(f"# {marker}")]
    return line


def metric(samples: dict, name: str, **labels: str) -> float | None:
    return sample(samples, f"{NS}_{name}", **labels)


def spikes(samples: dict, loop: str) -> tuple[float | None, ...]:
    return tuple(metric(samples, "event_loop_lag_spikes_total", loop=loop, threshold=t) for t in THRESHOLDS)


def series_of(samples: dict, loop: str) -> set[str]:
    return {name for name, labels in samples if ("loop", loop) in labels}


def stamp(line: str) -> float:
    return float(line.split()[-1])


def dumps_of(dump_dir: Path, loop: str) -> list[dict]:
    found = [json.loads(p.read_text()) for p in sorted(dump_dir.glob("loopwatch-*-event_loop_lag.json"))]
    return [d for d in found if d["loop"] == loop]


def check_culprit(dump: dict, function: str, marker: str) -> None:
    culprit = dump["culprit"]
    assert culprit is not None, dump
    assert os.path.realpath(culprit["filename"]) == os.path.realpath(APP), culprit
    assert (culprit["function"], culprit["lineno"]) == (function, marker_line(marker)), culprit


def stall_through(app, url: str, which: str, loop: str, other: str) -> tuple[float, dict]:
    """Wait for ``which``'s 2.5 s stall to start, scrape 1.5 s into it; returns (scrape time, samples)."""
    start = stamp(app.wait_line(f"{which}-STALL-START"))
    time.sleep(max(0.0, start + 1.5 - time.time()))
    taken = time.time()
    samples = scrape(url)
    end = stamp(app.wait_line(f"{which}-STALL-END"))
    assert start < taken < end, (start, taken, end)  # the scrape really happened during the stall
    # 1.5 s into the stall the beat is overdue by at least 1.5 - probe_interval (0.5)
    assert metric(samples, "event_loop_lag_seconds", loop=loop) >= 0.5, samples
    assert metric(samples, "event_loop_lag_seconds", loop=other) < 0.3, samples
    assert spikes(samples, loop)[0] == 1.0  # counted live, while the stall is going on
    return taken, samples


@pytest.mark.parametrize("impl, loop_class", [
    ("asyncio", "asyncio.unix_events._UnixSelectorEventLoop"),
    ("uvloop", "uvloop.Loop"),
])
def test_two_loops_in_two_threads(app_runner, tmp_path: Path, impl: str, loop_class: str) -> None:
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    dump_dir = tmp_path / "dumps"
    port = free_port()
    app = app_runner("tasks_multiloop", impl, str(dump_dir), str(port), str(ctl))
    url = app.wait_line("READY").split()[1]
    assert url == f"http://127.0.0.1:{port}/metrics"
    assert loop_class in app.wait_line("MAIN-UP")
    assert loop_class in app.wait_line("WORKER-UP")

    # -- both loops are watched, told apart by their thread's name; live tasks counted per loop ------
    def both_up() -> dict | None:
        samples = scrape(url)
        ok = (metric(samples, "tasks", loop="main") == 4.0 and metric(samples, "tasks", loop="worker-loop") == 6.0
              and metric(samples, "task_exceptions_total", exception="LookupError") == 1.0
              and metric(samples, "task_exceptions_total", exception="KeyError") == 1.0
              and all(metric(samples, "event_loop_delay_seconds_count", loop=loop) for loop in LOOPS))
        return samples if ok else None

    samples = wait_for(both_up, timeout=10.0, what="both loops' tasks and exceptions")
    loops = {dict(labels)["loop"] for name, labels in samples if name == f"{NS}_event_loop_lag_seconds"}
    assert loops == set(LOOPS)
    for loop in LOOPS:
        assert spikes(samples, loop) == (0.0, 0.0, 0.0)  # exported at 0 from the start

    # -- a stall in the worker loop is the worker loop's only -----------------------------------------
    (ctl / "stall-worker").touch()
    stall_through(app, url, "WORKER", "worker-loop", "main")
    samples = wait_for(lambda: (lambda s: s if spikes(s, "worker-loop") == (1.0, 1.0, 0.0) else None)(scrape(url)),
                       timeout=10.0, what="the worker stall's spikes")
    assert spikes(samples, "main") == (0.0, 0.0, 0.0)
    worker_dumps = wait_for(lambda: dumps_of(dump_dir, "worker-loop"), timeout=10.0, what="the worker dump")
    assert len(worker_dumps) == 1
    assert dumps_of(dump_dir, "main") == []
    check_culprit(worker_dumps[0], "worker_block", "WORKER-BLOCK")
    assert worker_dumps[0]["source"] == "watchdog"
    assert worker_dumps[0]["kind"] == "blocked"

    # -- then one in the main loop is the main loop's only --------------------------------------------
    (ctl / "stall-main").touch()
    stall_through(app, url, "MAIN", "main", "worker-loop")
    samples = wait_for(lambda: (lambda s: s if spikes(s, "main") == (1.0, 1.0, 0.0) else None)(scrape(url)),
                       timeout=10.0, what="the main stall's spikes")
    assert spikes(samples, "worker-loop") == (1.0, 1.0, 0.0)  # unchanged
    main_dumps = wait_for(lambda: dumps_of(dump_dir, "main"), timeout=10.0, what="the main dump")
    assert len(main_dumps) == 1
    assert len(dumps_of(dump_dir, "worker-loop")) == 1
    check_culprit(main_dumps[0], "main_block", "MAIN-BLOCK")

    # -- the worker loop is closed: its series stay at rest (gauges 0, counters kept), the main loop's too --
    before = series_of(samples, "main")
    worker_before = series_of(samples, "worker-loop")
    assert {f"{NS}_event_loop_lag_seconds", f"{NS}_event_loop_delay_seconds_count",
            f"{NS}_event_loop_lag_spikes_total", f"{NS}_tasks"} <= before, before
    (ctl / "close-worker").touch()
    assert app.wait_line("WORKER-HANDLER-CALLS") == "WORKER-HANDLER-CALLS 1"  # its own handler ran once
    app.wait_line("WORKER-CLOSED")
    samples = wait_for(lambda: (lambda s: s if metric(s, "tasks", loop="worker-loop") == 0.0 else None)(scrape(url)),
                       timeout=15.0, what="the closed worker loop's gauges to read 0")
    assert series_of(samples, "worker-loop") == worker_before  # no series dropped
    assert metric(samples, "event_loop_lag_seconds", loop="worker-loop") == 0.0
    assert spikes(samples, "worker-loop") == (1.0, 1.0, 0.0)  # its counters stay
    # None of the main loop's series went away (on uvloop the main stall's slow callback may have been
    # counted in between: the watchdog counts it when the stall ends, after ``before`` was read).
    assert before <= series_of(samples, "main")
    assert spikes(samples, "main") == (1.0, 1.0, 0.0)
    assert metric(samples, "tasks", loop="main") == 4.0
    assert metric(samples, "task_exceptions_total", exception="LookupError") == 1.0  # counters stay

    (ctl / "stop").touch()
    out = ANSI.sub("", app.finish(timeout=30))
    assert app.proc.returncode == 0, out
    stalls = [line for line in out.splitlines() if "loopwatch.stall" in line]
    assert len(stalls) == 2, out
    worker_stall, main_stall = stalls
    assert "loop=worker-loop" in worker_stall and f"tasks_multiloop.py:{marker_line('WORKER-BLOCK')} in worker_block" \
        in worker_stall, worker_stall
    assert "loop=main" in main_stall and f"tasks_multiloop.py:{marker_line('MAIN-BLOCK')} in main_block" \
        in main_stall, main_stall
    # the main loop had no handler of its own: asyncio's default one still logged its KeyError
    assert out.count("Exception in callback") == 1, out
    assert "KeyError: 'main callback failed'" in out
