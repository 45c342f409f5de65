"""A program whose stdout is data: JSON lines, with the loop stalled once in the middle.

``python json_pipe.py MODE DUMP_DIR [LOGS]``: MODE ``plain`` runs without loopwatch, ``installed`` installs
it first (a stall past its 0.2 s threshold, so it logs a ``loopwatch.stall`` warning and writes a dump).
LOGS is how the program sets up logging: ``none`` (nothing: Python's last-resort handler), ``logging``
(``logging.basicConfig`` on stderr, INFO) or ``structlog`` (``structlog.configure()`` with a renderer that
prints on stderr).  Its stdout must be the same bytes whatever MODE and LOGS are, when LOGS does not print
to stdout.  Deliberately not importing ``marker`` (which configures logging for the other apps).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

MODE, DUMP_DIR = sys.argv[1], sys.argv[2]
LOGS = sys.argv[3] if len(sys.argv) > 3 else "none"

if LOGS == "logging":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
elif LOGS == "structlog":
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

if MODE == "installed":
    import loopwatch

    loopwatch.install(metrics_port=0, dump_dir=DUMP_DIR, lag_thresholds=(0.2,), probe_interval=0.05,
                      dump_cooldown=0)


async def main() -> None:
    for n in range(3):
        print(json.dumps({"n": n, "square": n * n}))
        await asyncio.sleep(0.1)
    time.sleep(0.6)  # the stall: loopwatch logs it (on stderr, or wherever logging sends it), never on stdout
    for n in range(3, 6):
        print(json.dumps({"n": n, "square": n * n}))
        await asyncio.sleep(0.1)


asyncio.run(main())
if MODE == "installed":
    loopwatch.uninstall()
