"""Fork safety, end to end: an agent installed before ``os.fork()`` works in the children (own port
from the range, own watchdog, own faulthandler file, counters from zero) and still in the parent."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import APPS, sample, scrape, wait_for
from procs import Proc, dumps_of, port_range, python

NS = "lwfork"


def spikes(samples: dict, loop: str, threshold: str = "0.3") -> float | None:
    return sample(samples, f"{NS}_event_loop_lag_spikes_total", loop=loop, threshold=threshold)


def loops_of(samples: dict) -> set[str]:
    return {dict(labels)["loop"] for name, labels in samples if name == f"{NS}_event_loop_lag_seconds"}


def port_of(url: str) -> int:
    match = re.match(r"http://127\.0\.0\.1:(\d+)/metrics$", url)
    assert match, url
    return int(match.group(1))


def pid_of(line: str) -> int:
    return int(re.search(r"\bpid=(\d+)", line).group(1))


def url_of(line: str) -> str:
    """(Two processes share the pipe: another's line may follow a message before its newline.)"""
    return re.search(r"url=(http://127\.0\.0\.1:\d+/metrics)", line).group(1)


def test_agent_installed_before_fork_works_in_the_children_and_the_parent(tmp_path: Path) -> None:
    first, last = port_range(4)
    dump_dir, stop = tmp_path / "dumps", tmp_path / "stop"
    with Proc(python(str(APPS / "fork_app.py"), str(dump_dir), f"{first}-{last}", str(stop)), cwd=APPS) as app:
        (parent_line,) = app.wait_lines("PARENT pid=", timeout=30)
        parent_pid, parent_url = pid_of(parent_line), url_of(parent_line)
        assert port_of(parent_url) == first

        # A child that runs no loop stays dormant: no thread, no port; and it uninstalls without hanging.
        (dormant,) = app.wait_lines("DORMANT pid=")
        assert "url=None" in dormant and "threads=['MainThread']" in dormant, dormant
        app.wait_lines("DORMANT-UNINSTALLED")
        wait_for(lambda: app.matching("DORMANT-EXIT") or app.matching("DORMANT-HUNG"), timeout=30)
        assert [line[:14] for line in app.matching("DORMANT-EXIT")] == ["DORMANT-EXIT 0"], app.output

        # The active child resumed when its loop started: its own exporter on the next free port.
        (child_line,) = app.wait_lines("CHILD pid=")
        child_pid, child_url = pid_of(child_line), url_of(child_line)
        assert child_pid != parent_pid
        assert first < port_of(child_url) <= last, (parent_url, child_url)
        assert "'loopwatch-exporter'" in child_line and "'loopwatch-watchdog'" in child_line, child_line
        (forked,) = app.wait_lines("loopwatch.forked")
        assert f"pid={child_pid}" in forked and f"parent_pid={parent_pid}" in forked, forked
        assert f"metrics_url={child_url}" in forked, forked

        # Its counters started from zero and hold none of the parent's loops.
        early = scrape(child_url)
        assert sample(early, f"{NS}_dumps_total", reason="manual") == 0
        assert loops_of(early) == {"main"}
        assert spikes(early, "main") == 0

        app.wait_lines("CHILD-DONE", timeout=40)
        regex = [float(app.matching(f"CHILD-REGEX-{edge} ")[0].split()[1]) for edge in ("START", "END")]
        assert regex[1] - regex[0] > 0.5, f"the regex stall was too short to test anything: {regex}"
        # (At least: on a loaded machine a starved process shows extra short stalls of its own.)
        child = scrape(child_url)
        assert spikes(child, "main") >= 2, "the blocking stall and the GIL-held stall"
        assert sample(child, f"{NS}_dumps_total", reason="event_loop_lag") >= 2
        assert sample(child, f"{NS}_dumps_total", reason="manual") == 0
        assert loops_of(child) == {"main"}, "the parent's loops are not the child's"

        child_dumps = dumps_of(dump_dir, child_pid)
        culprits = {(d["source"], (d["culprit"] or {}).get("function")) for d in child_dumps}
        assert ("watchdog", "sync_query") in culprits, culprits
        # faulthandler works in the child: its own in-flight file, the GIL-held stall captured.
        assert ("faulthandler", "match_order_id") in culprits, culprits
        assert all(d["pid"] == child_pid and d["loop"] == "main" for d in child_dumps)
        inflight = {p.name.split("-")[2] for p in dump_dir.glob("loopwatch-inflight-*.txt")}
        assert inflight == {str(parent_pid), str(child_pid)}, "one in-flight file each; the parent's kept"

        # The parent still works after the forks: its own port, its stall counted, its manual dump kept.
        def parent_dumps() -> list[dict]:
            return [d for d in dumps_of(dump_dir, parent_pid)
                    if d["reason"] == "event_loop_lag" and (d["culprit"] or {}).get("function") == "parent_stall"]

        (parent_dump,) = wait_for(parent_dumps, timeout=20, what="the parent's stall after the forks")
        assert parent_dump["loop"] == "parent-loop" and parent_dump["source"] == "watchdog"
        parent = scrape(parent_url)
        assert spikes(parent, "parent-loop") >= 1
        assert sample(parent, f"{NS}_dumps_total", reason="manual") == 1
        assert sample(parent, f"{NS}_dumps_total", reason="event_loop_lag") >= 1
        assert loops_of(parent) == {"parent-loop"}

        stop.touch()
        assert app.proc.wait(30) == 0, app.output
        app.wait_lines("PARENT-EXIT")
        assert not list(dump_dir.glob("loopwatch-inflight-*.txt")), "clean exits remove both in-flight files"
        assert "loopwatch.error" not in app.output, app.output


def test_fork_from_inside_a_running_loop(tmp_path: Path) -> None:
    """The child's new loop (``asyncio.run`` in the forked callback) is watched on its own port; the
    inherited loop is not the child's; the parent's loop goes on being watched."""
    first, last = port_range(3)
    dump_dir = tmp_path / "dumps"
    with Proc(python(str(APPS / "fork_in_loop.py"), str(dump_dir), f"{first}-{last}"), cwd=APPS) as app:
        assert app.proc.wait(60) == 0, app.output
        app.wait_lines("PARENT pid=")
        (child_line,), (parent_line,) = app.matching("CHILD pid="), app.matching("PARENT pid=")
        child = {"pid": pid_of(child_line), "url": url_of(child_line)}
        parent = {"pid": pid_of(parent_line), "url": url_of(parent_line),
                  "child_status": re.search(r"child_status=(\d)", parent_line).group(1)}
        assert parent["child_status"] == "0", app.output
        assert port_of(parent["url"]) == first and first < port_of(child["url"]) <= last
        # Each process dumped its own stall (a loaded machine may add short stalls of its own: >=).
        for who, function in ((child, "child_query"), (parent, "parent_query")):
            found = [d for d in dumps_of(dump_dir, int(who["pid"]))
                     if (d["culprit"] or {}).get("function") == function]
            assert len(found) == 1 and found[0]["loop"] == "main", (who, function)
        stalls = app.matching("loopwatch.stall")
        assert any("in child_query" in line for line in stalls) and any("in parent_query" in line for line in stalls)
        assert "loopwatch.error" not in app.output, app.output
