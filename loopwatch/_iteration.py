"""The loop's iteration clock: when the busy stretch in progress began, and how busy the loop has been.

A *stretch* is the time between two waits for I/O: the loop runs callbacks, and runs no new one until it
waits again.  A stall is a long stretch -- it begins when the callback that blocks began, whatever the
phase of any timer -- so this clock is what stalls are measured with (see ``_watchdog``).

* **stdlib loops**: the wait for I/O is timed -- it returning starts a stretch, the next wait ends it.
  With the C accelerator (built by the README's setup), ``loopwatch._accel.PollClock`` stands in for the
  selector's epoll/poll object (``selector._selector``), whose ``poll()`` the selector's Python
  ``select()`` calls: timed from C to C, ~10% of the cost of a Python wrapper.  Without it (or for
  ``SelectSelector``), the selector's ``select()`` is wrapped (one instance attribute):
  :class:`PySelectClock` in Python, ``loopwatch._accel.SelectClock`` in C.  Both are removed on detach.
  Only the standard library's selector classes are touched.
* **uvloop**: ``loopwatch._accel.UvClock`` adds libuv *prepare* and *check* handles to the loop (through
  ``uvloop.loop.libuv_get_loop_t_ptr``): the check handle runs right after libuv polled for I/O, the
  prepare handle right before it polls again.  I/O callbacks run inside the poll phase, after ``epoll``
  returned: libuv updates the loop's time (ms) at that moment, which dates them.  :class:`UvStretches`
  reads it.  Without the accelerator, uvloop loops fall back to the probe's beats (``_probe``).

Every clock offers ``read() -> (busy seconds, start of the stretch in progress or None)`` and calls
``on_long(start, end)`` (or queues it, for uvloop) for each stretch at least ``threshold`` long.
"""

from __future__ import annotations

import os
import platform
import select as select_module
import selectors
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import _unpatched as _os
from ._cputime import ThreadClock

try:
    from . import _accel
except ImportError:  # not built (no compiler at install): the pure-Python twins run
    _accel = None  # type: ignore[assignment]

ACCELERATED = _accel is not None

# The selectors whose select() loopwatch wraps: the standard library's.  Anything else (a Mock, a test
# double, a subclass with its own select) is left untouched.
KNOWN_SELECTS = frozenset(
    function for function in (getattr(getattr(selectors, name, None), "select", None)
                              for name in ("SelectSelector", "PollSelector", "EpollSelector",
                                           "DevpollSelector", "KqueueSelector"))
    if function is not None)


class PySelectClock:
    """A selector's ``select`` wrapper in Python: the twin of ``loopwatch._accel.SelectClock``.

    Its state lives in closure cells and the call path has no method call of its own -- it runs on every
    loop iteration -- with one clock read instead of two when asyncio asks for ``select(0)`` (callbacks
    are ready: the poll does not wait, and its few microseconds count as busy)."""

    def __init__(self, original: Callable[..., Any], threshold: float,
                 on_long: Callable[[float, float], None], clock: Callable[[], float] | None = None) -> None:
        clock = clock or time.monotonic
        start: float | None = clock()  # when the current busy stretch began; None while select() waits
        busy_total = 0.0

        def select(timeout: float | None = None) -> Any:
            nonlocal start, busy_total
            if timeout == 0:
                try:
                    return original(0)
                finally:
                    now = clock()
                    began = now if start is None else start
                    start = now
                    busy_total += now - began
                    if now - began >= threshold:
                        on_long(began, now)
            now = clock()
            began = now if start is None else start
            busy_total += now - began
            start = None
            if now - began >= threshold:
                on_long(began, now)
            try:
                return original(timeout)
            finally:
                start = clock()

        def read() -> tuple[float, float | None]:
            return busy_total, start

        def restart(count_stretch: bool) -> None:
            nonlocal start, busy_total
            now = clock()
            if count_stretch and start is not None:
                busy_total += now - start
            start = now

        self.original = original
        self.select = select
        self.read = read
        self.restart = restart

    def __call__(self, timeout: float | None = None) -> Any:  # pragma: no cover - the closure is installed
        return self.select(timeout)


def select_clock(original: Callable[..., Any], threshold: float, on_long: Callable[[float, float], None], *,
                 accelerated: bool, clock: Callable[[], float] | None = None) -> tuple[Any, Any]:
    """``(the callable to install as select, the clock to read)``: C when ``accelerated``, else Python."""
    if accelerated and _accel is not None:
        wrapper = _accel.SelectClock(original, threshold, on_long, clock)
        return wrapper, wrapper
    clock_ = PySelectClock(original, threshold, on_long, clock)
    return clock_.select, clock_


# The selectors whose select() is Python code around one C call, ``self._selector.poll(...)``, on an object
# of these types: with the accelerator, that object is replaced by a ``PollClock`` (timed C to C).
_POLL_SELECTS = frozenset(getattr(getattr(selectors, name, None), "select", None)
                          for name in ("EpollSelector", "PollSelector", "DevpollSelector")) - {None}
_POLL_TYPES = tuple(kind for kind in (getattr(select_module, "epoll", None),
                                      type(select_module.poll()) if hasattr(select_module, "poll") else None,
                                      getattr(select_module, "devpoll", None)) if isinstance(kind, type))


def poll_clock(selector: Any, threshold: float, on_long: Callable[[float, float], None], *,
               clock: Callable[[], float] | None = None) -> Any | None:
    """A ``PollClock`` standing in for ``selector._selector``, or None where that does not apply (no
    accelerator, another selector class, an object of another type there)."""
    if _accel is None or getattr(type(selector), "select", None) not in _POLL_SELECTS:
        return None
    target = getattr(selector, "_selector", None)
    if type(target) not in _POLL_TYPES:
        return None
    return _accel.PollClock(target, threshold, on_long, clock)


# -- uvloop ------------------------------------------------------------------------------------------
# System call numbers of epoll_wait / epoll_pwait / epoll_pwait2, per architecture: a uvloop loop whose
# epoll returned within the millisecond it was entered is told from one still waiting by the system call
# its thread is in (``/proc/self/task/<tid>/syscall``).
_EPOLL_SYSCALLS = {"x86_64": {232, 281, 441}, "aarch64": {22, 441}, "arm64": {22, 441}}.get(platform.machine(), set())
_MS = 0.001


def in_epoll(native_id: int) -> bool | None:
    """True if the thread waits in ``epoll``, False if not, None where that cannot be read."""
    if not _EPOLL_SYSCALLS:
        return None
    try:
        fd = _os.open(f"/proc/self/task/{native_id}/syscall", os.O_RDONLY)
        try:
            first = _os.read(fd, 32).split(b" ", 1)[0]
        finally:
            _os.close(fd)
    except OSError:
        return None
    if first == b"running":
        return False
    try:
        return int(first) in _EPOLL_SYSCALLS
    except ValueError:
        return None


class UvStretches:
    """uvloop's iteration clock, from ``loopwatch._accel.UvClock`` (see the module docstring)."""

    def __init__(self, loop: Any, threshold: float, native_id: int) -> None:
        module = sys.modules["uvloop.loop"]  # loaded: the loop is one of its objects
        self._clock = _accel.UvClock(module.libuv_get_loop_t_ptr(loop), module.__file__, threshold)
        self._native_id = native_id
        self.threshold = threshold

    def busy_since(self) -> float | None:
        state = self._clock.state()
        if state is None:
            return None
        in_poll, start, entry, loop_time, _ = state
        if not in_poll:
            return start
        if loop_time > entry + _MS:  # epoll returned (libuv updated the loop's time): I/O callbacks run
            return loop_time
        waiting = in_epoll(self._native_id)
        return None if waiting or waiting is None else entry

    def read(self) -> tuple[float, float | None]:
        state = self._clock.state()
        if state is None:
            return 0.0, None
        return state[4], self.busy_since()

    def drain(self) -> list[tuple[float, float]]:
        return self._clock.drain()

    def close(self) -> None:
        self._clock.close()


class UvActivity:
    """A uvloop loop timed by :class:`UvStretches`.  Slow callbacks are counted by the watchdog, from the
    long stretches it drains here (``times_iterations`` is False)."""

    times_iterations = False
    exact = True

    def __init__(self, loop: Any, stretches: UvStretches) -> None:
        self._loop_ref = weakref.ref(loop)
        self._stretches = stretches
        self._threshold = stretches.threshold
        self._paused = False
        self._last_busy = 0.0
        self._extra: list[tuple[float, float]] = []  # stretches ended by a pause (no prepare callback ran)
        self._closed = False

    def busy_since(self, now: float) -> float | None:
        return None if self._paused or self._closed else self._stretches.busy_since()

    def finished(self) -> list[tuple[float, float]]:
        out = self._stretches.drain() if not self._closed else []
        if self._extra:
            out, self._extra = out + self._extra, []
        return out

    def busy_now(self) -> float:
        if self._closed or self._paused:
            return self._last_busy
        busy, since = self._stretches.read()
        if since is not None:
            busy += max(0.0, time.monotonic() - since)
        self._last_busy = max(self._last_busy, busy)
        return self._last_busy

    def reset(self) -> None:
        self._paused = False

    def pause(self) -> None:
        """The loop stopped running: the stretch up to here ended without a prepare callback."""
        since = None if self._closed else self._stretches.busy_since()
        now = time.monotonic()
        if since is not None and now - since >= self._threshold:
            self._extra.append((since, now))
        self.busy_now()
        self._paused = True

    def on_beat(self) -> None:
        pass

    def uninstall(self) -> None:
        """Close the libuv handles in the loop's thread: now if the loop is not running, else from it."""
        if self._closed:
            return
        self.busy_now()
        self._extra = self._stretches.drain() + self._extra  # still told by finished() after this
        self._closed = True
        loop = self._loop_ref()
        if loop is not None and loop.is_running():
            try:
                loop.call_soon_threadsafe(self._stretches.close)
                return
            except RuntimeError:  # closed in between
                pass
        self._stretches.close()


class CpuBusy:
    """Where iterations cannot be timed: the loop thread's on-CPU time stands in for busy time.  It misses
    time a callback spends blocked in a syscall (a sync DB call waiting on the network)."""

    def __init__(self, ident: int, native_id: int | None) -> None:
        self._clock = ThreadClock(ident, native_id)
        first = self._clock.sample(0.0).cpu
        self._base = first if first is not None else 0.0

    def busy_now(self) -> float | None:
        cpu = self._clock.sample(0.0).cpu
        return None if cpu is None else max(0.0, cpu - self._base)


class BeatActivity:
    """The fallback where the loop's iterations cannot be timed (uvloop without the accelerator, a
    selector loopwatch does not know): a stall is a beat of the probe that is overdue, timed from when
    that beat was due -- a lower bound of the real stall, short by up to ``probe_interval``, and a stall
    shorter than the threshold plus the time left until the next beat goes unseen."""

    times_iterations = False
    exact = False

    def __init__(self, probe: Any) -> None:
        self._probe = probe
        self._cpu = CpuBusy(probe.thread_ident, probe.native_id)

    def busy_since(self, now: float) -> float | None:
        probe = self._probe
        due = probe.expected_at
        return due if probe.running and now > due else None

    def finished(self) -> list[tuple[float, float]]:
        beats = self._probe.late_beats
        out = []
        while beats:
            beat = beats.popleft()
            out.append((beat.key, beat.key + beat.delay))
        return out

    def busy_now(self) -> float | None:
        return self._cpu.busy_now()

    def reset(self) -> None:
        pass

    def pause(self) -> None:
        pass

    def on_beat(self) -> None:
        pass

    def uninstall(self) -> None:
        pass
