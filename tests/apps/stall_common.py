"""Shared plumbing of the stall_* test apps (imported by them; not an app itself).

Every stall app is started as ``python stall_<name>.py DUMP_DIR METRICS_PORT STOP_FILE [extra...]``:
it installs loopwatch with a short ``lag_thresholds`` and its own ``dump_dir``/port, does its stall,
then keeps its loop healthy until the test creates ``STOP_FILE`` (so the test can scrape after the
stall), and exits.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
import time
from pathlib import Path

import loopwatch
from marker import emit_line

NAMESPACE = "lwstall"
SERVICE = "stall-app"


def argv() -> tuple[str, int, Path, list[str]]:
    dump_dir, port, stop, *extra = sys.argv[1:]
    return dump_dir, int(port), Path(stop), extra


def install(dump_dir: str, port: int, **options: object) -> loopwatch.Agent:
    settings: dict[str, object] = {
        "namespace": NAMESPACE, "service": SERVICE, "dump_dir": dump_dir, "metrics_port": port,
        "metrics_addr": "127.0.0.1", "lag_thresholds": (0.3, 1.0, 10.0), "dump_cooldown": 0,
    }
    settings.update(options)
    agent = loopwatch.install(**settings)  # type: ignore[arg-type]
    emit_line(f"READY {agent.metrics_url}")
    return agent


def say(what: str) -> None:
    """``WHAT <time.time()>``: the test compares these stamps with its own clock."""
    emit_line(f"{what} {time.time():.6f}")


async def wait_for_stop(stop: Path, timeout: float = 60.0) -> None:
    say("WAITING")
    deadline = time.monotonic() + timeout
    while not stop.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


BACKTRACK = re.compile(r"(a+)+$")


def backtracking_input(seconds: float) -> str:
    """A string on which ``BACKTRACK.match`` holds the GIL for about ``seconds`` on this machine.

    Each extra ``a`` doubles the time: measure a size that takes >= 0.1 s, then extrapolate.
    """
    n = 16
    while True:
        start = time.perf_counter()
        BACKTRACK.match("a" * n + "b")
        took = time.perf_counter() - start
        if took >= 0.1:
            break
        n += 1
    return "a" * (n + max(0, round(math.log2(seconds / took)))) + "b"
