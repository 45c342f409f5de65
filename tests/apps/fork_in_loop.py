"""``os.fork()`` from inside a running loop (what ``multiprocessing``'s fork start method does when a
coroutine starts a process): the child runs a new loop with ``asyncio.run`` (nested inside the inherited,
dead one) and stalls it; the parent stalls its own loop meanwhile.

``python fork_in_loop.py DUMP_DIR FIRST-LAST``: prints ``CHILD pid=... url=...`` and ``PARENT ...`` lines.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import loopwatch
from marker import emit_line

DUMP_DIR, PORTS = sys.argv[1], sys.argv[2]


def child_query() -> None:
    time.sleep(0.8)  # CHILD-BLOCK


def parent_query() -> None:
    time.sleep(0.8)  # PARENT-BLOCK


async def child_main(agent: loopwatch.Agent) -> None:
    await asyncio.sleep(0.3)
    child_query()
    await asyncio.sleep(0.5)
    emit_line(f"CHILD pid={os.getpid()} url={agent.metrics_url}")


async def main(agent: loopwatch.Agent) -> None:
    await asyncio.sleep(0.5)
    pid = os.fork()
    if pid == 0:
        try:
            asyncio.run(child_main(agent))
            loopwatch.uninstall()
        finally:
            os._exit(0)
    await asyncio.sleep(0.3)
    parent_query()
    await asyncio.sleep(0.5)
    _, status = await asyncio.get_running_loop().run_in_executor(None, os.waitpid, pid, 0)
    emit_line(f"PARENT pid={os.getpid()} url={agent.metrics_url} child_status={status}")


agent = loopwatch.install(namespace="lwfork", service="fork-in-loop", metrics_port=PORTS,
                          metrics_addr="127.0.0.1", dump_dir=DUMP_DIR, lag_thresholds=(0.3, 5.0, 10.0),
                          dump_cooldown=0, probe_interval=0.1)
asyncio.run(main(agent))
