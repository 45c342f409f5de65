"""Stacks of stalls that hold the GIL: a kernel timer makes the loop thread write its own stack.

When a C call holds the GIL for a whole stall (catastrophic ``re`` backtracking, a huge ``json.dumps``,
a long garbage collection) no Python thread can run -- the watchdog included -- so nobody can call
``sys._current_frames()``.  The watchdog therefore keeps a POSIX timer (``timer_create`` with
``SIGEV_THREAD_ID``) armed a little after its own next look (``FALLBACK_AFTER``): when it looks, it runs,
so it re-arms the timer further; when it cannot, the kernel delivers a real-time signal *to the loop
thread*, whose handler -- ``faulthandler.register(signal, all_threads=False)``, behind a gate in C
(``_accel.stack_signal``) -- writes that thread's own Python stack into the in-flight file while the stall is
still going on, and again every ``REPEAT`` seconds while it lasts.  After the stall the watchdog turns it into a dump.

**Safe by construction**: the handler walks only the frames of the thread it interrupted, from inside
that thread, and only if that thread holds the GIL at that instant -- so no other thread can be running
Python and the frames cannot change while it reads them.  A signal that arrives when the loop thread does
not hold the GIL (a throttled container made the watchdog late, and the loop thread now waits in a call
that released it) writes nothing: the watchdog, which can run then, looks for itself.  It never depends
on the watchdog cancelling it in time.  The gate also lets it run only when the interrupted instruction is outside the
bytecode interpreter -- the thread is in a C call, made from a complete frame: faulthandler's walk crashes
if the signal lands while the thread itself pushes or pops a frame.  Without the C accelerator the fallback is off
(``loopwatch.degraded``).
(``faulthandler.dump_traceback_later``, used before, walked every thread from its own thread without the
GIL: safe only if nothing else ran Python at that moment -- a race that crashed processes -- and it started
a thread on every re-arm.)  Re-arming is one ``timer_settime`` call, in the watchdog thread.

One loop owns the fallback (the first attached; the next one when it closes): the signal's stack does
not say which thread wrote it.  Off on free-threaded builds without the GIL, and where the platform has
no ``timer_create`` with ``SIGEV_THREAD_ID`` (not Linux).  If the process dies mid-stall (a liveness probe
kill), the next ``install()`` on the same ``dump_dir`` turns the leftover file into an
``unfinished_stall`` dump.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import faulthandler
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from . import _frames
from . import _unpatched as _os
from ._component import Component, Degrade, Report
from ._iteration import _accel
from ._dumps import PREFIX

INFLIGHT_PREFIX = f"{PREFIX}inflight-"
FALLBACK_AFTER = 0.25  # seconds after the watchdog's next look: the signal fires if it could not look
REPEAT = 0.25  # seconds between the stacks written while the stall lasts
# The first signal fires FALLBACK_AFTER after the watchdog's next planned look, which is at most 0.9 of the
# threshold after the stall began: 0.25 s to 0.9 x threshold + 0.25 s into the stall.  Repeating every
# REPEAT s puts a stack between the threshold and REPEAT s after it, whatever the stall's phase.
STACK_HEADER = "Stack (most recent call first):"
_HEADER = re.compile(r"^# loopwatch in-flight pid=(\d+) created=(\d+) loop_thread=(0x[0-9a-f]+|none)"
                     r"(?: probe_interval=[0-9.]+)?(?: host=(\S*))? service=(.*)$")
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


def host_id() -> str:
    """This host (in Kubernetes, this pod) as it goes into in-flight file names: two pods that share a dump
    volume, both pid 1, never take each other's file for their own or for a dead process's."""
    return _HOST_UNSAFE.sub("_", socket.gethostname())[:64] or "unknown"
_CLOCK_MONOTONIC = 1
_TIMER_ABSTIME = 1
_SIGEV_THREAD_ID = 4


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Sigevent(ctypes.Structure):  # glibc's struct sigevent, 64 bytes; the union's _tid at offset 16
    _fields_ = [("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int), ("sigev_notify", ctypes.c_int),
                ("tid", ctypes.c_int), ("_pad", ctypes.c_int * 11)]


def _libraries() -> Iterator[str]:
    yield "libc.so.6"  # glibc >= 2.34 has the timer_* functions
    yield "librt.so.1"  # older glibc
    for short in ("c", "rt"):
        found = ctypes.util.find_library(short)
        if found:
            yield found


def _timer_api() -> tuple[object, object, object] | None:
    if not sys.platform.startswith("linux"):
        return None
    # The sonames first: ctypes.util.find_library runs `ldconfig -p` (a fork and exec in the host, ~3 ms) and
    # is asked only if neither loads (a libc with another soname).
    for name in _libraries():
        try:
            # PyDLL: the calls keep the GIL -- the self-test's signal, delivered as timer_settime returns,
            # finds the thread holding it, as a stall that holds the GIL would.
            lib = ctypes.PyDLL(name, use_errno=True)
            create, settime, delete = lib.timer_create, lib.timer_settime, lib.timer_delete
        except (OSError, AttributeError):
            continue
        create.argtypes = [ctypes.c_int, ctypes.POINTER(_Sigevent), ctypes.POINTER(ctypes.c_void_p)]
        settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
        delete.argtypes = [ctypes.c_void_p]
        return create, settime, delete
    return None


def inflight_name(pid: int, created_ms: int, host: str) -> str:
    return f"{INFLIGHT_PREFIX}{pid}-{created_ms}-{host}.txt"


def parse_header(text: str) -> dict[str, object] | None:
    match = _HEADER.match(text.split("\n", 1)[0])
    if not match:
        return None
    thread = match.group(3)
    return {"pid": int(match.group(1)), "created_ms": int(match.group(2)),
            "loop_thread": None if thread == "none" else int(thread, 16), "host": match.group(4),
            "service": match.group(5)}


def split_stacks(text: str) -> list[str]:
    """The stacks the signal wrote, oldest first (each starts with ``STACK_HEADER``)."""
    parts = text.split(STACK_HEADER)
    return [STACK_HEADER + part for part in parts[1:] if part.strip()]


def _free_signal(avoid: frozenset[int] = frozenset()) -> int | None:
    """A real-time signal nobody handles (not one servers use: gunicorn takes USR1/USR2/HUP/TTIN/TTOU), from
    SIGRTMAX-3 down; SIGRTMAX-2..SIGRTMAX are left to the dump requests (``_remote``), and ``avoid`` (an
    explicit ``dump_signal``) is skipped too."""
    rtmax = getattr(signal, "SIGRTMAX", None)
    if rtmax is None:
        return None
    for number in range(int(rtmax) - 3, int(rtmax) - 9, -1):
        if number in avoid:
            continue
        try:
            if signal.getsignal(number) == signal.SIG_DFL:
                return number
        except (OSError, ValueError):
            continue
    return None


class GilHeldStacks:
    """Owns the in-flight file, the signal handler and the owner loop's timer (see the module docstring)."""

    def __init__(self, directory: Path, *, pid: int, created_ms: int, service: str,
                 avoid: frozenset[int] = frozenset()) -> None:
        self._avoid = avoid  # signals the fallback must not take (an explicit dump_signal)
        self._host = host_id()
        self.path = directory / inflight_name(pid, created_ms, self._host)
        self._pid = pid
        self._created_ms = created_ms
        self._service = service
        self._fd: int | None = None
        self._header_len = 0
        self._api = None
        self._timer: ctypes.c_void_p | None = None
        self.signal: int | None = None
        self.loop_thread: int | None = None  # threading ident of the owner loop's thread
        self.armed_at: float | None = None  # when the timer fires first (monotonic), if armed

    def open(self) -> str | None:
        """Create the file and register the handler, and check that a signal writes a stack; returns
        ``None`` if it all works, else why not (then nothing is left registered or open)."""
        if not getattr(sys, "_is_gil_enabled", lambda: True)():
            return "this interpreter runs without the GIL: no stall can hold it"
        if _accel is None or not hasattr(_accel, "stack_signal"):
            return "the C accelerator is not built: its signal handler is what makes the fallback safe"
        api = _timer_api()
        number = _free_signal(self._avoid)
        if api is None or number is None:
            return "no POSIX timer with SIGEV_THREAD_ID or no free real-time signal on this platform"
        self._fd = _create_private(self.path)
        self._write_header()
        faulthandler.register(number, file=self._fd, all_threads=False, chain=False)
        try:
            _accel.stack_signal(number)  # the gate, in front of faulthandler's handler
        except (RuntimeError, OSError) as exc:
            faulthandler.unregister(number)
            _os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)
            return str(exc)
        self._api, self.signal = api, number
        why = self._self_test()
        if why is not None:
            self.close()
        return why

    def _self_test(self) -> str | None:
        """A timer aimed at this thread, already due: the handler runs as timer_settime returns (a C call,
        holding the GIL: the gate lets it write)."""
        why = self.watch(threading_native_id())
        if why is not None:
            return why
        self._settime(1e-9, 0.0)
        written = self.has_output()
        self._stop_timer()
        self.take()
        return None if written else "the timer's signal did not make the handler write a stack"

    def watch(self, native_id: int | None, ident: int | None = None) -> str | None:
        """Aim the timer at thread ``native_id`` (the owner loop's); ``None`` stops it."""
        self._stop_timer()
        self.loop_thread = ident
        self._write_header()
        if native_id is None or self._api is None:
            return None
        create = self._api[0]
        event = _Sigevent(sigev_signo=self.signal, sigev_notify=_SIGEV_THREAD_ID, tid=native_id)
        timer = ctypes.c_void_p()
        if create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(timer)) != 0:  # type: ignore[operator]
            return f"timer_create failed: {os.strerror(ctypes.get_errno())}"
        self._timer = timer
        return None

    @property
    def timer_value(self) -> int | None:
        """The owner loop's timer (a ``timer_t``) as an integer, for the C parking (``_accel.Park``)."""
        return None if self._timer is None else self._timer.value

    def arm(self, at: float) -> None:
        """Fire at ``at`` (``time.monotonic()`` seconds), then every ``REPEAT`` s, until re-armed."""
        if self._timer is not None:
            self._settime(at, REPEAT)
            self.armed_at = at

    def disarm(self) -> None:
        if self._timer is not None:
            self._settime(0.0, 0.0)
        self.armed_at = None

    def _settime(self, at: float, interval: float) -> None:
        spec = _Itimerspec()
        spec.it_value.tv_sec, spec.it_value.tv_nsec = int(at), int((at - int(at)) * 1e9)
        spec.it_interval.tv_sec, spec.it_interval.tv_nsec = int(interval), int((interval - int(interval)) * 1e9)
        self._api[1](self._timer, _TIMER_ABSTIME if at else 0, ctypes.byref(spec), None)  # type: ignore[index, operator]

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        self.armed_at = None
        if timer is not None and self._api is not None:
            self._api[2](timer)  # type: ignore[index, operator]

    def _write_header(self) -> None:
        if self._fd is None:
            return
        thread = "none" if self.loop_thread is None else hex(self.loop_thread)
        header = (f"# loopwatch in-flight pid={self._pid} created={self._created_ms} loop_thread={thread} "
                  f"host={self._host} service={self._service}\n").encode()
        _os.ftruncate(self._fd, 0)
        _os.write(self._fd, header)
        self._header_len = len(header)

    def has_output(self) -> bool:
        return self._fd is not None and _os.fstat(self._fd).st_size > self._header_len

    def take(self) -> list[str]:
        """The stacks written since the last call (oldest first); the file is reset to its header."""
        if self._fd is None:
            return []
        size = _os.fstat(self._fd).st_size
        if size <= self._header_len:
            return []
        data = _os.pread(self._fd, size, 0)  # through our own descriptor: works if dump_dir was removed
        self._write_header()
        return split_stacks(data[self._header_len:].decode("utf-8", "replace"))

    def unguarded(self) -> str | None:
        """Why no stack can be written now although the handler is registered, or ``None``."""
        if self.signal is None or _accel is None or _accel.stack_guard()[0]:
            return None
        return ("the GIL-held fallback's memory-fault guard was replaced by another SIGSEGV/SIGBUS handler "
                "installed after loopwatch (faulthandler.enable() after install()?): stacks are not walked "
                "without it")

    def forget(self) -> None:
        """In a forked child: the timer did not cross ``fork()``; unregister the handler (it would write to
        the parent's file) and close this process's copy of the descriptor -- the file stays the parent's."""
        self._timer = None
        self.armed_at = None
        if self.signal is not None:
            _accel.stack_signal_off()
            faulthandler.unregister(self.signal)
            self.signal = None
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                _os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        """Stop the timer, unregister the handler, close the file and remove it.  (Whatever it still holds
        was written after the watchdog's last look, by a signal that found no stall going on: the process
        is shutting down cleanly.  Only a process killed mid-stall leaves its file behind.)"""
        self._stop_timer()
        if self.signal is not None:
            _accel.stack_signal_off()
            faulthandler.unregister(self.signal)
            self.signal = None
        if self._fd is None:
            return
        _os.close(self._fd)
        self._fd = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _create_private(path: Path) -> int:
    """A new file at ``path``, mode 0600, never through a link: ``O_EXCL | O_NOFOLLOW``.  Whatever is at
    that name already (a planted link or file: the name can be guessed) is removed -- the entry, never
    what a link points to -- and the file is created anew."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = _os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)
        fd = _os.open(path, flags, 0o600)
    _os.fchmod(fd, 0o600)
    return fd


def threading_native_id() -> int:
    return _os.get_native_id()


def leftover_dumps(directory: Path, *, own: Path | None,
                   build: Callable[..., dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``unfinished_stall`` dumps from the in-flight files of processes that died mid-stall (each file
    is removed once read; ``own`` -- this process's -- is skipped, and so are other hosts' files)."""
    host = host_id()
    for path in sorted(directory.glob(f"{INFLIGHT_PREFIX}*.txt")):
        if path == own:
            continue
        try:
            text = path.read_text("utf-8", "replace")
            mtime = path.stat().st_mtime
        except OSError:
            continue
        header = parse_header(text)
        if header is None or header["host"] not in (None, host) or \
                _process_alive(int(header["pid"]), int(header["created_ms"])):  # type: ignore[call-overload]
            continue  # another host's (a pod sharing the volume: its pids are not ours to judge), or alive
        body = text.split("\n", 1)[1] if "\n" in text else ""
        blocks = split_stacks(body) or _frames.split_faulthandler(body)  # this version's, or an older one's
        if blocks:
            stacks = _frames.parse_faulthandler(blocks[-1])
            loop_thread = header["loop_thread"]
            loop_stack = next(iter(stacks.values()), []) if len(stacks) == 1 else \
                stacks.get(loop_thread, []) if isinstance(loop_thread, int) else []
            yield build(
                "unfinished_stall", loop=None, stall_seconds=None, loop_stack=loop_stack,
                threads=[_frames.thread_entry(i, s, {}) for i, s in sorted(stacks.items())],
                tasks=[], source="faulthandler", pid=header["pid"], service=header["service"],
                timestamp=mtime, hostname=header["host"], python=None, loopwatch=None,
                note="the process ended during this stall (killed, e.g. by a liveness probe, or "
                     "crashed); its loop thread wrote this stack while the stall was going on")
        path.unlink(missing_ok=True)


def _process_alive(pid: int, created_ms: int) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() * 1000 - created_ms) < 1000
    except psutil.Error:
        return False


class FaulthandlerFallback(Component):
    """The fallback as a component: one :class:`GilHeldStacks`, aimed at the loop that owns it (the first
    running one; another takes over when it stops or closes), and the conversion of the leftovers of
    processes that died mid-stall (``start()``, once dumps can be written)."""

    component = "faulthandler"

    def __init__(self, directory: Path, *, service: str, enabled: Callable[[], bool], first_look: float,
                 clock: Callable[[], float], report: Report, count: Callable[[str], None],
                 degrade: Degrade, avoid: frozenset[int] = frozenset()) -> None:
        super().__init__(report=report)
        self._avoid = avoid
        self.directory = directory
        self._service = service
        self._enabled = enabled  # the ``faulthandler`` option, and dumps can be written; else leftovers only
        self._first_look = first_look  # seconds from a loop's start to the watchdog's first look at it
        self._clock = clock
        self._count = count
        self._degrade = degrade
        self.stacks: GilHeldStacks | None = None
        self.owner: Any = None  # the LoopProbe whose thread the timer is aimed at

    @property
    def path(self) -> Path | None:
        return self.stacks.path if self.stacks is not None else None

    def convert_leftovers(self, build: Callable[..., dict[str, Any]],
                          write: Callable[[dict[str, Any]], Any]) -> None:
        """In-flight files left by processes that died mid-stall become ``unfinished_stall`` dumps."""
        for dump in leftover_dumps(self.directory, own=self.path, build=build):
            write(dump)

    def start(self) -> None:
        if self.stacks is not None or not self._enabled():
            return
        try:
            created_ms = int(psutil.Process().create_time() * 1000)
            stacks = GilHeldStacks(self.directory, pid=os.getpid(), created_ms=created_ms, service=self._service,
                                   avoid=self._avoid)
            why = stacks.open()
        except (OSError, psutil.Error, ValueError, RuntimeError) as exc:
            self._count("faulthandler")
            self._degrade("faulthandler", f"cannot set up stacks of stalls that hold the GIL: {exc}")
            return
        if why is not None:
            self._degrade("faulthandler", f"stalls that hold the GIL are counted without a stack: {why}")
            return
        self.stacks = stacks

    def up(self) -> bool | None:
        return self.stacks is not None if self._enabled() else None

    def stop(self) -> None:
        stacks, self.stacks = self.stacks, None
        self.owner = None
        if stacks is not None:
            stacks.close()

    def after_fork(self) -> None:
        """The timer and the handler did not cross ``fork()``; the file stays the parent's.  The child opens
        its own when it resumes."""
        stacks, self.stacks = self.stacks, None
        self.owner = None
        if stacks is not None:
            stacks.forget()

    # -- the owner loop ----------------------------------------------------------------------------
    def attach(self, probe: Any) -> None:
        """A loop is watched: it owns the timer if no running loop does (called under the agent's lock)."""
        stacks, owner = self.stacks, self.owner
        if stacks is None or (owner is not None and owner.running and not owner.closed):
            return
        self.owner = probe
        why = stacks.watch(probe.native_id, probe.thread_ident)
        if why is not None:
            self.owner = None
            self.report("faulthandler", RuntimeError(why))

    def arm(self, probe: Any) -> None:
        """``probe``'s loop starts running: a stall that holds the GIL before the watchdog's first look still
        gets its stack; the watchdog re-arms the timer from then on."""
        if probe is self.owner and self.stacks is not None:
            self.stacks.arm(self._clock() + self._first_look + FALLBACK_AFTER)

    def pause(self, probe: Any) -> None:
        if probe is self.owner and self.stacks is not None:
            self.stacks.disarm()

    def detach(self, probe: Any) -> None:
        if self.owner is probe:
            self.owner = None
            if self.stacks is not None:
                self.stacks.watch(None)

    def for_probe(self, probe: Any) -> GilHeldStacks | None:
        """The stacks of ``probe``'s stalls that hold the GIL, if its loop owns the timer."""
        return self.stacks if probe is self.owner else None
