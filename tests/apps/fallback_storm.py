"""A storm of the GIL-held fallback's signal (``tests/test_fallback_safety.py``).

``python fallback_storm.py DIR SECONDS``: the fallback's timer aimed at this (main) thread, firing every
0.5 ms, while the thread runs call-heavy Python that creates and frees frames, locals and containers all
the time -- the moments a walk of the frame chain is unsafe.  Prints ``SURVIVED <json>`` with the guard's
counts and how many stacks were written; a crash is the process dying from the signal.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from loopwatch import _accel
from loopwatch._gilheld import GilHeldStacks
from marker import emit_line

DIR, SECONDS = Path(sys.argv[1]), float(sys.argv[2])
WORD = re.compile(r"\w+")


def leaf(i: int) -> list:
    return [i, str(i), {"k": (i, i + 1)}]


def middle(i: int) -> int:
    local = leaf(i) + leaf(i + 1)
    return len(local) + sum(len(WORD.findall(str(x))) for x in local)


def churn(until: float) -> int:
    total = 0
    while time.monotonic() < until:
        for i in range(200):
            total += middle(i)
        sorted(str(i) for i in range(100))
    return total


stacks = GilHeldStacks(DIR, pid=os.getpid(), created_ms=1, service="storm")
why = stacks.open()
if why is not None:
    emit_line(f"UNAVAILABLE {why}")
    sys.exit(0)
import threading
stacks.watch(threading.get_native_id(), threading.get_ident())  # this thread
stacks._settime(time.monotonic() + 0.01, 0.0005)
churn(time.monotonic() + SECONDS)
stacks.disarm()
written = stacks.take()
guard_on_top, faults, refused = _accel.stack_guard()
stacks.close()
emit_line("SURVIVED " + json.dumps({"stacks": len(written), "faults": faults, "refused": refused,
                                    "guard_on_top": guard_on_top}))
