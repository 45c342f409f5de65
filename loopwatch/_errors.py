"""loopwatch's exceptions.

The tree is deliberately small:

* :class:`ConfigError` (a :class:`ValueError`) -- an option given to :func:`loopwatch.install`,
  or read from a ``LOOPWATCH_*`` environment variable, is invalid.  The message names the option,
  the value and what is accepted.  Nothing is installed when it is raised.  :func:`loopwatch.watch_queue`
  raises it too, for something it cannot watch or a name it cannot use.

Runtime faults inside the agent never raise into the application: they are counted in
``<namespace>_errors_total{component}`` and logged once.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid loopwatch option; raised by :func:`loopwatch.install` before anything is changed."""
