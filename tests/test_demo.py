"""End to end: examples/demo.py (what ``make demo`` runs) catches the bot's blocking call and exits 0.

The demo is its own smoke test: it exits 1 when loopwatch misses the stall, which the second test
provokes with a blocking call shorter than the dump threshold.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def run_demo(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    return subprocess.run([sys.executable, str(DEMO), *args], cwd=DEMO.parent.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_demo_names_the_blocking_call_and_exits_0(tmp_path: Path) -> None:
    result = run_demo("--dump-dir", str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    culprit = re.search(r"^\s*culprit\s+(\S+):(\d+) in (\S+)$", result.stdout, re.M)
    assert culprit, output
    assert culprit.group(1).endswith("xai_integration.py"), output
    assert culprit.group(3) == "query_xai", output

    # the lag was read on /metrics while the loop was stuck (the API answers after 3 s)
    mid_stall = re.search(r"event_loop_lag_seconds rose to ([\d.]+) s", result.stdout)
    assert mid_stall and 1.0 <= float(mid_stall.group(1)) <= 4.0, output

    # exactly one automatic dump (the fixed handler wrote none), and it says what the report says
    dumps = sorted(tmp_path.glob("loopwatch-*-event_loop_lag.json"))
    assert len(dumps) == 1, output
    dump = json.loads(dumps[0].read_text())
    assert dump["culprit"]["function"] == "query_xai"
    assert dump["culprit"]["lineno"] == int(culprit.group(2))
    assert "urlopen" in dump["culprit"]["line"]
    assert dump["kind"] == "blocked"
    assert re.search(r"^\s*loopwatch\s+0 dumps, 0 spikes$", result.stdout, re.M), output


def test_demo_fails_loudly_when_loopwatch_sees_no_stall(tmp_path: Path) -> None:
    # a 0.2 s blocking call is below the 0.5 s dump threshold: no dump, so the smoke test must fail
    result = run_demo("--api-delay", "0.2", "--dump-dir", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL: loopwatch did not detect the stall" in result.stderr
    assert not list(tmp_path.glob("*.json"))
