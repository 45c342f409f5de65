"""``loopwatch dumps`` and ``loopwatch report``: the stalls in dump directories, grouped by culprit.

    loopwatch dumps DIR [DIR...] [--since WHEN] [--json]
    loopwatch report DIR [DIR...] -o FILE.html [--since WHEN]

Both read every dump in the directories (not their subdirectories), group the **stalls** by **culprit**
(the dump's ``culprit``: ``file:line in function``, the innermost application frame of the loop thread)
and rank the culprits by total stalled seconds (then by number of stalls).  ``dumps`` prints one block
per culprit (``--json``: the same as one JSON document); ``report`` writes one self-contained HTML page
(inline CSS and SVG drawn here, no script, no external reference; a Content-Security-Policy forbids
any load) with a timeline, the ranking and, for each culprit, the stack, task and threads of its worst dump.

What counts
    * ``reason: event_loop_lag`` -- one stall (loopwatch writes at most one dump per stall);
    * ``reason: unfinished_stall`` -- one stall the process did not survive (killed mid-stall, e.g. by a
      liveness probe): counted, its length unknown (no seconds; drawn at the top of the timeline);
    * any other reason (``manual``: ``loopwatch.dump()``, ``loopwatch dump PID``) -- not a stall: listed
      apart ("other dumps"), never counted in a group, even when taken during one (the watchdog's own
      dump of that stall already counts it).

Stalled seconds
    A dump is written *while* the stall goes on: its ``stall_seconds`` is the stall's age when the stack
    was taken (about the first lag threshold), a lower bound of its length.  Where a dump carries the
    stall's full length (``duration``, seconds, added once the stall ended), that is used instead.
    Totals and worsts that include lower bounds are marked ``>=`` (text) / ``"lower_bound": true`` (JSON).

``--since``
    An ISO 8601 time (``2026-12-03T21:00``, ``2026-12-03 21:00:00+01:00``, ``2026-12-03``; no zone
    means UTC) or a duration back from now: a number and a unit ``s``, ``m``, ``h``, ``d`` or ``w``
    (``90s``, ``30m``, ``1.5h``, ``2d``).  Only dumps whose ``timestamp`` is at or after it are read.

Robustness and safety
    Files are opened without following links (``O_NOFOLLOW``) and only if regular: a **symbolic link
    inside a dump directory is never followed**, wherever it points (loopwatch writes no links; one
    there was planted or copied) -- it is skipped with a note.  The directories named on the command
    line may themselves be links.  Hidden files (loopwatch's temporary files), ``.txt`` twins and the
    in-flight files of running processes (``loopwatch-inflight-*.txt``) are not dumps; anything else
    that is not a loopwatch dump (not JSON, no ``reason``/``timestamp``, unreadable, over
    ``MAX_DUMP_BYTES``) is skipped with a note on stderr, never a crash.  The same file reached twice
    (a directory named twice) counts once.  Everything from a dump is escaped in the page and control
    characters are made visible in the terminal.  The page is written like a dump: atomically, mode 0600
    (it holds code locations of the service).

Exit status: 0 (also when nothing was found: a message says so), 2 for bad arguments (a missing
directory, a bad ``--since``) with argparse's message naming the option or directory, 1 if the page
cannot be written.

``--json`` schema (``"schema": 1``)::

    {"schema": 1, "generated_at": ISO, "directories": [str], "since": ISO | null,
     "dumps_read": int, "stalls": int, "stalled_seconds": float, "lower_bound": bool,
     "culprits": [                                 # ranked: total stalled seconds, then stalls
       {"rank": int, "location": "file:line in function" | null,   # null: no application frame
        "culprit": {"filename", "lineno", "function", "line"} | null,
        "stalls": int, "unfinished": int, "total_seconds": float, "worst_seconds": float | null,
        "lower_bound": bool, "kinds": {kind: stalls},
        "first_seen": ISO, "last_seen": ISO, "first_seen_ts": float, "last_seen_ts": float,
        "services": [str], "pids": [int], "hosts": [str],
        "worst_dump": path, "dumps": [path, ...]}],   # dumps oldest first
     "other_dumps": [{"path", "reason", "time", "timestamp", "service", "pid", "host"}],
     "skipped": [{"path", "why"}]}

ISO times are UTC (``2026-12-04T16:37:47.123Z``); ``*_ts`` are Unix seconds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import math
import os
import re
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ._dumps import PREFIX, write_private
from ._frames import is_app_file

INFLIGHT_PREFIX = f"{PREFIX}inflight-"
STALL_REASONS = ("event_loop_lag", "unfinished_stall")
UNFINISHED = "unfinished_stall"
DURATION_FIELD = "duration"  # the stall's full length, when a dump carries it (see the module docstring)
MAX_DUMP_BYTES = 64 * 1024 * 1024  # a dump holds at most 128 frames x (threads + 200 tasks): far less
MAX_TEXT = 300  # characters of any one string from a dump that are shown
MAX_NOTES = 20  # notes printed one by one; the rest are counted
MAX_SECTIONS = 25  # culprits detailed in the page (stack, task, threads); all are ranked
MAX_RANKED = 100  # culprits drawn in the page's ranking
MAX_THREADS = 64  # threads listed per culprit section
MAX_TASKS = 50  # other tasks listed per culprit section
MAX_PATHS = 20  # dump paths listed per culprit section

KIND_COLOURS = {"blocked": "#1f77b4", "cpu": "#d62728", "gc": "#2ca02c", "unknown": "#7f7f7f"}
EXTRA_COLOURS = ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
KIND_MEANINGS = {
    "blocked": "the loop thread waited: a syscall or a lock (sync DB/HTTP, time.sleep, file I/O)",
    "cpu": "the loop thread computed: CPU-bound work (parsing, json.dumps, regexes, scoring)",
    "gc": "garbage collection took at least half the stall",
    "unknown": "no per-thread CPU clock, or not recorded",
}
# Library frames of a dump written on another machine (``is_app_file`` knows this machine's paths only).
_LIBRARY = re.compile(r"[/\\](site-packages|dist-packages|lib[/\\]python3\.\d+|loopwatch)[/\\]")
PLOT_BACKGROUND = "#f3f5fa"  # the timeline's plotting area (the browser test finds it by this colour)


class Usage(Exception):
    """A bad command line argument: argparse's error (exit status 2) with this message."""


# -- reading ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Dump:
    """What the commands need of one dump; stacks are read again only for the page's sections."""

    path: str
    reason: str
    timestamp: float
    seconds: float | None  # the stall's full length if recorded, else its age when the stack was taken
    final: bool  # ``seconds`` is the stall's full length
    kind: str
    source: str | None
    service: str | None
    pid: int | None
    host: str | None
    culprit: tuple[str, int | None, str] | None
    line: str | None  # the culprit's source text
    route: str | None = None  # the request the blocked task served (the dump's ``context``): its route
    trace_id: str | None = None  # ... and its trace

    @property
    def is_stall(self) -> bool:
        return self.reason in STALL_REASONS

    @property
    def unfinished(self) -> bool:
        return self.reason == UNFINISHED


@dataclass
class Scan:
    """The result of reading directories: the dumps, and what was skipped and why."""

    directories: list[str]
    dumps: list[Dump] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why), noted on stderr
    inflight: int = 0  # loopwatch-inflight-*.txt files (stacks being written by running processes)
    subdirectories: int = 0  # not searched
    older: int = 0  # dumps before --since


class Skip(Exception):
    """This file is not a dump that can be read (the message says why)."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _text(value: Any, limit: int = MAX_TEXT) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _culprit_key(value: Any) -> tuple[str, int | None, str] | None:
    if not isinstance(value, dict) or not isinstance(value.get("filename"), str):
        return None
    lineno = value.get("lineno")
    lineno = lineno if isinstance(lineno, int) and not isinstance(lineno, bool) else None
    return (value["filename"], lineno, str(value.get("function") or "?"))


def location(key: tuple[str, int | None, str] | None) -> str | None:
    """``file:line in function``, as loopwatch's events write it."""
    if key is None:
        return None
    filename, lineno, function = key
    return f"{filename}:{lineno if lineno is not None else '?'} in {function}"


def summarize(data: Any, path: str) -> Dump:
    """The fields of a parsed dump the commands use; :class:`Skip` if it is not a loopwatch dump."""
    if not isinstance(data, dict):
        raise Skip("not a loopwatch dump (not a JSON object)")
    reason, timestamp = data.get("reason"), _number(data.get("timestamp"))
    if not isinstance(reason, str) or not reason or timestamp is None:
        raise Skip("not a loopwatch dump (no reason or timestamp)")
    try:
        _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise Skip(f"not a loopwatch dump (timestamp {timestamp!r} out of range)") from None
    duration, age = _number(data.get(DURATION_FIELD)), _number(data.get("stall_seconds"))
    if duration is not None and duration < 0:
        duration = None
    if age is not None and age < 0:
        age = None
    seconds = duration if duration is not None else age
    kind = data.get("kind")
    kind = _text(kind, 40) if isinstance(kind, str) and kind else "unknown"
    pid = data.get("pid")
    culprit = data.get("culprit")
    line = culprit.get("line") if isinstance(culprit, dict) else None
    context = data.get("context") if isinstance(data.get("context"), dict) else {}
    route = context.get("route") or context.get("span_name")
    trace_id = context.get("trace_id")
    return Dump(path=path, reason=_text(reason, 60) or "", timestamp=timestamp, seconds=seconds,
                final=duration is not None, kind=kind or "unknown",
                source=_text(data.get("source"), 40) if isinstance(data.get("source"), str) else None,
                service=_text(data.get("service")) if isinstance(data.get("service"), str) else None,
                pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                host=_text(data.get("hostname")) if isinstance(data.get("hostname"), str) else None,
                culprit=_culprit_key(culprit), line=_text(line) if isinstance(line, str) and line else None,
                route=_text(route, 200) if isinstance(route, str) and route else None,
                trace_id=_text(trace_id, 64) if isinstance(trace_id, str) and trace_id else None)


def read_private(path: str, limit: int | None = None) -> bytes:
    """The bytes of a regular file, never through a symbolic link (``O_NOFOLLOW``), never a FIFO or a
    device (``O_NONBLOCK``, then checked), at most ``limit`` bytes; :class:`Skip` says why not."""
    limit = MAX_DUMP_BYTES if limit is None else limit
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if os.path.islink(path):
            raise Skip("a symbolic link: not followed") from None
        raise Skip(f"unreadable: {exc.strerror or exc}" + (
            " (dumps are mode 0600: run as the service's user, or root)"
            if isinstance(exc, PermissionError) else "")) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Skip("not a regular file")
        if info.st_size > limit:
            raise Skip(f"too large for a dump ({info.st_size} bytes; at most {limit})")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise Skip(f"too large for a dump (over {limit} bytes)")
        return b"".join(chunks)
    except OSError as exc:
        raise Skip(f"unreadable: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def load(path: str) -> dict[str, Any]:
    """One dump file, parsed (:class:`Skip` if it cannot be read or is not JSON)."""
    raw = read_private(path)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Skip(f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(data, dict):
        raise Skip("not a loopwatch dump (not a JSON object)")
    return data


def check_directories(directories: Sequence[str]) -> None:
    """:class:`Usage` naming the first argument that is not a readable directory."""
    for name in directories:
        path = Path(name)
        if not path.exists():
            raise Usage(f"no such directory: {name}")
        if not path.is_dir():
            raise Usage(f"not a directory: {name}")
        if not os.access(path, os.R_OK | os.X_OK):
            raise Usage(f"cannot read directory {name}: permission denied "
                        f"(dump directories are mode 0700: run as the service's user, or root)")


def scan(directories: Sequence[str], *, since: float | None = None) -> Scan:
    """Read every dump in ``directories`` (not recursively); see the module docstring for what is skipped."""
    result = Scan(list(directories))
    seen: set[tuple[int, int]] = set()
    for directory in directories:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise Usage(f"cannot read directory {directory}: {exc.strerror or exc}") from None
        for entry in entries:
            name, path = entry.name, os.path.abspath(os.path.join(directory, entry.name))
            try:
                if name.startswith("."):
                    continue  # loopwatch's temporary and write-test files; nobody's dumps
                if entry.is_symlink():
                    result.skipped.append((path, "a symbolic link: not followed (loopwatch writes none; "
                                                 "name the target's directory to read it)"))
                    continue
                if entry.is_dir(follow_symlinks=False):
                    result.subdirectories += 1
                    continue
                if name.startswith(INFLIGHT_PREFIX) and name.endswith(".txt"):
                    result.inflight += 1
                    continue
                if name.startswith(PREFIX) and name.endswith(".txt"):
                    continue  # a dump's human-readable twin
                if not name.endswith(".json"):
                    result.skipped.append((path, "not a loopwatch dump (not a .json file)"))
                    continue
                info = entry.stat(follow_symlinks=False)
                if (info.st_dev, info.st_ino) in seen:
                    continue
                seen.add((info.st_dev, info.st_ino))
                dump = summarize(load(path), path)
            except Skip as why:
                result.skipped.append((path, str(why)))
                continue
            except OSError as exc:  # vanished (pruned by the agent meanwhile) or unreadable entry
                result.skipped.append((path, f"unreadable: {exc.strerror or exc}"))
                continue
            if since is not None and dump.timestamp < since:
                result.older += 1
                continue
            result.dumps.append(dump)
    result.dumps.sort(key=lambda d: (d.timestamp, d.path))
    return result


# -- --since --------------------------------------------------------------------------------------------
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SINCE_ACCEPTED = ("an ISO time (2026-12-03T21:00:00Z, 2026-12-03 21:00+01:00, 2026-12-03; no zone = UTC) "
                  "or a duration back from now (90s, 30m, 1.5h, 2d, 1w)")


@dataclass(frozen=True)
class Since:
    """``--since``: an absolute Unix time, or seconds back from the moment the command runs."""

    text: str
    at: float | None = None
    back: float | None = None

    def cutoff(self, now: float) -> float:
        return self.at if self.at is not None else now - (self.back or 0.0)


def parse_since(text: str) -> Since:
    """``--since``'s value; ``argparse.ArgumentTypeError`` naming the value and what is accepted."""
    value = text.strip()
    match = _DURATION.match(value.lower())
    if match:
        back = float(match.group(1)) * _UNIT[match.group(2)]
        if back <= 0:
            raise argparse.ArgumentTypeError(f"must be a duration greater than 0, got {text!r}")
        return Since(text, back=back)
    try:
        when = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {SINCE_ACCEPTED}, got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return Since(text, at=when.timestamp())


# -- grouping -------------------------------------------------------------------------------------------
@dataclass
class Group:
    """The stalls of one culprit."""

    key: tuple[str, int | None, str] | None
    stalls: list[Dump] = field(default_factory=list)  # oldest first

    @property
    def location(self) -> str | None:
        return location(self.key)

    @property
    def line(self) -> str | None:
        return next((d.line for d in reversed(self.stalls) if d.line), None)

    @property
    def count(self) -> int:
        return len(self.stalls)

    @property
    def unfinished(self) -> int:
        return sum(1 for d in self.stalls if d.unfinished)

    @property
    def total_seconds(self) -> float:
        return sum(d.seconds for d in self.stalls if d.seconds is not None)

    @property
    def worst(self) -> Dump:
        """The longest stall (the latest of equals); the latest if none has a length."""
        timed = [d for d in self.stalls if d.seconds is not None]
        if not timed:
            return self.stalls[-1]
        return max(timed, key=lambda d: (d.seconds, d.timestamp))

    @property
    def lower_bound(self) -> bool:
        return any(not d.final for d in self.stalls if d.seconds is not None)

    @property
    def kinds(self) -> Counter[str]:
        return Counter(d.kind for d in self.stalls)

    def seconds_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for d in self.stalls:
            if d.seconds is not None:
                out[d.kind] = out.get(d.kind, 0.0) + d.seconds
        return out

    @property
    def first(self) -> float:
        return self.stalls[0].timestamp

    @property
    def last(self) -> float:
        return self.stalls[-1].timestamp

    def services(self) -> list[str]:
        return sorted({d.service for d in self.stalls if d.service})

    def pids(self) -> list[int]:
        return sorted({d.pid for d in self.stalls if d.pid is not None})

    def hosts(self) -> list[str]:
        return sorted({d.host for d in self.stalls if d.host})

    def routes(self) -> list[tuple[str, int]]:
        """The routes (or span names) of the requests these stalls blocked, most frequent first."""
        return sorted(Counter(d.route for d in self.stalls if d.route).items(), key=lambda kv: (-kv[1], kv[0]))


def group(dumps: Iterable[Dump]) -> list[Group]:
    """The stalls among ``dumps`` by culprit, ranked: total stalled seconds, stalls, latest, location."""
    groups: dict[Any, Group] = {}
    for dump in dumps:
        if dump.is_stall:
            groups.setdefault(dump.culprit, Group(dump.culprit)).stalls.append(dump)
    for g in groups.values():
        g.stalls.sort(key=lambda d: (d.timestamp, d.path))
    return sorted(groups.values(), key=lambda g: (-g.total_seconds, -g.count, -g.last, g.location or "\uffff"))


# -- time and text helpers ------------------------------------------------------------------------------
def iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def human(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """``text`` with control characters (a terminal's escape sequences) shown as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def seconds_text(value: float | None, lower_bound: bool) -> str:
    if value is None:
        return "unknown"
    return f"{'>=' if lower_bound else ''}{value:.2f} s"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _list(values: Sequence[object], limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" (+{len(values) - limit} more)" if len(values) > limit else "")


def notes(result: Scan, command: str) -> list[str]:
    """What was skipped, for stderr (the first ``MAX_NOTES`` one by one)."""
    out = [f"loopwatch {command}: skipped {printable(path)}: {why}" for path, why in result.skipped[:MAX_NOTES]]
    if len(result.skipped) > MAX_NOTES:
        out.append(f"loopwatch {command}: ... and {len(result.skipped) - MAX_NOTES} more files skipped")
    if result.inflight:
        out.append(f"loopwatch {command}: {_plural(result.inflight, 'in-flight file')} "
                   f"({INFLIGHT_PREFIX}*.txt) not read: stacks being written by a running process; a process "
                   f"that died mid-stall leaves one that the next install() on the directory makes an "
                   f"unfinished_stall dump")
    if result.subdirectories:
        out.append(f"loopwatch {command}: {_plural(result.subdirectories, 'subdirectory', 'subdirectories')} "
                   f"not searched (name each directory to read it)")
    return out


def where(result: Scan) -> str:
    return ", ".join(result.directories)


# -- loopwatch dumps ------------------------------------------------------------------------------------
def to_json(result: Scan, groups: list[Group], since: float | None, now: float) -> dict[str, Any]:
    stalls = [d for d in result.dumps if d.is_stall]
    return {
        "schema": 1,
        "generated_at": iso(now),
        "directories": result.directories,
        "since": iso(since) if since is not None else None,
        "dumps_read": len(result.dumps),
        "stalls": len(stalls),
        "stalled_seconds": round(sum(g.total_seconds for g in groups), 6),
        "lower_bound": any(g.lower_bound for g in groups),
        "culprits": [{
            "rank": rank,
            "location": g.location,
            "culprit": None if g.key is None else
            {"filename": g.key[0], "lineno": g.key[1], "function": g.key[2], "line": g.line},
            "stalls": g.count,
            "unfinished": g.unfinished,
            "total_seconds": round(g.total_seconds, 6),
            "worst_seconds": None if g.worst.seconds is None else round(g.worst.seconds, 6),
            "lower_bound": g.lower_bound,
            "kinds": dict(sorted(g.kinds.items(), key=lambda kv: (-kv[1], kv[0]))),
            "first_seen": iso(g.first), "last_seen": iso(g.last),
            "first_seen_ts": g.first, "last_seen_ts": g.last,
            "services": g.services(), "pids": g.pids(), "hosts": g.hosts(),
            "routes": dict(g.routes()),
            "worst_dump": g.worst.path,
            "worst_trace_id": g.worst.trace_id,
            "dumps": [d.path for d in g.stalls],
        } for rank, g in enumerate(groups, 1)],
        "other_dumps": [{"path": d.path, "reason": d.reason, "time": iso(d.timestamp), "timestamp": d.timestamp,
                         "service": d.service, "pid": d.pid, "host": d.host}
                        for d in result.dumps if not d.is_stall],
        "skipped": [{"path": path, "why": why} for path, why in result.skipped],
    }


def render_text(result: Scan, groups: list[Group], since: float | None) -> str:
    """``loopwatch dumps``' output for a terminal."""
    span = f" since {human(since)} UTC" if since is not None else ""
    others = [d for d in result.dumps if not d.is_stall]
    if not result.dumps:
        older = f" ({_plural(result.older, 'older dump')})" if result.older else ""
        return f"no loopwatch dumps{span} in {printable(where(result))}{older}\n"
    stalls = sum(g.count for g in groups)
    out = [f"{_plural(stalls, 'stall')} at {_plural(len(groups), 'culprit')} in {printable(where(result))}"
           f"{span} ({_plural(len(result.dumps), 'dump')} read)"]
    if groups:
        first, last = min(g.first for g in groups), max(g.last for g in groups)
        out.append(f"from {human(first)} to {human(last)} UTC")
    if any(g.lower_bound for g in groups):
        out.append(">= : the stall's age when its stack was taken (a lower bound): dumps are written mid-stall")
    for rank, g in enumerate(groups, 1):
        out.append("")
        out.append(f"{rank}. {printable(g.location or '(no application frame on the loop thread)')}")
        if g.line:
            out.append(f"       {printable(g.line)}")
        unfinished = f" ({g.unfinished} unfinished: the process died mid-stall)" if g.unfinished else ""
        out.append(f"   stalls      {g.count}{unfinished}")
        out.append(f"   seconds     total {seconds_text(g.total_seconds, g.lower_bound)}, "
                   f"worst {seconds_text(g.worst.seconds, g.lower_bound and not g.worst.final)}")
        out.append("   kind        " + ", ".join(f"{printable(k)} {n}" for k, n in
                                                 sorted(g.kinds.items(), key=lambda kv: (-kv[1], kv[0]))))
        out.append(f"   first seen  {human(g.first)} UTC")
        out.append(f"   last seen   {human(g.last)} UTC")
        services, pids, hosts = g.services(), g.pids(), g.hosts()
        out.append(f"   services    {printable(_list(services)) if services else '(none recorded)'}")
        out.append(f"   pids        {_list(pids) if pids else '(none recorded)'}"
                   + (f" on {printable(_list(hosts, 5))}" if hosts else ""))
        routes = g.routes()
        if routes:
            out.append("   requests    " + printable(", ".join(f"{r} {n}" for r, n in routes[:5]))
                       + (f" (+{len(routes) - 5} more)" if len(routes) > 5 else ""))
        out.append(f"   worst dump  {printable(g.worst.path)}")
        if g.worst.trace_id:
            out.append(f"   worst trace {printable(g.worst.trace_id)}")
    if not groups:
        out.append("no stalls: only dumps of other reasons")
    if others:
        reasons = Counter(d.reason for d in others)
        out.append("")
        out.append("other dumps (not stalls): " + ", ".join(f"{printable(r)} {n}" for r, n in sorted(reasons.items()))
                   + f"; latest {printable(others[-1].path)}")
    return "\n".join(out) + "\n"


def _utf8_safe(stream: TextIO) -> None:
    try:
        stream.reconfigure(errors="backslashreplace")  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        pass


def _read(args: argparse.Namespace, parser: argparse.ArgumentParser, since: float | None,
          command: str) -> tuple[Scan, list[Group]]:
    """What both commands start with: the directories read (a usage error exits 2), the notes on stderr,
    the stalls grouped."""
    try:
        check_directories(args.directories)
        result = scan(args.directories, since=since)
    except Usage as exc:
        parser.error(str(exc))
    for line in notes(result, command):
        print(line, file=sys.stderr)
    return result, group(result.dumps)


def run_dumps(args: argparse.Namespace, parser: argparse.ArgumentParser,
              clock: Callable[[], float] = time.time) -> int:
    now = clock()
    since = args.since.cutoff(now) if args.since is not None else None
    result, groups = _read(args, parser, since, "dumps")
    if args.json:
        if not result.dumps:
            print(f"loopwatch dumps: no loopwatch dumps in {printable(where(result))}", file=sys.stderr)
        return _out(json.dumps(to_json(result, groups, since, now), indent=2) + "\n")
    return _out(render_text(result, groups, since))


def _out(text: str) -> int:
    """Write ``text`` to stdout; a reader that stopped early (``| head``) is no error."""
    _utf8_safe(sys.stdout)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # so that the interpreter's final flush fails no more
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


# -- loopwatch report: the page --------------------------------------------------------------------------
def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def kind_colours(kinds: Iterable[str]) -> dict[str, str]:
    """A colour per kind: the known ones fixed, others from a small palette (then grey)."""
    colours = dict(KIND_COLOURS)
    extra = iter(EXTRA_COLOURS)
    for kind in sorted(set(kinds)):
        if kind not in colours:
            colours[kind] = next(extra, KIND_COLOURS["unknown"])
    return colours


_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
          2 * 86400, 7 * 86400, 14 * 86400, 30 * 86400, 91 * 86400, 365 * 86400)


def _time_ticks(t0: float, t1: float, most: int = 8) -> list[float]:
    step = next((s for s in _STEPS if (t1 - t0) / s <= most), _STEPS[-1])
    first = math.ceil(t0 / step) * step
    return [first + i * step for i in range(int((t1 - first) // step) + 1)]


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    return next(m * exp for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * exp >= value)


def _tick_label(ts: float, span: float) -> str:
    stamp = _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
    if span >= 2 * 86400:
        return stamp.strftime("%m-%d %H:%M")
    return stamp.strftime("%H:%M:%S" if span < 600 else "%H:%M")


def timeline_svg(stalls: Sequence[Dump], colours: dict[str, str], rank_of: dict[Any, int]) -> str:
    """One mark per stall (x: time, y: stalled seconds, colour: kind); unfinished stalls as triangles on
    the top edge.  Marks that would land on the same pixel are drawn once (their tooltip counts them), so
    the page stays small with any number of dumps."""
    width, height, left, right, top, bottom = 960, 320, 64, 28, 16, 44
    pw, ph = width - left - right, height - top - bottom
    times = [d.timestamp for d in stalls]
    t0, t1 = (min(times), max(times)) if times else (time.time() - 60, time.time())
    if t1 - t0 < 1:
        t0, t1 = t0 - 30, t1 + 30
    pad = (t1 - t0) * 0.03
    t0, t1 = t0 - pad, t1 + pad
    y_max = _nice_max(max((d.seconds for d in stalls if d.seconds is not None), default=1.0) * 1.08)

    def x_of(ts: float) -> float:
        return left + (ts - t0) / (t1 - t0) * pw

    def y_of(s: float) -> float:
        return top + ph - min(s, y_max) / y_max * ph

    parts = [f'<svg class="timeline" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="stalls over time">',
             f'<rect class="plot" x="{left}" y="{top}" width="{pw}" height="{ph}" fill="{PLOT_BACKGROUND}"/>']
    for i in range(6):
        value = y_max * i / 5
        y = y_of(value)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{value:g}</text>')
    span = t1 - t0
    for ts in _time_ticks(t0, t1):
        x = x_of(ts)
        if x < left + 20 or x > width - 30:
            continue  # its label would be cut off at the edge
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 5}" class="axis"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 18}" class="tick" text-anchor="middle">'
                     f'{esc(_tick_label(ts, span))}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" class="axis-title" text-anchor="middle">'
                 f'time (UTC)</text>')
    parts.append(f'<text x="14" y="{top + ph / 2}" class="axis-title" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + ph / 2})">stalled seconds</text>')
    marks: dict[tuple[int, int, str, bool], list[Dump]] = {}
    for d in stalls:
        unfinished = d.seconds is None
        x = round(x_of(d.timestamp))
        y = top + 7 if unfinished else round(y_of(d.seconds or 0.0))
        marks.setdefault((x, y, d.kind, unfinished), []).append(d)
    radius = 6 if len(marks) <= 400 else 4  # many marks: smaller, so that they overlap less
    for (x, y, kind, unfinished), here in marks.items():
        d = here[-1]
        rank = rank_of.get(d.culprit)
        length = "unfinished (process died)" if unfinished else seconds_text(d.seconds, not d.final)
        what = (f"{human(d.timestamp)} UTC  {length}"
                f"  {kind}\n#{rank} {location(d.culprit) or '(no application frame)'}"
                + (f"\n+{len(here) - 1} more here" if len(here) > 1 else ""))
        colour = colours.get(kind, KIND_COLOURS["unknown"])
        attrs = f'class="stall" data-kind="{esc(kind)}" data-count="{len(here)}"'
        if unfinished:
            parts.append(f'<path {attrs} data-unfinished="1" d="M{x},{y - 7} L{x + 7},{y + 6} L{x - 7},{y + 6} Z" '
                         f'fill="{colour}" stroke="#000" stroke-width="1"><title>{esc(what)}</title></path>')
        else:
            parts.append(f'<circle {attrs} cx="{x}" cy="{y}" r="{radius}" fill="{colour}" fill-opacity="1" '
                         f'stroke="#fff" stroke-width="1"><title>{esc(what)}</title></circle>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" class="frame"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def legend(kinds: Counter[str], colours: dict[str, str], unfinished: int) -> str:
    items = []
    for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])):
        meaning = KIND_MEANINGS.get(kind, "as recorded in the dumps")
        items.append(f'<li data-kind="{esc(kind)}"><svg width="14" height="14"><circle cx="7" cy="7" r="6" '
                     f'fill="{colours[kind]}"/></svg> <b>{esc(kind)}</b> ({n}): {esc(meaning)}</li>')
    if unfinished:
        items.append(f'<li><svg width="14" height="14"><path d="M7,1 L13,13 L1,13 Z" fill="#fff" stroke="#000"/>'
                     f'</svg> <b>unfinished</b> ({unfinished}): the process died during the stall (killed, e.g. by '
                     f'a liveness probe); its length is unknown, drawn on the top edge</li>')
    return f'<ul class="legend">{"".join(items)}</ul>'


def ranking_html(groups: Sequence[Group], colours: dict[str, str]) -> str:
    """One bar per culprit, its length the culprit's total stalled seconds, split by kind."""
    shown = groups[:MAX_RANKED]
    top = max((g.total_seconds for g in shown), default=0.0) or 1.0
    rows = []
    for rank, g in enumerate(shown, 1):
        bar_width = 360
        segments, x = [], 0.0
        for kind, secs in sorted(g.seconds_by_kind().items(), key=lambda kv: (-kv[1], kv[0])):
            w = secs / top * bar_width
            segments.append(f'<rect x="{x:.1f}" y="2" width="{max(w, 1):.1f}" height="14" fill="{colours[kind]}">'
                            f'<title>{esc(kind)}: {secs:.2f} s</title></rect>')
            x += w
        target = f"#culprit-{rank}" if rank <= MAX_SECTIONS else None
        name = esc(g.location or "(no application frame on the loop thread)")
        label = f'<a href="{target}">{name}</a>' if target else name
        unfinished = f", {g.unfinished} unfinished" if g.unfinished else ""
        rows.append(
            f'<li class="culprit-row" data-rank="{rank}" data-location="{esc(g.location or "")}">'
            f'<span class="rank">#{rank}</span>'
            f'<svg class="bar" width="{bar_width}" height="18">{"".join(segments)}</svg>'
            f'<span class="figures">{esc(seconds_text(g.total_seconds, g.lower_bound))} in '
            f'{_plural(g.count, "stall")}{unfinished}</span>'
            f'<span class="where">{label}</span></li>')
    more = ""
    if len(groups) > len(shown):
        rest = groups[len(shown):]
        more = (f'<p class="note">and {len(rest)} more culprits ({sum(g.count for g in rest)} stalls, '
                f'{sum(g.total_seconds for g in rest):.2f} s): <code>loopwatch dumps --json</code> lists them all.</p>')
    return f'<ol class="ranking">{"".join(rows)}</ol>{more}'


def _frame_key(frame: Any) -> tuple[Any, Any, Any] | None:
    if not isinstance(frame, dict):
        return None
    return (frame.get("filename"), frame.get("lineno"), frame.get("function"))


def _frame_list(value: Any) -> list[dict[str, Any]]:
    return [f for f in value if isinstance(f, dict)] if isinstance(value, list) else []


def stack_html(frames: list[dict[str, Any]], culprit: tuple[str, int | None, str] | None, cls: str = "stack") -> str:
    if not frames:
        return '<p class="note">no frames recorded</p>'
    items = []
    for f in frames:
        key = _frame_key(f)
        filename = f.get("filename")
        app = isinstance(filename, str) and is_app_file(filename) and not _LIBRARY.search(filename)
        is_culprit = culprit is not None and key == culprit
        cls_item = "culprit" if is_culprit else ("app" if app else "lib")
        line = f.get("line")
        items.append(f'<li class="{cls_item}"><code class="loc">{esc(_text(filename))}:{esc(f.get("lineno"))}</code> '
                     f'in <code class="fn">{esc(_text(f.get("function")))}</code>'
                     + (f'<pre class="src">{esc(_text(line))}</pre>' if isinstance(line, str) and line else "")
                     + "</li>")
    return f'<ol class="{cls}">{"".join(items)}</ol>'


def _innermost(frames: list[dict[str, Any]]) -> str:
    if not frames:
        return "(no Python frames)"
    f = frames[-1]
    return f"{_text(f.get('function'))} ({_text(f.get('filename'))}:{f.get('lineno')})"


def running_task(tasks: list[Any], loop_stack: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The task whose coroutine was running on the loop thread: its innermost frame is on the loop's stack."""
    on_loop = {_frame_key(f) for f in loop_stack}
    best = None
    for task in tasks:
        if not isinstance(task, dict):
            continue
        frames = _frame_list(task.get("stack"))
        if frames and _frame_key(frames[-1]) in on_loop:
            if best is None or len(frames) > len(_frame_list(best.get("stack"))):
                best = task
    return best


def section_html(rank: int, g: Group, colours: dict[str, str]) -> str:
    worst = g.worst
    head = (f'<section class="culprit" id="culprit-{rank}" data-rank="{rank}">'
            f'<h3><span class="rank">#{rank}</span> '
            f'{esc(g.location or "(no application frame on the loop thread)")}</h3>')
    if g.line:
        head += f'<pre class="src culprit-line">{esc(g.line)}</pre>'
    kinds = ", ".join(f'<span class="kind" style="border-color:{colours[k]}">{esc(k)} {n}</span>'
                      for k, n in sorted(g.kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    facts = [
        ("stalls", f"{g.count}"
                   + (f" ({g.unfinished} unfinished: the process died mid-stall)" if g.unfinished else "")),
        ("stalled", f"total {esc(seconds_text(g.total_seconds, g.lower_bound))}, worst "
                    f"{esc(seconds_text(worst.seconds, not worst.final))}"),
        ("kind", kinds),
        ("seen", f"{esc(human(g.first))} to {esc(human(g.last))} UTC"),
        ("services", esc(_list(g.services())) or "(none recorded)"),
        ("pids", (esc(_list(g.pids())) or "(none recorded)")
                 + (f" on {esc(_list(g.hosts(), 5))}" if g.hosts() else "")),
        ("worst dump", f"<code>{esc(worst.path)}</code>"),
    ]
    if g.routes():
        facts.insert(-1, ("requests", esc(", ".join(f"{r} {n}" for r, n in g.routes()[:5]))))
    if worst.trace_id:
        facts.append(("worst trace", f"<code>{esc(worst.trace_id)}</code>"))
    body = ['<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"]
    try:
        data = load(worst.path)
    except Skip as why:
        body.append(f'<p class="note">the worst dump cannot be read now: {esc(why)}</p>')
        data = {}
    if data:
        loop_stack = _frame_list(data.get("loop_stack"))
        source, cpu = data.get("source"), _number(data.get("cpu_seconds"))
        context = [f"loop <code>{esc(_text(data.get('loop')))}</code>", f"kind <b>{esc(worst.kind)}</b>"]
        if cpu is not None:
            context.append(f"loop thread CPU {cpu:.3f} s over the measured window")
        if _number(data.get("gc_seconds")) is not None:
            context.append(f"garbage collection {data['gc_seconds']:.3f} s "
                           f"(generation {esc(data.get('gc_generation'))})")
        context.append(f"stack taken by <b>{esc(_text(source))}</b>")
        body.append(f'<p class="context">{"; ".join(context)}</p>')
        if source == "faulthandler":
            body.append('<p class="gil"><b>GIL held:</b> no Python thread could run during this stall (a C call '
                        'kept the GIL: a regex, a huge json.dumps, a long collection); the loop thread wrote its own '
                        'stack on a timer signal, so other threads\' stacks and task stacks could not be read.</p>')
        if isinstance(data.get("note"), str) and data["note"]:
            body.append(f'<p class="note">note: {esc(_text(data["note"], 600))}</p>')
        body.append("<h4>Loop thread stack (most recent call last)</h4>" + stack_html(loop_stack, g.key))
        native = _frame_list(data.get("native_stack"))
        if native:
            body.append(f'<details><summary>native stack ({len(native)} frames, '
                        f'{esc(_text(data.get("native_source")))})</summary>{stack_html(native, None)}</details>')
        tasks = [t for t in data["tasks"] if isinstance(t, dict)] if isinstance(data.get("tasks"), list) else []
        task = running_task(tasks, loop_stack)
        body.append("<h4>Task</h4>")
        if task is not None:
            body.append(f'<p class="task">running: <b>{esc(_text(task.get("name")))}</b> '
                        f'(coroutine <code>{esc(_text(task.get("coro")))}</code>)</p>'
                        + stack_html(_frame_list(task.get("stack")), g.key, "stack task-stack"))
        elif tasks:
            body.append('<p class="note">the running task could not be matched to the loop thread\'s stack '
                        '(a plain callback, not a task step)</p>')
        else:
            body.append('<p class="note">no task stacks in this dump</p>')
        others = [t for t in tasks if t is not task]
        if others:
            shown = others[:MAX_TASKS]
            rows = "".join(f'<li><b>{esc(_text(t.get("name")))}</b> <code>{esc(_text(t.get("coro")))}</code>: '
                           f'{esc(_innermost(_frame_list(t.get("stack"))))}</li>' for t in shown)
            more = f'<li class="note">and {len(others) - len(shown)} more</li>' if len(others) > len(shown) else ""
            body.append(f'<details><summary>{_plural(len(others), "other task")} waiting</summary>'
                        f'<ul class="tasks">{rows}{more}</ul></details>')
        threads = [t for t in data["threads"] if isinstance(t, dict)] if isinstance(data.get("threads"), list) else []
        body.append(f"<h4>Threads ({len(threads)})</h4>")
        if threads:
            loop_key = [_frame_key(f) for f in loop_stack]
            rows = []
            for t in threads[:MAX_THREADS]:
                frames = _frame_list(t.get("stack"))
                is_loop = bool(loop_key) and [_frame_key(f) for f in frames] == loop_key
                rows.append(f'<tr class="{"loop-thread" if is_loop else "thread"}">'
                            f'<td>{esc(_text(t.get("name")))}{" <b>(loop thread)</b>" if is_loop else ""}</td>'
                            f'<td>{esc(t.get("native_id"))}</td><td>{"daemon" if t.get("daemon") else ""}</td>'
                            f'<td><details><summary>{esc(_innermost(frames))}</summary>'
                            f'{stack_html(frames, g.key)}</details></td></tr>')
            more = (f'<tr><td colspan="4" class="note">and {len(threads) - MAX_THREADS} more threads</td></tr>'
                    if len(threads) > MAX_THREADS else "")
            body.append('<table class="threads"><thead><tr><th>thread</th><th>native id</th><th></th>'
                        f'<th>innermost frame (open for the stack)</th></tr></thead><tbody>{"".join(rows)}{more}'
                        '</tbody></table>')
        else:
            body.append('<p class="note">no thread stacks in this dump</p>')
    paths = [d.path for d in reversed(g.stalls)]
    listed = "".join(f"<li><code>{esc(p)}</code></li>" for p in paths[:MAX_PATHS])
    more = f'<li class="note">and {len(paths) - MAX_PATHS} more</li>' if len(paths) > MAX_PATHS else ""
    body.append(f'<details><summary>{_plural(len(paths), "dump")} of this culprit (newest first)</summary>'
                f'<ul class="paths">{listed}{more}</ul></details>')
    return head + "".join(body) + "</section>"


CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 24px auto;
       max-width: 1100px; padding: 0 16px; color: #1d2330; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #dde2ec; }
h3 { font-size: 15px; margin: 0 0 6px; word-break: break-all; }
h4 { font-size: 13px; margin: 14px 0 4px; color: #4a5466; }
code, pre { font: 12.5px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; }
pre { margin: 2px 0 2px 16px; white-space: pre-wrap; word-break: break-all; color: #3b4252; }
.meta, .note { color: #5d6677; } .note { font-size: 13px; }
.tiles { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; padding: 0; list-style: none; }
.tiles li { border: 1px solid #dde2ec; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.tiles b { display: block; font-size: 20px; }
.legend { list-style: none; padding: 0; margin: 6px 0; display: flex; flex-wrap: wrap; gap: 4px 18px; font-size: 13px; }
.legend svg { vertical-align: -2px; }
svg text { font: 11px system-ui, "DejaVu Sans", sans-serif; fill: #4a5466; }
svg .grid { stroke: #dde2ec; } svg .axis { stroke: #8a93a5; } svg .frame { stroke: #8a93a5; }
svg .axis-title { font-size: 12px; fill: #1d2330; }
.ranking { list-style: none; padding: 0; margin: 0; }
.culprit-row { display: grid; grid-template-columns: 44px 370px 190px 1fr; align-items: center; padding: 3px 0;
               border-bottom: 1px solid #eef1f6; }
.culprit-row .where { word-break: break-all; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
                      font-size: 12.5px; }
.rank { color: #5d6677; font-weight: 600; }
.culprit { border: 1px solid #dde2ec; border-radius: 6px; padding: 12px 16px; margin: 14px 0; }
.facts { display: grid; grid-template-columns: 100px 1fr; gap: 2px 12px; margin: 8px 0; }
.facts dt { color: #5d6677; } .facts dd { margin: 0; word-break: break-all; }
.kind { border-left: 4px solid; padding-left: 4px; margin-right: 8px; }
.stack { margin: 4px 0; padding-left: 28px; } .stack li { margin: 1px 0; word-break: break-all; }
.stack li.lib { color: #8a93a5; } .stack li.lib pre { color: #8a93a5; }
.stack li.culprit { background: #fff3cd; font-weight: 600; }
.gil { background: #fdecea; padding: 6px 10px; border-radius: 4px; }
.threads { border-collapse: collapse; width: 100%; font-size: 13px; }
.threads td, .threads th { border-bottom: 1px solid #eef1f6; padding: 3px 6px; text-align: left; vertical-align: top; }
.threads tr.loop-thread { background: #f7f9fc; } .threads summary { word-break: break-all; }
details { margin: 4px 0; } summary { cursor: pointer; }
"""


def render_html(result: Scan, groups: list[Group], since: float | None, now: float) -> str:
    """The whole page (see the module docstring)."""
    stalls = [d for g in groups for d in g.stalls]
    colours = kind_colours(d.kind for d in stalls)
    kinds = Counter(d.kind for d in stalls)
    unfinished = sum(g.unfinished for g in groups)
    lower = any(g.lower_bound for g in groups)
    total = sum(g.total_seconds for g in groups)
    rank_of = {g.key: rank for rank, g in enumerate(groups, 1)}
    others = [d for d in result.dumps if not d.is_stall]
    title = f"loopwatch: {_plural(len(stalls), 'stall')} at {_plural(len(groups), 'culprit')}"
    span = f" since {human(since)} UTC" if since is not None else ""
    out = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
           # Nothing may be loaded, nothing may run: the page is read offline and holds data from dumps.
           "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
           "img-src data:; base-uri 'none'; form-action 'none'\">",
           '<meta name="referrer" content="no-referrer">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
           "<header><h1>loopwatch incident report</h1>",
           f'<p class="meta">{esc(where(result))}{esc(span)}; generated {esc(human(now))} UTC '
           f'by <code>loopwatch report</code>; {_plural(len(result.dumps), "dump")} read</p></header>']
    if groups:
        first, last = min(g.first for g in groups), max(g.last for g in groups)
        services = sorted({d.service for d in stalls if d.service})
        out.append('<ul class="tiles" id="summary">'
                   f'<li><b>{len(stalls)}</b>stalls</li><li><b>{len(groups)}</b>culprits</li>'
                   f'<li><b>{esc(seconds_text(total, lower))}</b>stalled</li>'
                   f'<li><b>{esc(human(first))}</b>first (UTC)</li><li><b>{esc(human(last))}</b>last (UTC)</li>'
                   f'<li><b>{esc(_list(services, 3)) or "-"}</b>services</li></ul>')
    else:
        older = f" ({_plural(result.older, 'older dump')} before --since)" if result.older else ""
        out.append(f'<p class="empty" id="summary">No stalls in these dumps{esc(older)}.</p>')
    if lower:
        out.append('<p class="note">Stalled seconds marked &ge; are each stall\'s age when its stack was taken '
                   '(dumps are written while the stall goes on): a lower bound of its length.</p>')
    out.append('<section id="timeline"><h2>Timeline</h2>')
    out.append(legend(kinds, colours, unfinished))
    out.append(timeline_svg(stalls, colours, rank_of))
    out.append("</section>")
    out.append('<section id="ranking"><h2>Culprits by total stalled time</h2>')
    out.append(ranking_html(groups, colours) if groups else '<p class="note">none</p>')
    out.append("</section>")
    out.append('<section id="culprits"><h2>Culprits</h2>')
    for rank, g in enumerate(groups[:MAX_SECTIONS], 1):
        out.append(section_html(rank, g, colours))
    if len(groups) > MAX_SECTIONS:
        out.append(f'<p class="note">{len(groups) - MAX_SECTIONS} more culprits are ranked above but not detailed '
                   f'(the top {MAX_SECTIONS} are); <code>loopwatch dumps --json</code> lists them all.</p>')
    out.append("</section>")
    if others:
        reasons = Counter(d.reason for d in others)
        listed = "".join(f"<li>{esc(human(d.timestamp))} UTC <b>{esc(d.reason)}</b> {esc(d.service or '')} "
                         f"pid {esc(d.pid)} <code>{esc(d.path)}</code></li>" for d in others[-MAX_PATHS:][::-1])
        out.append('<section id="other-dumps"><h2>Other dumps (not stalls)</h2><p class="note">'
                   + esc(", ".join(f"{r} {n}" for r, n in sorted(reasons.items())))
                   + f" (newest {min(len(others), MAX_PATHS)} listed)</p><ul>{listed}</ul></section>")
    if result.skipped:
        listed = "".join(f"<li><code>{esc(p)}</code>: {esc(w)}</li>" for p, w in result.skipped[:MAX_PATHS])
        more = f"<li>and {len(result.skipped) - MAX_PATHS} more</li>" if len(result.skipped) > MAX_PATHS else ""
        out.append(f'<section id="skipped"><h2>Files skipped</h2><ul class="note">{listed}{more}</ul></section>')
    out.append("</body></html>\n")
    return "\n".join(out)


def run_report(args: argparse.Namespace, parser: argparse.ArgumentParser,
               clock: Callable[[], float] = time.time) -> int:
    now = clock()
    since = args.since.cutoff(now) if args.since is not None else None
    output = args.output
    if output != "-":
        parent = Path(output).parent
        if not parent.is_dir():
            parser.error(f"argument -o/--output: no such directory: {parent}")
        if Path(output).is_dir():
            parser.error(f"argument -o/--output: is a directory: {output}")
    result, groups = _read(args, parser, since, "report")
    page = render_html(result, groups, since, now)
    if output == "-":
        return _out(page)
    try:
        write_private(Path(output), page.encode("utf-8"))
    except OSError as exc:
        print(f"loopwatch report: cannot write {printable(output)}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    stalls = sum(g.count for g in groups)
    found = (f"{_plural(stalls, 'stall')} at {_plural(len(groups), 'culprit')}" if groups
             else f"no stalls in {printable(where(result))}")
    print(f"wrote {printable(output)}: {found} ({_plural(len(result.dumps), 'dump')} read)")
    return 0


# -- the command line -------------------------------------------------------------------------------------
def add_parsers(commands: Any) -> None:
    """``dumps`` and ``report``, for :mod:`loopwatch.__main__`."""
    since_help = f"only dumps at or after WHEN: {SINCE_ACCEPTED}"
    dir_help = "a dump directory (a dump_dir; not searched recursively); several may be given"
    dumps = commands.add_parser(
        "dumps", help="the stalls in dump directories, grouped by culprit",
        description="The stalls in loopwatch dump directories, grouped by culprit (file:line in function) and "
                    "ranked by total stalled seconds. Manual dumps are listed apart, not counted as stalls; "
                    "unfinished_stall dumps count as stalls of unknown length.")
    dumps.add_argument("directories", nargs="+", metavar="DIR", help=dir_help)
    dumps.add_argument("--since", type=parse_since, metavar="WHEN", help=since_help)
    dumps.add_argument("--json", action="store_true", help="one JSON document (schema: see the README)")
    dumps.set_defaults(handler=lambda args, _parser: run_dumps(args, dumps))

    report = commands.add_parser(
        "report", help="one self-contained HTML page of the stalls in dump directories",
        description="One self-contained HTML page (no network, no script): a timeline of the stalls, the culprits "
                    "ranked by total stalled time, and for each culprit the stack, task and threads of its worst "
                    "dump. Written mode 0600, like the dumps.")
    report.add_argument("directories", nargs="+", metavar="DIR", help=dir_help)
    report.add_argument("-o", "--output", required=True, metavar="FILE.html", help="the page to write ('-': stdout)")
    report.add_argument("--since", type=parse_since, metavar="WHEN", help=since_help)
    report.set_defaults(handler=lambda args, _parser: run_report(args, report))
