"""How the watchdog thread sleeps: until its next deadline, or until poked (a loop attached, the agent
stops).  ``poll``, not ``select``: a process with many sockets open gives loopwatch descriptors above
``select``'s limit of 1024."""

from __future__ import annotations

import os

from . import _unpatched as _os


class Waker:
    """A poke pipe, and a sleep that ends at a deadline or at a poke."""

    def __init__(self) -> None:
        self._read, self._write = _os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._poller = _os.poll()
        self._poller.register(self._read, _os.POLLIN)

    def poke(self) -> None:
        try:
            _os.write(self._write, b"\0")
        except OSError:
            pass  # already poked (pipe full) or closed

    def watch(self, fd: int) -> None:
        """Also wake when ``fd`` (the parking's timerfd) is readable."""
        self._poller.register(fd, _os.POLLIN)

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds (rounded up to the millisecond: never early); True if poked or
        woken by a watched descriptor (the caller drains that one)."""
        events = self._poller.poll(max(0, int(timeout * 1000 + 0.999)))
        if not events:
            return False
        try:
            while _os.read(self._read, 4096):
                pass
        except OSError:
            pass
        return True

    @property
    def write_fd(self) -> int:
        return self._write

    def close(self) -> None:
        for fd in (self._read, self._write):
            try:
                _os.close(fd)
            except OSError:
                pass
