"""A watchdog that needs no GIL: ``faulthandler.dump_traceback_later``'s C thread, as a fallback.

When a C call holds the GIL for a whole stall (catastrophic ``re`` backtracking, a huge
``json.dumps``) no Python thread can run, so the Python watchdog cannot take a stack.  The lag probe
therefore re-arms ``faulthandler.dump_traceback_later`` on every beat with a timeout ``FALLBACK_AFTER``
seconds past the dump threshold; if the loop misses it, faulthandler's C thread writes every thread's
stack into this "in-flight" file *while the stall is still going on*.

Only as a fallback: faulthandler walks every thread's frames without the GIL, which is safe while one
thread holds the GIL in C (nothing else runs Python) but not while other threads run Python -- it then
reads frames being pushed and can crash the process (seen: SIGSEGV in ``PyCode_Addr2Line`` from
``faulthandler_thread``, about 1 stall in 10 with busy threads).  So the Python watchdog looks first, at
the threshold; if it can run, the GIL is free, it takes the stacks itself and cancels this timer.  The
timer fires only when the watchdog could not run: when the GIL is held.  After the stall the watchdog turns that text into
a normal JSON dump; if the process dies mid-stall (a liveness probe kill), the next ``install()`` on the
same ``dump_dir`` converts the leftover file.

faulthandler has a single timer per process: only one loop owns it, and an application that uses
``dump_traceback_later`` itself should pass ``faulthandler=False``.
"""

from __future__ import annotations

import faulthandler
import os
import re
from pathlib import Path

from . import _unpatched as _os

from ._dumps import PREFIX

INFLIGHT_PREFIX = f"{PREFIX}inflight-"
FIRE_AT = 0.9  # the watchdog samples the loop thread from this share of the dump threshold on
FALLBACK_AFTER = 0.25  # seconds past the dump threshold at which faulthandler fires (see the docstring)
_HEADER = re.compile(r"^# loopwatch in-flight pid=(\d+) created=(\d+) loop_thread=(0x[0-9a-f]+|none) "
                     r"probe_interval=([0-9.]+) service=(.*)$")


def inflight_name(pid: int, created_ms: int) -> str:
    return f"{INFLIGHT_PREFIX}{pid}-{created_ms}.txt"


def parse_header(text: str) -> dict[str, object] | None:
    first = text.split("\n", 1)[0]
    match = _HEADER.match(first)
    if not match:
        return None
    thread = match.group(3)
    return {"pid": int(match.group(1)), "created_ms": int(match.group(2)),
            "loop_thread": None if thread == "none" else int(thread, 16),
            "probe_interval": float(match.group(4)), "service": match.group(5)}


class NativeWatch:
    """Owns the in-flight file and faulthandler's timer (see the module docstring)."""

    def __init__(self, directory: Path, *, pid: int, created_ms: int, service: str,
                 probe_interval: float, dump_threshold: float) -> None:
        self.path = directory / inflight_name(pid, created_ms)
        self._pid = pid
        self._created_ms = created_ms
        self._service = service
        self.probe_interval = probe_interval
        # Fire FALLBACK_AFTER seconds after the Python watchdog's look at the threshold: only a stall in
        # which the watchdog could not run (the GIL is held) leaves the timer armed that long.
        self.timeout = probe_interval + dump_threshold + FALLBACK_AFTER
        self._fd: int | None = None
        self._header_len = 0
        self.loop_thread: int | None = None

    @property
    def lag_when_fired(self) -> float:
        """How long the loop had been stalled when faulthandler wrote the stack."""
        return self.timeout - self.probe_interval

    def open(self) -> None:
        self._fd = _os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        _os.fchmod(self._fd, 0o600)
        self._write_header()

    def rewrite_header(self) -> None:
        self._write_header()

    def written_at(self) -> float | None:
        """Wall-clock time of the last write to the file (faulthandler's, or our header's)."""
        return _os.fstat(self._fd).st_mtime if self._fd is not None else None

    def _write_header(self) -> None:
        if self._fd is None:
            return
        thread = "none" if self.loop_thread is None else hex(self.loop_thread)
        header = (f"# loopwatch in-flight pid={self._pid} created={self._created_ms} loop_thread={thread} "
                  f"probe_interval={self.probe_interval} service={self._service}\n").encode()
        _os.ftruncate(self._fd, 0)
        _os.write(self._fd, header)
        self._header_len = len(header)

    def set_loop_thread(self, ident: int | None) -> None:
        if ident != self.loop_thread:
            self.loop_thread = ident
            self._write_header()

    def arm(self) -> None:
        """(Re)start faulthandler's countdown; called by the owning loop's probe on every beat."""
        if self._fd is not None:
            faulthandler.dump_traceback_later(self.timeout, repeat=False, file=self._fd, exit=False)

    @staticmethod
    def cancel() -> None:
        faulthandler.cancel_dump_traceback_later()

    def has_output(self) -> bool:
        return self._fd is not None and _os.fstat(self._fd).st_size > self._header_len

    def take(self) -> str:
        """Return what faulthandler wrote since the last call, and reset the file to its header."""
        if self._fd is None:
            return ""
        size = _os.fstat(self._fd).st_size
        if size <= self._header_len:
            return ""
        data = _os.pread(self._fd, size, 0)  # through our own fd: works even if dump_dir was removed
        self._write_header()
        return data[self._header_len:].decode("utf-8", "replace")

    def forget(self) -> None:
        """In a forked child: close this process's copy of the descriptor, nothing else -- no cancel
        (the timer was cancelled before fork; cancelling one armed across fork hangs) and no unlink
        (the file is the parent's)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                _os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        """Cancel the timer, close the file and remove it unless it holds an unread stack."""
        if self._fd is None:
            return
        self.cancel()
        keep = self.has_output()
        _os.close(self._fd)
        self._fd = None
        if not keep:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
