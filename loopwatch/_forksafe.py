"""Locks that are never stuck in a forked child.

``fork()`` copies the process with one thread -- the one that forked.  A lock that another thread held at
that moment stays held in the child, by a thread that does not exist there: the child's first scrape,
log line or exact-timing switch that needs it would hang forever.  Every lock loopwatch creates comes
from here (a test checks the source for any other), so one ``os.register_at_fork`` handler, registered
when loopwatch is imported, resets all of them in the child -- instance locks of every component,
module-level locks (the exact-timing lock in ``_slow``, ``install()``'s lock) and the locks of the
counters and histograms -- whoever held them.  It runs before the agent's own after-fork handler
(``_fork``), which then forgets the parent's threads, descriptors and loops.

Components (``_component``) register here too, with :func:`at_fork`: after the locks, the same handler
calls each registered component's ``after_fork()``, in registration order -- each resets its own state.

The reset is the interpreter's own ``_at_fork_reinit()`` (what ``threading`` and ``logging`` use for
their locks), feature-detected; the locks are held through weak references, so tracking one costs
nothing once its owner is gone.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

_locks: weakref.WeakSet[Any] = weakref.WeakSet()
_components: dict[int, weakref.ref[Any]] = {}  # id -> the component; insertion order is call order


def lock() -> threading.Lock:
    """A ``threading.Lock`` that is free again in a forked child."""
    new = threading.Lock()
    _locks.add(new)
    return new


def rlock() -> threading.RLock:
    """A ``threading.RLock`` that is free again in a forked child."""
    new = threading.RLock()
    _locks.add(new)
    return new


def tracked() -> list[Any]:
    """The live locks (for the tests)."""
    return list(_locks)


def at_fork(component: Any) -> None:
    """Call ``component.after_fork()`` in every forked child, until :func:`forget` (held weakly)."""
    key = id(component)
    _components[key] = weakref.ref(component, lambda _ref, key=key: _components.pop(key, None))


def forget(component: Any) -> None:
    _components.pop(id(component), None)


def _after_in_child() -> None:
    for held in list(_locks):
        reinit = getattr(held, "_at_fork_reinit", None)
        if reinit is not None:
            try:
                reinit()
            except Exception:  # noqa: BLE001 - never raise into the child  # pragma: no cover
                pass
    for ref in list(_components.values()):
        component = ref()
        if component is None:
            continue
        try:
            component.after_fork()
        except Exception as exc:  # noqa: BLE001 - never raise into the child
            report = getattr(component, "report", None)
            if report is not None:
                report("fork", exc)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_in_child)
