"""Shared fixtures: free ports, subprocess apps, scraping."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import loopwatch

APPS = Path(__file__).parent / "apps"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(url: str, timeout: float = 10.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Fetch ``url`` and return {(sample name, sorted labels): value}."""
    body = urllib.request.urlopen(url, timeout=timeout).read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def collected(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Like :func:`scrape`, straight from a registry (no HTTP)."""
    out = {}
    for family in registry.collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: dict, name: str, **labels: str) -> float | None:
    """The value of the one sample named ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    if len(found) > 1:
        raise AssertionError(f"{len(found)} samples match {name} {labels}")
    return found[0] if found else None


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def marker(line: str, prefix: str) -> str | None:
    """``line`` from ``prefix`` on, when ``prefix`` starts the line or follows other text."""
    at = line.find(prefix)
    return None if at < 0 else line[at:].rstrip("\n")


class App:
    """A test app (``tests/apps/<name>.py``) running in a subprocess with the current interpreter."""

    def __init__(self, name: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, str(APPS / f"{name}.py"), *args], env=full_env, cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []

    def wait_line(self, prefix: str, timeout: float = 30.0) -> str:
        """Read output until a marker starting with ``prefix``; returns the marker line from ``prefix``
        on.  Apps write markers whole (``apps/say.py``) but a log message written in two parts by another
        thread may still sit in front of one, so the marker is searched inside each line."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            found = marker(line, prefix)
            if found is not None:
                return found
        raise AssertionError(f"no line starting with {prefix!r}; output so far:\n" + "\n".join(self.lines))

    def marker(self, prefix: str) -> str | None:
        """The first marker starting with ``prefix`` in the output read so far (see :meth:`wait_line`)."""
        for line in self.lines:
            found = marker(line, prefix)
            if found is not None:
                return found
        return None

    def finish(self, timeout: float = 60.0) -> str:
        """Read the rest of the output until the app exits (killed after ``timeout`` s); all of it.

        Not ``communicate(timeout=...)``: that reads the pipe's descriptor directly and would lose what
        ``wait_line``'s ``readline()`` already buffered."""
        assert self.proc.stdout is not None
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            out = self.proc.stdout.read()
            self.proc.wait()
        finally:
            timer.cancel()
        self.lines.extend(out.splitlines())
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


@pytest.fixture
def app_runner() -> Iterator[Callable[..., App]]:
    apps: list[App] = []

    def start(name: str, *args: str, **kwargs) -> App:
        app = App(name, *args, **kwargs)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.kill()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(autouse=True)
def _no_agent_left() -> Iterator[None]:
    yield
    loopwatch.uninstall()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LOOPWATCH_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def prometheus_tools() -> dict[str, str]:
    """``prometheus`` and ``promtool`` from Debian's package, installed by ``make test``'s setup step
    (``tools/system-packages``), never from here.  Missing, they fail the tests that need them: never a skip."""
    import shutil

    found = {name: shutil.which(name) for name in ("prometheus", "promtool")}
    assert all(found.values()), (f"prometheus/promtool not on PATH: {found}; run `make test` (its setup step "
                                 f"installs Debian's prometheus package) or `tools/system-packages test`")
    return found  # type: ignore[return-value]


@contextmanager
def prometheus_server(binary: str, tmp_path: Path, config: str, *flags: str) -> Iterator[str]:
    """A real Prometheus with ``config`` (YAML text) and ``flags``, on a free loopback port: yields its base
    URL once ready; stopped at the end.  One that exits fails the test with the end of its log."""
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(config)
    log_path = tmp_path / "prometheus.log"
    log = log_path.open("w")
    prometheus = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", *flags], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200
        except OSError:
            return prometheus.poll() is not None  # exited: fail below with its log
    try:
        wait_for(ready, timeout=60, what="prometheus to be ready")
        assert prometheus.poll() is None, log_path.read_text()[-3000:]
        yield base
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prometheus.kill()
        log.close()
