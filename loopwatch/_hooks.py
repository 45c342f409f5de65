"""Learning when an event loop starts and stops running, so ``install()`` can come before any loop.

asyncio's loops announce themselves through ``asyncio.events._set_running_loop`` (stdlib loops look it
up at call time; uvloop captures it when it is imported).  We wrap it: a loop that starts running is
attached (or resumed), one that stops is paused.  If uvloop was imported before ``install()`` -- so it
holds the original function -- ``uvloop.Loop.run_forever`` (a Python-level subclass method) is wrapped
instead.  Both patches are feature-detected and undone by :meth:`LoopHooks.uninstall`; the wrapper
that uvloop may have captured becomes a plain pass-through once no agent is installed.
"""

from __future__ import annotations

import asyncio
import asyncio.events as _events
import sys
from collections.abc import Callable
from typing import Any

LoopCallback = Callable[[asyncio.AbstractEventLoop], None]

_original_set_running_loop = getattr(_events, "_set_running_loop", None)
_callbacks: tuple[LoopCallback, LoopCallback, LoopCallback, Callable[[BaseException], None]] | None = None


def _notify(which: int, loop: asyncio.AbstractEventLoop) -> None:
    callbacks = _callbacks
    if callbacks is None:
        return
    try:
        callbacks[which](loop)
    except Exception as exc:  # noqa: BLE001 - never raise into the loop
        try:
            callbacks[3](exc)
        except Exception:  # noqa: BLE001
            pass


def _set_running_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """Drop-in for ``asyncio.events._set_running_loop`` that tells the agent."""
    if _original_set_running_loop is None:  # pragma: no cover - only installed when it exists
        return
    if loop is None:
        previous = _events._get_running_loop()
        _original_set_running_loop(None)
        if previous is not None:
            _notify(1, previous)
    else:
        _original_set_running_loop(loop)
        _notify(0, loop)


class LoopHooks:
    """Installs and removes the patches described in the module docstring."""

    def __init__(self, on_start: LoopCallback, on_stop: LoopCallback, on_close: LoopCallback,
                 on_error: Callable[[BaseException], None]) -> None:
        self._callbacks = (on_start, on_stop, on_close, on_error)
        self._patched: list[tuple[Any, str, Any]] = []
        self.notes: list[str] = []

    def install(self) -> None:
        global _callbacks
        _callbacks = self._callbacks
        if _original_set_running_loop is None:
            self.notes.append("asyncio.events._set_running_loop not found: loops are watched only "
                              "when install() is called inside them")
        else:
            for module in (_events, asyncio):
                if getattr(module, "_set_running_loop", None) is _original_set_running_loop:
                    self._patch(module, "_set_running_loop", _set_running_loop)
        uvloop = sys.modules.get("uvloop")
        loop_class = getattr(uvloop, "Loop", None)
        original_run_forever = getattr(loop_class, "run_forever", None)
        if loop_class is not None and original_run_forever is not None:
            def run_forever(self: Any) -> Any:
                _notify(0, self)
                try:
                    return original_run_forever(self)
                finally:
                    _notify(1, self)
            try:
                self._patch(loop_class, "run_forever", run_forever)
            except (TypeError, AttributeError):
                self.notes.append("uvloop.Loop.run_forever cannot be wrapped: uvloop loops started "
                                  "later are watched only when install() is called inside them")

    def watch_close(self, loop_class: type) -> None:
        """Tell the agent before a loop of ``loop_class`` (uvloop's Python ``Loop``) closes: its libuv
        handles of ours must be closed first.  ``uvloop.Loop.close`` is wrapped once, on the class."""
        uvloop = sys.modules.get("uvloop")
        owner = getattr(uvloop, "Loop", None)
        if owner is None or not issubclass(loop_class, owner) or any(
                o is owner and n == "close" for o, n, _ in self._patched):
            return
        original_close = owner.close

        def close(self: Any) -> Any:
            _notify(2, self)
            return original_close(self)

        self._patch(owner, "close", close)

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        had_own = name in vars(owner)
        original = vars(owner).get(name)
        setattr(owner, name, value)
        self._patched.append((owner, name, original if had_own else _MISSING))

    def uninstall(self) -> None:
        global _callbacks
        if _callbacks is self._callbacks:
            _callbacks = None
        while self._patched:
            owner, name, original = self._patched.pop()
            if original is _MISSING:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
            else:
                setattr(owner, name, original)


_MISSING = object()


def known_loop_method(loop: Any, name: str) -> bool:
    """True if ``loop``'s class takes its method ``name`` from asyncio or uvloop, not from a subclass of
    its own (a test double, or a loop that does something else there): only then does loopwatch wrap it."""
    method = getattr(type(loop), name, None)
    if method is not None and method is getattr(asyncio.BaseEventLoop, name, None):
        return True
    uvloop = sys.modules.get("uvloop")
    loop_class = getattr(uvloop, "Loop", None)
    return method is not None and loop_class is not None and method is getattr(loop_class, name, None)


def instance_attribute(obj: Any, name: str) -> Any:
    """What an instance attribute ``name`` of ``obj`` holds (someone wrapped the method before us), or
    None when ``obj.name`` is the class's own method.  Deliberately not ``vars(obj)``: on CPython >= 3.11
    that materializes the instance ``__dict__`` and slows every attribute access of a loop's hot path
    (~14% of an await-step, measured)."""
    current = getattr(obj, name)
    if getattr(current, "__self__", None) is obj and getattr(current, "__func__", None) is getattr(type(obj), name, None):
        return None
    return current
