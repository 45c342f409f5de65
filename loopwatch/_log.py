"""Logging and the agent's own error accounting.

loopwatch logs events with stable names (``loopwatch.stall``, ``loopwatch.dump``, ...) and never
configures logging, and never writes to stdout itself:

* when the application has configured structlog (``structlog.is_configured()``), events go through
  structlog, as structured events with their fields (loopwatch does not import structlog itself: an
  application that configured it has imported it);
* otherwise they go through the standard :mod:`logging` module, to the ``loopwatch`` logger, as one
  ``event key=value ...`` message (the fields are also on the record, as ``record.loopwatch``).  The
  application's logging configuration decides where they go; without one, Python's last-resort handler
  prints warnings and errors on **stderr** and drops the rest.  structlog's own default, printing to
  stdout, would corrupt the output of every program whose stdout is data.

The choice is made per event, so an application that configures structlog after ``install()`` gets
loopwatch's events through it from then on.

:class:`Guard` is the agent's answer to "never harm the host": every piece of agent code that runs
inside the application (probe callbacks, the watchdog, collectors, dump writing) runs under a guard
that catches the exception, counts it in ``errors_total{component}`` and logs it -- with its
traceback the first time a component fails with a given exception type, at debug level afterwards.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from . import _forksafe

std_logger = logging.getLogger("loopwatch")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_structlog_loggers: dict[int, Any] = {}  # id(structlog module) -> its logger named "loopwatch"


def configured_structlog() -> Any:
    """structlog's logger for loopwatch if the application has configured structlog, else ``None``.

    Looked up in ``sys.modules``, never imported: an application that has not imported structlog has not
    configured it, and importing it for nothing costs every process start ~40 ms (and, through its
    module ``__getattr__``, imports ``importlib.metadata`` when a test runner walking ``sys.modules`` asks
    it for an attribute it does not have)."""
    module = sys.modules.get("structlog")
    is_configured = getattr(module, "is_configured", None)
    if is_configured is None or not is_configured():
        return None
    logger = _structlog_loggers.get(id(module))
    if logger is None:
        logger = _structlog_loggers[id(module)] = module.get_logger("loopwatch")
    return logger


def _text(value: object) -> str:
    """A field value in an ``event key=value`` message: quoted when it would not read as one token."""
    if isinstance(value, str):
        return value if value and not any(c.isspace() or c in "'\"[]=" for c in value) else repr(value)
    if isinstance(value, float):
        return repr(round(value, 6))
    if isinstance(value, (list, tuple)):
        return repr(list(value))
    return str(value).replace("\n", " ")


def emit(level: str, event: str, *, exc_info: BaseException | None = None, **fields: object) -> None:
    """Log ``event`` at ``level`` with the fields that have a value (see the module docstring)."""
    values = {k: v for k, v in fields.items() if v is not None}
    logger = configured_structlog()
    if logger is not None:
        if exc_info is not None:
            values["exc_info"] = exc_info
        getattr(logger, level)(event, **values)
        return
    number = _LEVELS[level]
    if not std_logger.isEnabledFor(number):
        return
    message = " ".join([event, *(f"{k}={_text(v)}" for k, v in sorted(values.items()))])
    std_logger.log(number, "%s", message, exc_info=exc_info, extra={"loopwatch": {"event": event, **values}})


COMPONENTS = ("probe", "watchdog", "dump", "exporter", "collector", "faulthandler", "hooks", "fork", "threads",
              "gil", "executor", "pool", "native_stacks", "console", "otel")


class Guard:
    """Counts and logs agent failures; see the module docstring."""

    def __init__(self, count: Callable[[str], None]) -> None:
        self._count = count
        self._seen: set[tuple[str, type[BaseException]]] = set()
        self._lock = _forksafe.lock()

    def report(self, component: str, exc: BaseException, **context: object) -> None:
        """Count and log ``exc`` raised inside ``component``; never raises."""
        try:
            self._count(component)
            key = (component, type(exc))
            with self._lock:
                first = key not in self._seen
                self._seen.add(key)
            if first:
                emit("error", "loopwatch.error", component=component, error=repr(exc), exc_info=exc, **context)
            else:
                emit("debug", "loopwatch.error", component=component, error=repr(exc), **context)
        except Exception:  # noqa: BLE001 - the last line of defence must not raise
            pass

    def __call__(self, component: str) -> _GuardContext:
        """``with guard("watchdog"): ...`` swallows, counts and logs any ``Exception``."""
        return _GuardContext(self, component)


class _GuardContext:
    __slots__ = ("_guard", "_component")

    def __init__(self, guard: Guard, component: str) -> None:
        self._guard = guard
        self._component = component

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        self._guard.report(self._component, exc)
        return True


class Degraded:
    """The features that cannot work here, each with its reason (``loopwatch.degraded``, and the
    agent's snapshot)."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def __call__(self, feature: str, reason: str) -> None:
        self.notes.append(f"{feature}: {reason}")
        emit("warning", "loopwatch.degraded", feature=feature, reason=reason)
