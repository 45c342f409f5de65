"""``loopwatch dumps`` and ``loopwatch report`` (loopwatch/_incidents.py): grouping, ranking, ``--since``,
``--json``, what is skipped and why, and the page's safety -- run as a user runs them (``python -m
loopwatch`` and the ``loopwatch`` console script, in subprocesses) on dump directories built here with
loopwatch's own dump builder and writer.  The page as a browser draws it: tests/test_report_browser.py."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import stat
import subprocess
import sys
import sysconfig
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from loopwatch import _incidents
from loopwatch._dumps import DumpWriter, build_dump

CONSOLE_SCRIPT = Path(sys.executable).parent / "loopwatch"
STDLIB = sysconfig.get_paths()["stdlib"]  # library frames, as this interpreter's dumps name them
NOW = time.time()


def frame(filename: str, lineno: int, function: str, line: str | None = None) -> dict[str, Any]:
    return {"filename": filename, "lineno": lineno, "function": function, "line": line}


def loop_stack(filename: str, lineno: int, function: str, line: str | None = None) -> list[dict[str, Any]]:
    """A loop thread's stack whose innermost application frame is ``filename:lineno in function``."""
    return [frame(f"{STDLIB}/asyncio/base_events.py", 607, "BaseEventLoop.run_forever"),
            frame("/srv/app/server.py", 10, "handle", "await route(request)"),
            frame(filename, lineno, function, line),
            frame(f"{STDLIB}/socket.py", 706, "SocketIO.readinto")]


def write_dump(directory: Path, *, at: float, function: str = "load_sessions", lineno: int = 42,
               filename: str = "/srv/app/handlers.py", line: str | None = "rows = cursor.fetchall()",
               seconds: float | None = 0.5, kind: str | None = "blocked", reason: str = "event_loop_lag",
               service: str = "alerts", pid: int = 100, **overrides: Any) -> Path:
    """A dump as loopwatch writes it (``build_dump`` + ``DumpWriter``), at time ``at``."""
    dump = build_dump(reason, service=service, loop="main", stall_seconds=seconds,
                      loop_stack=loop_stack(filename, lineno, function, line),
                      threads=[{"name": "MainThread", "ident": 1, "native_id": pid, "daemon": False,
                                "stack": loop_stack(filename, lineno, function, line)}],
                      tasks=[{"name": "Task-7", "coro": "handle",
                              "stack": [frame("/srv/app/server.py", 10, "handle", "await route(request)")]}],
                      source="watchdog" if reason == "event_loop_lag" else "manual", kind=kind,
                      cpu_seconds=0.0, timestamp=at, pid=pid, **overrides)
    directory.mkdir(parents=True, exist_ok=True)
    return DumpWriter(directory, keep=100000, cooldown=0).write(dump)


def run(*args: str, script: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "loopwatch"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def dumps_json(*args: str) -> dict[str, Any]:
    result = run("dumps", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def incident(tmp_path: Path) -> Path:
    """Three culprits: one long stall (5 s, cpu), three short ones (3 x 0.5 s, blocked, two pids and two
    services), one 1.2 s; one manual dump (not a stall)."""
    d = tmp_path / "dumps"
    write_dump(d, at=NOW - 600, function="load_sessions", seconds=0.5, pid=100)
    write_dump(d, at=NOW - 500, function="load_sessions", seconds=0.5, pid=101, service="alerts")
    write_dump(d, at=NOW - 400, function="load_sessions", seconds=0.5, pid=102, service="billing")
    write_dump(d, at=NOW - 300, function="score", lineno=7, filename="/srv/app/scoring.py", line="for x in xs:",
               seconds=5.0, kind="cpu", pid=100)
    write_dump(d, at=NOW - 200, function="parse", lineno=3, filename="/srv/app/feed.py", seconds=1.2, kind="cpu",
               pid=101)
    write_dump(d, at=NOW - 100, reason="manual", seconds=None, kind=None, function="idle", pid=100)
    return d


# -- grouping and ranking -------------------------------------------------------------------------------
def test_groups_by_culprit_ranked_by_total_stalled_seconds(incident: Path) -> None:
    out = dumps_json(str(incident))
    by_location = {c["location"]: c for c in out["culprits"]}
    sessions = by_location["/srv/app/handlers.py:42 in load_sessions"]
    assert sessions["stalls"] == 3
    assert sessions["total_seconds"] == pytest.approx(1.5)
    assert sessions["worst_seconds"] == pytest.approx(0.5)
    assert sessions["kinds"] == {"blocked": 3}
    assert sessions["services"] == ["alerts", "billing"]
    assert sessions["pids"] == [100, 101, 102]
    assert sessions["first_seen_ts"] == pytest.approx(NOW - 600)
    assert sessions["last_seen_ts"] == pytest.approx(NOW - 400)
    assert sessions["first_seen"] == dt.datetime.fromtimestamp(NOW - 600, dt.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")
    assert sessions["culprit"] == {"filename": "/srv/app/handlers.py", "lineno": 42, "function": "load_sessions",
                                   "line": "rows = cursor.fetchall()"}
    assert len(sessions["dumps"]) == 3 and all(Path(p).is_file() for p in sessions["dumps"])
    # ranked by total stalled seconds: 5.0 (1 stall) > 1.5 (3 stalls) > 1.2 (1 stall)
    assert [(c["rank"], c["location"], c["total_seconds"]) for c in out["culprits"]] == [
        (1, "/srv/app/scoring.py:7 in score", 5.0),
        (2, "/srv/app/handlers.py:42 in load_sessions", 1.5),
        (3, "/srv/app/feed.py:3 in parse", 1.2)]
    assert out["stalls"] == 5 and out["dumps_read"] == 6
    assert out["stalled_seconds"] == pytest.approx(7.7)


def test_the_worst_dump_is_the_longest_stall_of_its_culprit(tmp_path: Path) -> None:
    short = write_dump(tmp_path, at=NOW - 30, seconds=0.6)
    worst = write_dump(tmp_path, at=NOW - 20, seconds=2.5)
    latest = write_dump(tmp_path, at=NOW - 10, seconds=0.7)
    (group,) = dumps_json(str(tmp_path))["culprits"]
    assert group["worst_dump"] == str(worst)
    assert group["worst_seconds"] == 2.5
    assert group["dumps"] == [str(short), str(worst), str(latest)]  # oldest first


def test_equal_seconds_rank_by_number_of_stalls(tmp_path: Path) -> None:
    write_dump(tmp_path, at=NOW - 9, function="one", seconds=1.0)
    write_dump(tmp_path, at=NOW - 8, function="two", seconds=0.5)
    write_dump(tmp_path, at=NOW - 7, function="two", seconds=0.5)
    assert [c["culprit"]["function"] for c in dumps_json(str(tmp_path))["culprits"]] == ["two", "one"]


def test_text_output_names_every_figure_per_culprit(incident: Path) -> None:
    result = run("dumps", str(incident))
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.split("\n\n")
    assert blocks[0].startswith("5 stalls at 3 culprits in ")
    first = blocks[1]
    assert first.startswith("1. /srv/app/scoring.py:7 in score\n")
    assert "for x in xs:" in first
    assert re.search(r"stalls\s+1\n", first)
    assert re.search(r"seconds\s+total >=5\.00 s, worst >=5\.00 s", first)
    assert re.search(r"kind\s+cpu 1", first)
    second = blocks[2]
    assert second.startswith("2. /srv/app/handlers.py:42 in load_sessions\n")
    assert re.search(r"seconds\s+total >=1\.50 s, worst >=0\.50 s", second)
    assert re.search(r"services\s+alerts, billing", second)
    assert re.search(r"pids\s+100, 101, 102", second)
    when = dt.datetime.fromtimestamp(NOW - 600, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    assert re.search(rf"first seen\s+{when} UTC", second)
    assert re.search(r"worst dump\s+/\S+\.json", second)
    assert "other dumps (not stalls): manual 1" in result.stdout


def test_a_recorded_full_duration_is_used_and_not_marked_as_a_lower_bound(tmp_path: Path) -> None:
    write_dump(tmp_path, at=NOW - 5, seconds=0.5, duration=3.25)
    write_dump(tmp_path, at=NOW - 4, seconds=0.5, duration=1.0)
    out = dumps_json(str(tmp_path))
    (group,) = out["culprits"]
    assert group["total_seconds"] == pytest.approx(4.25) and group["worst_seconds"] == 3.25
    assert group["lower_bound"] is False and out["lower_bound"] is False
    text = run("dumps", str(tmp_path)).stdout
    assert "total 4.25 s, worst 3.25 s" in text and ">=" not in text


def test_manual_dumps_are_not_stalls_and_unfinished_stalls_count_without_seconds(tmp_path: Path) -> None:
    write_dump(tmp_path, at=NOW - 50, seconds=0.5)
    write_dump(tmp_path, at=NOW - 40, reason="manual", seconds=3.0, kind=None)  # mid-stall manual dump
    unfinished = write_dump(tmp_path, at=NOW - 30, reason="unfinished_stall", seconds=None, kind=None)
    out = dumps_json(str(tmp_path))
    (group,) = out["culprits"]
    assert group["stalls"] == 2 and group["unfinished"] == 1
    assert group["total_seconds"] == 0.5  # the unfinished stall's length is unknown; the manual dump is no stall
    assert group["kinds"] == {"blocked": 1, "unknown": 1}
    assert group["last_seen_ts"] == pytest.approx(NOW - 30) and str(unfinished) in group["dumps"]
    assert [(d["reason"], d["service"]) for d in out["other_dumps"]] == [("manual", "alerts")]
    assert "1 unfinished: the process died mid-stall" in run("dumps", str(tmp_path)).stdout


def test_stalls_without_an_application_frame_form_their_own_group(tmp_path: Path) -> None:
    dump = build_dump("event_loop_lag", service="s", loop="main", stall_seconds=0.8, source="watchdog",
                      loop_stack=[frame(f"{STDLIB}/selectors.py", 468, "select")], threads=[], tasks=[],
                      timestamp=NOW - 5, kind="blocked")
    assert dump["culprit"] is None
    DumpWriter(tmp_path, keep=10, cooldown=0).write(dump)
    (group,) = dumps_json(str(tmp_path))["culprits"]
    assert group["location"] is None and group["culprit"] is None and group["stalls"] == 1
    assert "1. (no application frame on the loop thread)" in run("dumps", str(tmp_path)).stdout


def test_several_directories_and_a_directory_named_twice(tmp_path: Path) -> None:
    write_dump(tmp_path / "pod-a", at=NOW - 20, pid=1, service="alerts")
    write_dump(tmp_path / "pod-b", at=NOW - 10, pid=1, service="alerts", hostname="pod-b")
    out = dumps_json(str(tmp_path / "pod-a"), str(tmp_path / "pod-b"), str(tmp_path / "pod-a"))
    (group,) = out["culprits"]
    assert group["stalls"] == 2  # pod-a's dump once, not twice
    assert "pod-b" in group["hosts"]


# -- --since ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "back"), [("30m", 1800), ("90s", 90), ("1.5h", 5400), ("2d", 172800),
                                            ("1w", 604800), (" 2H ", 7200)])
def test_since_durations(text: str, back: float) -> None:
    assert _incidents.parse_since(text).cutoff(1_000_000.0) == 1_000_000.0 - back


@pytest.mark.parametrize(("text", "when"), [
    ("2026-12-03T21:00:00Z", dt.datetime(2026, 12, 3, 21, tzinfo=dt.timezone.utc)),
    ("2026-12-03T21:00", dt.datetime(2026, 12, 3, 21, tzinfo=dt.timezone.utc)),  # no zone: UTC
    ("2026-12-03 22:00:00+01:00", dt.datetime(2026, 12, 3, 21, tzinfo=dt.timezone.utc)),
    ("2026-12-03", dt.datetime(2026, 12, 3, tzinfo=dt.timezone.utc)),
])
def test_since_iso_times(text: str, when: dt.datetime) -> None:
    assert _incidents.parse_since(text).cutoff(0.0) == when.timestamp()


@pytest.mark.parametrize("text", ["yesterday", "0m", "-5m", "5 minutes", "2026-13-01", "", "10"])
def test_since_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(text))):
        _incidents.parse_since(text)


def test_since_filters_dumps(incident: Path) -> None:
    # NOW is when this module was imported (collection): minutes may have passed in a full run
    out = dumps_json(str(incident), "--since", f"{round(time.time() - NOW) + 350}s")
    assert {c["culprit"]["function"]: c["stalls"] for c in out["culprits"]} == {"score": 1, "parse": 1}
    iso = dt.datetime.fromtimestamp(NOW - 450, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    out = dumps_json(str(incident), "--since", iso)  # no zone: UTC
    assert sum(c["stalls"] for c in out["culprits"]) == 3
    assert out["since"].startswith(iso)
    result = run("dumps", str(incident), "--since", "1m")
    assert result.returncode == 0
    assert result.stdout.startswith("no loopwatch dumps since ") and "(6 older dumps)" in result.stdout


def test_a_bad_since_is_an_argparse_error_naming_the_value(incident: Path) -> None:
    for command in (("dumps", str(incident)), ("report", str(incident), "-o", str(incident / "r.html"))):
        result = run(*command, "--since", "last tuesday")
        assert result.returncode == 2
        assert f"loopwatch {command[0]}: error: argument --since: must be an ISO time" in result.stderr
        assert "'last tuesday'" in result.stderr and "30m" in result.stderr
        assert not result.stdout


# -- robustness ------------------------------------------------------------------------------------------
def test_foreign_corrupt_and_odd_files_are_skipped_with_a_note(tmp_path: Path) -> None:
    good = write_dump(tmp_path, at=NOW - 5)
    (tmp_path / "loopwatch-20261204T000000.000000Z-1-event_loop_lag.json").write_text('{"reason": "event_lo')
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    (tmp_path / "config.json").write_text('{"name": "not a dump"}')
    (tmp_path / "nested.json").write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "notes.md").write_text("hello")
    (tmp_path / "loopwatch-inflight-vm-123.txt").write_text("# loopwatch in-flight pid=123\n")
    (tmp_path / ".loopwatch-x.json.abc.tmp").write_text("{")  # a write in progress
    (tmp_path / "old").mkdir()
    os.mkfifo(tmp_path / "pipe.json")  # must not hang the reader
    result = run("dumps", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 stall at 1 culprit in ")
    notes = result.stderr.splitlines()
    skipped = {Path(m.group(1)).name: m.group(2) for m in
               (re.match(r"loopwatch dumps: skipped (\S+): (.*)$", n) for n in notes) if m}
    assert skipped["loopwatch-20261204T000000.000000Z-1-event_loop_lag.json"].startswith("not JSON")
    assert skipped["list.json"] == "not a loopwatch dump (not a JSON object)"
    assert skipped["config.json"] == "not a loopwatch dump (no reason or timestamp)"
    assert skipped["nested.json"].startswith("not JSON")
    assert skipped["binary.json"].startswith("not JSON")
    assert skipped["notes.md"] == "not a loopwatch dump (not a .json file)"
    assert skipped["pipe.json"] == "not a regular file"
    assert set(skipped) == {"loopwatch-20261204T000000.000000Z-1-event_loop_lag.json", "list.json", "config.json",
                            "nested.json", "binary.json", "notes.md", "pipe.json"}  # not the twin, not hidden
    assert any("1 in-flight file (loopwatch-inflight-*.txt) not read" in n for n in notes)
    assert any("1 subdirectory not searched" in n for n in notes)
    assert good.with_suffix(".txt").exists()  # the twin was there, and not noted
    out = dumps_json(str(tmp_path))
    assert len(out["skipped"]) == 7 and out["stalls"] == 1


def test_a_file_over_the_size_limit_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = write_dump(tmp_path, at=NOW - 5)
    monkeypatch.setattr(_incidents, "MAX_DUMP_BYTES", 100)
    result = _incidents.scan([str(tmp_path)])
    assert result.dumps == []
    assert result.skipped == [(str(big), f"too large for a dump ({big.stat().st_size} bytes; at most 100)")]


def test_symbolic_links_inside_a_dump_directory_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    target = write_dump(outside, at=NOW - 50, function="secret_elsewhere")
    dumps = tmp_path / "dumps"
    inside = write_dump(dumps, at=NOW - 10, function="load_sessions")
    (dumps / "loopwatch-planted.json").symlink_to(target)  # would add a stall from outside the directory
    (dumps / "loopwatch-again.json").symlink_to(inside)  # would count one stall twice
    (dumps / "loopwatch-etc.json").symlink_to("/etc/shadow")
    (dumps / "sub").symlink_to(outside, target_is_directory=True)
    result = run("dumps", str(dumps))
    assert result.returncode == 0
    assert result.stdout.startswith("1 stall at 1 culprit") and "secret_elsewhere" not in result.stdout
    for name in ("loopwatch-planted.json", "loopwatch-again.json", "loopwatch-etc.json", "sub"):
        assert f"skipped {dumps / name}: a symbolic link: not followed" in result.stderr
    # the directory named on the command line may itself be a link: the operator chose it
    (tmp_path / "current").symlink_to(dumps, target_is_directory=True)
    out = dumps_json(str(tmp_path / "current"))
    assert out["stalls"] == 1 and out["culprits"][0]["culprit"]["function"] == "load_sessions"


def test_read_private_refuses_a_link_even_when_asked_directly(tmp_path: Path) -> None:
    target = write_dump(tmp_path / "a", at=NOW)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(_incidents.Skip, match="a symbolic link: not followed"):
        _incidents.read_private(str(link))


def test_a_dump_removed_while_reading_is_skipped_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write_dump(tmp_path, at=NOW - 2, function="one")
    write_dump(tmp_path, at=NOW - 1, function="two")
    real = _incidents.load

    def pruned(path: str) -> dict[str, Any]:  # the agent pruned it between listing and reading
        if path == str(first):
            os.unlink(path)
        return real(path)

    monkeypatch.setattr(_incidents, "load", pruned)
    result = _incidents.scan([str(tmp_path)])
    assert [d.culprit[2] for d in result.dumps if d.culprit] == ["two"]
    assert result.skipped[0][0] == str(first) and result.skipped[0][1].startswith("unreadable")


def test_fields_of_the_wrong_type_do_not_crash(tmp_path: Path) -> None:
    write_dump(tmp_path, at=NOW - 3, seconds=0.5, kind=None)
    odd = {"reason": "event_loop_lag", "timestamp": NOW - 2, "stall_seconds": "long", "pid": "x", "kind": 7,
           "service": ["a"], "culprit": {"filename": 3}, "loop_stack": "no", "threads": {}, "tasks": None}
    (tmp_path / "odd.json").write_text(json.dumps(odd))
    (tmp_path / "nan.json").write_text('{"reason": "event_loop_lag", "timestamp": NaN}')
    (tmp_path / "far.json").write_text('{"reason": "event_loop_lag", "timestamp": 1e300}')
    out = dumps_json(str(tmp_path))
    assert out["stalls"] == 2
    assert {s["path"].rsplit("/", 1)[1]: s["why"] for s in out["skipped"]} == {
        "nan.json": "not a loopwatch dump (no reason or timestamp)",
        "far.json": "not a loopwatch dump (timestamp 1e+300 out of range)"}
    report = tmp_path.parent / "odd.html"
    result = run("report", str(tmp_path), "-o", str(report))
    assert result.returncode == 0, result.stderr
    assert "no frames recorded" in report.read_text()


def test_control_characters_from_a_dump_are_made_visible_in_the_terminal(tmp_path: Path) -> None:
    write_dump(tmp_path, at=NOW, function="evil\x1b[2J\x1b]0;pwned\x07", line="x = 1\rok")
    result = run("dumps", str(tmp_path))
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout and "\r" not in result.stdout
    assert "evil\\x1b[2J\\x1b]0;pwned\\x07" in result.stdout


# -- the command line ------------------------------------------------------------------------------------
def test_an_empty_directory_says_so_and_exits_0(tmp_path: Path) -> None:
    result = run("dumps", str(tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"no loopwatch dumps in {tmp_path}\n", "")
    result = run("dumps", str(tmp_path), "--json")
    assert result.returncode == 0
    out = json.loads(result.stdout)
    assert (out["schema"], out["culprits"], out["stalls"], out["dumps_read"]) == (1, [], 0, 0)
    assert f"no loopwatch dumps in {tmp_path}" in result.stderr


def test_a_missing_directory_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    write_dump(tmp_path / "ok", at=NOW)
    commands = (("dumps", str(tmp_path / "ok"), str(missing)), ("report", str(missing), "-o", str(tmp_path / "r.html")))
    for command in commands:
        result = run(*command)
        assert result.returncode == 2
        assert f"loopwatch {command[0]}: error: no such directory: {missing}" in result.stderr
        assert result.stdout == ""
    not_dir = write_dump(tmp_path / "ok", at=NOW - 1)
    result = run("dumps", str(not_dir))
    assert result.returncode == 2 and f"error: not a directory: {not_dir}" in result.stderr
    assert not (tmp_path / "r.html").exists()


def test_the_console_script_and_python_m_agree(incident: Path) -> None:
    assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT} missing: run `make setup` (pip install -e .)"
    by_script = run("dumps", str(incident), "--json", script=True)
    by_module = run("dumps", str(incident), "--json")
    assert by_script.returncode == by_module.returncode == 0, by_script.stderr + by_module.stderr
    drop = lambda out: {k: v for k, v in json.loads(out).items() if k != "generated_at"}  # noqa: E731
    assert drop(by_script.stdout) == drop(by_module.stdout)
    assert len(json.loads(by_script.stdout)["culprits"]) == 3
    helped = run("--help", script=True)
    assert "dumps" in helped.stdout and "report" in helped.stdout
    helped = run("dumps", "--help", script=True)
    assert "--since WHEN" in helped.stdout and "--json" in helped.stdout and "30m" in helped.stdout


def test_json_schema(incident: Path) -> None:
    out = dumps_json(str(incident))
    assert set(out) == {"schema", "generated_at", "directories", "since", "dumps_read", "stalls",
                        "stalled_seconds", "lower_bound", "culprits", "other_dumps", "skipped"}
    assert out["directories"] == [str(incident)] and out["since"] is None
    for culprit in out["culprits"]:
        assert set(culprit) == {"rank", "location", "culprit", "stalls", "unfinished", "total_seconds",
                                "worst_seconds", "lower_bound", "kinds", "first_seen", "last_seen", "first_seen_ts",
                                "last_seen_ts", "services", "pids", "hosts", "routes", "worst_dump", "worst_trace_id",
                                "dumps"}
        assert culprit["routes"] == {} and culprit["worst_trace_id"] is None  # these dumps predate request context
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", culprit["last_seen"])
    (other,) = out["other_dumps"]
    assert set(other) == {"path", "reason", "time", "timestamp", "service", "pid", "host"}


# -- the page ----------------------------------------------------------------------------------------------
class Tags(HTMLParser):
    """Every start tag with its attributes, and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parsed(page: str) -> Tags:
    tags = Tags()
    tags.feed(page)
    return tags


EXTERNAL = re.compile(r"""(?ix)  # a resource the browser would fetch: an attribute with a scheme or //, url(), @import
    (?:\b(?:src|href|xlink:href|action|poster|data|srcset)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:|//))
    |url\(\s*["']?\s*(?!data:)[^)]|@import""")


def test_the_page_is_self_contained_and_loads_nothing(incident: Path, tmp_path: Path) -> None:
    page_path = tmp_path / "report.html"
    result = run("report", str(incident), "-o", str(page_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {page_path}: 5 stalls at 3 culprits (6 dumps read)\n"
    page = page_path.read_text()
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assert "http://" not in page and "https://" not in page
    tags = parsed(page)
    assert not [t for t, _ in tags.tags if t in ("script", "link", "img", "iframe", "object", "embed", "base")]
    assert [a for t, a in tags.tags if t == "a" and not str(a.get("href", "")).startswith("#")] == []
    csp = [a["content"] for t, a in tags.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]
    assert stat.S_IMODE(page_path.stat().st_mode) == 0o600  # stacks of a service: like a dump
    # what a reader looks for: every culprit, ranked, with the worst dump's stack, task and threads
    rows = [a["data-location"] for t, a in tags.tags if t == "li" and a.get("class") == "culprit-row"]
    assert rows == ["/srv/app/scoring.py:7 in score", "/srv/app/handlers.py:42 in load_sessions",
                    "/srv/app/feed.py:3 in parse"]
    marks = [a for t, a in tags.tags if t == "circle" and a.get("class") == "stall"]
    assert sorted(a["data-kind"] for a in marks) == ["blocked", "blocked", "blocked", "cpu", "cpu"]
    text = "".join(tags.text)
    assert "rows = cursor.fetchall()" in text and "running: Task-7" in text and "MainThread (loop thread)" in text
    assert "Other dumps (not stalls)" in text


def test_everything_from_a_dump_is_escaped(tmp_path: Path) -> None:
    hostile = "<script>document.title='pwned'</script>"
    write_dump(tmp_path / "d", at=NOW, function=hostile, filename='/srv/"><img src=x onerror=alert(1)>.py',
               line="</pre><script>alert(2)</script>", service="<b>svc</b>", kind="<i>k</i>")
    page_path = tmp_path / "r.html"
    assert run("report", str(tmp_path / "d"), "-o", str(page_path)).returncode == 0
    page = page_path.read_text()
    tags = parsed(page)
    assert [t for t, _ in tags.tags if t in ("script", "img", "i")] == []
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    assert hostile in "".join(tags.text)  # shown as text


def test_the_page_stays_bounded_with_thousands_of_dumps(tmp_path: Path) -> None:
    d = tmp_path / "many"
    d.mkdir()
    base = NOW - 86400
    for i in range(3000):  # 60 culprits, stalls spread over a day, written as loopwatch writes them
        dump = build_dump("event_loop_lag", service="alerts", loop="main", stall_seconds=0.5 + (i % 17) / 10,
                          loop_stack=loop_stack(f"/srv/app/mod{i % 60}.py", i % 60 + 1, f"f{i % 60}"),
                          threads=[], tasks=[], source="watchdog", kind=("blocked", "cpu", "gc")[i % 3],
                          timestamp=base + i * 28.8, pid=1000 + i % 7)
        (d / f"loopwatch-{i:05d}-event_loop_lag.json").write_text(json.dumps(dump))
    page_path = tmp_path / "many.html"
    started = time.monotonic()
    result = run("report", str(d), "-o", str(page_path))
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("3000 stalls at 60 culprits (3000 dumps read)\n")
    assert took < 60, took
    page = page_path.read_text()
    assert len(page) < 3_000_000, len(page)
    tags = parsed(page)
    sections = [a for t, a in tags.tags if t == "section" and a.get("class") == "culprit"]
    assert len(sections) == _incidents.MAX_SECTIONS
    assert f"{60 - _incidents.MAX_SECTIONS} more culprits are ranked above but not detailed" in page
    assert len([a for t, a in tags.tags if t == "li" and a.get("class") == "culprit-row"]) == 60
    marks = [a for t, a in tags.tags if t in ("circle", "path") and a.get("class") == "stall"]
    assert 0 < len(marks) <= 3000
    assert sum(int(a["data-count"]) for a in marks) == 3000  # every stall drawn (same pixel: drawn once)
    out = dumps_json(str(d))
    assert out["stalls"] == 3000 and len(out["culprits"]) == 60


def test_report_output_errors_and_stdout(incident: Path, tmp_path: Path) -> None:
    result = run("report", str(incident), "-o", str(tmp_path / "no" / "such" / "r.html"))
    assert result.returncode == 2
    assert f"argument -o/--output: no such directory: {tmp_path / 'no' / 'such'}" in result.stderr
    result = run("report", str(incident))
    assert result.returncode == 2 and "the following arguments are required: -o/--output" in result.stderr
    result = run("report", str(incident), "-o", "-")
    assert result.returncode == 0 and result.stdout.startswith("<!DOCTYPE html>")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("report", str(empty), "-o", str(tmp_path / "e.html"))
    assert result.returncode == 0
    assert result.stdout == f"wrote {tmp_path / 'e.html'}: no stalls in {empty} (0 dumps read)\n"
    assert "No stalls in these dumps" in (tmp_path / "e.html").read_text()


def test_report_replaces_a_link_at_the_output_path_instead_of_writing_through_it(incident: Path,
                                                                                  tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "r.html"
    out.symlink_to(victim)
    assert run("report", str(incident), "-o", str(out)).returncode == 0
    assert victim.read_text() == "keep me"
    assert not out.is_symlink() and out.read_text().startswith("<!DOCTYPE html>")


def test_a_reader_that_stops_early_is_no_error(incident: Path, tmp_path: Path) -> None:
    """``loopwatch dumps DIR | head -1``: the reader is gone before the output is; no traceback, status 0."""
    for command in (("dumps", str(incident), "--json"), ("dumps", str(incident)), ("report", str(incident), "-o", "-")):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader has already stopped reading
        try:
            result = subprocess.run([sys.executable, "-m", "loopwatch", *command], stdout=write_end,
                                    stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write_end)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
