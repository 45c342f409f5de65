"""Two loops one after the other (``asyncio.run()`` twice) with loopwatch's console:
``python console_reruns.py DUMP_DIR PORT``.  Each loop waits for the console, prints ``CONSOLE <n> <port>``,
then waits until the test creates ``DUMP_DIR/../next-<n>``."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from marker import emit_line

import loopwatch

DUMP_DIR, PORT = Path(sys.argv[1]), int(sys.argv[2])
agent = loopwatch.install(metrics_port=0, dump_dir=str(DUMP_DIR), console=PORT)


async def main(n: int) -> None:
    deadline = time.monotonic() + 30
    while agent.console.port is None and agent.console.failed is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    emit_line(f"CONSOLE {n} {agent.console.port} {agent.console.failed}")
    go = DUMP_DIR.parent / f"next-{n}"
    while not go.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


asyncio.run(main(1))
asyncio.run(main(2))
loopwatch.uninstall()
emit_line("DONE")
