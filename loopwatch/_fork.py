"""Fork safety: an agent installed before ``fork()`` keeps working in the children.

A pre-forking server (gunicorn with ``--preload``, or any process that forks workers) may install
loopwatch in the parent.  The child is a copy of the parent with one thread -- the one that forked --
so after ``fork()`` the agent there would be broken: its watchdog and exporter threads do not exist,
the descriptors it holds (the exporter's listening socket, the watchdog's wake-up pipe, the in-flight
file of stacks of GIL-held stalls) are the parent's, locks may be held by threads that are
gone, and its counters hold the parent's counts.  ``os.register_at_fork`` handlers fix that:

* **before** ``fork()`` (in the parent): take the exporter's scrape gate, the agent's lock and
  structlog's write locks, so no scrape, attach or log line is half-done in the copy (a lock held by a
  thread that is gone would block the child forever).
* **after**, in the parent: release them.
* **after**, in the child: each component forgets what belongs to the parent in its own ``after_fork``
  (``_forksafe`` calls them, after freeing every lock loopwatch owns): the exporter closes (never
  ``shutdown``) the inherited listening socket, the watchdog the waker's descriptors, the faulthandler
  fallback its copy of the in-flight file (it stays the parent's: not removed) and its signal handler
  (POSIX timers do not cross ``fork()``), and every component starts its counters from zero.  Then this
  module's handler detaches the parent's probes (its loops do not run in the child).  Nothing is started
  yet: the child is *dormant*.
* The agent **resumes** in the child when a loop first starts there (the hooks attach it) or
  ``install()`` is called there: each component's ``start()`` starts what the child lacks -- a new
  watchdog thread (with a new waker), a new in-flight file named after the child's pid, and the exporter
  on the first free port of ``metrics_port``'s range.  A child
  that never runs a loop -- a ``ProcessPoolExecutor`` worker, a ``subprocess`` ``preexec_fn`` -- so
  costs no thread and takes no port.

``os.register_at_fork`` cannot unregister: the handlers are registered once per process and act on
the current agent (``_current``), which ``Agent.stop()`` clears.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ._log import emit

Agent = Any  # loopwatch._agent.Agent, not imported: _agent imports this module (no import cycle)

LOCK_TIMEOUT = 1.0  # never hold a fork up longer than this per lock (a stuck scrape, say)

_current: Agent | None = None
_registered = False
_held: _Held | None = None


def register(agent: Agent) -> None:
    """Make ``agent`` the one the fork handlers act on (``Agent.start``)."""
    global _current, _registered
    _current = agent
    if not _registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child)
        _registered = True


def unregister(agent: Agent) -> None:
    """``Agent.stop``: the handlers do nothing for ``agent`` any more."""
    global _current
    if _current is agent:
        _current = None


class _Held:
    """What the parent holds across one ``fork()``."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.parent_pid = os.getpid()
        self.locks: list[Any] = []
        self.log_locks: list[Any] = []

    def acquire(self, lock: Any, into: list[Any] | None = None) -> None:
        if lock.acquire(timeout=LOCK_TIMEOUT):
            (self.locks if into is None else into).append(lock)

    def release(self, locks: list[Any] | None = None) -> None:
        for held in (self.log_locks, self.locks) if locks is None else (locks,):
            while held:
                try:
                    held.pop().release()
                except RuntimeError:
                    pass


def _before() -> None:
    global _held
    agent = _current
    if agent is None or not agent.started:
        return
    held = _Held(agent)
    _held = held
    try:
        server = agent.exporter.server if agent.exporter is not None else None
        if server is not None:
            held.acquire(server.gate)  # first: a scrape may need the agent's lock to finish
        held.acquire(agent._lock)
    except Exception as exc:  # noqa: BLE001 - never raise into the host
        agent.guard.report("fork", exc)
    # Last (nothing may log from here on in this thread): a line half-written by the watchdog at fork()
    # would leave its lock held in the child, blocking every log line there.
    for lock in _log_write_locks():
        held.acquire(lock, held.log_locks)


def _after_in_parent() -> None:
    global _held
    held, _held = _held, None
    if held is None:
        return
    held.release(held.log_locks)
    held.release()


def _after_in_child() -> None:
    global _held
    held, _held = _held, None
    agent = _current
    if agent is None or not agent.started:
        return
    parent_pid = held.parent_pid if held is not None else os.getppid()
    if held is not None:
        held.release()  # the child's copies: this thread took them, and is the only one here
    try:
        _forget_parent(agent, parent_pid)
    except Exception as exc:  # noqa: BLE001
        agent.guard.report("fork", exc)


def _forget_parent(agent: Agent, parent_pid: int) -> None:
    """In the child, after every component's ``after_fork``: drop the parent's loops (see the docstring)."""
    agent.fork_pending = True
    agent.parent_pid = parent_pid
    for probe in agent.loops.probes:
        probe.late_beats.clear()  # the parent's stalls: not the child's to report
        try:
            agent._detach_locked(probe)  # the per-loop state of every component goes with it
        except Exception as exc:  # noqa: BLE001
            agent.guard.report("fork", exc)
        probe.stopped = True  # a pending beat on an inherited loop returns at once
    agent.loops.probes = ()
    agent.loops.forget()
    notes = agent._degrade.notes
    notes[:] = [d for d in notes if not d.startswith(("exporter:", "faulthandler:"))]


def _log_write_locks() -> list[Any]:
    """structlog's per-file write locks (``PrintLogger``; private, so best effort): held across fork()
    like the ``logging`` module holds its handlers' locks."""
    try:  # looked up, not imported: only an application that uses structlog has its locks
        return list(getattr(sys.modules.get("structlog._output"), "WRITE_LOCKS", {}).values())
    except Exception:  # noqa: BLE001
        return []


def resume(agent: Agent) -> None:
    """In a forked child, when a loop starts or ``install()`` is called: start the agent's own
    threads again (see the module docstring).  Idempotent."""
    with agent._lock:
        if not agent.fork_pending or not agent.started:
            return
        agent.fork_pending = False
        agent.resume()
    emit("info", "loopwatch.forked", pid=os.getpid(), parent_pid=agent.parent_pid,
         metrics_url=agent.metrics_url, dump_dir=str(agent.options.dump_dir))
