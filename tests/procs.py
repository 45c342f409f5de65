"""Helpers for the tests that run real servers and forking apps: port ranges, output readers, dumps."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "examples" / "servers"


def port_range(n: int) -> tuple[int, int]:
    """``n`` consecutive free TCP ports on 127.0.0.1 (below the kernel's ephemeral range)."""
    for _ in range(200):
        first = random.randrange(20000, 30000 - n)
        socks = []
        try:
            for port in range(first, first + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return first, first + n - 1
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError(f"no {n} consecutive free ports found")


def fields(line: str) -> dict[str, str]:
    """``key=value`` pairs of a structlog console line.  Processes sharing a pipe may write another
    line right after a message and before its newline, so a plain value stops at ``[``."""
    return dict(re.findall(r"(\w+)=('[^']*'|\[[^\]]*\]|[^\s\[]+)", line))


class Proc:
    """A subprocess whose merged output is read by a thread into ``lines`` (for servers that fork)."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(args, env=full_env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(ANSI.sub("", line.rstrip("\n")))

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self.kill()
        if isinstance(exc, AssertionError):
            exc.add_note(f"--- output of {' '.join(self.proc.args[:4])} ...:\n{self.output}")

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def matching(self, *words: str) -> list[str]:
        return [line for line in list(self.lines) if all(w in line for w in words)]

    def wait_lines(self, *words: str, count: int = 1, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.matching(*words)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                self._reader.join(5)
                found = self.matching(*words)
                if len(found) >= count:
                    return found
                break
            time.sleep(0.05)
        raise AssertionError(f"expected {count} line(s) with {words}; output:\n{self.output}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the process (its children get it from it) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            self.kill()
        self._reader.join(5)
        return code

    def kill(self) -> None:
        """Kill the whole process group (a server's workers too)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(30)
        self._reader.join(5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def dumps_of(dump_dir: Path, pid: int) -> list[dict[str, Any]]:
    """The JSON dumps written by process ``pid``, oldest first."""
    out = []
    for path in sorted(dump_dir.glob(f"loopwatch-*-{pid}-*.json")):
        out.append(json.loads(path.read_text()))
    return out
