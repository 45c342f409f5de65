"""One way to replace an attribute: chained to what is there, undone only if it is still ours.

Another library may patch the same attribute as loopwatch -- before it (loopwatch then wraps *theirs*) or
after it (theirs wraps loopwatch's).  :class:`Patch` keeps both working:

* :meth:`Patch.apply` reads what is installed *now* and builds the replacement around it (``make`` gets
  the current value: the replacement calls it, never a copy taken at import);
* :meth:`Patch.undo` puts the previous value back only if the attribute still holds loopwatch's
  replacement.  If someone patched on top of it since, theirs stays where it is and loopwatch's
  replacement -- still in their chain -- becomes a pass-through (``active`` is False: the replacement's
  own code checks it and calls straight through);
* it holds no lock and runs nothing at ``fork()``: an attribute is the same in the child, and
  ``active`` is a plain attribute read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MISSING = object()


class Patch:
    """``owner.name`` replaced by ``make(current value)`` (see the module docstring)."""

    def __init__(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        self.owner = owner
        self.name = name
        self._make = make
        self.original: Any = None  # what was installed when applied (what the replacement calls)
        self.replacement: Any = None
        self._own: Any = _MISSING  # owner's own raw attribute before (``vars``), to restore as it was
        self.active = False  # the replacement does its job; False: a pass-through

    def apply(self) -> Patch:
        owner, name = self.owner, self.name
        namespace = _namespace(owner)
        self._own = namespace.get(name, _MISSING) if namespace is not None else _MISSING
        self.original = getattr(owner, name)
        self.replacement = self._make(self.original)
        setattr(owner, name, self.replacement)
        self.active = True
        return self

    @property
    def on_top(self) -> bool:
        """The attribute still holds loopwatch's replacement (nobody patched over it)."""
        namespace = _namespace(self.owner)
        current = namespace.get(self.name, _MISSING) if namespace is not None else getattr(self.owner, self.name)
        return current is self.replacement

    def undo(self) -> bool:
        """Restore the previous value if the replacement is still on top; else leave it as a
        pass-through in whoever's chain holds it.  Returns True if restored."""
        self.active = False
        if self.replacement is None or not self.on_top:
            return False
        if self._own is _MISSING:
            try:
                delattr(self.owner, self.name)
            except AttributeError:
                pass
        else:
            setattr(self.owner, self.name, self._own)
        self.replacement = None
        return True


def _namespace(owner: Any) -> dict[str, Any] | None:
    try:
        return vars(owner)  # type: ignore[no-any-return]
    except TypeError:
        return None
