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

from ._patch import Patch

LoopCallback = Callable[[asyncio.AbstractEventLoop], None]

_original_set_running_loop = getattr(_events, "_set_running_loop", None)
_chained: Any = _original_set_running_loop  # what our _set_running_loop calls: what was installed before it
_left: Patch | None = None  # our _set_running_loop's patch, left under another library's at uninstall()
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
    chained = _chained
    if chained is None:  # pragma: no cover - only installed when it exists
        return
    if loop is None:
        previous = _events._get_running_loop()
        chained(None)
        if previous is not None:
            _notify(1, previous)
    else:
        chained(loop)
        _notify(0, loop)


class LoopHooks:
    """Installs and removes the patches described in the module docstring."""

    def __init__(self, on_start: LoopCallback, on_stop: LoopCallback, on_close: LoopCallback,
                 on_error: Callable[[BaseException], None]) -> None:
        self._callbacks = (on_start, on_stop, on_close, on_error)
        self._patched: list[Patch] = []
        self.notes: list[str] = []

    def install(self) -> None:
        global _callbacks
        _callbacks = self._callbacks
        if _original_set_running_loop is None:
            self.notes.append("asyncio.events._set_running_loop not found: loops are watched only "
                              "when install() is called inside them")
        else:
            global _chained, _left
            current = getattr(_events, "_set_running_loop", None)
            if _left is not None and not _left.in_chain:  # the other library put back what ours replaced
                _left = None
            # Ours may still sit in another library's chain (patched over, then uninstalled): it calls
            # through again as soon as _callbacks is set, and patching again would make a loop.
            if current is not _set_running_loop and _left is None:
                _chained = current  # chain to whatever is installed now (another library's)
                for module in (_events, asyncio):
                    if getattr(module, "_set_running_loop", None) is current:
                        self._patch(module, "_set_running_loop", lambda original: _set_running_loop)
        uvloop = sys.modules.get("uvloop")
        loop_class = getattr(uvloop, "Loop", None)
        original_run_forever = getattr(loop_class, "run_forever", None)
        if loop_class is not None and original_run_forever is not None:
            def make_run_forever(original: Any) -> Any:
                def run_forever(self: Any) -> Any:
                    _notify(0, self)
                    try:
                        return original(self)
                    finally:
                        _notify(1, self)
                return run_forever
            try:
                self._patch(loop_class, "run_forever", make_run_forever)
            except (TypeError, AttributeError):
                self.notes.append("uvloop.Loop.run_forever cannot be wrapped: uvloop loops started "
                                  "later are watched only when install() is called inside them")

    def watch_close(self, loop_class: type) -> None:
        """Tell the agent before a loop of ``loop_class`` (uvloop's Python ``Loop``) closes: its libuv
        handles of ours must be closed first.  ``uvloop.Loop.close`` is wrapped once, on the class."""
        uvloop = sys.modules.get("uvloop")
        owner = getattr(uvloop, "Loop", None)
        if owner is None or not issubclass(loop_class, owner) or any(
                p.owner is owner and p.name == "close" for p in self._patched):
            return

        def make_close(original: Any) -> Any:
            def close(self: Any) -> Any:
                _notify(2, self)
                return original(self)
            return close

        self._patch(owner, "close", make_close)

    def _patch(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        self._patched.append(Patch(owner, name, make).apply())

    def uninstall(self) -> None:
        """Undo the patches that are still on top; one another library patched over stays in its chain
        as a pass-through (``_notify`` does nothing once ``_callbacks`` is None)."""
        global _callbacks
        if _callbacks is self._callbacks:
            _callbacks = None
        global _left
        while self._patched:
            patch = self._patched.pop()
            if not patch.undo() and patch.owner is _events and patch.name == "_set_running_loop":
                _left = patch


def known_loop_method(loop: Any, name: str) -> bool:
    """True if ``loop``'s class takes its method ``name`` from asyncio or uvloop, not from a subclass of
    its own (a test double, or a loop that does something else there): only then does loopwatch wrap it."""
    method = getattr(type(loop), name, None)
    if method is not None and method is getattr(asyncio.BaseEventLoop, name, None):
        return True
    uvloop = sys.modules.get("uvloop")
    loop_class = getattr(uvloop, "Loop", None)
    return method is not None and loop_class is not None and method is getattr(loop_class, name, None)
