"""End to end: examples/sessions_db.py against the machine's real PostgreSQL (127.0.0.1:5432).

The example runs the trading bot's sessions database twice -- sync psycopg2 called from async handlers (the
bug), then an asyncpg pool watched with ``loopwatch.watch_pool`` (the fix) -- and prints what loopwatch
showed; these tests parse those figures.  No mocks: PostgreSQL is required, and when it cannot be reached the
example exits non-zero, so the first test fails (never skips); the second checks that it fails loudly.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import psycopg2

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sessions_db.py"
PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def run_example(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=EXAMPLE.parent.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


def field(output: str, pattern: str) -> re.Match[str]:
    match = re.search(pattern, output, re.M)
    assert match, (pattern, output)
    return match


def test_sessions_db_bug_blocks_the_loop_and_the_pool_fix_does_not(tmp_path: Path) -> None:
    result = run_example("--dsn", PG, "--dump-dir", str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    bug, fix = result.stdout.split("[2/2]", 1)

    # -- the bug: psycopg2's load_all_sessions() called from the async handler stalls the loop
    culprit = field(bug, r"^\s*culprit\s+(\S+):(\d+) in (\S+)$")
    assert culprit.group(1).endswith("sessions_db.py"), output
    assert culprit.group(3) == "load_all_sessions", output
    assert field(bug, r"^\s*stall\s+kind=(\w+)").group(1) == "blocked", output
    assert float(field(bug, r"event_loop_lag_seconds rose to ([\d.]+) s").group(1)) > 0.5, output
    assert int(field(bug, r"^\s*ticker\s+missed (\d+) ticks?").group(1)) > 0, output
    dump_path = Path(field(bug, r"^\s*dump\s+(\S+\.json)$").group(1))
    assert dump_path.parent == tmp_path, output
    dump = json.loads(dump_path.read_text())
    assert dump["culprit"]["function"] == "load_all_sessions", dump
    assert dump["culprit"]["lineno"] == int(culprit.group(2)), dump
    assert "cur.execute" in dump["culprit"]["line"], dump
    assert dump["kind"] == "blocked", dump

    # -- the fix, mid-flight: 8 commands on a pool of 3 -- all 3 used, the rest waiting
    used, idle = (int(n) for n in field(fix, r"^\s*count\s+used (\d+), idle (\d+)").groups())
    maximum = int(field(fix, r"^\s*max\s+(\d+)").group(1))
    pending = int(field(fix, r"^\s*pending\s+(\d+)").group(1))
    assert used == maximum == 3 and idle == 0, output
    assert pending > 0, output
    assert "'database busy, try again in a moment'" in fix, output  # /status's acquire(timeout=0.1) gave up

    # -- the fix, after: every acquire's wait observed (the timed-out one too), one timeout, no stall
    wait = field(fix, r"^\s*wait time\s+mean ([\d.]+) s, count (\d+) .*the app made (\d+) acquires")
    assert int(wait.group(2)) == int(wait.group(3)) == 9, output
    assert float(wait.group(1)) > 0.3, output  # 5 of the 8 commands waited for a connection (1.2 s queries)
    use = field(fix, r"^\s*use time\s+mean ([\d.]+) s, count (\d+)")
    assert int(use.group(2)) == 8 and float(use.group(1)) >= 1.0, output
    assert int(field(fix, r"^\s*timeouts\s+(\d+)").group(1)) == 1, output
    assert field(fix, r"^\s*loopwatch\s+(\d+) stall dumps, (\d+) spikes$").groups() == ("0", "0"), output
    dumps_bug, dumps_fix = (int(n) for n in field(fix, r"^\s*stall dumps\s+(\d+)\s+(\d+)$").groups())
    assert dumps_bug >= 1 and dumps_fix == 0, output
    assert len(list(tmp_path.glob("loopwatch-*-event_loop_lag.json"))) == dumps_bug, output
    assert "OK: loopwatch named sessions_db.py" in output

    # the example dropped its table
    table = field(output, r"table (loopwatch_demo_sessions_\d+) ").group(1)
    with psycopg2.connect(PG, connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (table,))
        assert cur.fetchone() == (None,)
    conn.close()


def test_sessions_db_fails_loudly_without_postgresql() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_example("--dsn", f"postgresql://postgres@127.0.0.1:{port}/postgres", timeout=60)
    assert result.returncode != 0, result.stdout + result.stderr
    assert f"FAIL: PostgreSQL is not reachable at postgresql://postgres@127.0.0.1:{port}/postgres" in result.stderr
    assert "[1/2]" not in result.stdout
