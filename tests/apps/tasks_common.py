"""Shared plumbing of the tasks_* test apps (imported by them; not an app itself).

The exception classes live here so that their qualified names are known to the tests:
``tasks_common.Boom`` and ``tasks_common.Errors.Timeout``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from marker import emit_line


class Boom(Exception):
    """An application error: ``task_exceptions_total{exception="tasks_common.Boom"}``."""


class Errors:
    class Timeout(Exception):
        """A nested class: ``tasks_common.Errors.Timeout``."""


def runner(impl: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """``asyncio.run`` or ``uvloop.run``."""
    if impl == "uvloop":
        import uvloop

        return uvloop.run
    assert impl == "asyncio", impl
    return asyncio.run


def loop_class() -> str:
    kind = type(asyncio.get_running_loop())
    return f"{kind.__module__}.{kind.__qualname__}"


def say(what: str) -> None:
    """``WHAT <time.time()>``: the test compares these stamps with its own clock."""
    emit_line(f"{what} {time.time():.6f}")


async def until(path: Path, timeout: float = 60.0) -> None:
    """Wait (healthily: the loop keeps running) until the test creates ``path``."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.05)


async def sleeper() -> None:
    await asyncio.sleep(3600)
