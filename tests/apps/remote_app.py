"""An app with loopwatch, for ``loopwatch dump PID``: ``python remote_app.py DUMP_DIR CONTROL_DIR [NAME=VALUE...]``.

It installs loopwatch (no exporter, thresholds 0.3/1/10 s, no dump cooldown, plus the ``NAME=VALUE``
options), prints ``READY <pid> <the dump signal's number or off>``, and then waits on a healthy loop for the
test to create a file in CONTROL_DIR:

* ``sleep-S`` -- blocks the loop in ``time.sleep(S)`` (the line marked SLEEP-LINE), between ``SLEEP-START``
  and ``SLEEP-END``;
* ``regex`` -- holds the GIL for about ``REGEX_SECONDS`` (environment; calibrated before install) in
  catastrophic ``re`` backtracking (REGEX-LINE), between ``REGEX-START`` and ``REGEX-END``;
* ``stop`` -- uninstalls loopwatch (``UNINSTALLED``) and exits.

With ``APP_SIGNAL=<name>`` (``SIGUSR2``, ``SIGRTMAX-2``...) it installs its own handler for that signal before
loopwatch (after it with ``APP_SIGNAL_AFTER=1``), which prints ``APP-HANDLER <count>`` each time it runs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from marker import emit_line
from stall_common import BACKTRACK, backtracking_input

import loopwatch

DUMP_DIR, CONTROL = sys.argv[1], Path(sys.argv[2])
OPTIONS = dict(arg.split("=", 1) for arg in sys.argv[3:])
REGEX_TEXT = backtracking_input(float(os.environ["REGEX_SECONDS"])) if os.environ.get("REGEX_SECONDS") else ""
handled = 0


def app_signal(name: str) -> int:
    if name.startswith("SIGRTMAX-"):
        return int(signal.SIGRTMAX) - int(name.split("-")[1])
    return int(getattr(signal, name))


def on_signal(signum: int, frame: object) -> None:
    global handled
    handled += 1
    emit_line(f"APP-HANDLER {handled}")


def block_in_sleep(seconds: float) -> None:
    time.sleep(seconds)  # SLEEP-LINE


def match_order_id(text: str) -> bool:
    return BACKTRACK.match(text) is not None  # REGEX-LINE


async def main() -> None:
    after = os.environ.get("APP_SIGNAL_AFTER") == "1"
    if os.environ.get("APP_SIGNAL") and not after:
        signal.signal(app_signal(os.environ["APP_SIGNAL"]), on_signal)
    agent = loopwatch.install(metrics_port=0, dump_dir=DUMP_DIR, lag_thresholds=(0.3, 1.0, 10.0), dump_cooldown=0,
                              **OPTIONS)
    if os.environ.get("APP_SIGNAL") and after:
        signal.signal(app_signal(os.environ["APP_SIGNAL"]), on_signal)
    emit_line(f"READY {os.getpid()} {agent.requests.signal or 'off'}")
    while True:
        await asyncio.sleep(0.05)
        for entry in sorted(CONTROL.iterdir()):
            entry.unlink()
            if entry.name == "stop":
                loopwatch.uninstall()
                emit_line("UNINSTALLED")
                return
            if entry.name.startswith("sleep-"):
                emit_line(f"SLEEP-START {time.time():.6f}")
                block_in_sleep(float(entry.name.split("-", 1)[1]))
                emit_line(f"SLEEP-END {time.time():.6f}")
            elif entry.name == "regex":
                emit_line(f"REGEX-START {time.time():.6f}")
                match_order_id(REGEX_TEXT)
                emit_line(f"REGEX-END {time.time():.6f}")


asyncio.run(main())
