"""Lifecycle app: loopwatch installed at different moments, then the loop blocks for ~1 s.

Usage: life_stall.py MODE DUMP_DIR

MODE is one of
  stdlib          install() before any loop exists, then asyncio.run(main())
  uvloop_after    install() before ``import uvloop``, then uvloop.run(main())
  uvloop_before   ``import uvloop`` before install(), then uvloop.run(main())
  uvloop_inside   uvloop.run(main()) and install() inside the running uvloop

Prints ``loop-class <module>.<name>`` once the loop runs, ``snapshot <labels>`` after the stall and
``done`` at the end; loopwatch's own structlog events go to stdout (no structlog configuration).
"""

from __future__ import annotations

import asyncio
import sys
import time

MODE, DUMP_DIR = sys.argv[1], sys.argv[2]
MODES = ("stdlib", "uvloop_after", "uvloop_before", "uvloop_inside")
if MODE not in MODES:
    raise SystemExit(f"unknown mode {MODE!r}; expected one of {MODES}")

if MODE == "uvloop_before":
    import uvloop

import loopwatch  # noqa: E402
from marker import emit_line

OPTIONS = {"metrics_port": 0, "dump_dir": DUMP_DIR, "dump_cooldown": 0}

if MODE in ("stdlib", "uvloop_after", "uvloop_before"):
    loopwatch.install(**OPTIONS)

if MODE in ("uvloop_after", "uvloop_inside"):
    import uvloop  # noqa: E402,F811


def block() -> None:
    time.sleep(1.0)  # BLOCK: the line every dump must name


async def main() -> None:
    if MODE == "uvloop_inside":
        loopwatch.install(**OPTIONS)
    loop = asyncio.get_running_loop()
    emit_line(f"loop-class {type(loop).__module__}.{type(loop).__qualname__}")
    await asyncio.sleep(0.6)  # a few healthy beats first
    block()
    await asyncio.sleep(0.8)  # the probe beats late, the watchdog logs the stall
    agent = loopwatch.install()
    labels = ",".join(f"{lp.label}:{lp.running}" for lp in agent.snapshot().loops)
    emit_line(f"snapshot {labels}")


if MODE == "stdlib":
    asyncio.run(main())
else:
    uvloop.run(main())
loopwatch.uninstall()
emit_line("done")
