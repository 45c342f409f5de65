"""One way to replace an attribute: chained to what is there, undone only if it is still ours.

Every patch loopwatch applies goes through :class:`Patch` -- module and class attributes
(``asyncio.events._set_running_loop``, ``Handle._run``, uvloop's ``run_forever``/``close``, asyncpg's
``Pool`` methods) and instance attributes alike (a loop's ``call_exception_handler`` and
``run_in_executor``, its selector's ``select``, an executor's ``submit``, a pool's acquire and release).
Another library may patch the same attribute as loopwatch -- before it (loopwatch then wraps *theirs*)
or after it (theirs wraps loopwatch's).  :class:`Patch` keeps both working:

* :meth:`Patch.apply` reads what is installed *now* and builds the replacement around it (``make`` gets
  the current value: the replacement calls it, never a copy taken at import), and checks that the
  assignment took (a property or ``__slots__`` may refuse it: ``AttributeError``, nothing changed);
* :meth:`Patch.undo` puts the previous value back only if the attribute still holds loopwatch's
  replacement.  If someone patched on top of it since, theirs stays where it is and loopwatch's
  replacement -- still in their chain -- becomes a pass-through (``active`` is False: the replacement's
  own code checks it and calls straight through);
* :attr:`Patch.in_chain` says whether loopwatch's replacement can still be reached: on top, or under
  someone else's patch.  Once the attribute holds again what loopwatch replaced (the other library put
  the original back), it is out of every chain and must be applied anew to work;
* it holds the patched object and the replacement weakly where they allow it (a watched pool or
  executor, a loop, is never kept alive by its patch), no lock, and runs nothing at ``fork()``: an
  attribute is the same in the child, and ``active`` is a plain attribute read.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

_MISSING = object()


def _ref(value: Any) -> Callable[[], Any]:
    """A weak reference where ``value`` takes one, else a strong one with the same call."""
    try:
        return weakref.ref(value)
    except TypeError:
        return lambda: value


class Patch:
    """``owner.name`` replaced by ``make(current value)`` (see the module docstring)."""

    def __init__(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        self._owner = _ref(owner)
        self.name = name
        self._make = make
        self._replacement: Callable[[], Any] | None = None
        self._own: Any = _MISSING  # owner's own raw attribute before (``vars``), to restore as it was
        self.active = False  # the replacement does its job; False: a pass-through

    @property
    def owner(self) -> Any:
        return self._owner()

    @property
    def replacement(self) -> Any:
        return None if self._replacement is None else self._replacement()

    def apply(self) -> Patch:
        owner, name = self.owner, self.name
        own = _own(owner, name)
        replacement = self._make(getattr(owner, name))
        setattr(owner, name, replacement)
        if getattr(owner, name, None) is not replacement:
            self._restore(owner, own)
            raise AttributeError(f"{type(owner).__qualname__}.{name}: the assignment did not take")
        self._own = own
        self._replacement = _ref(replacement)
        self.active = True
        return self

    @property
    def on_top(self) -> bool:
        """The attribute still holds loopwatch's replacement (nobody patched over it)."""
        owner, replacement = self.owner, self.replacement
        return owner is not None and replacement is not None and _own(owner, self.name) is replacement

    @property
    def in_chain(self) -> bool:
        """loopwatch's replacement can still be reached: on top, or under another library's patch (the
        attribute holds neither ours nor what ours replaced)."""
        owner = self.owner
        if owner is None or self.replacement is None:
            return False
        current = _own(owner, self.name)
        return current is self.replacement or current is not self._own

    def undo(self) -> bool:
        """Restore the previous value if the replacement is still on top; else leave it as a
        pass-through in whoever's chain holds it.  Returns True if restored."""
        self.active = False
        owner = self.owner
        if owner is None or not self.on_top:
            return False
        self._restore(owner, self._own)
        self._replacement = None
        return True

    def _restore(self, owner: Any, own: Any) -> None:
        try:
            if own is _MISSING:
                delattr(owner, self.name)
            else:
                setattr(owner, self.name, own)
        except AttributeError:  # pragma: no cover - changed under us
            pass


def _own(owner: Any, name: str) -> Any:
    """``owner``'s own value for ``name`` -- a module's or class's entry, an instance's attribute -- or
    ``_MISSING`` where ``owner.name`` comes from its class."""
    if isinstance(owner, (type, types.ModuleType)):
        return vars(owner).get(name, _MISSING)
    found = instance_attribute(owner, name)
    return _MISSING if found is None else found


def instance_attribute(obj: Any, name: str) -> Any:
    """What an instance attribute ``name`` of ``obj`` holds (someone wrapped the method before us), or
    None when ``obj.name`` is the class's own method or value.  Deliberately not ``vars(obj)``: on CPython
    >= 3.11 that materializes the instance ``__dict__`` and slows every attribute access of a loop's hot
    path (~14% of an await-step, measured)."""
    current = getattr(obj, name, None)
    declared = getattr(type(obj), name, None)
    if current is None or current is declared:
        return None
    if getattr(current, "__self__", None) is obj and getattr(current, "__func__", None) is declared:
        return None
    return current
