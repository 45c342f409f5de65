"""``emit_line(line)``: print a marker line for the test runner in one ``write(2)``; and the app's logging.

``print()`` writes the text and its newline separately, and so does structlog's PrintLogger: with
another thread logging, a marker could land in the middle of a log line.  One ``os.write`` of a short
line to a pipe is atomic, so the runner finds each marker whole (``App.wait_line`` searches inside lines
for the same reason: a log message may still be split around it).

Importing this module sets up the app's logging, as an application would (loopwatch never does):
``APP_LOGS=structlog`` (the default) configures structlog with its defaults -- its console renderer on
stdout -- so loopwatch's events go through structlog; ``APP_LOGS=logging`` configures the standard
``logging`` module instead (INFO and up, the bare message, on stdout), which loopwatch uses when
structlog is not configured.  ``APP_LOGS=none`` leaves both alone."""

from __future__ import annotations

import logging
import os
import sys


def emit_line(line: str) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def configure_logs(how: str) -> None:
    if how == "structlog":
        import structlog

        structlog.configure()
    elif how == "logging":
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")


configure_logs(os.environ.get("APP_LOGS", "structlog"))
