"""End to end: the threads/GIL/executor examples run by themselves, exit 0 and show the effect they describe.

Each example scrapes its own /metrics and prints a bug-vs-fix table; these tests parse that table.  The
margins are wide on purpose: the machine is shared, and the point is the direction and size of the effect
(about 3 threads of GIL contention against ~0; dozens of calls queued against none), not exact figures.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, timeout: float = 90.0) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=EXAMPLES.parent, env=env,
                            capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def table_row(output: str, label: str) -> tuple[str, str]:
    """The bug and fix columns of the summary row that starts with ``label``."""
    match = re.search(rf"^  {re.escape(label)}\s+(\S+)\s+(\S+)\s*$", output, re.M)
    assert match, (label, output)
    return match.group(1), match.group(2)


def floats(output: str, label: str) -> tuple[float, float]:
    bug, fix = table_row(output, label)
    return float(bug), float(fix)


def test_gil_fight_contention_drops_when_the_work_moves_to_processes() -> None:
    output = run_example("gil_fight.py")
    bug, fix = floats(output, "gil_contention")
    assert bug > fix + 0.5, output  # four threads on the GIL (~3) against ~0 with the process pool
    assert bug > 1.0, output
    wait_bug, wait_fix = floats(output, "gil wait mean (ms)")
    assert wait_bug > 2 * wait_fix, output
    assert wait_bug > 5.0, output  # at least one 5 ms switch interval: threads are queueing for the GIL
    cores_bug, cores_fix = floats(output, "process cores")
    assert cores_bug < 1.6, output  # four busy threads, yet the GIL keeps the process near one core
    assert cores_fix < cores_bug, output  # the work left the process
    # the busiest threads of the bug phase are the default executor's (asyncio.to_thread) threads
    busiest = re.findall(r"^  busiest threads\s+(\S+)", output, re.M)
    assert len(busiest) == 2 and busiest[0].startswith("asyncio_"), output
    assert re.search(r'executor="cpu"\s+processes \d+ / max_workers \d+', output), output
    assert "OK: moving the CPU-bound work to processes" in output


def test_to_thread_saturation_fills_the_default_executor_and_the_fix_does_not() -> None:
    output = run_example("to_thread_saturation.py")
    depth_bug, depth_fix = floats(output, "queue depth mid-burst")
    assert depth_bug > 0, output  # calls queued for one of the default executor's threads
    threads_bug, _ = table_row(output, "threads / max_workers")
    threads, max_workers = (float(n) for n in threads_bug.split("/"))
    assert threads == max_workers > 0, output
    assert depth_bug >= 40 - 2 * max_workers, output  # 40 one-second calls at once, read 0.5 s in
    wait_bug, wait_fix = floats(output, "queue wait mean (s)")
    assert wait_bug > 0.1 and wait_bug > 2 * wait_fix, output  # ~2.9 s here (6 threads); less with 32
    assert wait_fix < 0.25, output  # the semaphore hands the pool only what it can start at once
    saturated_bug, saturated_fix = floats(output, "executor_saturated events")
    assert saturated_bug >= 1 and saturated_fix == 0, output
    assert re.search(r"loopwatch\.executor_saturated\s.*executor=default", output), output  # the log line itself
    dns_bug, dns_fix = floats(output, "DNS lookup (s)")
    assert dns_fix < 0.5 < dns_bug, output  # the lookup queued behind the burst, then did not
    assert "OK: loopwatch showed the default executor saturated" in output
