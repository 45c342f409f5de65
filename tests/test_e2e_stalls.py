"""End to end: real apps (tests/apps/stall_*.py) stall their event loop in a subprocess, and loopwatch
must see each stall *while it is going on* (live lag on /metrics, spike counters, a dump on disk),
name the blocking line, say what kind of stall it was, keep secrets out of the dump, and leave a
dump even when the process is killed mid-stall.

Each app prints ``STALL-START <time.time()>`` / ``STALL-END <time.time()>`` (or ``REGEX-...``) around its
stall; the test stamps its own mid-stall observations with ``time.time()`` and compares, so "seen during
the stall" is proven by the clock, not assumed.  The blocking line of each app is found in its source
by a marker comment, so the expected line numbers never go stale.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time

import pytest
from collections.abc import Callable
from pathlib import Path

from conftest import APPS, App, free_port, sample, scrape, wait_for

NS = "lwstall"  # the namespace tests/apps/stall_common.py installs with
SECRET = "hunter2-SECRET"
ANSI = re.compile(r"\x1b\[[0-9;]*m")

Runner = Callable[..., App]


# -- helpers ------------------------------------------------------------------------------------
def app_file(name: str) -> Path:
    return APPS / f"{name}.py"


def marker_lines(name: str, marker: str) -> list[int]:
    """Line numbers of ``name``'s source lines carrying the comment ``# <marker>``."""
    lines = app_file(name).read_text().splitlines()
    found = [n for n, text in enumerate(lines, 1) if text.rstrip().endswith(f"# {marker}")]
    assert found, f"marker {marker!r} not found in {name}.py"
    return found


def marker_line(name: str, marker: str) -> int:
    (line,) = marker_lines(name, marker)
    return line


def same_file(a: str, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def stamp(line: str) -> float:
    """The ``time.time()`` an app printed after its ``WHAT`` word."""
    return float(line.split()[1])


def start(app_runner: Runner, name: str, tmp_path: Path, *extra: str) -> tuple[App, Path, str, Path]:
    dump_dir = tmp_path / "dumps"
    stop = tmp_path / "stop"
    port = free_port()
    app = app_runner(name, str(dump_dir), str(port), str(stop), *extra)
    ready = app.wait_line("READY")
    url = ready.split()[1]
    assert url == f"http://127.0.0.1:{port}/metrics"
    return app, dump_dir, url, stop


def finish(app: App, stop: Path) -> str:
    stop.touch()
    out = ANSI.sub("", app.finish(timeout=30))
    assert app.proc.returncode == 0, out
    return out


def metric(samples: dict, name: str, **labels: str) -> float | None:
    return sample(samples, f"{NS}_{name}", **labels)


def lag(samples: dict) -> float:
    value = metric(samples, "event_loop_lag_seconds", loop="main")
    assert value is not None, "no event_loop_lag_seconds{loop='main'} series"
    return value


def spikes(samples: dict, threshold: str) -> float | None:
    return metric(samples, "event_loop_lag_spikes_total", loop="main", threshold=threshold)


def dumps(dump_dir: Path) -> list[Path]:
    return sorted(dump_dir.glob("loopwatch-*.json"))


def inflight_files(dump_dir: Path) -> list[Path]:
    return sorted(dump_dir.glob("loopwatch-inflight-*.txt"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def stall_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "loopwatch.stall" in line]


def check_culprit(dump: dict, name: str, lineno: int | set[int], function: str) -> None:
    culprit = dump["culprit"]
    assert culprit is not None, dump
    assert same_file(culprit["filename"], app_file(name)), culprit
    assert culprit["lineno"] in (lineno if isinstance(lineno, set) else {lineno}), culprit
    assert culprit["function"] == function, culprit
    # The culprit is the loop thread's innermost application frame, and the loop stack ends there.
    assert dump["loop_stack"], dump
    innermost = dump["loop_stack"][-1]
    assert (innermost["lineno"], innermost["function"]) == (culprit["lineno"], function), dump["loop_stack"]


def faulthandler_location(name: str, lineno: int, function: str) -> str:
    """How faulthandler writes a frame: ``  File "<path>", line <n> in <function>``."""
    return f'{name}.py", line {lineno} in {function}'


def loop_thread_block(text: str) -> str:
    """The stacks in an in-flight file: the loop thread (the header names it) writes its own, on a signal."""
    header = re.match(r"# loopwatch in-flight pid=\d+ created=\d+ loop_thread=(0x[0-9a-f]+) ", text)
    assert header, text[:300]
    return text.split("\n", 1)[1] if text.count("Stack (most recent call first):") else ""


# -- 1. blocking stall, GIL released ------------------------------------------------------------
def test_blocking_stall_is_measured_and_dumped_while_it_lasts(app_runner: Runner, tmp_path: Path) -> None:
    name = "stall_block"
    stall_line = marker_line(name, "STALL-LINE")
    app, dump_dir, url, stop = start(app_runner, name, tmp_path)
    started = stamp(app.wait_line("STALL-START"))

    # -- while the loop is blocked (~5 s): /metrics answers, the lag grows live, spikes are counted
    first = wait_for(lambda: (s := scrape(url)) and lag(s) >= 1.0 and s, timeout=4.0,
                     what="live lag >= 1.0 s")
    time.sleep(0.4)
    second = scrape(url)
    assert lag(second) >= lag(first) + 0.3, (lag(first), lag(second))
    assert spikes(second, "0.3") == 1
    assert spikes(second, "1.0") == 1
    assert spikes(second, "10.0") == 0
    assert metric(second, "dumps_total", reason="event_loop_lag") == 1
    # -- and the dump is already on disk
    (path,) = wait_for(lambda: dumps(dump_dir), timeout=2.0, what="a dump during the stall")
    checked = time.time()
    dump = load(path)
    ended = stamp(app.wait_line("STALL-END"))
    assert started < checked < ended, "the mid-stall checks must happen during the stall"
    assert ended - started >= 4.0

    assert dump["reason"] == "event_loop_lag"
    assert dump["source"] == "watchdog"
    assert dump["kind"] == "blocked", dump
    assert dump["loop"] == "main"
    assert 0.3 <= dump["stall_seconds"] <= 0.35  # taken as the stall crossed the threshold
    assert dump["service"] == "stall-app"
    assert dump["pid"] == app.proc.pid
    check_culprit(dump, name, stall_line, "fetch_rows")
    assert "sock.recv" in dump["culprit"]["line"]
    # Files are private and hold code locations only, never local variable values.
    txt = path.with_suffix(".txt")
    for file in (path, txt):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
        assert SECRET not in file.read_text(), f"a local variable's value leaked into {file.name}"
    assert f"{name}.py:{stall_line} in fetch_rows" in txt.read_text()
    # Every thread is there; the main thread is the blocked loop thread.
    threads = {t["name"]: t for t in dump["threads"]}
    assert "MainThread" in threads and "slow-db" in threads, list(threads)
    assert threads["MainThread"]["stack"][-1]["lineno"] == stall_line
    # Tasks with their coroutine and await chain.
    tasks = {t["name"]: t for t in dump["tasks"]}
    handler = tasks["handler-task"]
    assert handler["coro"] == "handle_request"
    assert handler["stack"] and handler["stack"][0]["function"] == "handle_request"
    assert same_file(handler["stack"][0]["filename"], app_file(name))
    idle = tasks["idle-task"]
    assert idle["coro"] == "idle"
    assert [f["function"] for f in idle["stack"]][:3] == ["idle", "wait_forever", "Event.wait"], idle
    assert idle["stack"][1]["lineno"] == marker_line(name, "IDLE-AWAIT")

    # -- after the stall: the lag is back to normal, one dump, and the stall is logged
    wait_for(lambda: lag(scrape(url)) < 0.2, timeout=5.0, what="lag back under 0.2 s")
    after = scrape(url)
    assert metric(after, "dumps_total", reason="event_loop_lag") == 1
    assert spikes(after, "0.3") == 1 and spikes(after, "1.0") == 1 and spikes(after, "10.0") == 0
    assert dumps(dump_dir) == [path]
    out = finish(app, stop)
    assert SECRET not in out
    (logged,) = stall_lines(out)
    assert f"{name}.py:{stall_line} in fetch_rows" in logged, logged
    assert str(path) in logged, logged
    assert "kind=blocked" in logged, logged
    assert dumps(dump_dir) == [path]
    # -- the dump taken mid-stall now also says how long the whole stall lasted (as the event does)
    whole = load(path)
    assert "duration" not in dump and abs(whole["duration"] - (ended - started)) < 0.3, (whole["duration"], ended - started)
    assert f"duration={whole['duration']}" in logged, logged
    assert whole["whole_stall"]["kind"] == "blocked" and whole["stall_seconds"] == dump["stall_seconds"]
    assert f"the whole stall lasted {whole['duration']:.3f} s (kind: blocked" in txt.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- 2. CPU-bound stall -------------------------------------------------------------------------
def test_cpu_bound_stall_is_dumped_as_kind_cpu(app_runner: Runner, tmp_path: Path) -> None:
    name = "stall_cpu"
    app, dump_dir, url, stop = start(app_runner, name, tmp_path)
    started = stamp(app.wait_line("STALL-START"))
    (path,) = wait_for(lambda: dumps(dump_dir), timeout=2.5, what="a dump during the busy loop")
    seen = time.time()
    ended = stamp(app.wait_line("STALL-END"))
    assert started < seen < ended

    dump = load(path)
    assert dump["reason"] == "event_loop_lag"
    assert dump["source"] == "watchdog"
    assert dump["kind"] == "cpu", dump
    assert dump["cpu_seconds"] > 0
    check_culprit(dump, name, set(marker_lines(name, "CPU-LOOP")), "crunch")

    # (the stall is logged when the watchdog sees the late beat: let it before the app exits)
    wait_for(lambda: lag(scrape(url)) < 0.2, timeout=5.0, what="lag back under 0.2 s")
    out = finish(app, stop)
    (logged,) = stall_lines(out)
    assert "kind=cpu" in logged and str(path) in logged, logged
    assert dumps(dump_dir) == [path]
    whole = load(path)
    assert whole["duration"] >= ended - started - 0.3 and whole["whole_stall"]["kind"] == "cpu", whole
    assert whole["whole_stall"]["cpu_seconds"] > dump["cpu_seconds"]


# -- 3. GIL-held stall --------------------------------------------------------------------------
def test_gil_held_stall_is_written_by_faulthandler_during_the_stall(app_runner: Runner,
                                                                    tmp_path: Path) -> None:
    name = "stall_regex"
    stall_line = marker_line(name, "STALL-LINE")
    location = faulthandler_location(name, stall_line, "match_order_id")
    app, dump_dir, url, stop = start(app_runner, name, tmp_path, "3")
    started = stamp(app.wait_line("REGEX-START"))

    def inflight_with_stack() -> tuple[Path, str] | None:
        for path in inflight_files(dump_dir):
            text = path.read_text()
            if location in text:
                return path, text
        return None

    inflight, text = wait_for(inflight_with_stack, timeout=20.0, what="the regex line in the in-flight file")
    seen = time.time()
    ended = stamp(app.wait_line("REGEX-END", timeout=60.0))
    assert started < seen < ended, "the in-flight stack must be written while the GIL is still held"
    assert text.startswith("# loopwatch in-flight ")
    assert location in loop_thread_block(text), text
    assert stat.S_IMODE(inflight.stat().st_mode) == 0o600

    (path,) = wait_for(lambda: dumps(dump_dir), timeout=10.0, what="the dump after the stall")
    dump = load(path)
    assert dump["reason"] == "event_loop_lag"
    assert dump["source"] == "faulthandler"
    assert dump["kind"] == "cpu", dump
    # The watchdog could not run (GIL held): the loop thread wrote its own stack on the fallback timer's
    # signal, no later than half a second after the stall crossed the threshold.
    assert 0.3 <= dump["stall_seconds"] <= 0.3 + 0.5, dump["stall_seconds"]
    check_culprit(dump, name, stall_line, "match_order_id")
    for file in (path, path.with_suffix(".txt")):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    # The in-flight stack was consumed (the file is back to its header) and not dumped twice.
    assert location not in inflight.read_text()
    wait_for(lambda: lag(scrape(url)) < 0.2, timeout=5.0, what="lag back under 0.2 s")
    assert metric(scrape(url), "dumps_total", reason="event_loop_lag") == 1

    out = finish(app, stop)
    (logged,) = stall_lines(out)
    assert f"{name}.py:{stall_line} in match_order_id" in logged, logged
    assert "source=faulthandler" in logged and str(path) in logged, logged
    assert dumps(dump_dir) == [path]
    assert inflight_files(dump_dir) == [], "a clean exit removes the in-flight file"


# -- 4. killed mid-stall ------------------------------------------------------------------------
def test_process_killed_mid_stall_leaves_an_unfinished_stall_dump(app_runner: Runner,
                                                                  tmp_path: Path) -> None:
    name = "stall_regex"
    stall_line = marker_line(name, "STALL-LINE")
    location = faulthandler_location(name, stall_line, "match_order_id")
    victim, dump_dir, _, _ = start(app_runner, name, tmp_path, "30")
    pid = int(victim.wait_line("PID").split()[1])
    victim.wait_line("REGEX-START")
    (inflight,) = wait_for(lambda: [p for p in inflight_files(dump_dir) if location in p.read_text()],
                           timeout=20.0, what="the regex line in the in-flight file")
    victim.kill()  # SIGKILL, like a liveness probe's kill: no atexit, no cleanup
    assert victim.proc.returncode == -9
    assert inflight.exists() and dumps(dump_dir) == []

    survivor = app_runner("stall_reinstall", str(dump_dir), str(free_port()), str(tmp_path / "stop"))
    out = ANSI.sub("", survivor.finish(timeout=30))
    assert survivor.proc.returncode == 0, out
    assert "BYE" in out

    (path,) = dumps(dump_dir)
    dump = load(path)
    assert dump["reason"] == "unfinished_stall"
    assert dump["source"] == "faulthandler"
    assert dump["pid"] == pid
    assert path.name.endswith(f"-{pid}-unfinished_stall.json")
    check_culprit(dump, name, stall_line, "match_order_id")
    for file in (path, path.with_suffix(".txt")):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    assert not inflight.exists(), "the leftover in-flight file must be removed once converted"
    assert inflight_files(dump_dir) == []
    assert any("loopwatch.dump" in line and "reason=unfinished_stall" in line and str(path) in line
               for line in out.splitlines()), out


# -- 5. one dump per stall, cooldown ------------------------------------------------------------
def test_cooldown_allows_one_dump_but_every_stall_is_counted(app_runner: Runner, tmp_path: Path) -> None:
    name = "stall_twice"
    stall_line = marker_line(name, "STALL-LINE")
    app, dump_dir, url, stop = start(app_runner, name, tmp_path)
    first_start = stamp(app.wait_line("STALL1-START"))
    first_end = stamp(app.wait_line("STALL1-END"))
    second_start = stamp(app.wait_line("STALL2-START"))
    app.wait_line("STALL2-END")
    app.wait_line("STALLS-DONE")
    assert second_start - first_end >= 0.9

    samples = scrape(url)
    assert spikes(samples, "0.3") == 2
    assert spikes(samples, "1.0") == 2
    assert spikes(samples, "10.0") == 0
    assert metric(samples, "dumps_total", reason="event_loop_lag") == 1
    (path,) = dumps(dump_dir)
    dump = load(path)
    assert first_start < dump["timestamp"] < first_end, "the one dump belongs to the first stall"
    check_culprit(dump, name, stall_line, "nap")

    out = finish(app, stop)
    first, second = stall_lines(out)
    assert str(path) in first, first
    assert not re.search(r"\bdump=", second), second
    assert "dump_cooldown" in second, second
    assert dumps(dump_dir) == [path]


def test_stalls_that_release_the_gil_never_crash_the_app_while_threads_run_python(app_runner, tmp_path):
    """Stalls that release the GIL while other threads run Python and start threads: the watchdog takes
    every stack itself.  (faulthandler's dump_traceback_later, used before, walked every thread's frames
    without the GIL and crashed the process with SIGSEGV about once in ten such stalls; the fallback that
    replaced it only ever lets the loop thread read its own frames.)"""
    stalls = 10
    dump_dir, stop = tmp_path / "dumps", tmp_path / "stop"
    app = app_runner("stall_churn", str(dump_dir), str(free_port()), str(stop), str(stalls))
    app.wait_line("CHURN-DONE", timeout=90)
    stop.touch()
    out = app.finish(timeout=30)
    assert app.proc.returncode == 0, f"exit status {app.proc.returncode}\n{out}"
    sources = [json.loads(p.read_text())["source"] for p in dump_dir.glob("loopwatch-*.json")]
    assert sources and set(sources) == {"watchdog"}, sources  # the Python watchdog took every stack
    assert out.count("loopwatch.stall") >= stalls - 1, out
