"""The shape every feature has: a component that owns its series, its threads, its patches and its fork handling.

A component is a prometheus_client ``Collector`` with these methods:

* ``start()`` -- start what it runs (a thread, a socket, a file).  Idempotent: after ``after_fork()``
  it starts again what the child lacks, and does nothing for what it still has.
* ``stop()`` -- stop it and undo its patches.  Idempotent; never raises.
* ``after_fork()`` -- in a forked child, before anything else runs there: drop the parent's threads and
  descriptors (never close what the parent still uses: ``abandon``, not ``shutdown``) and start its
  counters from zero.  Its locks are already free (``_forksafe``); state it holds *outside* ``_forksafe``
  locks is its own to reset.  The agent registers it with :func:`_forksafe.at_fork` (one
  ``os.register_at_fork`` handler calls every registered component) and forgets it at ``stop()``.
* ``families()`` -- its series, read at scrape time in the scraping thread; ``collect()`` wraps it so a
  scrape never fails: an exception is counted in ``errors_total{component=<component>}``.
* ``up()`` -- whether what it runs is alive (``agent_up{part=<component>}``); None for a component that
  runs nothing that could die.

Each component is registered with the registry on its own (a name clash names the component, and a
feature switched off with ``disable`` is simply never built).  A component never holds the agent: it
gets what it needs when it is built -- the :class:`Naming` of its series, the clock, its options, a
``report(component, exc)`` for its failures and a ``degrade(feature, reason)`` for a part that cannot work.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

Report = Callable[[str, BaseException], None]
Degrade = Callable[[str, str], None]


def ignore_error(component: str, exc: BaseException, **context: object) -> None:
    """The default ``report`` of a component built outside an agent (tests, benchmarks)."""


class Naming:
    """How loopwatch names a series: ``<namespace>_<name>``, the constant ``service`` label first."""

    __slots__ = ("namespace", "service")

    def __init__(self, namespace: str, service: str) -> None:
        self.namespace = namespace
        self.service = service

    def family(self, kind: type[Metric], name: str, documentation: str, labels: Iterable[str] = ()) -> Metric:
        return kind(f"{self.namespace}_{name}", documentation, labels=["service", *labels])


class Component(Collector):
    """One feature (see the module docstring).  Subclasses override what they need."""

    component: ClassVar[str] = "collector"  # the errors_total label its scrape failures count under

    def __init__(self, naming: Naming | None = None, *, report: Report = ignore_error) -> None:
        self.naming = naming  # None: a component with no series of its own (a thread, a socket)
        self.report = report

    def start(self) -> None:
        """Start what this component runs (idempotent)."""

    def stop(self) -> None:
        """Stop it and undo its patches (idempotent, never raises)."""

    def after_fork(self) -> None:
        """In a forked child: forget the parent's threads and descriptors, counts from zero."""

    def families(self) -> Iterable[Metric]:
        """This component's series, at scrape time."""
        return ()

    def up(self) -> bool | None:
        """Is what it runs alive (``agent_up{part}``)?  None: it runs nothing that could die."""
        return None

    def collect(self) -> list[Metric]:
        try:
            return list(self.families())
        except Exception as exc:  # noqa: BLE001 - a scrape must never fail because of us
            self.report(self.component, exc)
            return []

    def describe(self) -> list[Metric]:
        """Lets the registry detect a name clash at ``register()`` time."""
        return self.collect()


def weak(method: Callable[..., Any]) -> Callable[..., Any]:
    """A callback to ``method``'s object that does not keep it alive (a component calling back into the
    agent holds no reference to it): calls it while it lives, else does nothing."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any, **kwargs: Any) -> Any:
        target = ref()
        return None if target is None else target(*args, **kwargs)

    return call
