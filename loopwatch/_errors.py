"""loopwatch's exceptions.

The tree is deliberately small:

* :class:`ConfigError` (a :class:`ValueError`) -- an option given to :func:`loopwatch.install`,
  or read from a ``LOOPWATCH_*`` environment variable, is invalid.  The message names the option,
  the value and what is accepted.  Nothing is installed when it is raised.  ``watch_queue``,
  ``watch_executor`` and ``watch_pool`` raise it too, for something they cannot watch or a name they
  cannot use.

Runtime faults inside the agent never raise into the application: they are counted in
``<namespace>_errors_total{component}`` and logged once.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid loopwatch option; raised by :func:`loopwatch.install` before anything is changed."""


MAX_WATCH_NAME = 128


def check_watch_name(api: str, name: object) -> None:
    """The ``name`` of ``watch_queue``/``watch_executor``/``watch_pool``: it becomes a label value."""
    if (not isinstance(name, str) or not name or len(name) > MAX_WATCH_NAME or not name.isprintable()
            or name != name.strip()):
        raise ConfigError(f"{api}() name must be a non-empty printable string of at most {MAX_WATCH_NAME} "
                          f"characters without surrounding spaces, got {name!r}")
