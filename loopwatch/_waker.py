"""How the watchdog thread sleeps without costing a busy loop anything.

Every time a Python thread wakes up it needs the GIL; if the loop thread is busy, the two hand the GIL
back and forth on every loop iteration until the loop idles, which slows a busy loop by 10-20% for that
while (measured: a thread waking at 10 Hz costs a callback-heavy loop ~11%).  So the watchdog should not
wake while the loop is healthy.

On Linux it does not have to: faulthandler's C thread -- armed by the probe on every beat, firing
shortly before the loop's beat is a threshold late -- writes the in-flight file, and an ``inotify``
watch on that file (through ``ctypes``; feature-detected and self-tested) wakes the watchdog.  A
healthy loop then costs no watchdog wake-ups at all beyond slow housekeeping.  Elsewhere, or for loops
that do not own faulthandler's single timer, the watchdog wakes on deadlines instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import sys
from collections.abc import Callable

_IN_MODIFY = 0x00000002


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
    """``wait(timeout)`` returns ``"timeout"``, ``"poke"`` or ``"file"`` (the watched file was written)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._inotify: int | None = None

    @property
    def watching(self) -> bool:
        return self._inotify is not None

    def watch_file(self, path: str, touch: Callable[[], None], timeout: float = 1.0) -> str | None:
        """Wake on writes to ``path``; returns ``None`` if that works, else why not (then only deadlines)."""
        self.unwatch()
        libc = _libc()
        if libc is None:
            return "inotify is not available on this platform"
        fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            return f"inotify_init1 failed: {os.strerror(ctypes.get_errno())}"
        if libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
            error = os.strerror(ctypes.get_errno())
            os.close(fd)
            return f"inotify_add_watch failed: {error}"
        touch()  # self-test: a write must make the descriptor readable
        readable, _, _ = select.select([fd], [], [], timeout)
        if not readable:
            os.close(fd)
            return "inotify did not report a write to the in-flight file"
        _drain(fd)
        self._inotify = fd
        return None

    def unwatch(self) -> None:
        if self._inotify is not None:
            os.close(self._inotify)
            self._inotify = None

    def poke(self) -> None:
        try:
            os.write(self._write, b"\0")
        except (BlockingIOError, OSError):
            pass  # already poked (pipe full) or closed

    def wait(self, timeout: float) -> str:
        fds = [self._read] if self._inotify is None else [self._read, self._inotify]
        readable, _, _ = select.select(fds, [], [], max(0.0, timeout))
        if not readable:
            return "timeout"
        woke = "poke" if self._read in readable else "file"
        for fd in readable:
            _drain(fd)
        return woke

    def close(self) -> None:
        self.unwatch()
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass
