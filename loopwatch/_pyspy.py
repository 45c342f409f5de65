"""Native stacks in stall dumps, with py-spy (opt-in: ``native_stacks=True``, the ``[pyspy]`` extra).

The Python stack says *which line* blocked the loop; the native stack says *where in C* it is stuck:
``recv`` inside libpq for a sync PostgreSQL query, ``SSL_read`` for a ``requests.post``,
``clock_nanosleep`` for ``time.sleep``, ``sre_match`` for a regex.  After the watchdog has written a
mid-stall dump, a short-lived thread runs ``py-spy dump --native --json --pid <this process>`` and, if the
stall is still going on when py-spy returns, adds the loop thread's ``native_stack`` to the dump (the
JSON is rewritten atomically, 0600).  py-spy never reads local variables here (no ``--locals``).

py-spy pauses the process while it reads the stacks (~0.1 s; the loop is stalled anyway) and needs
permission to ptrace it: root, ``CAP_SYS_PTRACE``, or Yama's ``ptrace_scope`` at 0 -- with
``ptrace_scope`` 1 loopwatch names the py-spy process as its ptracer (``PR_SET_PTRACER``) for that one
run.  Missing or not permitted: the feature is switched off with a logged reason (``loopwatch.degraded``,
``feature=native_stacks``) and dumps carry their Python stacks as before.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _forksafe

TIMEOUT = 5.0  # seconds py-spy may take
PR_SET_PTRACER = 0x59616D61
YAMA = Path("/proc/sys/kernel/yama/ptrace_scope")
_DELAY = 0.05  # seconds py-spy waits before attaching, so that PR_SET_PTRACER is set first


def find_pyspy() -> str | None:
    """``py-spy`` next to this interpreter (a venv with the [pyspy] extra), else on ``PATH``."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def _yama_scope() -> int:
    try:
        return int(YAMA.read_text().strip())
    except (OSError, ValueError):
        return 0


def _set_ptracer(pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PTRACER, ctypes.c_ulong(pid), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def native_frames(report: list[dict[str, Any]], native_id: int) -> list[dict[str, Any]] | None:
    """The frames of thread ``native_id`` in py-spy's JSON report, outermost first (as in ``loop_stack``)."""
    for thread in report:
        if thread.get("os_thread_id") == native_id:
            frames = [{"function": f.get("name"), "filename": f.get("filename"), "lineno": f.get("line") or None}
                      for f in thread.get("frames", [])]
            return list(reversed(frames))
    return None


class NativeStacks:
    """Adds ``native_stack`` to stall dumps (see the module docstring)."""

    def __init__(self, *, binary: str | None, degrade: Callable[[str], None],
                 on_error: Callable[[BaseException], None], log: Callable[..., None]) -> None:
        self.binary = binary
        self._degrade = degrade
        self._on_error = on_error
        self._log = log
        self.enabled = binary is not None
        self._busy = _forksafe.lock()

    def enrich(self, path: Path, native_id: int, still_stalled: Callable[[], bool], *,
               update: Callable[[Path, dict[str, Any]], bool]) -> threading.Thread | None:
        """Start the capture for the dump at ``path`` (one at a time; never blocks the caller)."""
        if not self.enabled or not self._busy.acquire(blocking=False):
            return None
        thread = threading.Thread(target=self._run, args=(path, native_id, still_stalled, update),
                                  name="loopwatch-pyspy", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # pragma: no cover - interpreter shutting down
            self._busy.release()
            self._on_error(exc)
            return None
        return thread

    def _run(self, path: Path, native_id: int, still_stalled: Callable[[], bool],
             update: Callable[[Path, dict[str, Any]], bool]) -> None:
        try:
            report = self.capture()
            if report is None:
                return
            frames = native_frames(report, native_id)
            if frames is None:
                return
            if not still_stalled():  # re-check after capture: a stack of healthy code is not evidence
                self._log("info", "loopwatch.native_stack", path=str(path), added=False,
                          note="the stall ended while py-spy was reading the stacks")
                return
            if not update(path, {"native_stack": frames, "native_source": "py-spy"}):
                return  # the dump was pruned meanwhile
            innermost = frames[-1] if frames else {}
            self._log("info", "loopwatch.native_stack", path=str(path), added=True,
                      innermost=f"{innermost.get('function')} in {innermost.get('filename')}")
        except FileNotFoundError:
            pass  # the dump was pruned meanwhile
        except Exception as exc:  # noqa: BLE001 - never raise into anything
            self._on_error(exc)
        finally:
            self._busy.release()

    def capture(self) -> list[dict[str, Any]] | None:
        """py-spy's JSON report of this process, or None (and the feature off, with the reason)."""
        assert self.binary is not None
        command = [self.binary, "dump", "--native", "--json", "--pid", str(os.getpid())]
        yama = _yama_scope() == 1 and os.geteuid() != 0
        if yama:  # let this one py-spy process ptrace us: it waits until PR_SET_PTRACER is set
            command = ["/bin/sh", "-c", f"sleep {_DELAY}; exec \"$0\" \"$@\"", *command]
        try:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    close_fds=True)
        except OSError as exc:
            self._off(f"cannot run py-spy ({self.binary}): {exc}")
            return None
        if yama:
            _set_ptracer(proc.pid)
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self._on_error(TimeoutError(f"py-spy took more than {TIMEOUT} s"))
            return None
        finally:
            if yama:
                _set_ptracer(0)
        if proc.returncode != 0:
            message = (err or out).strip().splitlines()
            reason = message[-1] if message else f"exit status {proc.returncode}"
            if any(word in (err or "") for word in ("ermission", "not permitted", "EPERM", "ptrace")):
                self._off(f"py-spy is not permitted to read this process ({reason}); run as root, grant "
                          f"CAP_SYS_PTRACE, or set kernel.yama.ptrace_scope=0")
            else:
                self._on_error(RuntimeError(f"py-spy failed: {reason}"))
            return None
        try:
            report = json.loads(out)
        except ValueError as exc:
            self._on_error(exc)
            return None
        return report if isinstance(report, list) else None

    def _off(self, reason: str) -> None:
        if self.enabled:
            self.enabled = False
            self._degrade(reason)
