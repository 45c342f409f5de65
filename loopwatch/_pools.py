"""Connection pools: ``loopwatch.watch_pool(pool, name)`` for database and cache pools.

Series (OpenTelemetry's DB connection-pool semantics): ``db_client_connection_count{pool_name, state}``
(``idle``/``used``), ``db_client_connection_max``, ``db_client_connection_pending_requests``,
``db_client_connection_overflow`` (SQLAlchemy), the ``db_client_connection_wait_time_seconds`` and
``db_client_connection_use_time_seconds`` histograms and ``db_client_connection_timeouts_total``.

Each kind has an adapter: how to time an acquire and a release (a wrapper on the pool *instance*, or
for asyncpg, whose ``Pool`` has ``__slots__`` and no ``__weakref__``, on the class, dispatching to the
watched pools only), and how to read its gauges at scrape time from the pool's own counters -- plain
attribute reads that never block and never call into the loop.  ``pending`` is the number of acquires
in progress through the wrapper (the pool's own count where it keeps one: psycopg_pool).

Pools are held through weak references (asyncpg: through its internal queue, which lives and dies
with it); a closed or collected pool's series disappear.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from . import _forksafe
from ._component import Component, Naming
from ._errors import ConfigError
from ._log import emit
from ._patch import Patch
from ._series import Counter, Histogram

MAX_POOLS = 100
MAX_HELD = 10_000  # acquired-connection start times kept per pool (a leak must not grow memory)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
USE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

SUPPORTED = ("asyncpg.Pool", "psycopg_pool.ConnectionPool", "psycopg_pool.AsyncConnectionPool",
             "sqlalchemy Engine, AsyncEngine or their Pool (QueuePool, AsyncAdaptedQueuePool, NullPool, "
             "StaticPool, SingletonThreadPool)",
             "redis.ConnectionPool, redis.BlockingConnectionPool, redis.asyncio.ConnectionPool, "
             "redis.asyncio.BlockingConnectionPool (or a Redis client: its connection_pool)",
             "aiopg.Pool", "aiomysql.Pool")


def _library(name: str) -> Any:
    """A pool library's module.  A watched pool's library is loaded already (the pool is one of its
    objects), so this is a lookup, not an import, in the application's thread or ours."""
    module = sys.modules.get(name)
    return module if module is not None else importlib.import_module(name)


def _module(obj: Any) -> str:
    return type(obj).__module__ or ""


def _is(obj: Any, module_prefix: str, *names: str) -> bool:
    """``obj`` is an instance of a class named ``names`` from ``module_prefix`` (or a subclass of one):
    recognised without importing the library."""
    for kind in type(obj).__mro__:
        if (kind.__module__ or "").startswith(module_prefix) and kind.__name__ in names:
            return True
    return False


class PoolState:
    """One watched pool: its adapter, the in-flight acquires, and when each connection was acquired."""

    def __init__(self, name: str, adapter: Adapter) -> None:
        self.name = name
        self.adapter = adapter
        self.pending = 0
        self.held: dict[int, float] = {}
        self.checked_out = 0  # for pools without a count of their own (NullPool)


class Pools(Component):
    """The pool component (see the module docstring)."""

    component = "pool"

    def __init__(self, naming: Naming, *, clock: Callable[[], float] = time.monotonic,
                 on_error: Callable[[BaseException], None]) -> None:
        super().__init__(naming, report=lambda component, exc, **context: on_error(exc))
        self._clock = clock
        self._on_error = on_error
        self._lock = _forksafe.lock()
        self._pools: dict[str, PoolState] = {}
        self._new_series()

    def _new_series(self) -> None:
        ns = self.naming.namespace
        self.wait = Histogram("db_client_connection_wait_time_seconds",
                              "Time to acquire a connection from the pool.", ["service", "pool_name"],
                              namespace=ns, buckets=WAIT_BUCKETS)
        self.use = Histogram("db_client_connection_use_time_seconds",
                             "Time between acquiring a connection and giving it back.", ["service", "pool_name"],
                             namespace=ns, buckets=USE_BUCKETS)
        self.timeouts = Counter("db_client_connection_timeouts", "Acquires that timed out.",
                                ["service", "pool_name"], namespace=ns)

    def after_fork(self) -> None:
        """A forked child: fresh series and lock; watched pools stay watched."""
        self._lock = _forksafe.lock()
        self._new_series()
        for state in self._pools.values():
            state.pending, state.held = 0, {}
            self._series_for(state.name)

    def _series_for(self, name: str) -> None:
        service = self.naming.service
        self.wait.labels(service, name)
        self.use.labels(service, name)
        self.timeouts.labels(service, name)

    def _drop_series(self, name: str) -> None:
        for metric in (self.wait, self.use, self.timeouts):
            try:
                metric.remove(self.naming.service, name)
            except KeyError:
                pass

    # -- the hooks the adapters call (never raise) -----------------------------------------------
    def acquiring(self, state: PoolState) -> float:
        state.pending += 1
        return self._clock()

    def acquired(self, state: PoolState, started: float, connection: Any, error: BaseException | None) -> None:
        state.pending -= 1
        try:
            now = self._clock()
            service = self.naming.service
            if error is None:
                self.wait.labels(service, state.name).observe(now - started)
                state.checked_out += 1
                if len(state.held) < MAX_HELD:
                    state.held[id(connection)] = now
            elif state.adapter.is_timeout(error):
                self.wait.labels(service, state.name).observe(now - started)
                self.timeouts.labels(service, state.name).inc()
        except Exception as exc:  # noqa: BLE001 - never raise into the app's acquire
            self._on_error(exc)

    def released(self, state: PoolState, connection: Any) -> None:
        try:
            state.checked_out = max(0, state.checked_out - 1)
            started = state.held.pop(id(connection), None)
            if started is not None:
                self.use.labels(self.naming.service, state.name).observe(self._clock() - started)
        except Exception as exc:  # noqa: BLE001
            self._on_error(exc)

    # -- watch_pool --------------------------------------------------------------------------------
    @staticmethod
    def check(pool: Any) -> type[Adapter]:
        """The adapter for ``pool``; raises :class:`ConfigError` listing what is supported."""
        adapter_class = adapter_for(pool)
        if adapter_class is None:
            kind = type(pool)
            raise ConfigError(f"watch_pool() does not know {kind.__module__}.{kind.__qualname__}; it watches "
                              + "; ".join(SUPPORTED))
        return adapter_class

    def watch(self, pool: Any, name: str) -> None:
        adapter_class = self.check(pool)
        with self._lock:
            previous = self._pools.get(name)
            if previous is not None and previous.adapter.target() is adapter_class.target_of(pool):
                return
            if previous is None and len(self._pools) >= MAX_POOLS:
                raise ConfigError(f"watch_pool() watches at most {MAX_POOLS} pools; {name!r} would be one more")
            if previous is not None:
                previous.adapter.unpatch()
            state = PoolState(name, None)  # type: ignore[arg-type]
            state.adapter = adapter_class(pool, state, self)
            self._pools[name] = state
            self._series_for(name)
        state.adapter.patch()

    def stop(self) -> None:
        with self._lock:
            states = list(self._pools.values())
            self._pools.clear()
        for state in states:
            try:
                state.adapter.unpatch()
            except Exception as exc:  # noqa: BLE001
                self._on_error(exc)

    # -- scrape --------------------------------------------------------------------------------------
    def families(self) -> list[Metric]:
        family, service = self.naming.family, self.naming.service
        count = family(GaugeMetricFamily, "db_client_connection_count",
                       "Connections in the pool, by state (idle, used).", ["pool_name", "state"])
        maximum = family(GaugeMetricFamily, "db_client_connection_max", "The pool's connection limit.",
                         ["pool_name"])
        pending = family(GaugeMetricFamily, "db_client_connection_pending_requests",
                         "Callers waiting for a connection.", ["pool_name"])
        overflow = family(GaugeMetricFamily, "db_client_connection_overflow",
                          "Connections open beyond the pool size (SQLAlchemy's max_overflow).", ["pool_name"])
        with self._lock:
            states = list(self._pools.items())
        for name, state in states:
            try:
                numbers = state.adapter.read()
            except Exception as exc:  # noqa: BLE001 - a pool changing under us never fails the scrape
                self._on_error(exc)
                continue
            if numbers is None:  # closed or collected: its series go
                self._forget(name, state)
                continue
            count.add_metric([service, name, "idle"], float(numbers["idle"]))
            count.add_metric([service, name, "used"], float(numbers["used"]))
            if numbers.get("max") is not None:
                maximum.add_metric([service, name], float(numbers["max"]))
            pending.add_metric([service, name], float(numbers.get("pending", state.pending)))
            if numbers.get("overflow") is not None:
                overflow.add_metric([service, name], float(numbers["overflow"]))
        return [count, maximum, pending, overflow, *self.wait.collect(), *self.use.collect(),
                *self.timeouts.collect()]

    def _forget(self, name: str, state: PoolState) -> None:
        with self._lock:
            if self._pools.get(name) is state:
                del self._pools[name]
        state.adapter.unpatch()
        self._drop_series(name)


# -- adapters ----------------------------------------------------------------------------------------
class Adapter:
    """How to time and read one kind of pool.  ``target()`` is the pool (or None once it is gone)."""

    timeout_types: tuple[type[BaseException], ...] = ()

    def __init__(self, pool: Any, state: PoolState, pools: Pools) -> None:
        self._ref = weakref.ref(self.target_of(pool))
        self._state = state
        self._pools = pools
        self._patched: list[Patch] = []

    @staticmethod
    def target_of(pool: Any) -> Any:
        return pool

    def target(self) -> Any:
        return self._ref()

    def is_timeout(self, error: BaseException) -> bool:
        return isinstance(error, self.timeout_types)

    def patch(self) -> None:
        raise NotImplementedError

    def read(self) -> dict[str, float | None] | None:
        raise NotImplementedError

    # helpers: wrap an instance method so that it is timed as an acquire or a release
    def _set(self, obj: Any, name: str, make: Callable[[Any, Callable[[], bool]], Any]) -> None:
        """Patch ``obj.name`` with ``make(installed, active)``: a wrapper that times while ``active()``,
        and passes straight through once unwatched (left in another library's chain).  The patch holds
        ``obj`` weakly: the wrapper holds the pool's bound method, and the watch must not keep the pool
        (or, through its event listeners, the engine) alive."""
        holder: list[Patch] = []

        def active() -> bool:
            return bool(holder) and holder[0].active

        patch = Patch(obj, name, lambda installed: functools.update_wrapper(make(installed, active), installed))
        holder.append(patch.apply())
        self._patched.append(patch)

    def unpatch(self) -> None:
        while self._patched:
            self._patched.pop().undo()

    def _library_method(self, obj: Any, name: str) -> bool:
        """True if ``obj``'s class takes ``name`` from the pool's library: a subclass's own method (or a
        test double) is left untouched, and only the pool's gauges are read."""
        module = getattr(getattr(type(obj), name, None), "__module__", None) or ""
        library = _module(obj).split(".", 1)[0]
        if module.split(".", 1)[0] == library:
            return True
        kind = type(obj)
        emit("debug", "loopwatch.not_patched", pool=self._state.name,
             reason=f"{kind.__module__}.{kind.__qualname__}.{name} is not {library}'s own: acquires through "
                    f"it are not timed")
        return False

    def _wrap_acquire(self, obj: Any, name: str) -> None:
        if not self._library_method(obj, name):
            return
        state, pools = self._state, self._pools

        def make(original: Any, active: Callable[[], bool]) -> Any:
            if inspect.iscoroutinefunction(original):
                async def acquire_async(*args: Any, **kwargs: Any) -> Any:
                    if not active():
                        return await original(*args, **kwargs)
                    started = pools.acquiring(state)
                    try:
                        connection = await original(*args, **kwargs)
                    except BaseException as exc:
                        pools.acquired(state, started, None, exc)
                        raise
                    pools.acquired(state, started, connection, None)
                    return connection
                return acquire_async

            def acquire(*args: Any, **kwargs: Any) -> Any:
                if not active():
                    return original(*args, **kwargs)
                started = pools.acquiring(state)
                try:
                    connection = original(*args, **kwargs)
                except BaseException as exc:
                    pools.acquired(state, started, None, exc)
                    raise
                pools.acquired(state, started, connection, None)
                return connection
            return acquire

        self._set(obj, name, make)

    def _wrap_release(self, obj: Any, name: str) -> None:
        if not self._library_method(obj, name):
            return
        state, pools = self._state, self._pools

        def make(original: Any, active: Callable[[], bool]) -> Any:
            if inspect.iscoroutinefunction(original):
                async def release_async(connection: Any, *args: Any, **kwargs: Any) -> Any:
                    if active():
                        pools.released(state, connection)
                    return await original(connection, *args, **kwargs)
                return release_async

            def release(connection: Any, *args: Any, **kwargs: Any) -> Any:
                if active():
                    pools.released(state, connection)
                return original(connection, *args, **kwargs)
            return release

        self._set(obj, name, make)


class PsycopgPool(Adapter):
    """psycopg_pool: ``getconn``/``putconn`` timed; gauges from ``get_stats()`` (pending included)."""

    def __init__(self, pool: Any, state: PoolState, pools: Pools) -> None:
        super().__init__(pool, state, pools)
        self.timeout_types = (_library("psycopg_pool").PoolTimeout,)

    def patch(self) -> None:
        pool = self.target()
        self._wrap_acquire(pool, "getconn")
        self._wrap_release(pool, "putconn")

    def read(self) -> dict[str, float | None] | None:
        pool = self.target()
        if pool is None or pool.closed:
            return None
        stats = pool.get_stats()
        size, available = stats.get("pool_size", 0), stats.get("pool_available", 0)
        return {"idle": available, "used": max(0, size - available), "max": stats.get("pool_max", pool.max_size),
                "pending": stats.get("requests_waiting", 0)}


class SqlAlchemyPool(Adapter):
    """SQLAlchemy: the engine's pool (re-found after ``engine.dispose()``); ``_do_get`` timed, checkout
    and checkin through the pool's public events."""

    def __init__(self, pool: Any, state: PoolState, pools: Pools) -> None:
        self._engine_ref = None
        engine = getattr(pool, "sync_engine", pool)  # AsyncEngine -> Engine
        if _is(engine, "sqlalchemy", "Engine"):
            self._engine_ref = weakref.ref(engine)
        super().__init__(pool, state, pools)
        self.timeout_types = (_library("sqlalchemy.exc").TimeoutError,)
        self._listening: Any = None
        self._on_dispose: Any = None

    @staticmethod
    def target_of(pool: Any) -> Any:
        return getattr(pool, "sync_engine", pool)

    def _pool(self) -> Any:
        engine = self._engine_ref() if self._engine_ref is not None else None
        if self._engine_ref is not None:
            return None if engine is None else engine.pool
        return self.target()

    def patch(self) -> None:
        pool = self._pool()
        if pool is None:
            return
        event = _library("sqlalchemy.event")
        state, pools = self._state, self._pools

        def on_checkin(dbapi_connection: Any, record: Any) -> None:
            pools.released(state, record)

        self._wrap_acquire(pool, "_do_get")  # returns the record that checkout/checkin name later
        event.listen(pool, "checkin", on_checkin)
        self._listening = (weakref.ref(pool), on_checkin)
        engine = self._engine_ref() if self._engine_ref is not None else None
        if engine is not None and self._on_dispose is None:
            adapter_ref = weakref.ref(self)

            def on_dispose(engine: Any) -> None:  # engine.dispose() made a new pool: time that one
                adapter = adapter_ref()
                if adapter is not None:
                    try:
                        adapter.unpatch_pool()
                        adapter.patch()
                    except Exception as exc:  # noqa: BLE001 - never raise into dispose()
                        adapter._pools._on_error(exc)

            event.listen(engine, "engine_disposed", on_dispose)
            self._on_dispose = on_dispose

    def unpatch(self) -> None:
        self.unpatch_pool()
        engine = self._engine_ref() if self._engine_ref is not None else None
        on_dispose, self._on_dispose = self._on_dispose, None
        if engine is not None and on_dispose is not None:
            try:
                _library("sqlalchemy.event").remove(engine, "engine_disposed", on_dispose)
            except Exception:  # noqa: BLE001
                pass

    def unpatch_pool(self) -> None:
        super().unpatch()
        if self._listening is not None:
            pool_ref, on_checkin = self._listening
            self._listening = None
            pool = pool_ref()
            if pool is not None:
                try:
                    _library("sqlalchemy.event").remove(pool, "checkin", on_checkin)
                except Exception:  # noqa: BLE001 - already gone with the pool
                    pass

    def read(self) -> dict[str, float | None] | None:
        if self._engine_ref is not None and self._engine_ref() is None:
            return None
        pool = self._pool()
        if pool is None:
            return None
        listening = self._listening[0]() if self._listening is not None else None
        if listening is not pool:  # the pool was replaced without dispose(): time the new one
            self.unpatch_pool()
            self.patch()
        name = type(pool).__name__
        if hasattr(pool, "checkedout") and hasattr(pool, "overflow") and hasattr(pool, "_max_overflow"):
            size, max_overflow = pool.size(), pool._max_overflow
            return {"idle": pool.checkedin(), "used": pool.checkedout(),
                    "max": size + max_overflow if max_overflow >= 0 else None,
                    "overflow": max(0, pool.overflow())}
        used = self._state.checked_out
        if name == "StaticPool":
            return {"idle": 1 - min(1, used), "used": min(1, used), "max": 1}
        return {"idle": 0, "used": used, "max": None}  # NullPool, SingletonThreadPool: no limit to report


class RedisPool(Adapter):
    """redis-py, sync and asyncio, plain and blocking: ``get_connection``/``release`` timed."""

    def __init__(self, pool: Any, state: PoolState, pools: Pools) -> None:
        super().__init__(pool, state, pools)
        self._connection_error = _library("redis.exceptions").ConnectionError

    @staticmethod
    def target_of(pool: Any) -> Any:
        return pool if not hasattr(pool, "connection_pool") else pool.connection_pool

    def is_timeout(self, error: BaseException) -> bool:
        # The blocking pools raise ConnectionError("No connection available.") when their timeout expires.
        return isinstance(error, self._connection_error) and "No connection available" in str(error)

    def patch(self) -> None:
        pool = self.target()
        self._wrap_acquire(pool, "get_connection")
        self._wrap_release(pool, "release")

    def read(self) -> dict[str, float | None] | None:
        pool = self.target()
        if pool is None:
            return None
        limit = getattr(pool, "max_connections", None)
        limit = limit if isinstance(limit, int) and limit < 2**31 else None
        queue = getattr(pool, "pool", None)  # sync BlockingConnectionPool: a LifoQueue of conns or None
        if queue is not None and hasattr(pool, "_connections"):
            idle = sum(1 for c in list(queue.queue) if c is not None)
            used = max(0, len(pool._connections) - idle)
            return {"idle": idle, "used": used, "max": limit}
        available = getattr(pool, "_available_connections", [])
        in_use = getattr(pool, "_in_use_connections", ())
        return {"idle": len(available), "used": len(in_use), "max": limit}


class AioPool(Adapter):
    """aiopg and aiomysql: ``_acquire``/``release`` timed; ``size``, ``freesize``, ``maxsize`` read."""

    timeout_types = (asyncio.TimeoutError,)

    def patch(self) -> None:
        pool = self.target()
        self._wrap_acquire(pool, "_acquire")
        self._wrap_release(pool, "release")

    def read(self) -> dict[str, float | None] | None:
        pool = self.target()
        if pool is None or getattr(pool, "closed", False):
            return None
        free = pool.freesize
        return {"idle": free, "used": max(0, pool.size - free), "max": pool.maxsize}


class AsyncpgPool(Adapter):
    """asyncpg: its ``Pool`` has ``__slots__`` without ``__weakref__``, so the class's ``_acquire`` and
    ``release`` are wrapped (once, for every watched pool) and the pool is held through its internal
    queue, which only the pool references.  The queue holds the free connection holders."""

    timeout_types = (asyncio.TimeoutError,)
    _watched: dict[int, AsyncpgPool] = {}  # id(pool) -> adapter, for the class-level wrappers
    _class_patch: dict[str, Patch] = {}  # asyncpg.pool.Pool's methods, wrapped while a pool is watched

    def __init__(self, pool: Any, state: PoolState, pools: Pools) -> None:
        self._queue_ref = weakref.ref(pool._queue)
        self._id = id(pool)
        self._max = pool._maxsize
        self._ref = lambda: None  # type: ignore[assignment]
        self._state = state
        self._pools = pools
        self._patched = []
        self._closed = False

    @staticmethod
    def target_of(pool: Any) -> Any:
        return pool._queue

    def target(self) -> Any:
        return self._queue_ref()

    def patch(self) -> None:
        AsyncpgPool._watched[self._id] = self
        _patch_asyncpg_class()

    def unpatch(self) -> None:
        if AsyncpgPool._watched.get(self._id) is self:
            del AsyncpgPool._watched[self._id]
        if not AsyncpgPool._watched:  # undone if still on top; else kept, a pass-through (for_pool is None)
            for name, patch in list(AsyncpgPool._class_patch.items()):
                if patch.undo():
                    del AsyncpgPool._class_patch[name]

    @classmethod
    def for_pool(cls, pool: Any) -> AsyncpgPool | None:
        adapter = cls._watched.get(id(pool))
        if adapter is not None and adapter._queue_ref() is getattr(pool, "_queue", None):
            return adapter
        return None

    def read(self) -> dict[str, float | None] | None:
        queue = self._queue_ref()
        if queue is None or self._closed:
            return None
        free = list(queue._queue)  # PoolConnectionHolder objects not acquired
        idle = sum(1 for holder in free if getattr(holder, "_con", None) is not None)
        return {"idle": idle, "used": max(0, self._max - len(free)), "max": self._max}


def _patch_asyncpg_class() -> None:
    """Wrap each method not already wrapped: one left under another library's patch at the last unwatch
    is still in its chain, and times again as soon as a pool is watched (wrapping it again would time twice)."""
    cls = _library("asyncpg.pool").Pool

    def make_acquire(original: Any) -> Any:
        async def _acquire(self: Any, timeout: Any) -> Any:
            adapter = AsyncpgPool.for_pool(self)
            if adapter is None:
                return await original(self, timeout)
            pools, state = adapter._pools, adapter._state
            started = pools.acquiring(state)
            try:
                connection = await original(self, timeout)
            except BaseException as exc:
                pools.acquired(state, started, None, exc)
                raise
            pools.acquired(state, started, connection, None)
            return connection
        return _acquire

    def make_release(original: Any) -> Any:
        async def release(self: Any, connection: Any, *, timeout: Any = None) -> Any:
            adapter = AsyncpgPool.for_pool(self)
            if adapter is not None:
                adapter._pools.released(adapter._state, connection)
            return await original(self, connection, timeout=timeout)
        return release

    def make_close(original: Any) -> Any:
        async def close(self: Any) -> Any:
            adapter = AsyncpgPool.for_pool(self)
            if adapter is not None:
                adapter._closed = True
            return await original(self)
        return close

    def make_terminate(original: Any) -> Any:
        def terminate(self: Any) -> Any:
            adapter = AsyncpgPool.for_pool(self)
            if adapter is not None:
                adapter._closed = True
            return original(self)
        return terminate

    for name, make in (("_acquire", make_acquire), ("release", make_release), ("close", make_close),
                       ("terminate", make_terminate)):
        left = AsyncpgPool._class_patch.get(name)
        if left is not None and left.in_chain:
            continue
        patch = Patch(cls, name, lambda original, make=make: functools.update_wrapper(make(original), original))
        AsyncpgPool._class_patch[name] = patch.apply()


def adapter_for(pool: Any) -> type[Adapter] | None:
    """The adapter class for ``pool``, recognised by its class's module and name (no import needed)."""
    if _is(pool, "asyncpg", "Pool"):
        return AsyncpgPool
    if _is(pool, "psycopg_pool", "ConnectionPool", "AsyncConnectionPool", "NullConnectionPool",
           "AsyncNullConnectionPool"):
        return PsycopgPool
    if _is(pool, "sqlalchemy", "Engine", "AsyncEngine", "Pool"):
        return SqlAlchemyPool
    if _is(pool, "redis", "ConnectionPool", "BlockingConnectionPool", "Redis"):
        return RedisPool
    if _is(pool, "aiopg", "Pool") or _is(pool, "aiomysql", "Pool"):
        return AioPool
    return None
