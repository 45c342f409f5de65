"""The dump writer: atomic 0600 files, cooldown (injected clock), bounded directory; stack helpers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import sys
from pathlib import Path

import pytest

from loopwatch import _frames
from loopwatch._dumps import DumpWriter, render_text, safe_reason


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_dump(reason: str = "event_loop_lag", ts: float = 1795317599.8) -> dict:
    stack = [_frames.frame_record(__file__, 1, "outer"), _frames.frame_record(__file__, 2, "inner")]
    return {"reason": reason, "timestamp": ts, "stall_seconds": 0.51, "service": "svc", "pid": 123,
            "loop": "main", "kind": "blocked", "cpu_seconds": 0.0, "source": "watchdog",
            "culprit": _frames.culprit_of(stack), "loop_stack": stack, "threads": [], "tasks": [], "note": None}


def test_write_is_private_and_has_a_text_twin(tmp_path: Path) -> None:
    writer = DumpWriter(tmp_path, keep=5, cooldown=0)
    writer.prepare()
    path = writer.write(make_dump())
    assert re.fullmatch(r"loopwatch-\d{8}T\d{6}\.\d{6}Z-123-event_loop_lag\.json", path.name)
    assert json.loads(path.read_text())["culprit"]["function"] == "inner"
    for file in (path, path.with_suffix(".txt")):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert "culprit: " + __file__ + ":2 in inner" in path.with_suffix(".txt").read_text()
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_directory_is_created_0700(tmp_path: Path) -> None:
    target = tmp_path / "a" / "dumps"
    writer = DumpWriter(target, keep=5, cooldown=0)
    writer.prepare()
    assert writer.enabled
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_keep_bounds_the_directory(tmp_path: Path) -> None:
    writer = DumpWriter(tmp_path, keep=3, cooldown=0)
    writer.prepare()
    paths = []
    for i in range(7):
        path = writer.write(make_dump(ts=1795317599.0 + i))
        os.utime(path, (1000 + i, 1000 + i))
        paths.append(path)
    left = sorted(p.name for p in tmp_path.glob("loopwatch-*.json"))
    assert left == sorted(p.name for p in paths[-3:])
    assert len(list(tmp_path.glob("loopwatch-*.txt"))) == 3


def test_same_timestamp_does_not_overwrite(tmp_path: Path) -> None:
    writer = DumpWriter(tmp_path, keep=10, cooldown=0)
    writer.prepare()
    first, second = writer.write(make_dump()), writer.write(make_dump())
    assert first != second and first.exists() and second.exists()


def test_cooldown_with_injected_clock(tmp_path: Path) -> None:
    clock = Clock()
    writer = DumpWriter(tmp_path, keep=10, cooldown=60, clock=clock)
    assert writer.claim_automatic()
    clock.now = 59.9
    assert not writer.claim_automatic()
    clock.now = 60.0
    assert writer.claim_automatic()
    assert not writer.claim_automatic()


def test_unwritable_directory_disables_with_a_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    writer = DumpWriter(blocker / "dumps", keep=10, cooldown=0)
    writer.prepare()
    assert not writer.enabled
    assert writer.disabled_reason is not None
    assert str(blocker / "dumps") in writer.disabled_reason and "Not a directory" in writer.disabled_reason


def test_keep_zero_disables(tmp_path: Path) -> None:
    writer = DumpWriter(tmp_path, keep=0, cooldown=0)
    writer.prepare()
    assert not writer.enabled and writer.disabled_reason == "dump_keep is 0"


def test_safe_reason() -> None:
    assert safe_reason("Weird Reason!") == "weird_reason"
    assert safe_reason("../../etc/passwd") == "etc_passwd"
    assert safe_reason("") == "unnamed"
    assert len(safe_reason("x" * 100)) == 40


def test_render_text_without_culprit() -> None:
    dump = make_dump()
    dump["culprit"] = None
    assert "culprit: none found in application code" in render_text(dump)


# -- stacks --------------------------------------------------------------------------------------

def test_application_files() -> None:
    assert _frames.is_app_file(__file__)
    assert not _frames.is_app_file(asyncio.__file__)
    assert not _frames.is_app_file(pytest.__file__)  # site-packages
    assert not _frames.is_app_file(_frames.__file__)  # loopwatch itself
    assert not _frames.is_app_file("<frozen importlib._bootstrap>")


def secret_holder() -> list[dict]:
    password = "hunter2-do-not-leak"  # noqa: F841 - a local value that must never reach a dump
    return _frames.stack_of(sys._getframe())


def test_stacks_hold_locations_not_values() -> None:
    stack = secret_holder()
    assert stack[-1]["function"] == "secret_holder"
    assert stack[-1]["line"] == "return _frames.stack_of(sys._getframe())"
    assert "hunter2-do-not-leak" not in json.dumps(stack)
    assert set(stack[-1]) == {"filename", "lineno", "function", "line"}


def test_culprit_is_innermost_application_frame() -> None:
    stack = [_frames.frame_record(__file__, 10, "handler"), _frames.frame_record(__file__, 20, "helper"),
             _frames.frame_record(json.__file__, 30, "dumps"), _frames.frame_record(asyncio.__file__, 5, "x")]
    assert _frames.culprit_of(stack)["function"] == "helper"
    assert _frames.culprit_of(stack[2:]) is None


async def _leaf(event: asyncio.Event) -> None:
    await event.wait()


async def _middle(event: asyncio.Event) -> None:
    await _leaf(event)


def test_task_stacks_follow_the_await_chain() -> None:
    async def main() -> list[dict]:
        event = asyncio.Event()
        task = asyncio.create_task(_middle(event), name="worker")
        await asyncio.sleep(0)
        stacks = _frames.task_stacks(asyncio.get_running_loop())
        event.set()
        await task
        return stacks

    stacks = asyncio.run(main())
    worker = next(t for t in stacks if t["name"] == "worker")
    assert worker["coro"] == "_middle"
    assert [f["function"] for f in worker["stack"]][:2] == ["_middle", "_leaf"]


FAULTHANDLER_TEXT = """Timeout (0:00:00.750000)!
Thread 0x00007fe580bdc6c0 (most recent call first):
  File "/srv/app/worker.py", line 4 in <lambda>
  File "/usr/lib/python3.11/threading.py", line 982 in run

Thread 0x00007fe58164bb80 (most recent call first):
  File "/srv/app/handlers/commands.py", line 42 in load_all_sessions
  File "/srv/app/main.py", line 6 in <module>
Timeout (0:00:00.750000)!
Current thread 0x00007fe58164bb80 (most recent call first):
  File "/srv/app/x.py", line ??? in f
"""


def test_parse_faulthandler() -> None:
    blocks = _frames.split_faulthandler(FAULTHANDLER_TEXT)
    assert len(blocks) == 2
    stacks = _frames.parse_faulthandler(blocks[0])
    loop = stacks[0x00007FE58164BB80]
    assert [(f["filename"], f["lineno"], f["function"]) for f in loop] == [
        ("/srv/app/main.py", 6, "<module>"), ("/srv/app/handlers/commands.py", 42, "load_all_sessions")]
    assert _frames.culprit_of(loop)["function"] == "load_all_sessions"
    assert _frames.parse_faulthandler(blocks[1])[0x00007FE58164BB80][0]["lineno"] is None
