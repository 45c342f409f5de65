"""Logging and the agent's own error accounting.

loopwatch logs structlog events with stable names (``loopwatch.stall``, ``loopwatch.dump``, ...)
through whatever structlog/logging set-up the application has; it never configures logging.

:class:`Guard` is the agent's answer to "never harm the host": every piece of agent code that runs
inside the application (probe callbacks, the watchdog, collectors, dump writing) runs under a guard
that catches the exception, counts it in ``errors_total{component}`` and logs it -- with its
traceback the first time a component fails with a given exception type, at debug level afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

import structlog

logger = structlog.get_logger("loopwatch")

def emit(level: str, event: str, **fields: object) -> None:
    """Log ``event`` at ``level`` with the fields that have a value."""
    getattr(logger, level)(event, **{k: v for k, v in fields.items() if v is not None})


COMPONENTS = ("probe", "watchdog", "dump", "exporter", "collector", "faulthandler", "hooks", "fork", "threads",
              "gil", "executor", "pool",
              "native")


class Guard:
    """Counts and logs agent failures; see the module docstring."""

    def __init__(self, count: Callable[[str], None]) -> None:
        self._count = count
        self._seen: set[tuple[str, type[BaseException]]] = set()
        self._lock = threading.Lock()

    def report(self, component: str, exc: BaseException, **context: object) -> None:
        """Count and log ``exc`` raised inside ``component``; never raises."""
        try:
            self._count(component)
            key = (component, type(exc))
            with self._lock:
                first = key not in self._seen
                self._seen.add(key)
            if first:
                logger.error("loopwatch.error", component=component, error=repr(exc),
                             exc_info=exc, **context)
            else:
                logger.debug("loopwatch.error", component=component, error=repr(exc), **context)
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
