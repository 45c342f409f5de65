"""Dumps on demand from outside the process: ``loopwatch dump PID``, and the agent's side of it.

**The agent's side** (:class:`DumpRequests`, a component).  At install the agent takes a signal for dump
requests -- ``dump_signal``: by default (``auto``) the first of SIGRTMAX-2, SIGRTMAX-1, SIGRTMAX that
nothing handles (real-time signals: no server uses them; gunicorn takes USR1/USR2/HUP/TTIN/TTOU/WINCH, and
the GIL-held fallback of ``_gilheld`` takes SIGRTMAX-3 or below) -- and installs a C handler for it
(``_accel.request_signal``) that chains to whatever handled it before.  The handler is async-signal-safe:
it stamps the request, writes one byte to a pipe the watchdog thread sleeps on, and forwards the signal
to the owner loop's thread (``tgkill``).  Then:

* the loop is healthy, or stalled in a call that lets the GIL go (``time.sleep``, a sync socket read, a
  lock) or in pure Python (the GIL changes hands every 5 ms): the watchdog wakes at once and writes a
  dump with ``reason: "requested"`` -- the loop thread's stack taken live, every thread, the tasks, and the
  stall going on, if any (``stall_seconds``, ``kind``);
* a C call holds the GIL for the whole stall (catastrophic ``re`` backtracking, a huge ``json.dumps``):
  no Python thread runs, the watchdog included.  The forwarded signal makes the loop thread write its own
  Python stack at once -- faulthandler's handler behind the same C gate as the GIL-held fallback (it runs
  only while that thread holds the GIL in a C call) -- into this process's *beacon* file; the watchdog
  turns it into the dump (``source: "faulthandler"``) as soon as the GIL is released.  The CLI does not
  wait for that: it reads the stack from the beacon file and says where the loop is stuck.

**The beacon** is how the CLI knows the process has loopwatch and which signal to send: a 0600 file
``loopwatch-agent-<pid>-<host>.txt`` in ``dump_dir`` (created ``O_EXCL | O_NOFOLLOW``, in a directory
``_dumps`` checked is this user's), kept open by the agent and removed at ``uninstall()``.  Its first line
is ``# loopwatch-agent {json}`` -- pid, process start time, host, service, signal, dump_dir, metrics URL,
versions -- and the rest is where the loop thread's stack goes.  A process killed without ``uninstall()``
leaves it behind: the next agent on that directory removes the beacons of dead processes of its host.

**The command** finds the beacon (an open descriptor of the process, in ``/proc/PID/fd``; else
``--dump-dir``, the process's ``LOOPWATCH_DUMP_DIR``, the per-user default), checks that it names this
very process (pid, start time, host) and that the process catches the signal (``SigCgt`` in
``/proc/PID/status``: an uncaught real-time signal would kill it), sends it, and waits for the new dump.
Without loopwatch (no beacon, or ``dump_signal=off``) it runs ``py-spy dump --pid PID`` instead, and says
so.  An application that handles the chosen signal itself still gets its handler called (chained); one
that wants the signal for itself sets ``dump_signal`` to another one, or ``off``.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import re
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from . import _frames
from . import _unpatched as _os
from ._component import Component, Degrade, Report
from ._config import signal_name
from ._cputime import ThreadClock, classify
from ._dumps import PREFIX, safe_reason
from ._gilheld import _create_private, host_id, split_stacks
from ._iteration import _accel
from ._log import emit
from ._version import __version__

if TYPE_CHECKING:  # the command's types: not imported by the agent
    import argparse

BEACON_PREFIX = f"{PREFIX}agent-"
BEACON_TAG = "# loopwatch-agent "
REASON = "requested"
LATE = 0.1  # seconds: a request answered later than this found the watchdog unable to run (the GIL held)
KIND_WINDOW = 0.02  # seconds over which a requested dump mid-stall judges the stall's kind
TOLERANCE = 0.002  # seconds: a stretch's start as read twice
_MAX_BEACON = 1 << 20  # bytes of a beacon file the command reads


def beacon_name(pid: int, host: str) -> str:
    return f"{BEACON_PREFIX}{pid}-{host}.txt"


def auto_signals() -> tuple[int, ...]:
    """The signals ``dump_signal="auto"`` tries, in order."""
    rtmax = getattr(signal, "SIGRTMAX", None)
    return () if rtmax is None else (int(rtmax) - 2, int(rtmax) - 1, int(rtmax))


def parse_beacon(text: str) -> dict[str, Any] | None:
    """The header of a beacon file, or None."""
    first = text.split("\n", 1)[0]
    if not first.startswith(BEACON_TAG):
        return None
    try:
        header = json.loads(first[len(BEACON_TAG):])
    except ValueError:
        return None
    return header if isinstance(header, dict) and isinstance(header.get("pid"), int) else None


def beacon_stacks(text: str) -> list[str]:
    """The stacks the loop thread wrote into a beacon file, oldest first."""
    body = text.split("\n", 1)[1] if "\n" in text else ""
    return split_stacks(body)


def _same_process(pid: int, created_ms: Any) -> bool:
    try:
        return isinstance(created_ms, int) and abs(psutil.Process(pid).create_time() * 1000 - created_ms) < 1000
    except psutil.Error:
        return False


class DumpRequests(Component):
    """The agent's side of ``loopwatch dump PID`` (see the module docstring).  Owns the beacon file, the
    request pipe and the signal handler; the watchdog thread sleeps on the pipe (``fileno()``) and calls
    :meth:`serve` each time it wakes."""

    component = "dump_signal"  # agent_up{part="dump_signal"}: the handler is installed (errors count as "dump")

    def __init__(self, directory: Path, *, dump_signal: int | str, walk: bool, service: str,
                 enabled: Callable[[], bool], loops: Callable[[], tuple[Any, ...]],
                 lag_of: Callable[[Any, float], float], build: Callable[..., dict[str, Any]],
                 write: Callable[[dict[str, Any]], Path], metrics_url: Callable[[], str | None],
                 clock: Callable[[], float], report: Report, degrade: Degrade,
                 context: Callable[[Any], dict[str, Any] | None] = lambda loop: None) -> None:
        super().__init__(report=report)
        self._context = context  # a loop -> the request context of the task it is running
        self.directory = directory
        self._option = dump_signal
        self._want_walk = walk  # the ``faulthandler`` option: the GIL-held path writes stacks the same way
        self._service = service
        self._enabled = enabled  # dumps can be written
        self._loops = loops
        self._lag_of = lag_of
        self._build = build
        self._write = write
        self._metrics_url = metrics_url
        self._clock = clock
        self._degrade = degrade
        self.path: Path | None = None  # the beacon
        self.signal: int | None = None
        self.walk = False
        self.note: str | None = None  # why there is no signal, if there is none
        self.replaced = False  # another handler replaced ours after install
        self.owner: Any = None  # the LoopProbe whose thread the signal is forwarded to
        self._fd: int | None = None
        self._pipe: tuple[int, int] | None = None
        self._handled = 0
        self._created_ms = 0
        self._header_len = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._fd is not None or not self._enabled():
            return  # running already (a forked child resuming has none), or no dumps to write
        try:
            self._created_ms = int(psutil.Process().create_time() * 1000)
            self._remove_stale()
            self.path = self.directory / beacon_name(os.getpid(), host_id())
            self._fd = _create_private(self.path)
        except (OSError, psutil.Error) as exc:
            self.path = None
            self._degrade("dump_signal", f"cannot create the beacon file that `loopwatch dump` looks for: {exc}")
            return
        self.note = self._take_signal()
        if self.note is not None and self._option != "off":
            self._degrade("dump_signal", self.note)
        self._write_header()

    def _take_signal(self) -> str | None:
        """Install the handler; returns why there is none, or None."""
        if self._option == "off":
            return "dump_signal is off"
        if _accel is None or not hasattr(_accel, "request_signal"):
            return ("the C accelerator is not built: `loopwatch dump` cannot ask this process for a dump "
                    "(py-spy dump still reads it from outside)")
        if isinstance(self._option, int):
            number = self._option
        else:
            number = next((n for n in auto_signals() if _accel.signal_free(n)), None)
            if number is None:
                names = ", ".join(signal_name(n) for n in auto_signals())
                return (f"no free signal for dump requests among {names} (all handled already): set dump_signal "
                        f"to another real-time signal, or off")
        read, write = _os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        try:
            _accel.request_signal(number, write)
        except (OSError, RuntimeError) as exc:
            for fd in (read, write):
                _os.close(fd)
            return f"cannot install the handler of {signal_name(number)}: {exc}"
        self._pipe = (read, write)
        self.signal = number
        self._handled = _accel.request_state()[0]
        if self._want_walk and self._fd is not None:
            self.walk = self._add_walk(number)
        return None

    def _add_walk(self, number: int) -> bool:
        """faulthandler writes the loop thread's stack into the beacon file; our handler goes back on top."""
        try:
            faulthandler.register(number, file=self._fd, all_threads=False, chain=False)
        except (OSError, RuntimeError, ValueError) as exc:
            self._degrade("dump_signal", f"requests mid-stall while a C call holds the GIL cannot be answered "
                                         f"with a stack: {exc}")
            return False
        try:
            _accel.request_walk()
        except (OSError, RuntimeError) as exc:
            faulthandler.unregister(number)  # our handler again (faulthandler's previous)
            self._degrade("dump_signal", f"requests mid-stall while a C call holds the GIL cannot be answered "
                                         f"with a stack: {exc}")
            return False
        return True

    def _release_signal(self) -> None:
        """Put the previous handler back -- only if ours is still the one installed."""
        number = self.signal
        if number is None:
            return
        on_top = bool(_accel.request_state()[3])
        if self.walk and on_top:
            faulthandler.unregister(number)  # faulthandler puts back what it replaced: ours
        _accel.request_signal_off()
        if not on_top and not self.replaced:
            emit("warning", "loopwatch.dump_signal_replaced", signal=signal_name(number),
                 note="another handler replaced loopwatch's for this signal; it was left in place")
        self.signal = None
        self.walk = False
        self.replaced = False

    def stop(self) -> None:
        try:
            self._release_signal()
        finally:
            self.owner = None
            self._close_fds()
            path, self.path = self.path, None
            if path is not None:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass

    def after_fork(self) -> None:
        """The handler and the pipe are the parent's (the handler would wake nobody in the child, and write
        to the parent's beacon): undone, and the descriptors closed -- the beacon file stays the parent's.
        The child takes its own when it resumes."""
        if self.signal is not None:
            self._release_signal()
        self.owner = None
        self.path = None
        self._close_fds()

    def _close_fds(self) -> None:
        fds = [self._fd, *(self._pipe or ())]
        self._fd, self._pipe = None, None
        for fd in fds:
            if fd is not None:
                try:
                    _os.close(fd)
                except OSError:
                    pass

    def up(self) -> bool | None:
        """``agent_up{part="dump_signal"}``: the handler answers requests (no series with ``off`` or no dumps)."""
        if self._option == "off" or self.path is None:
            return None
        return self.signal is not None and not self.replaced

    def _remove_stale(self) -> None:
        """Beacons of processes of this host that ended without ``uninstall()`` (killed)."""
        host = host_id()
        for path in self.directory.glob(f"{BEACON_PREFIX}*-{host}.txt"):
            try:
                fd = _os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                try:
                    header = parse_beacon(_os.read(fd, 4096).decode("utf-8", "replace"))
                finally:
                    _os.close(fd)
            except OSError:
                continue
            if header is not None and header.get("host") == host and header["pid"] != os.getpid() \
                    and not _same_process(header["pid"], header.get("created_ms")):
                path.unlink(missing_ok=True)

    # -- the beacon ---------------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        number = None if self.replaced else self.signal  # the signal the command may send, if any
        return {
            "pid": os.getpid(), "created_ms": self._created_ms, "host": host_id(), "service": self._service,
            "signal": number, "signal_name": signal_name(number) if number else None,
            "walk": self.walk, "note": self.note, "dump_dir": str(self.directory),
            "metrics_url": self._metrics_url(), "loopwatch": __version__, "python": sys.version.split()[0],
        }

    def _write_header(self) -> None:
        if self._fd is None:
            return
        data = (BEACON_TAG + json.dumps(self.header(), separators=(",", ":")) + "\n").encode()
        _os.ftruncate(self._fd, 0)
        _os.write(self._fd, data)
        self._header_len = len(data)

    def _take(self) -> list[str]:
        """The stacks the loop thread wrote since the last call (oldest first); the file keeps its header."""
        if self._fd is None:
            return []
        size = _os.fstat(self._fd).st_size
        if size <= self._header_len:
            return []
        data = _os.pread(self._fd, size, 0)
        self._write_header()
        return split_stacks(data[self._header_len:].decode("utf-8", "replace"))

    # -- the owner loop -------------------------------------------------------------------------------
    def attach(self, probe: Any) -> None:
        """A loop is watched: its thread gets the forwarded signal if no running loop's does."""
        owner = self.owner
        if owner is not None and owner.running and not owner.closed:
            return
        self.owner = probe
        if self.signal is not None:
            _accel.request_target(probe.native_id or 0)

    def detach(self, probe: Any) -> None:
        if self.owner is not probe:
            return
        self.owner = next((p for p in self._loops() if p is not probe and p.running), None)
        if self.signal is not None:
            _accel.request_target((self.owner.native_id or 0) if self.owner is not None else 0)

    # -- answering ----------------------------------------------------------------------------------
    def fileno(self) -> int | None:
        """The request pipe's read end (the watchdog sleeps on it), or None."""
        return self._pipe[0] if self._pipe is not None else None

    def serve(self, now: float) -> Path | None:
        """Answer a request that arrived since the last call (watchdog thread); never raises."""
        if self.signal is None:
            return None
        count, at, walked, on_top = _accel.request_state()
        if not on_top and not self.replaced:
            self._replaced_by_another()
        if count == self._handled:
            return None
        previous, self._handled = self._handled, count
        self._drain()
        try:  # the requests since the last answer get one dump; the loop thread wrote a stack for one of them?
            return self.answer(at, walked > previous, now)
        except Exception as exc:  # noqa: BLE001 - the watchdog thread must go on
            self.report("dump", exc)
            return None

    def _replaced_by_another(self) -> None:
        """Another handler took the signal after install (the application's ``signal.signal``): requests no
        longer reach loopwatch -- the beacon says so, and the command reads stacks with py-spy instead."""
        self.replaced = True
        name = signal_name(self.signal) if self.signal else "?"
        self.note = (f"another handler replaced loopwatch's for {name} after install: dump requests are off "
                     f"(set dump_signal to a signal the application leaves alone)")
        emit("warning", "loopwatch.dump_signal_replaced", signal=name, note=self.note)
        self._write_header()

    def _drain(self) -> None:
        try:
            while _os.read(self._pipe[0], 256):  # type: ignore[index]
                pass
        except OSError:
            pass

    def answer(self, at: float, walked: bool, now: float, *, via: str = "signal") -> Path:
        """Write the dump for a request made at ``at`` (monotonic); ``walked``: the loop thread wrote its own
        stack on it (it held the GIL in a C call then)."""
        stacks = self._take()
        probe = self._probe()
        fields: dict[str, Any] = {"requested_at": round(time.time() - (now - at), 6), "requested_via": via}
        if probe is not None and walked and stacks and now - at > LATE:
            return self._from_stack(probe, at, stacks[-1], fields)
        activity = probe.activity if probe is not None else None
        since = activity.busy_since(now) if activity is not None and probe.running else None
        if since is None and activity is not None:
            ended = [(s, e) for s, e in getattr(activity, "peek_finished", list)()
                     if s - TOLERANCE <= at <= e + TOLERANCE]
            if ended:
                start, end = ended[-1]
                fields["culprit"] = None
                fields["note"] = (f"the stall going on when the dump was requested ({at - start:.3f} s in; it lasted "
                                  f"{end - start:.3f} s) ended before the stack could be taken: these stacks are "
                                  f"from after it, so no culprit is named -- its own event_loop_lag dump, if any, "
                                  f"names it")
        return self.live(probe, REASON, **fields)

    def _probe(self) -> Any:
        owner = self.owner
        if owner is not None and owner.running:
            return owner
        return next((p for p in self._loops() if p.running), owner)

    def dump_now(self, via: str) -> tuple[Path, dict[str, Any]]:
        """A requested dump now, from this thread (the console's): ``(path, dump)``.  Raises
        ``RuntimeError`` if dumps are disabled, ``OSError`` if it cannot be written."""
        if not self._enabled():
            raise RuntimeError("dumps are disabled (see loopwatch.degraded, feature=dumps)")
        return self._live(self._probe(), REASON, requested_at=round(time.time(), 6), requested_via=via)

    def live(self, probe: Any, reason: str, **fields: Any) -> Path:
        """A dump of the process as it is now (any thread but the loop's): the loop thread's stack, every
        thread, the tasks; mid-stall, how long the loop has been stuck and the stall's kind.  Raises
        ``OSError`` if it cannot be written."""
        return self._live(probe, reason, **fields)[0]

    def _live(self, probe: Any, reason: str, **fields: Any) -> tuple[Path, dict[str, Any]]:
        frames = _frames.current_frames()
        loop_stack = _frames.stack_of(frames.get(probe.thread_ident)) if probe is not None else []
        threads = _frames.all_thread_stacks(frames)
        del frames
        taken = self._clock()
        loop = probe.loop if probe is not None else None
        tasks = _frames.task_stacks(loop) if loop is not None and not loop.is_closed() else []
        lag = self._lag_of(probe, taken) if probe is not None and probe.running else None
        activity = probe.activity if probe is not None else None
        since = activity.busy_since(taken) if activity is not None and probe.running else None
        kind = None
        if since is not None and lag is not None and lag >= KIND_WINDOW:
            clock = ThreadClock(probe.thread_ident, probe.native_id)
            first = clock.sample(self._clock())
            _os.sleep(KIND_WINDOW)
            last = clock.sample(self._clock())
            kind = classify(first, last, last.wall - first.wall)[0]
            if activity.busy_since(self._clock()) != since:
                fields.setdefault("note", "the stall ended while the stack was being taken")
        fields.setdefault("source", "request")
        dump = self._build(safe_reason(reason), loop=probe.label if probe is not None else None,
                           stall_seconds=lag, loop_stack=loop_stack, threads=threads, tasks=tasks, kind=kind,
                           context=self._context(loop) if since is not None else None, **fields)
        return self._write(dump), dump

    def _from_stack(self, probe: Any, at: float, text: str, fields: dict[str, Any]) -> Path:
        """The dump of a request that found the loop thread holding the GIL: the stack it wrote itself."""
        loop_stack = next(iter(_frames.parse_faulthandler(text).values()), [])
        activity = probe.activity
        start = None
        if activity is not None:
            since = activity.busy_since(self._clock()) if probe.running else None
            ended = [s for s, e in getattr(activity, "peek_finished", list)() if s - TOLERANCE <= at <= e + TOLERANCE]
            start = ended[-1] if ended else since if since is not None and since <= at else None
        known = _frames.threads_info()
        dump = self._build(
            REASON, loop=probe.label, stall_seconds=None if start is None else max(0.0, at - start),
            loop_stack=loop_stack, threads=[_frames.thread_entry(probe.thread_ident, loop_stack, known)], tasks=[],
            source="faulthandler",
            note=(f"the loop thread held the GIL in a C call when the dump was requested: it wrote its own stack "
                  f"then (a signal); this dump was written {self._clock() - at:.3f} s later, when the GIL was "
                  f"released.  Other threads' and tasks' stacks cannot be read without the GIL"), **fields)
        return self._write(dump)


# ---------------------------------------------------------------------------------------------------------
# The command: loopwatch dump PID
# ---------------------------------------------------------------------------------------------------------

DEFAULT_TIMEOUT = 30.0
INTERIM_AFTER = 1.0  # seconds without a dump before the command reads the stack from the beacon file
_DUMP_NAME = re.compile(r"^loopwatch-\d{8}T\d{6}\.\d+Z-(\d+)-requested(?:-\d+)?\.json$")


@dataclasses.dataclass
class Beacon:
    path: Path
    header: dict[str, Any]

    @property
    def signal(self) -> int | None:
        value = self.header.get("signal")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def dump_dir(self) -> Path:
        return Path(str(self.header.get("dump_dir") or self.path.parent))


class CommandError(Exception):
    """A failure the command reports in one line (exit status 1)."""


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser(
        "dump", help="make a running process write a stack dump now (mid-stall too); py-spy dump without loopwatch",
        description="Ask a running process that has loopwatch for a stack dump now -- while its loop is stalled "
                    "too, and while a C call holds the GIL (its loop thread then writes its own stack at once; the "
                    "dump file follows when the GIL is released) -- and print the dump's path and culprit.  A "
                    "process without loopwatch gets `py-spy dump --pid PID` instead, when py-spy is installed and "
                    "allowed to read it.")
    parser.add_argument("pid", type=_pid, metavar="PID", help="the process id")
    parser.add_argument("--dump-dir", metavar="DIR",
                        help="where the process's loopwatch writes dumps, if it cannot be found from /proc/PID "
                             "(default: the agent's open beacon file, else LOOPWATCH_DUMP_DIR in the process's "
                             "environment, else the per-user default)")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for the dump (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--no-py-spy", dest="pyspy_fallback", action="store_false",
                        help="without loopwatch in PID, fail instead of running py-spy dump")
    parser.add_argument("--py-spy", dest="pyspy", metavar="PATH",
                        help="the py-spy program (default: next to this Python, else on PATH)")
    parser.set_defaults(handler=_command, dump_parser=parser)


def _pid(text: str) -> int:
    import argparse

    try:
        pid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a process id (a positive integer), got {text!r}") from None
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"must be a process id (a positive integer), got {text!r}")
    return pid


def _seconds(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be seconds between 0.1 and 3600, got {text!r}")
    return value


def _command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    parser = getattr(args, "dump_parser", parser)  # errors show `loopwatch dump`'s usage
    pid = args.pid
    try:
        process = psutil.Process(pid)
        process.create_time()
    except psutil.NoSuchProcess:
        parser.error(f"argument PID: no process with pid {pid}")
    except psutil.AccessDenied as exc:
        parser.error(f"argument PID: cannot read process {pid}: {exc}")
    out = _Output(args.json)
    try:
        beacon, looked = find_beacon(process, args.dump_dir)
        why = None
        if beacon is None:
            why = f"no loopwatch beacon for pid {pid} (looked in {', '.join(looked) or 'nothing readable'})"
        elif beacon.signal is None:
            why = (f"loopwatch is installed in pid {pid} (dumps in {beacon.dump_dir}) but takes no dump requests: "
                   f"{beacon.header.get('note') or 'dump_signal is off'}")
        elif not _catches(pid, beacon.signal):
            why = (f"loopwatch's beacon names {signal_name(beacon.signal)} but pid {pid} does not catch it "
                   f"(replaced by another handler?): not sent, it could kill the process")
        if why is None:
            return _request(process, beacon, args.timeout, out)  # type: ignore[arg-type]
        if not args.pyspy_fallback:
            raise CommandError(f"{why}; --no-py-spy: nothing done")
        headline = f"no loopwatch in pid {pid}: py-spy dump" if beacon is None else \
            f"loopwatch in pid {pid} takes no dump requests: py-spy dump"
        return _pyspy(pid, args.pyspy, why, headline, out)
    except CommandError as exc:
        out.fail(str(exc))
        return 1


class _Output:
    """What the command prints: lines on stdout (progress on stderr), or one JSON object."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.result: dict[str, Any] = {}

    def say(self, line: str) -> None:
        if not self.as_json:
            print(line, flush=True)

    def progress(self, line: str) -> None:
        if not self.as_json:
            print(line, file=sys.stderr, flush=True)

    def done(self, **result: Any) -> None:
        self.result.update(result)
        if self.as_json:
            print(json.dumps(self.result, indent=2, default=str), flush=True)

    def fail(self, message: str) -> None:
        self.result.update(ok=False, error=message)
        if self.as_json:
            print(json.dumps(self.result, indent=2, default=str), flush=True)
        print(f"loopwatch dump: error: {message}", file=sys.stderr, flush=True)


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return out


def find_beacon(process: psutil.Process, dump_dir: str | None) -> tuple[Beacon | None, list[str]]:
    """The beacon of ``process``'s agent, and where it was looked for."""
    pid, host = process.pid, host_id()
    name = beacon_name(pid, host)
    looked: list[str] = []
    candidates: list[Path] = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if os.path.basename(target) == name:
                candidates.append(Path(target))
        looked.append(f"/proc/{pid}/fd")
    except OSError:
        pass
    env = _environ(pid)
    try:
        uid = process.uids().real
    except psutil.Error:
        uid = os.getuid()
    dirs = [Path(dump_dir).expanduser()] if dump_dir else []
    if env.get("LOOPWATCH_DUMP_DIR"):
        dirs.append(Path(env["LOOPWATCH_DUMP_DIR"]).expanduser())
    dirs.append(Path(env.get("TMPDIR") or "/tmp") / f"loopwatch-{uid}")
    for directory in dirs:
        candidates.append(directory / name)
        looked.append(str(directory))
    for path in candidates:
        beacon = _read_beacon(path, process)
        if beacon is not None:
            return beacon, looked
    return None, looked


def _read_beacon(path: Path, process: psutil.Process) -> Beacon | None:
    """The beacon at ``path`` if it is a regular file (not a link) of the process's user or root, naming
    this very process (pid, start time, host)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        uids = set(process.uids()) | {0}
        if not stat.S_ISREG(info.st_mode) or info.st_uid not in uids:
            return None
        text = os.read(fd, 65536).decode("utf-8", "replace")
    except (OSError, psutil.Error):
        return None
    finally:
        os.close(fd)
    header = parse_beacon(text)
    if header is None or header.get("pid") != process.pid or header.get("host") != host_id() \
            or not _same_process(process.pid, header.get("created_ms")):
        return None
    return Beacon(path, header)


def _catches(pid: int, number: int) -> bool:
    """Whether ``pid`` has a handler for signal ``number`` (``SigCgt`` in /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (number - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _request(process: psutil.Process, beacon: Beacon, timeout: float, out: _Output) -> int:
    pid, number = process.pid, beacon.signal
    assert number is not None
    name = signal_name(number)
    directory = beacon.dump_dir
    before = {p.name for p in _requested_dumps(directory, pid)}
    sent = time.time()
    try:
        os.kill(pid, number)
    except PermissionError:
        raise CommandError(f"not permitted to send {name} to pid {pid}: run as its user or as root") from None
    except ProcessLookupError:
        raise CommandError(f"pid {pid} ended before it could be asked") from None
    out.result.update(pid=pid, via="loopwatch", signal=name, dump_dir=str(directory),
                      service=beacon.header.get("service"))
    out.progress(f"pid {pid} has loopwatch {beacon.header.get('loopwatch')} (service "
                 f"{beacon.header.get('service')!r}): sent {name}; waiting up to {timeout:g} s for its dump")
    deadline = time.monotonic() + timeout
    interim: dict[str, Any] | None = None
    started = time.monotonic()
    while True:
        dump, path = _new_dump(directory, pid, before, sent)
        if dump is not None and path is not None:
            _report_dump(pid, name, path, dump, out)
            return 0
        if not process.is_running():
            raise CommandError(f"pid {pid} ended before it wrote the dump")
        if interim is None and time.monotonic() - started >= INTERIM_AFTER:
            interim = _interim(beacon, pid, timeout, out)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if interim:
        out.done(ok=False, dump=None, waiting=True, **interim)
        out.progress(f"no dump file from pid {pid} after {timeout:g} s: its loop thread still holds the GIL; the "
                     f"dump will be written to {directory} when it is released (run `loopwatch dumps "
                     f"{directory}` then)")
        return 1
    raise CommandError(f"no dump from pid {pid} after {timeout:g} s (is the process stopped, or did another "
                       f"handler replace loopwatch's {name}?); dumps go to {directory}")


def _interim(beacon: Beacon, pid: int, timeout: float, out: _Output) -> dict[str, Any]:
    """The stack the loop thread wrote into the beacon file, if it did (it holds the GIL: no dump yet)."""
    try:
        fd = os.open(beacon.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            text = os.read(fd, _MAX_BEACON).decode("utf-8", "replace")
        finally:
            os.close(fd)
    except OSError:
        return {}
    stacks = beacon_stacks(text)
    if not stacks:
        return {}
    loop_stack = next(iter(_frames.parse_faulthandler(stacks[-1]).values()), [])
    culprit = _frames.culprit_of(loop_stack)
    out.say(f"pid {pid}: its loop thread holds the GIL in a C call (no Python thread can run); the stack it wrote "
            f"itself on the signal:")
    out.say(f"  culprit: {_where(culprit)}")
    if culprit and culprit.get("line"):
        out.say(f"      {culprit['line']}")
    out.say(f"  (the dump file is written when the GIL is released; waiting up to {timeout:g} s)")
    return {"gil_held": True, "culprit": culprit, "loop_stack": loop_stack}


def _requested_dumps(directory: Path, pid: int) -> list[Path]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out = []
    for name in names:
        match = _DUMP_NAME.match(name)
        if match and int(match.group(1)) == pid:
            out.append(directory / name)
    return out


def _new_dump(directory: Path, pid: int, before: set[str], sent: float) -> tuple[dict[str, Any] | None, Path | None]:
    for path in sorted(_requested_dumps(directory, pid), reverse=True):
        if path.name in before:
            continue
        try:
            dump = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # pruned meanwhile, or not ours to read
        if dump.get("pid") == pid and float(dump.get("timestamp") or 0) >= sent - 0.05:
            return dump, path
    return None, None


def _where(culprit: dict[str, Any] | None) -> str:
    if not culprit:
        return "none found in application code"
    return f"{culprit['filename']}:{culprit['lineno']} in {culprit['function']}"


def _report_dump(pid: int, name: str, path: Path, dump: dict[str, Any], out: _Output) -> None:
    culprit = dump.get("culprit")
    out.say(f"pid {pid}: dump written by loopwatch (asked with {name})")
    out.say(f"  {path}")
    text = path.with_suffix(".txt")
    if text.exists():
        out.say(f"  {text}")
    out.say(f"  culprit: {_where(culprit)}")
    if culprit and culprit.get("line"):
        out.say(f"      {culprit['line']}")
    stall = dump.get("stall_seconds")
    if isinstance(stall, (int, float)) and stall > 0.01:
        out.say(f"  loop {dump.get('loop')!r} stalled for {stall:.3f} s when the stack was taken (kind: "
                f"{dump.get('kind') or 'unknown'}; stack from: {dump.get('source')})")
    else:
        out.say(f"  loop {dump.get('loop')!r} was not stalled (stack from: {dump.get('source')})")
    if dump.get("note"):
        out.say(f"  note: {dump['note']}")
    out.done(ok=True, dump=str(path), text=str(text) if text.exists() else None, culprit=culprit,
             stall_seconds=stall, kind=dump.get("kind"), source=dump.get("source"), note=dump.get("note"))


def _pyspy_reason(message: str) -> str:
    """py-spy's error in one line: its ``Error:`` line and the first cause, not its backtrace."""
    lines = [line.strip() for line in message.split("Stack backtrace:")[0].splitlines() if line.strip()]
    error = next((line for line in lines if line.startswith("Error")), lines[0] if lines else "")
    cause = next((line.split(":", 1)[1].strip() for line in lines if re.match(r"^\d+: ", line)), "")
    return f"{error} ({cause})" if cause and cause not in error else error


def _pyspy(pid: int, binary: str | None, why: str, headline: str, out: _Output) -> int:
    import subprocess

    from ._pyspy import find_pyspy

    out.result.update(pid=pid, via="py-spy", why=why)
    if binary is not None:
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise CommandError(f"{why}; and py-spy is not at {binary}")
    else:
        binary = find_pyspy()
        if binary is None:
            raise CommandError(f"{why}; and py-spy is not installed (pip install 'loopwatch[pyspy]', or "
                               f"pass --py-spy PATH): no stack can be read from outside")
    out.say(headline)
    out.progress(f"({why})")
    try:
        proc = subprocess.run([binary, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise CommandError(f"py-spy dump --pid {pid} took more than 60 s") from None
    except OSError as exc:
        raise CommandError(f"cannot run py-spy ({binary}): {exc}") from None
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        last = _pyspy_reason(message) or f"exit status {proc.returncode}"
        if any(word in message for word in ("ermission", "not permitted", "EPERM", "ptrace")):
            raise CommandError(f"py-spy is not permitted to read pid {pid} ({last}): run as root, or as its user "
                               f"with CAP_SYS_PTRACE or kernel.yama.ptrace_scope=0")
        raise CommandError(f"py-spy dump --pid {pid} failed: {last}")
    if out.as_json:
        out.done(ok=True, output=proc.stdout)
    else:
        sys.stdout.write(proc.stdout)
        sys.stdout.flush()
    return 0


