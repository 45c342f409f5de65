"""loopwatch installed in a parent that runs no loop -- a pre-forking server's master with ``--preload`` --
and a forked worker that runs one: ``python remote_fork.py DUMP_DIR CONTROL_DIR``.

The parent installs loopwatch, forks, prints ``PARENT <pid> CHILD <pid>`` and waits for the worker.  The
worker runs ``asyncio.run`` (the agent resumes there: its own beacon and handler), prints ``CHILD-READY``,
and obeys CONTROL_DIR as ``remote_app`` does: ``sleep-S`` (SLEEP-LINE), ``stop``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from marker import emit_line

import loopwatch

DUMP_DIR, CONTROL = sys.argv[1], Path(sys.argv[2])


def block_in_sleep(seconds: float) -> None:
    time.sleep(seconds)  # SLEEP-LINE


async def worker() -> None:
    emit_line(f"CHILD-READY {os.getpid()}")
    while True:
        await asyncio.sleep(0.05)
        for entry in sorted(CONTROL.iterdir()):
            entry.unlink()
            if entry.name == "stop":
                return
            if entry.name.startswith("sleep-"):
                emit_line(f"SLEEP-START {time.time():.6f}")
                block_in_sleep(float(entry.name.split("-", 1)[1]))
                emit_line(f"SLEEP-END {time.time():.6f}")


loopwatch.install(metrics_port=0, dump_dir=DUMP_DIR, lag_thresholds=(0.3, 1.0, 10.0), dump_cooldown=0)
child = os.fork()
if child == 0:
    asyncio.run(worker())
    loopwatch.uninstall()
    os._exit(0)
emit_line(f"PARENT {os.getpid()} CHILD {child}")
os.waitpid(child, 0)
loopwatch.uninstall()
emit_line("PARENT-DONE")
