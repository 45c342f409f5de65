"""Task health: live tasks per loop, exceptions that reach a loop's exception handler, tasks destroyed
while still pending, and the depth of the asyncio queues the application asks us to watch.

* **Live tasks** are counted at scrape time, in the scraping thread, with ``asyncio.all_tasks(loop)``:
  nothing runs on the loop and no timer is added.  Reading the task set from another thread can fail with
  ``RuntimeError: Set changed size during iteration``; the count is retried a few times, then that loop
  is left out of that scrape and ``errors_total{component="collector"}`` is counted.
* **Exceptions** are seen by chaining each watched loop's exception handler: when a probe attaches, the
  loop *instance* gets its own ``call_exception_handler`` attribute (a :class:`_ChainedHandler`) that
  counts the event and then calls the class's method, which runs the handler the application set with
  ``loop.set_exception_handler`` (before or after us: it is looked up at call time), or the default
  handler that logs.  Only a loop whose class takes that method from asyncio or uvloop, and whose
  instance does not have its own already (a test's ``Mock``, another library's wrapper), is chained.  Every caller goes through that attribute: asyncio's
  ``Handle._run`` and transports (``self._loop.call_exception_handler``), the C ``_asyncio`` finalizers of
  futures and tasks ("exception was never retrieved", "Task was destroyed but it is pending!": a method
  call by name), and uvloop's Cython loop (attribute lookups on ``self``/``self.loop``).  The wrapper
  holds its loop weakly (no reference cycle: a dropped loop is still freed at once) and is removed when
  the probe is detached or the agent stops; if someone wrapped the attribute on top of ours meanwhile,
  ours is switched to a pure pass-through instead, so their wrapper keeps working.
* **Queues** registered with :func:`loopwatch.watch_queue` are held through weak references and read
  (``qsize()``, ``maxsize``) at scrape time; a collected queue's series disappear.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import _forksafe
from ._component import Component, Degrade, Naming, Report, ignore_error
from ._errors import ConfigError, check_watch_name
from ._patch import Patch, instance_attribute
from ._labels import Slots
from ._log import emit

if TYPE_CHECKING:
    from ._probe import LoopProbe

DESTROYED_PENDING = "Task was destroyed but it is pending"
ALL_TASKS_TRIES = 3
MAX_QUEUES = 1000
EXCEPTION_LABELS = 20  # exception types exported under their own name; the rest is "other"
_NAME_CACHE_MAX = 1024


def qualified_name(kind: type[BaseException]) -> str:
    """``ValueError`` for builtins, else ``module.QualName`` (``json.decoder.JSONDecodeError``)."""
    qualname = getattr(kind, "__qualname__", None) or getattr(kind, "__name__", None) or "unknown"
    module = getattr(kind, "__module__", None)
    if not isinstance(module, str) or module == "builtins":
        return str(qualname)
    return f"{module}.{qualname}"


class _ChainedHandler:
    """A loop instance's ``call_exception_handler``: count, then call the loop class's own method."""

    __slots__ = ("_loop_ref", "_count", "patch", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: Callable[[Any], None]) -> None:
        self._loop_ref = weakref.ref(loop)
        self._count = count
        self.patch: Patch | None = None  # set once applied; inactive: a pass-through

    def __call__(self, context: dict[str, Any]) -> Any:
        patch = self.patch
        if patch is not None and patch.active:
            self._count(context)  # never raises
        loop = self._loop_ref()
        if loop is None:  # pragma: no cover - the caller holds the loop
            return None
        return type(loop).call_exception_handler(loop, context)


class TaskHealth(Component):
    """The task-health component (see the module docstring)."""

    def __init__(self, naming: Naming, probes: Callable[[], Iterable[LoopProbe]], *,
                 all_tasks: Callable[[asyncio.AbstractEventLoop], Iterable[Any]] = asyncio.all_tasks,
                 wall_clock: Callable[[], float] = time.time, report: Report = ignore_error,
                 degrade: Degrade = lambda feature, reason: None) -> None:
        super().__init__(naming, report=report)
        self._probes = probes
        self._degrade = degrade
        self._all_tasks = all_tasks
        self._wall_clock = wall_clock
        self._exceptions = Slots(EXCEPTION_LABELS)
        self._names: dict[type, str] = {}
        self._lock = _forksafe.lock()
        self._last_exception = 0.0
        self._destroyed_pending = 0
        self._handlers: dict[LoopProbe, _ChainedHandler] = {}
        self._queues: dict[str, weakref.ref[asyncio.Queue[Any]]] = {}
        self._degraded = False

    def after_fork(self) -> None:
        """A forked child: counts from zero.  Watched queues stay watched (the child has them too)."""
        self._exceptions = Slots(EXCEPTION_LABELS)
        self._last_exception = 0.0
        self._destroyed_pending = 0

    # -- exception handler chaining ---------------------------------------------------------------
    def attach(self, probe: LoopProbe) -> None:
        """Chain ``probe``'s loop's exception handler (called in the loop's thread, by ``Agent.attach``)."""
        loop = probe.loop
        if loop is None or probe in self._handlers:
            return
        if instance_attribute(loop, "call_exception_handler") is not None:  # replaced on this loop by someone else (a test's Mock, a library): theirs
            emit("debug", "loopwatch.not_patched", loop=probe.label,
                 reason="the loop's call_exception_handler was already replaced on the instance: left alone, "
                        "exceptions of this loop are not counted")
            return
        handler = _ChainedHandler(loop, self._count)
        try:
            handler.patch = Patch(loop, "call_exception_handler", lambda original: handler).apply()
        except (TypeError, AttributeError) as exc:
            if not self._degraded:
                self._degraded = True
                self._degrade("task_exceptions", f"cannot chain {type(loop).__qualname__}."
                                     f"call_exception_handler ({exc}): task exceptions are not counted")
            return
        self._handlers[probe] = handler

    def detach(self, probe: LoopProbe) -> None:
        """Undo the chaining for ``probe`` (any thread, maybe inside the GC: no locks)."""
        handler = self._handlers.pop(probe, None)
        if handler is not None:
            _unchain(handler)

    def stop(self) -> None:
        """Undo every chaining and forget the watched queues (``Agent.stop``)."""
        while self._handlers:
            try:
                _, handler = self._handlers.popitem()
            except KeyError:  # emptied by a concurrent detach
                break
            _unchain(handler)
        with self._lock:
            self._queues.clear()

    def _count(self, context: Any) -> None:
        """Runs inside the loop's exception handler: cheap, and never raises."""
        try:
            exc = context.get("exception")
            if isinstance(exc, BaseException):
                kind = type(exc)
                name = self._names.get(kind)
                if name is None:
                    name = qualified_name(kind)
                    if len(self._names) < _NAME_CACHE_MAX:
                        self._names[kind] = name
                self._exceptions.inc(name)
                self._last_exception = self._wall_clock()
            else:
                message = context.get("message")
                if isinstance(message, str) and message.startswith(DESTROYED_PENDING):
                    with self._lock:
                        self._destroyed_pending += 1
        except Exception as exc:  # noqa: BLE001 - never raise into the loop's exception handler
            self.report("hooks", exc)

    # -- queues ------------------------------------------------------------------------------------
    def watch_queue(self, queue: asyncio.Queue[Any], name: str) -> asyncio.Queue[Any]:
        check_queue(queue, name)
        with self._lock:
            for other, ref in list(self._queues.items()):
                watched = ref()
                if watched is None:
                    del self._queues[other]
                elif watched is queue:
                    if other == name:
                        return queue
                    raise ConfigError(f"watch_queue(): this queue is already watched as {other!r}, "
                                      f"got name {name!r}")
            if name in self._queues:
                raise ConfigError(f"watch_queue(): name {name!r} is already used by another live queue; "
                                  f"names must be unique")
            if len(self._queues) >= MAX_QUEUES:
                raise ConfigError(f"watch_queue(): at most {MAX_QUEUES} queues can be watched at once")
            self._queues[name] = weakref.ref(queue)
        return queue

    # -- scrape ------------------------------------------------------------------------------------
    def families(self) -> Iterator[Metric]:
        metrics = self.naming
        service = metrics.service
        tasks = metrics.family(GaugeMetricFamily, "tasks",
                               "Live (not done) tasks of each watched loop, counted at scrape time.", ["loop"])
        for probe in self._probes():
            loop = probe.loop
            if loop is None or loop.is_closed():
                tasks.add_metric([service, probe.label], 0)
                continue
            count = self._count_tasks(loop)
            if count is not None:
                tasks.add_metric([service, probe.label], count)
        for label in getattr(self._probes, "idle_labels", list)():
            tasks.add_metric([service, label], 0)
        yield tasks

        exceptions = metrics.family(
            CounterMetricFamily, "task_exceptions",
            "Exceptions that reached a watched loop's exception handler, by exception type "
            "(first 20 seen, the rest as 'other').", ["exception"])
        for name, value in self._exceptions.items():
            exceptions.add_metric([service, name], value)
        yield exceptions
        last = metrics.family(GaugeMetricFamily, "last_exception_timestamp_seconds",
                              "Unix time of the last exception counted in task_exceptions_total (0: none yet).")
        last.add_metric([service], self._last_exception)
        yield last
        destroyed = metrics.family(CounterMetricFamily, "tasks_destroyed_pending",
                                   "Tasks garbage-collected while still pending "
                                   "('Task was destroyed but it is pending!').")
        destroyed.add_metric([service], self._destroyed_pending)
        yield destroyed

        depth = metrics.family(GaugeMetricFamily, "queue_depth",
                               "Items in each watched asyncio queue (qsize()), read at scrape time.", ["queue"])
        maxsize = metrics.family(GaugeMetricFamily, "queue_maxsize",
                                 "Each watched asyncio queue's maxsize (0: unbounded).", ["queue"])
        with self._lock:
            watched = list(self._queues.items())
        for name, ref in watched:
            queue = ref()
            if queue is None:
                with self._lock:
                    if self._queues.get(name) is ref:
                        del self._queues[name]
                continue
            depth.add_metric([service, name], queue.qsize())
            maxsize.add_metric([service, name], queue.maxsize)
            del queue
        yield depth
        yield maxsize

    def _count_tasks(self, loop: asyncio.AbstractEventLoop) -> int | None:
        error: RuntimeError | None = None
        for _ in range(ALL_TASKS_TRIES):
            try:
                return len(self._all_tasks(loop))  # type: ignore[arg-type]
            except RuntimeError as exc:  # "Set changed size during iteration": the loop thread moved on
                error = exc
        assert error is not None
        self.report("collector", error)
        return None


def _unchain(handler: _ChainedHandler) -> None:
    """Undo the chaining (``Patch.undo``): restored if still on top, else a pass-through in whoever's chain."""
    patch = handler.patch
    if patch is not None:
        patch.undo()


def check_queue(queue: object, name: object) -> None:
    """Refuse what :func:`loopwatch.watch_queue` cannot watch, with a :class:`ConfigError`."""
    if not isinstance(queue, asyncio.Queue):
        kind = type(queue)
        raise ConfigError(f"watch_queue() watches asyncio.Queue and its subclasses (asyncio.PriorityQueue, "
                          f"asyncio.LifoQueue), got {qualified_name(kind)}")
    check_watch_name("watch_queue", name)
