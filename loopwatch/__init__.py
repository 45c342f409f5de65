"""loopwatch: keeps asyncio services healthy in production.

``loopwatch.install()`` -- one line -- and the application exports Prometheus metrics about its event
loop, and writes stack dumps that name the line of code that blocked the loop while the stall is still
going on.  See the README for the metric catalogue, the dump format and the configuration.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from pathlib import Path
from typing import Any, TypeVar

from . import _forksafe
from ._agent import Agent, AgentSnapshot, LoopSnapshot
from ._config import OPTION_NAMES, Options, resolve
from ._errors import ConfigError, check_watch_name
from ._executors import check_executor
from ._pools import Pools
from ._tasks import check_queue
from ._version import __version__

__all__ = [
    "Agent",
    "AgentSnapshot",
    "ConfigError",
    "LoopSnapshot",
    "Options",
    "__version__",
    "dump",
    "install",
    "uninstall",
    "watch_executor",
    "watch_pool",
    "watch_queue",
]

_lock = _forksafe.rlock()
_agent: Agent | None = None
_implicit: Agent | None = None  # installed by ``loopwatch run`` and not yet claimed by the application


def install(
    *,
    namespace: str | None = None,
    service: str | None = None,
    metrics_port: int | str | None = None,
    metrics_addr: str | None = None,
    registry: Any = None,
    probe_interval: float | None = None,
    lag_thresholds: Any = None,
    dump_dir: str | os.PathLike[str] | None = None,
    dump_cooldown: float | None = None,
    dump_keep: int | None = None,
    faulthandler: bool | None = None,
    slow_callback_threshold: float | None = None,
    slow_callback_mode: str | None = None,
    gil_probe_interval: float | None = None,
    executor_wait_threshold: float | None = None,
    native_stacks: bool | None = None,
    accelerator: bool | None = None,
    disable: Any = None,
    metrics_certfile: str | os.PathLike[str] | None = None,
    metrics_keyfile: str | os.PathLike[str] | None = None,
    metrics_client_cafile: str | os.PathLike[str] | None = None,
    metrics_client_capath: str | os.PathLike[str] | None = None,
    metrics_client_auth_required: bool | None = None,
    dump_signal: int | str | None = None,
    console: bool | int | str | tuple[int, int] | None = None,
    console_addr: str | None = None,
    console_task_factory: bool | None = None,
    context_keys: Any = None,
    otel_metrics: str | None = None,
) -> Agent:
    """Install the agent (idempotent) and return it.

    Call it inside a running loop, or before any loop exists (e.g. at import, then
    ``asyncio.run(main())``): loops that start running later are watched from their first iteration.
    Every option also comes from ``LOOPWATCH_<NAME>``; explicit arguments win.  Invalid options raise
    :class:`ConfigError` and nothing is installed; so does a name clash in the registry.  Anything else that
    escapes while installing raises ``RuntimeError``, with nothing left behind (no thread, descriptor,
    patch or series); a part that cannot work is a logged ``loopwatch.degraded`` and the rest runs.
    A second call returns the running agent; passing
    options that differ from the running agent's raises :class:`ConfigError` (``uninstall()`` first) --
    except over the agent ``loopwatch run`` installed before the application's first call: that one is
    replaced (the application's options, ``LOOPWATCH_*`` for the rest).
    """
    global _agent, _implicit
    explicit = {name: value for name, value in locals().items() if name in OPTION_NAMES and value is not None}
    with _lock:
        implicit, _implicit = _implicit, None  # the application's first call claims the agent
        if _agent is not None and _agent.started:
            replace = False
            if explicit:
                wanted = resolve(explicit, environ={})
                for name in explicit:
                    current, new = getattr(_agent.options, name), getattr(wanted, name)
                    if (current is not new) if name == "registry" else current != new:
                        if _agent is implicit:
                            replace = True
                            break
                        raise ConfigError(
                            f"loopwatch is already installed with {name}={current!r}, got {name}={new!r}; "
                            f"call loopwatch.uninstall() before installing with other options")
            if not replace:
                _agent.attach_current_loop()
                return _agent
            options = resolve(explicit)  # validated before the running agent stops
            _agent, running = None, _agent
            running.stop()
        else:
            options = resolve(explicit)
        agent = Agent(options)
        agent.start()
        _agent = agent
        return agent


def _install_for_run() -> Agent:
    """``loopwatch run``'s install (its bootstrap ``sitecustomize``, in a process's first running loop):
    ``install()`` with the ``LOOPWATCH_*`` options.  Until the application calls ``install()`` itself, the
    agent is ``loopwatch run``'s: the application's first ``install(...)`` with options that differ
    replaces it (instead of raising :class:`ConfigError`)."""
    global _implicit
    with _lock:
        ours = _agent is None or not _agent.started or _agent is _implicit
        agent = install()
        _implicit = agent if ours else None
        return agent


def uninstall() -> None:
    """Stop the agent: threads stopped, patches undone, metrics unregistered.  Safe to call twice."""
    global _agent, _implicit
    with _lock:
        agent, _agent, _implicit = _agent, None, None
    if agent is not None:
        agent.stop()


def dump(reason: str = "manual") -> Path:
    """Write a stack dump now and return its path (JSON; a ``.txt`` twin sits beside it).

    Raises ``RuntimeError`` if loopwatch is not installed or dumps are disabled.
    """
    agent = _agent
    if agent is None:
        raise RuntimeError("loopwatch is not installed: call loopwatch.install() first")
    return agent.dump(reason)


_Executor = TypeVar("_Executor", bound=concurrent.futures.Executor)


def watch_executor(executor: _Executor, name: str) -> _Executor:
    """Export ``to_thread_executor_*{executor=name}`` for ``executor``; returns it.

    ``executor`` is a :class:`concurrent.futures.ThreadPoolExecutor` (queue depth, threads, busy
    threads, limit, and the submit-to-start wait) or :class:`~concurrent.futures.ProcessPoolExecutor`
    (queue depth, processes, limit), held through a weak reference; its series disappear when it is shut
    down or garbage-collected.  ``name`` is a non-empty printable string (at most 128 characters);
    watching another executor under a taken name replaces it.  Anything else raises
    :class:`ConfigError`.  The loop's default executor (``asyncio.to_thread``) is watched without this
    call, as ``executor="default"``.  Raises ``RuntimeError`` if loopwatch is not installed.  With
    ``disable`` naming ``executors`` it only checks its arguments and returns ``executor`` untouched.
    """
    check_executor(executor, name)
    agent = _agent
    if agent is None or not agent.started:
        raise RuntimeError("loopwatch is not installed: call loopwatch.install() before loopwatch.watch_executor()")
    if agent.executors is not None:  # None: ``disable=executors``
        agent.executors.watch(executor, name)
    return executor


_Pool = TypeVar("_Pool")


def watch_pool(pool: _Pool, name: str) -> _Pool:
    """Export ``db_client_connection_*{pool_name=name}`` for a database or cache pool; returns it.

    Recognised without saying which: asyncpg ``Pool``; psycopg_pool ``ConnectionPool`` and
    ``AsyncConnectionPool``; SQLAlchemy ``Engine``, ``AsyncEngine`` and their pools; redis-py connection
    pools, sync and asyncio, plain and blocking (or a ``Redis`` client, for its pool); aiopg and aiomysql
    pools.  Anything else raises :class:`ConfigError` listing what is supported.  The pool is held weakly;
    once it is closed or collected its series disappear.  ``name`` is a non-empty printable string (at
    most 128 characters); watching another pool under a taken name replaces it.  Raises ``RuntimeError``
    if loopwatch is not installed.  With ``disable`` naming ``pools`` it returns ``pool`` untouched.
    """
    check_watch_name("watch_pool", name)
    agent = _agent
    if agent is None or not agent.started:
        raise RuntimeError("loopwatch is not installed: call loopwatch.install() before loopwatch.watch_pool()")
    if agent.pools is not None:
        agent.pools.watch(pool, name)
    else:  # ``disable=pools``: the pool is still checked
        Pools.check(pool)
    return pool


_Queue = TypeVar("_Queue", bound=asyncio.Queue[Any])


def watch_queue(queue: _Queue, name: str) -> _Queue:
    """Export ``queue_depth{queue=name}`` and ``queue_maxsize{queue=name}`` for ``queue``; returns it.

    ``queue`` is an :class:`asyncio.Queue` (or a subclass: :class:`asyncio.PriorityQueue`,
    :class:`asyncio.LifoQueue`), read at scrape time through a weak reference: watching never keeps it
    alive, and its series disappear once it is garbage-collected.  ``name`` is a non-empty printable
    string (at most 128 characters), unique among the live watched queues; watching the same queue
    under the same name again is a no-op.  Anything else raises :class:`ConfigError`.  Raises
    ``RuntimeError`` if loopwatch is not installed; ``uninstall()`` forgets every watched queue.  With
    ``disable`` naming ``tasks`` it returns ``queue`` untouched.
    """
    check_queue(queue, name)
    agent = _agent
    if agent is None or not agent.started:
        raise RuntimeError("loopwatch is not installed: call loopwatch.install() before loopwatch.watch_queue()")
    if agent.task_health is None:  # ``disable=tasks``: queue depths are task health's series
        return queue
    return agent.task_health.watch_queue(queue, name)
