"""Native stacks in stall dumps with py-spy (``native_stacks=True``): the real py-spy of the [pyspy] extra
on a real stall, and the feature switched off with a reason when py-spy is missing or not permitted."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import free_port, wait_for

import loopwatch
from loopwatch import _pyspy


def _dump_with_native(dump_dir: Path) -> dict | None:
    for path in sorted(dump_dir.glob("loopwatch-*event_loop_lag.json")):
        dump = json.loads(path.read_text())
        if "native_stack" in dump:
            return dump
    return None


def test_a_stall_dump_gets_the_loop_threads_native_stack(app_runner, tmp_path) -> None:
    assert _pyspy.find_pyspy(), "py-spy (the [pyspy] extra, in [dev]) must be installed for this test"
    dump_dir, stop = tmp_path / "dumps", tmp_path / "stop"
    app = app_runner("stall_native", str(dump_dir), str(free_port()), str(stop))
    app.wait_line("BLOCK-END", timeout=30)
    dump = wait_for(lambda: _dump_with_native(dump_dir), timeout=15, what="a dump with native_stack")
    stop.touch()
    out = app.finish(timeout=30)
    assert app.proc.returncode == 0, out
    native = [frame["function"] for frame in dump["native_stack"]]
    assert "clock_nanosleep" in native[-3:], native  # innermost: where in C the loop thread waits
    assert "time_sleep" in native, native
    assert "fetch_quotes_sync" in native, native  # py-spy interleaves the Python frames
    assert dump["native_source"] == "py-spy"
    assert dump["culprit"]["function"] == "fetch_quotes_sync"
    path = next(p for p in dump_dir.glob("*.json") if json.loads(p.read_text()).get("native_stack"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "loopwatch.native_stack" in out and "added=True" in out, out


def test_missing_pyspy_switches_the_feature_off_with_a_reason(registry, tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setattr(sys.modules["loopwatch._dumps"], "find_pyspy", lambda: None)
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, native_stacks=True)
    assert agent.dumps.native_stacks is None
    assert any(d.startswith("native_stacks: py-spy not found") and "loopwatch[pyspy]" in d
               for d in agent.snapshot().degraded), agent.snapshot().degraded
    assert agent.snapshot().dumps_enabled  # the rest keeps working
    assert loopwatch.dump().exists()


def test_pyspy_not_permitted_switches_the_feature_off(tmp_path) -> None:
    """A py-spy that is refused (as in a container without CAP_SYS_PTRACE): here a stand-in executable
    printing py-spy's own error."""
    fake = tmp_path / "py-spy"
    fake.write_text("#!/bin/sh\necho 'Error: Failed to attach: Permission Denied (os error 13)' >&2\nexit 1\n")
    fake.chmod(0o755)
    reasons, errors = [], []
    stacks = _pyspy.NativeStacks(binary=str(fake), degrade=reasons.append, on_error=errors.append,
                                 log=lambda *a, **k: None)
    assert stacks.capture() is None
    assert not stacks.enabled and errors == []
    assert reasons and "not permitted" in reasons[0] and "CAP_SYS_PTRACE" in reasons[0], reasons
    assert stacks.enrich(tmp_path / "x.json", os.getpid(), lambda: True, update=lambda *a: False) is None


def test_native_frames_are_outermost_first_for_the_asked_thread() -> None:
    report = [{"os_thread_id": 7, "frames": [{"name": "recv", "filename": "libc.so.6", "line": 0},
                                             {"name": "query", "filename": "app/db.py", "line": 42}]},
              {"os_thread_id": 8, "frames": []}]
    assert _pyspy.native_frames(report, 7) == [{"function": "query", "filename": "app/db.py", "lineno": 42},
                                              {"function": "recv", "filename": "libc.so.6", "lineno": None}]
    assert _pyspy.native_frames(report, 9) is None


def test_native_stacks_option_is_validated() -> None:
    with pytest.raises(loopwatch.ConfigError, match=r"^native_stacks must be a boolean"):
        loopwatch.install(native_stacks="sometimes")
