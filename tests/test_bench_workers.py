"""The benchmark's workers still run against this checkout (``make bench`` is slow and not part of ``make
test``: this catches a worker broken by a change in loopwatch, as one was once by a renamed internal)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.overhead.harness import _child_env, _parse_result, _worker_cmd  # noqa: E402


def test_the_step_worker_runs_with_loopwatch_and_reports_its_state(tmp_path: Path) -> None:
    cmd = _worker_cmd("steps", True, tmp_path, steps=200, tasks=4)
    done = subprocess.run(cmd, cwd=tmp_path, env=_child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = _parse_result(done.stdout, "steps")
    assert result["steps"] == 800
    state = result["state"]
    assert state["selector_wrapped"] is True and state["exact_on"] is False, state
    assert state["slow_callbacks"] == 0, state
