"""An agent installed before ``os.fork()``: does it work in the children, and still in the parent?

``python fork_app.py DUMP_DIR FIRST-LAST STOP_FILE``.  The parent installs loopwatch (metrics port
range FIRST-LAST), writes a manual dump (so its ``dumps_total`` is not zero) and runs a loop in a
thread named ``parent-loop`` -- that loop owns faulthandler's timer, re-armed on every beat.  The main
thread then forks twice:

* a *dormant* child that runs no loop: it reports its threads and metrics URL, uninstalls and exits;
* an *active* child that runs ``asyncio.run``: a blocking stall (``time.sleep``, GIL released) and a
  GIL-held stall (catastrophic ``re`` backtracking), then waits for STOP_FILE.

After the forks the parent's loop stalls too (``time.sleep``).  Every step prints a line for the test.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

from stall_common import BACKTRACK, backtracking_input, say

import loopwatch
from marker import emit_line

DUMP_DIR, PORTS, STOP = sys.argv[1], sys.argv[2], Path(sys.argv[3])
TEXT = backtracking_input(2.0)  # calibrated before anything runs (2 s: calibration may be off 3x)


def wait_stop(timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not STOP.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def sync_query() -> None:
    time.sleep(1.0)  # CHILD-BLOCK


def match_order_id(text: str) -> bool:
    return BACKTRACK.match(text) is not None  # CHILD-REGEX


async def child_main(agent: loopwatch.Agent) -> None:
    emit_line(f"CHILD pid={os.getpid()} url={agent.metrics_url} "
              f"threads={sorted(t.name for t in threading.enumerate())}")
    await asyncio.sleep(0.6)
    say("CHILD-BLOCK-START")
    sync_query()
    await asyncio.sleep(0.6)
    say("CHILD-REGEX-START")
    match_order_id(TEXT)
    say("CHILD-REGEX-END")
    await asyncio.sleep(1.0)
    say("CHILD-DONE")
    while not STOP.exists():
        await asyncio.sleep(0.05)


def dormant_child(agent: loopwatch.Agent) -> None:
    emit_line(f"DORMANT pid={os.getpid()} url={agent.metrics_url} "
              f"threads={sorted(t.name for t in threading.enumerate())}")
    loopwatch.uninstall()  # must not wait for the parent's exporter or watchdog threads
    emit_line("DORMANT-UNINSTALLED")


def parent_stall() -> None:
    time.sleep(1.0)  # PARENT-BLOCK


def main() -> None:
    agent = loopwatch.install(namespace="lwfork", service="fork-app", metrics_port=PORTS,
                              metrics_addr="127.0.0.1", dump_dir=DUMP_DIR, lag_thresholds=(0.3, 5.0, 10.0),
                              dump_cooldown=0, probe_interval=0.1)
    loopwatch.dump("manual")
    ready = threading.Event()
    holder: dict[str, asyncio.AbstractEventLoop] = {}

    async def parent_main() -> None:
        holder["loop"] = asyncio.get_running_loop()
        ready.set()
        while not STOP.exists():
            await asyncio.sleep(0.05)

    thread = threading.Thread(target=asyncio.run, args=(parent_main(),), name="parent-loop")
    thread.start()
    ready.wait(10)
    time.sleep(0.5)  # a few beats: faulthandler's timer is armed by the parent-loop thread
    emit_line(f"PARENT pid={os.getpid()} url={agent.metrics_url}")

    pid = os.fork()
    if pid == 0:
        try:
            dormant_child(agent)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            emit_line(f"DORMANT-EXIT {status}")
            break
        time.sleep(0.05)
    else:
        emit_line("DORMANT-HUNG")

    pid = os.fork()
    if pid == 0:
        try:
            asyncio.run(child_main(agent))
            loopwatch.uninstall()  # os._exit runs no atexit handler
        finally:
            os._exit(0)
    time.sleep(0.5)
    say("PARENT-BLOCK-START")
    holder["loop"].call_soon_threadsafe(parent_stall)
    wait_stop()
    thread.join(10)
    os.waitpid(pid, 0)
    emit_line("PARENT-EXIT")


main()
