"""How the watchdog thread sleeps without costing a busy loop anything.

Every time a Python thread wakes up it needs the GIL; if the loop thread is busy, the two hand the GIL
back and forth on every loop iteration until the loop idles, which slows a busy loop by 10-20% for that
while (measured: a thread waking at 10 Hz costs a callback-heavy loop ~11%).  So the watchdog should not
wake while the loop is healthy.

On Linux it does not have to: a ``timerfd`` (through ``ctypes``; feature-detected and self-tested) is
re-armed by every probe beat -- one ``timerfd_settime`` call on the loop thread, no thread woken -- to
the moment the earliest beat would be a threshold late.  The watchdog sleeps in ``select()`` on it and
wakes only if the loop misses that moment: a healthy loop costs no watchdog wake-ups at all beyond slow
housekeeping.  An ``inotify`` watch on faulthandler's in-flight file also wakes it when faulthandler's
fallback fired (a stall that holds the GIL; see ``_native``).  Elsewhere the watchdog wakes on deadlines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from collections.abc import Callable

from . import _unpatched as _os

_IN_MODIFY = 0x00000002


CLOCK_MONOTONIC = 1  # the clock of time.monotonic() on Linux
TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timer_functions() -> tuple[Callable[..., int], Callable[..., int]] | None:
    """``timerfd_create`` and ``timerfd_settime`` called *with* the GIL held (``PyDLL``): both return at
    once, and releasing the GIL around them would cost the loop thread more than the calls."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes, create.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
    settime.restype = ctypes.c_int
    return create, settime


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1  # noqa: B018 - feature detection
        libc.inotify_add_watch  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


class Waker:
    """The watchdog's sleep: a poke pipe, plus the beat timer and the in-flight file watch where available."""

    def __init__(self) -> None:
        self._read, self._write = _os.pipe()
        _os.set_blocking(self._read, False)
        _os.set_blocking(self._write, False)
        self._inotify: int | None = None
        self._timer: int | None = None
        self._settime: Callable[..., int] | None = None
        self.deadline: float | None = None  # what the timer was last armed for

    @property
    def timed(self) -> bool:
        """True if ``arm_at`` works (the beats, not deadlines, wake the watchdog)."""
        return self._timer is not None

    def start_timer(self, timeout: float = 1.0) -> str | None:
        """Create the timerfd and check that it fires; returns ``None`` if it works, else why not."""
        functions = _timer_functions()
        if functions is None:
            return "timerfd is not available on this platform"
        create, settime = functions
        fd = create(CLOCK_MONOTONIC, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            return f"timerfd_create failed: {_os.strerror(ctypes.get_errno())}"
        self._timer, self._settime = fd, settime
        if not self.arm_at(time.monotonic() + 0.001):
            self._close_timer()
            return "timerfd_settime failed"
        if not _readable([fd], timeout):
            self._close_timer()
            return "the timerfd did not fire"
        _drain(fd)
        return None

    def arm_at(self, deadline: float) -> bool:
        """Fire at ``deadline`` (``time.monotonic()`` seconds; at once if it is past).  Any thread."""
        fd, settime = self._timer, self._settime
        if fd is None or settime is None:
            return False
        deadline = max(deadline, 1e-9)  # an all-zero value would disarm the timer
        self.deadline = deadline
        spec = _Itimerspec()
        spec.it_value.tv_sec = int(deadline)
        spec.it_value.tv_nsec = min(999_999_999, int((deadline - int(deadline)) * 1e9))
        return settime(fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) == 0

    def _close_timer(self) -> None:
        fd, self._timer, self._settime = self._timer, None, None
        if fd is not None:
            try:
                _os.close(fd)
            except OSError:
                pass

    def watch_file(self, path: str, touch: Callable[[], None], timeout: float = 1.0) -> str | None:
        """Wake on writes to ``path``; returns ``None`` if that works, else why not (then only deadlines)."""
        self.unwatch()
        libc = _libc()
        if libc is None:
            return "inotify is not available on this platform"
        fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            return f"inotify_init1 failed: {_os.strerror(ctypes.get_errno())}"
        if libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
            error = _os.strerror(ctypes.get_errno())
            _os.close(fd)
            return f"inotify_add_watch failed: {error}"
        touch()  # self-test: a write must make the descriptor readable
        if not _readable([fd], timeout):
            _os.close(fd)
            return "inotify did not report a write to the in-flight file"
        _drain(fd)
        self._inotify = fd
        return None

    def unwatch(self) -> None:
        if self._inotify is not None:
            _os.close(self._inotify)
            self._inotify = None

    def poke(self) -> None:
        try:
            _os.write(self._write, b"\0")
        except (BlockingIOError, OSError):
            pass  # already poked (pipe full) or closed

    def wait(self, timeout: float) -> str:
        """``"timeout"``, ``"poke"``, ``"file"`` (faulthandler wrote) or ``"timer"`` (a beat is late)."""
        fds = [fd for fd in (self._read, self._inotify, self._timer) if fd is not None]
        readable = _readable(fds, timeout)
        if not readable:
            return "timeout"
        woke = ("poke" if self._read in readable else "file" if self._inotify in readable else "timer")
        for fd in readable:
            _drain(fd)
        return woke

    def close(self) -> None:
        self.unwatch()
        self._close_timer()
        for fd in (self._read, self._write):
            try:
                _os.close(fd)
            except OSError:
                pass


def _readable(fds: list[int], timeout: float) -> list[int]:
    """The descriptors of ``fds`` that are readable within ``timeout`` seconds.  ``poll``, not ``select``:
    a process with many sockets open gives loopwatch descriptors above ``select``'s limit of 1024."""
    poller = _os.poll()
    for fd in fds:
        poller.register(fd, _os.POLLIN)
    try:
        events = poller.poll(max(0, int(timeout * 1000 + 0.999)))  # ms, rounded up: never wake early
    except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for safety
        return []
    return [fd for fd, _ in events]


def _drain(fd: int) -> None:
    try:
        while _os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass
