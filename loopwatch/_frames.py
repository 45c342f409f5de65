"""Stacks as plain data: threads, the loop thread's culprit, tasks' await chains, faulthandler text.

Only code locations are recorded -- file, line, function and the source line's text -- never local
variable values: stacks of production services hold secrets.  Stacks are listed outermost call
first ("most recent call last", like a traceback).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import linecache
import os
import re
import sys
import sysconfig
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

MAX_DEPTH = 128  # frames kept per stack (the innermost ones)
MAX_TASKS = 200  # tasks listed per dump
MAX_LINE = 200  # characters of source text kept per frame

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _library_roots() -> tuple[str, ...]:
    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(os.path.realpath(path) + os.sep)
            roots.add(os.path.abspath(path) + os.sep)
    for prefix in {sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix}:
        lib = os.path.join(prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}")
        roots.add(os.path.abspath(lib) + os.sep)
        roots.add(os.path.realpath(lib) + os.sep)
    return tuple(sorted(roots))


_LIBRARY_ROOTS = _library_roots()


@functools.lru_cache(maxsize=4096)
def is_app_file(filename: str) -> bool:
    """True for the application's own code: not the standard library, site-packages or loopwatch."""
    if not filename or filename.startswith("<"):
        return False
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE_DIR):
        return False
    if f"{os.sep}site-packages{os.sep}" in path or f"{os.sep}dist-packages{os.sep}" in path:
        return False
    return not path.startswith(_LIBRARY_ROOTS)


def frame_record(filename: str, lineno: int | None, function: str) -> dict[str, Any]:
    """One stack entry.  ``line`` is the source text, read from disk when available."""
    line = linecache.getline(filename, lineno).strip()[:MAX_LINE] if lineno else ""
    return {"filename": filename, "lineno": lineno, "function": function, "line": line or None}


def locations_of(frame: FrameType | None, limit: int = MAX_DEPTH) -> list[tuple[str, int | None, str]]:
    """``(filename, lineno, function)`` of the stack ending at ``frame``, outermost first: attribute reads
    only, so it is quick even when the GIL is contended (reading the source lines opens files: each one
    hands the GIL over, see :func:`records`)."""
    raw = []
    while frame is not None and len(raw) < limit:
        code = frame.f_code
        raw.append((code.co_filename, frame.f_lineno, getattr(code, "co_qualname", code.co_name)))
        frame = frame.f_back
    raw.reverse()
    return raw


def records(locations: Iterable[tuple[str, int | None, str]]) -> list[dict[str, Any]]:
    """Stack entries of ``locations``, with their source lines."""
    return [frame_record(*item) for item in locations]


def stack_of(frame: FrameType | None, limit: int = MAX_DEPTH) -> list[dict[str, Any]]:
    """The stack ending at ``frame``, outermost first, at most ``limit`` innermost frames."""
    return records(locations_of(frame, limit))


def culprit_of(stack: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The innermost application frame of ``stack`` (outermost first), or ``None``."""
    for entry in reversed(stack):
        if is_app_file(entry["filename"]):
            return dict(entry)
    return None


def current_frames() -> dict[int, FrameType]:
    """``sys._current_frames()``, guarded against cpython#106883 (a GC-triggered deadlock in 3.11)."""
    if sys.version_info < (3, 12) and gc.isenabled():
        gc.disable()
        try:
            return sys._current_frames()
        finally:
            gc.enable()
    return sys._current_frames()


def threads_info() -> dict[int, threading.Thread]:
    return {t.ident: t for t in threading.enumerate() if t.ident is not None}


def thread_entry(ident: int, stack: list[dict[str, Any]], known: dict[int, threading.Thread]) -> dict[str, Any]:
    thread = known.get(ident)
    return {
        "name": thread.name if thread is not None else None,
        "ident": ident,
        "native_id": getattr(thread, "native_id", None) if thread is not None else None,
        "daemon": thread.daemon if thread is not None else None,
        "stack": stack,
    }


def all_thread_stacks(frames: dict[int, FrameType], walked: dict[int, list[dict[str, Any]]] | None = None
                      ) -> list[dict[str, Any]]:
    """Every thread's entry; ``walked``: stacks already read (by thread ident), used as they are."""
    known = threads_info()
    walked = walked or {}
    return [thread_entry(ident, walked[ident] if ident in walked else stack_of(frame), known)
            for ident, frame in sorted(frames.items())]


def _await_chain(coro: Any) -> list[dict[str, Any]]:
    """Frames of a coroutine and everything it is awaiting, outermost first."""
    stack = []
    seen = 0
    while coro is not None and seen < MAX_DEPTH:
        seen += 1
        frame = (getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                 or getattr(coro, "ag_frame", None))
        if frame is None:
            break
        code = frame.f_code
        stack.append(frame_record(code.co_filename, frame.f_lineno,
                                  getattr(code, "co_qualname", code.co_name)))
        coro = (getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
                or getattr(coro, "ag_await", None))
    return stack


def task_stacks(loop: asyncio.AbstractEventLoop, limit: int = MAX_TASKS) -> list[dict[str, Any]]:
    """The loop's pending tasks with their await chains (safe to call from another thread)."""
    try:
        tasks = list(asyncio.all_tasks(loop))
    except RuntimeError:  # set changed size during iteration: the loop is running, try once more
        tasks = list(asyncio.all_tasks(loop))
    result = []
    for task in tasks[:limit]:
        coro = task.get_coro()
        result.append({
            "name": task.get_name(),
            "coro": getattr(coro, "__qualname__", type(coro).__name__),
            "stack": _await_chain(coro),
        })
    result.sort(key=lambda t: t["name"])
    return result


_FH_THREAD = re.compile(r"^(?:(?:Current thread|Thread) (0x[0-9a-fA-F]+)|Stack \(most recent call first\):)")
_FH_FRAME = re.compile(r'^\s+File "(.*)", line (\d+|\?\?\?) in (.*)$')


def parse_faulthandler(text: str) -> dict[int, list[dict[str, Any]]]:
    """Per thread ident, the stacks (outermost first) in one ``faulthandler`` traceback dump."""
    threads: dict[int, list[tuple[str, int | None, str]]] = {}
    current: list[tuple[str, int | None, str]] | None = None
    for line in text.splitlines():
        head = _FH_THREAD.match(line)
        if head:  # a thread's header; a stack the thread wrote itself (all_threads=False) has no ident: 0
            current = threads.setdefault(int(head.group(1), 16) if head.group(1) else 0, [])
            continue
        frame = _FH_FRAME.match(line)
        if frame and current is not None:
            lineno = int(frame.group(2)) if frame.group(2).isdigit() else None
            current.append((frame.group(1), lineno, frame.group(3).strip()))
    return {ident: [frame_record(*f) for f in reversed(frames)] for ident, frames in threads.items()}


def split_faulthandler(text: str) -> list[str]:
    """Split a file of several faulthandler dumps (each starts with ``Timeout (...)!``)."""
    parts = re.split(r"(?m)^(?=Timeout \()", text)
    return [part for part in parts if part.strip()]


def format_stack(stack: Iterable[dict[str, Any]], indent: str = "  ") -> str:
    lines = []
    for entry in stack:
        lines.append(f'{indent}File "{entry["filename"]}", line {entry["lineno"]}, in {entry["function"]}')
        if entry.get("line"):
            lines.append(f"{indent}  {entry['line']}")
    return "\n".join(lines)
