"""``emit_line(line)``: print a marker line for the test runner in one ``write(2)``.

``print()`` writes the text and its newline separately, and so does structlog's PrintLogger: with
another thread logging, a marker could land in the middle of a log line.  One ``os.write`` of a short
line to a pipe is atomic, so the runner finds each marker whole (``App.wait_line`` searches inside lines
for the same reason: a log message may still be split around it)."""

from __future__ import annotations

import os
import sys


def emit_line(line: str) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())
