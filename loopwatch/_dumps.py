"""Dump files: atomic, mode 0600, rate-limited, and a bounded directory.

Each dump is a JSON file (the contract, see the README) plus a ``.txt`` twin for humans.  Files are
written to a temporary name in the same directory, fsynced and renamed, so a reader never sees half a
dump.  At most ``dump_keep`` dumps are kept (oldest removed first); automatic dumps are at most one
per ``dump_cooldown`` seconds.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric

from . import _forksafe
from ._component import Component, Degrade, Naming, Report
from ._context import event_fields
from ._frames import culprit_of, format_stack
from ._log import emit
from ._pyspy import NativeStacks, find_pyspy
from ._series import Counter
from ._version import __version__

PREFIX = "loopwatch-"
KNOWN_DUMP_REASONS = ("event_loop_lag", "manual", "requested", "unfinished_stall")
MAX_DUMP_REASONS = 16
_REASON = re.compile(r"[^a-z0-9_]+")


def safe_reason(reason: str) -> str:
    cleaned = _REASON.sub("_", str(reason).lower()).strip("_")[:40]
    return cleaned or "unnamed"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def unsafe_directory(path: Path) -> str | None:
    """Why loopwatch must not write into ``path``, or None: a directory that another user could change
    under it -- writable by group or others and not owned by this process's user (a ``/tmp/loopwatch`` that
    someone else created world-writable), or a link that another user owns (it could point anywhere)."""
    uid = os.geteuid()
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        if info.st_uid not in (uid, 0):
            return (f"dump_dir {str(path)!r} is a symbolic link owned by another user (uid {info.st_uid}): "
                    f"refused; use a directory of your own")
        info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        return f"dump_dir {str(path)!r} is not a directory"
    if info.st_uid != uid and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"dump_dir {str(path)!r} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}) and "
                f"owned by uid {info.st_uid}, not by this process's (uid {uid}): refused, they could read, "
                f"replace or plant files there; use a directory of your own")
    return None


def _request_lines(context: Any) -> list[str]:
    """The request the blocked task served (the dump's ``context``), for the text twin."""
    if not isinstance(context, dict) or not context:
        return []
    out = []
    if context.get("trace_id"):
        span = context.get("span_name") or "(unnamed span)"
        route = f"  route {context['route']}" if context.get("route") else ""
        out.append(f"request: span {span!r}{route}  trace_id {context['trace_id']}  span_id {context.get('span_id')}")
    values = context.get("values") if isinstance(context.get("values"), dict) else {}
    if values:
        out.append("context: " + "  ".join(f"{k}={v!r}" for k, v in values.items()))
    if context.get("other_keys"):
        out.append("context keys not shown (not in context_keys): " + ", ".join(map(str, context["other_keys"])))
    return out


def render_text(dump: dict[str, Any]) -> str:
    """The human-readable twin of a dump."""
    when = _dt.datetime.fromtimestamp(dump["timestamp"], _dt.timezone.utc).isoformat()
    out = [f"loopwatch dump: {dump['reason']}",
           f"service {dump.get('service')}  pid {dump.get('pid')}  at {when}"]
    if dump.get("stall_seconds") is not None:
        kind = dump.get("kind") or "unknown"
        cpu = dump.get("cpu_seconds")
        cpu_text = f", loop thread CPU {cpu:.3f} s" if isinstance(cpu, (int, float)) else ""
        out.append(f"loop {dump.get('loop')!r} stalled for {dump['stall_seconds']:.3f} s when the stack "
                   f"was taken (kind: {kind}{cpu_text}; source: {dump.get('source')})")
        whole = dump.get("whole_stall") if isinstance(dump.get("whole_stall"), dict) else {}
        if isinstance(dump.get("duration"), (int, float)):
            whole_cpu = whole.get("cpu_seconds")
            whole_cpu_text = f", loop thread CPU {whole_cpu:.3f} s" if isinstance(whole_cpu, (int, float)) else ""
            out.append(f"the whole stall lasted {dump['duration']:.3f} s (kind: {whole.get('kind') or 'unknown'}"
                       f"{whole_cpu_text})")
    culprit = dump.get("culprit")
    if culprit:
        out.append(f"culprit: {culprit['filename']}:{culprit['lineno']} in {culprit['function']}")
        if culprit.get("line"):
            out.append(f"    {culprit['line']}")
    else:
        out.append("culprit: none found in application code")
    out.extend(_request_lines(dump.get("context")))
    out.append("")
    out.append("Loop thread (most recent call last):")
    out.append(format_stack(dump.get("loop_stack") or []))
    for thread in dump.get("threads") or []:
        out.append("")
        out.append(f"Thread {thread.get('name')!r} native_id={thread.get('native_id')} "
                   f"(most recent call last):")
        out.append(format_stack(thread.get("stack") or []))
    tasks = dump.get("tasks") or []
    if tasks:
        out.append("")
        out.append(f"Tasks ({len(tasks)}):")
        for task in tasks:
            out.append(f"  {task['name']}: {task['coro']}")
            out.append(format_stack(task.get("stack") or [], indent="    "))
    if dump.get("note"):
        out.append("")
        out.append(f"note: {dump['note']}")
    return "\n".join(out) + "\n"


class DumpWriter:
    """Owns ``dump_dir``: writes dumps, enforces the cooldown and the ``keep`` bound."""

    def __init__(self, directory: Path, *, keep: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.keep = keep
        self.cooldown = cooldown
        self._clock = clock
        self._last_automatic: float | None = None
        self._lock = _forksafe.lock()
        self.disabled_reason: str | None = "dump_keep is 0" if keep == 0 else None

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    def prepare(self) -> None:
        """Create the directory (0700), refuse one another user controls, and prove it is writable;
        disable dumps with a reason if not."""
        if not self.enabled:
            return
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            why = unsafe_directory(self.directory)
            if why is not None:
                self.disabled_reason = why
                return
            probe = self.directory / f".{PREFIX}write-test-{os.getpid()}"
            write_private(probe, b"")
            probe.unlink()
        except OSError as exc:
            self.disabled_reason = f"dump_dir {str(self.directory)!r} is not writable: {exc.strerror or exc}"

    def disable(self, reason: str) -> None:
        self.disabled_reason = reason

    def claim_automatic(self) -> bool:
        """True (and starts the cooldown) if an automatic dump may be written now."""
        with self._lock:
            now = self._clock()
            if self._last_automatic is not None and now - self._last_automatic < self.cooldown:
                return False
            self._last_automatic = now
            return True

    def write(self, dump: dict[str, Any]) -> Path:
        """Write ``dump`` (JSON and text twin) and prune the directory; returns the JSON path."""
        stamp = _dt.datetime.fromtimestamp(dump["timestamp"], _dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        base = f"{PREFIX}{stamp}-{dump.get('pid', os.getpid())}-{safe_reason(dump['reason'])}"
        with self._lock:
            path = self.directory / f"{base}.json"
            n = 1
            while path.exists():
                n += 1
                path = self.directory / f"{base}-{n}.json"
            write_private(path, json.dumps(dump, indent=2, default=str).encode())
            write_private(path.with_suffix(".txt"), render_text(dump).encode())
            self._prune()
        return path

    def update(self, path: Path, fields: dict[str, Any]) -> bool:
        """Add ``fields`` to the dump at ``path`` (JSON and text twin, rewritten atomically); False if it is
        gone (pruned).  Under the writer's lock: two updates (the stall's end, py-spy's native stack) never
        undo each other."""
        with self._lock:
            try:
                dump = json.loads(path.read_bytes())
            except FileNotFoundError:
                return False
            dump.update(fields)
            write_private(path, json.dumps(dump, indent=2, default=str).encode())
            write_private(path.with_suffix(".txt"), render_text(dump).encode())
        return True

    def existing(self) -> list[Path]:
        """The dumps in the directory, oldest first."""
        entries = []
        for path in self.directory.glob(f"{PREFIX}*.json"):
            try:
                entries.append((path.stat().st_mtime, path.name, path))
            except FileNotFoundError:
                continue
        return [path for _, _, path in sorted(entries)]

    def _prune(self) -> None:
        dumps = self.existing()
        for path in dumps[: max(0, len(dumps) - self.keep)]:
            for victim in (path, path.with_suffix(".txt")):
                try:
                    victim.unlink()
                except FileNotFoundError:
                    pass


def build_dump(reason: str, *, service: str, loop: str | None, stall_seconds: float | None,
               loop_stack: list[dict[str, Any]], threads: list[dict[str, Any]], tasks: list[dict[str, Any]],
               source: str, kind: str | None = None, cpu_seconds: float | None = None, note: str | None = None,
               context: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """A dump's fields (the README's dump format), in order; ``overrides`` replace or add fields."""
    dump: dict[str, Any] = {
        "reason": reason,
        "timestamp": time.time(),
        "stall_seconds": None if stall_seconds is None else round(stall_seconds, 6),
        "service": service,
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "loop": loop,
        "kind": kind,
        "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 6),
        "source": source,
        "culprit": culprit_of(loop_stack),
        "context": context,
        "loop_stack": loop_stack,
        "threads": threads,
        "tasks": tasks,
        "python": platform.python_version(),
        "loopwatch": __version__,
        "note": note,
    }
    dump.update(overrides)
    return dump


class Dumps(Component):
    """Dumps as a component: the writer, ``dumps_total{reason}``, the ``loopwatch.dump`` event, and py-spy's
    native stack added to mid-stall dumps (the ``native_stacks`` option).  ``write`` never raises (the
    watchdog's and the fallback's dumps); ``write_or_raise`` is :func:`loopwatch.dump`'s."""

    component = "dump"

    def __init__(self, naming: Naming, directory: Path, *, keep: int, cooldown: float, native_stacks: bool,
                 busy_since: Callable[[str], tuple[int, Callable[[], bool]] | None],
                 clock: Callable[[], float], report: Report, degrade: Degrade) -> None:
        super().__init__(naming, report=report)
        self.writer = DumpWriter(directory, keep=keep, cooldown=cooldown, clock=clock)
        self._want_native = native_stacks
        self._busy_since = busy_since  # a loop's label -> (its thread's native id, "still the same stall?")
        self._degrade = degrade
        self.native_stacks: NativeStacks | None = None
        self._prepared = False
        self.after_fork()

    @property
    def enabled(self) -> bool:
        return self.writer.enabled

    def up(self) -> bool:
        return self.writer.enabled

    def start(self) -> None:
        if self._prepared:
            return  # a forked child resuming: the directory is the same
        self._prepared = True
        self.writer.prepare()
        if not self.writer.enabled:
            self._degrade("dumps", self.writer.disabled_reason or "disabled")
        if self._want_native:
            self._start_native_stacks()

    def _start_native_stacks(self) -> None:
        binary = find_pyspy()
        if binary is None:
            self._degrade("native_stacks", "py-spy not found next to the interpreter or on PATH: "
                                           "pip install 'loopwatch[pyspy]'")
            return
        if not self.writer.enabled:
            return  # no dumps to add native stacks to (already reported as degraded)
        self.native_stacks = NativeStacks(
            binary=binary, degrade=lambda reason: self._degrade("native_stacks", reason),
            on_error=lambda exc: self.report("native_stacks", exc), log=emit)

    def after_fork(self) -> None:
        """The child's own counts; the parent's cooldown is not the child's."""
        self.writer._last_automatic = None
        self.counts = Counter("dumps", "Stack dumps written, by reason.", ["service", "reason"],
                              namespace=self.naming.namespace)
        for reason in KNOWN_DUMP_REASONS:
            self.counts.labels(self.naming.service, reason)
        self._reasons = set(KNOWN_DUMP_REASONS)

    def build(self, reason: str, **fields: Any) -> dict[str, Any]:
        """A dump of this service and process (see :func:`build_dump`)."""
        return build_dump(reason, **{"service": self.naming.service, **fields})

    def write(self, dump: dict[str, Any]) -> Path | None:
        """Write a dump from loopwatch's own threads: failures are counted and logged, never raised."""
        try:
            path = self.writer.write(dump)
        except OSError as exc:
            self.report("dump", exc, dump_dir=str(self.writer.directory))  # type: ignore[call-arg]
            return None
        self._written(dump, path)
        return path

    def update(self, path: Path, fields: dict[str, Any]) -> bool:
        """:meth:`DumpWriter.update` from loopwatch's own threads: failures are counted, never raised."""
        try:
            return self.writer.update(path, fields)
        except (OSError, ValueError) as exc:
            self.report("dump", exc, dump_dir=str(self.writer.directory))  # type: ignore[call-arg]
            return False

    def write_or_raise(self, dump: dict[str, Any]) -> Path:
        path = self.writer.write(dump)
        self._written(dump, path)
        return path

    def _written(self, dump: dict[str, Any], path: Path) -> None:
        self.count(dump["reason"])
        if self.native_stacks is not None and dump.get("source") == "watchdog" and dump["reason"] == "event_loop_lag":
            self._add_native_stack(dump, path)
        culprit = dump.get("culprit")
        emit("warning", "loopwatch.dump", reason=dump["reason"], path=str(path), loop=dump.get("loop"),
             stall_seconds=dump.get("stall_seconds"), source=dump.get("source"),
             culprit=None if not culprit else f"{culprit['filename']}:{culprit['lineno']} in {culprit['function']}",
             **event_fields(dump.get("context")))

    def _add_native_stack(self, dump: dict[str, Any], path: Path) -> None:
        """py-spy adds the loop thread's native stack to this mid-stall dump, if the stall lasts."""
        try:
            found = self._busy_since(dump.get("loop") or "")
            if found is not None and self.native_stacks is not None:
                native_id, still_stalled = found
                self.native_stacks.enrich(path, native_id, still_stalled, update=self.writer.update)
        except Exception as exc:  # noqa: BLE001
            self.report("native_stacks", exc)

    def count(self, reason: str) -> None:
        if reason not in self._reasons:
            if len(self._reasons) >= MAX_DUMP_REASONS:
                reason = "other"
            self._reasons.add(reason)
        self.counts.labels(self.naming.service, reason).inc()

    def families(self) -> list[Metric]:
        return self.counts.collect()
