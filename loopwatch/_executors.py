"""Executors: the loop's default executor (``asyncio.to_thread``, ``run_in_executor(None, ...)``) and
any executor passed to :func:`loopwatch.watch_executor`.

* **Default executor.** asyncio creates it on the first ``run_in_executor(None, ...)``.  loopwatch sets
  an instance attribute ``run_in_executor`` on each watched loop (removed on detach) that wraps the
  function in a small timing shim and, after the call, picks up ``loop._default_executor``.  Its label
  is ``default`` (``default:<loop>`` for loops other than the first).
* **Watched executors.** ``watch_executor()`` sets an instance attribute ``submit`` on the executor
  that wraps the function the same way (``ThreadPoolExecutor``).  A ``ProcessPoolExecutor`` runs its
  work in other processes: its queue depth, processes and limit are exported, not the queue wait.

The shim records submit -> start (``to_thread_executor_queue_wait_seconds``) and counts the work
running (``to_thread_executor_busy_threads``); it costs ~1 µs per submitted call.  Queue depth, threads
and the limit are read at scrape time from the executor's attributes.  A shut-down or garbage-collected
executor's series disappear.  A wait past ``executor_wait_threshold`` logs ``loopwatch.executor_saturated``
(at most once per executor per ``LOG_EVERY`` seconds).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from . import _forksafe
from ._component import Component, Naming
from ._errors import ConfigError, check_watch_name
from ._patch import Patch, instance_attribute
from ._log import emit
from ._series import Histogram

MAX_EXECUTORS = 100
LOG_EVERY = 10.0
BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _nothing() -> None:
    return None


def _is_pool(executor: object, kind: str) -> bool:
    """``isinstance(executor, concurrent.futures.<kind>)`` without importing anything: the package loads
    ``ThreadPoolExecutor`` and ``ProcessPoolExecutor`` lazily (the latter imports ``multiprocessing``), and
    an executor of a class that is not loaded yet cannot exist."""
    module = sys.modules.get("concurrent.futures.thread" if kind == "ThreadPoolExecutor" else "concurrent.futures.process")
    cls = getattr(module, kind, None)
    return cls is not None and isinstance(executor, cls)


def _thread_pool_submit() -> Any:
    return sys.modules["concurrent.futures.thread"].ThreadPoolExecutor.submit


def check_executor(executor: object, name: object) -> None:
    """Refuse what :func:`loopwatch.watch_executor` cannot watch, with a :class:`ConfigError`."""
    if not (_is_pool(executor, "ThreadPoolExecutor") or _is_pool(executor, "ProcessPoolExecutor")):
        kind = type(executor)
        raise ConfigError(f"watch_executor() watches concurrent.futures.ThreadPoolExecutor and "
                          f"ProcessPoolExecutor (and their subclasses), got {kind.__module__}.{kind.__qualname__}")
    check_watch_name("watch_executor", name)


class _Watched:
    """One executor under watch: the weak reference, the in-flight count, the log rate limit."""

    __slots__ = ("name", "ref", "busy", "last_log", "patch", "__weakref__")

    def __init__(self, name: str, executor: cf.Executor | None) -> None:
        self.name = name
        self.ref: Callable[[], Any] = weakref.ref(executor) if executor is not None else _nothing
        self.busy = 0
        self.last_log = -LOG_EVERY
        self.patch: Patch | None = None  # the executor's submit, wrapped (ThreadPoolExecutor)


class Executors(Component):
    """The executor component: its series and its hooks (see the module docstring)."""

    component = "executor"

    def __init__(self, naming: Naming, *, threshold: float, clock: Callable[[], float] = time.monotonic,
                 on_error: Callable[[BaseException], None]) -> None:
        super().__init__(naming, report=lambda component, exc, **context: on_error(exc))
        self.threshold = threshold
        self._clock = clock
        self._on_error = on_error
        self._lock = _forksafe.lock()
        self._watched: dict[str, _Watched] = {}
        self._loops: dict[str, tuple[str, Patch]] = {}  # loop label -> (executor name, run_in_executor patch)
        self.histogram = self._new_histogram()

    def _new_histogram(self) -> Histogram:
        return Histogram("to_thread_executor_queue_wait_seconds",
                         "Time from submit to start of work given to an executor.",
                         ["service", "executor"], namespace=self.naming.namespace,
                         buckets=BUCKETS)

    def after_fork(self) -> None:
        """A forked child: fresh lock and histogram; watched executors stay watched (their threads are
        gone, and the executor itself starts new ones)."""
        self._lock = _forksafe.lock()
        self.histogram = self._new_histogram()
        for watched in self._watched.values():
            watched.busy = 0
            self.histogram.labels(self.naming.service, watched.name)

    # -- the timing shim ------------------------------------------------------------------------
    def _shim(self, watched: _Watched, fn: Callable[..., Any]) -> Callable[..., Any]:
        submitted = self._clock()

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._started(watched, submitted)
            try:
                return fn(*args, **kwargs)
            finally:
                watched.busy -= 1

        return functools.update_wrapper(timed, fn) if callable(fn) else timed

    def _started(self, watched: _Watched, submitted: float) -> None:
        watched.busy += 1  # a race with another worker loses at most a count; never raises
        try:
            wait = self._clock() - submitted
            self.histogram.labels(self.naming.service, watched.name).observe(wait)
            if wait >= self.threshold:
                now = self._clock()
                if now - watched.last_log >= LOG_EVERY:
                    watched.last_log = now
                    executor = watched.ref()
                    emit("warning", "loopwatch.executor_saturated", executor=watched.name,
                         queue_wait=round(wait, 6), threshold=self.threshold,
                         **(_numbers(executor) if executor is not None else {}))
        except Exception as exc:  # noqa: BLE001 - never raise into the work item
            self._on_error(exc)

    # -- watch_executor --------------------------------------------------------------------------
    def watch(self, executor: cf.Executor, name: str) -> None:
        with self._lock:
            previous = self._watched.get(name)
            if previous is not None and previous.ref() is executor:
                return
            if previous is None and len(self._watched) >= MAX_EXECUTORS:
                raise ConfigError(f"watch_executor() watches at most {MAX_EXECUTORS} executors; "
                                  f"{name!r} would be one more")
            if previous is not None:
                self._unpatch(previous)
            watched = _Watched(name, executor)
            self._watched[name] = watched
            self.histogram.labels(self.naming.service, name)
        if _is_pool(executor, "ThreadPoolExecutor"):
            self._patch_submit(watched, executor)

    def _patch_submit(self, watched: _Watched, executor: cf.Executor) -> None:
        if type(executor).submit is not _thread_pool_submit():
            kind = type(executor)
            emit("debug", "loopwatch.not_patched", executor=watched.name,
                 reason=f"{kind.__module__}.{kind.__qualname__}.submit is its own: its queue wait is not "
                        f"measured, its gauges are")
            return
        shim = self._shim

        def make(original: Callable[..., cf.Future[Any]]) -> Callable[..., cf.Future[Any]]:
            def submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
                patch = watched.patch
                if patch is None or not patch.active:  # unwatched under another library's wrapper
                    return original(fn, *args, **kwargs)
                return original(shim(watched, fn), *args, **kwargs)
            return submit

        try:
            watched.patch = Patch(executor, "submit", make).apply()
        except AttributeError:  # pragma: no cover - a subclass with __slots__: gauges only
            pass

    @staticmethod
    def _unpatch(watched: _Watched) -> None:
        patch, watched.patch = watched.patch, None
        if patch is not None:
            patch.undo()

    # -- the default executor, per loop ----------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop, label: str) -> bool:
        """Wrap ``loop.run_in_executor`` (an instance attribute); False where it cannot be set."""
        if label in self._loops:
            return True
        name = "default" if not self._loops and label == "main" else f"default:{label}"
        watched = _Watched(name, None)  # until asyncio creates the default executor
        if instance_attribute(loop, "run_in_executor") is not None:  # replaced on this loop by someone else: theirs, left alone
            emit("debug", "loopwatch.not_patched", loop=label,
                 reason="the loop's run_in_executor was already replaced on the instance: left alone, its "
                        "default executor is not measured")
            return True
        method = type(loop).run_in_executor
        shim, pick_up = self._shim, self._pick_up
        loop_ref = weakref.ref(loop)  # never the loop itself: the wrapper lives on it (no cycle, no leak)
        holder: list[Patch] = []

        def original(executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            return method(loop_ref(), executor, func, *args)

        def run_in_executor(executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            if executor is not None or not holder or not holder[0].active:
                return original(executor, func, *args)
            future = original(None, shim(watched, func), *args)
            if watched.ref() is None:
                pick_up(watched, loop_ref)
            return future

        try:  # the class's method is what is installed (instance_attribute said so): called through it
            holder.append(Patch(loop, "run_in_executor", lambda installed: run_in_executor).apply())
        except (AttributeError, TypeError):
            return False
        self._loops[label] = (name, holder[0])
        with self._lock:
            self._watched[name] = watched
        self._pick_up(watched, loop_ref)  # set_default_executor() may have been called already
        return True

    def _pick_up(self, watched: _Watched, loop_ref: weakref.ref[Any]) -> None:
        loop = loop_ref()
        executor = getattr(loop, "_default_executor", None) if loop is not None else None
        if isinstance(executor, cf.Executor):
            watched.ref = weakref.ref(executor)
            self.histogram.labels(self.naming.service, watched.name)

    def detach(self, label: str) -> None:
        """Stop watching the default executor of the loop labelled ``label`` (closed or collected)."""
        entry = self._loops.pop(label, None)
        if entry is None:
            return
        name, patch = entry
        with self._lock:
            self._watched.pop(name, None)
        # Its wait histogram stays: the next loop with this label carries on in the same series.
        patch.undo()  # restored if still on top, else a pass-through in whoever's chain

    def stop(self) -> None:
        with self._lock:
            watched = list(self._watched.values())
            self._watched.clear()
        for item in watched:
            self._unpatch(item)
        for _, patch in list(self._loops.values()):
            patch.undo()
        self._loops.clear()

    # -- scrape ----------------------------------------------------------------------------------
    def families(self) -> list[Metric]:
        family, service = self.naming.family, self.naming.service
        depth = family(GaugeMetricFamily, "to_thread_executor_queue_depth",
                       "Work items waiting for a worker.", ["executor"])
        threads = family(GaugeMetricFamily, "to_thread_executor_threads",
                         "Worker threads (processes for a ProcessPoolExecutor) alive.", ["executor"])
        limit = family(GaugeMetricFamily, "to_thread_executor_max_workers", "The executor's limit.", ["executor"])
        busy = family(GaugeMetricFamily, "to_thread_executor_busy_threads",
                      "Workers running a work item (ThreadPoolExecutor).", ["executor"])
        with self._lock:
            watched = list(self._watched.items())
        for name, item in watched:
            executor = item.ref()
            if executor is None:
                continue
            if getattr(executor, "_shutdown", False) or getattr(executor, "_shutdown_thread", False):
                self._forget(name, item)
                continue
            numbers = _numbers(executor)
            if not numbers:
                continue
            depth.add_metric([service, name], numbers["queue_depth"])
            threads.add_metric([service, name], numbers["threads"])
            limit.add_metric([service, name], numbers["max_workers"])
            if _is_pool(executor, "ThreadPoolExecutor"):
                busy.add_metric([service, name], float(max(0, min(item.busy, numbers["threads"]))))
        histograms = [m for m in self.histogram.collect()]
        return [depth, threads, limit, busy, *histograms]

    def _forget(self, name: str, item: _Watched) -> None:
        """A shut-down executor: its gauges go (a default one comes back if asyncio makes a new one); its wait
        histogram stays -- it only grows, and an executor watched again under the name carries on in it, so
        a pool made and shut down again and again under one name does not create and drop series."""
        self._unpatch(item)
        if name.startswith("default"):
            item.ref = _nothing
        else:
            with self._lock:
                if self._watched.get(name) is item:
                    del self._watched[name]


def _numbers(executor: Any) -> dict[str, float]:
    """Queue depth, workers and limit, read from the executor's attributes (never blocks)."""
    try:
        if _is_pool(executor, "ThreadPoolExecutor"):
            queue = executor._work_queue  # type: ignore[attr-defined]
            return {"queue_depth": float(queue.qsize()), "threads": float(len(executor._threads)),  # type: ignore[attr-defined]
                    "max_workers": float(executor._max_workers)}  # type: ignore[attr-defined]
        if _is_pool(executor, "ProcessPoolExecutor"):
            pending = len(getattr(executor, "_pending_work_items", {}) or {})
            processes = getattr(executor, "_processes", None) or {}
            workers = float(getattr(executor, "_max_workers", 0) or 0)
            # Pending items include the ones running (at most one per process).
            return {"queue_depth": float(max(0, pending - len(processes))), "threads": float(len(processes)),
                    "max_workers": workers}
    except (AttributeError, TypeError, RuntimeError):
        return {}
    return {}
