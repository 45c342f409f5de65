"""The aiomonitor console with loopwatch's commands, driven as a user drives it: a telnet client connects to
the real console of a real app process, types each command and reads the answer -- idle, mid-stall in
``time.sleep`` (aiomonitor's own thread answers while the loop is stuck), and around a stall that holds the
GIL (no Python thread can answer until it is released).  Also: loopback only by default, aiomonitor's
``python -m aiomonitor.cli`` in a terminal, the task factory only when asked, no aiomonitor -> degraded.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

import loopwatch
from loopwatch._config import resolve

from conftest import APPS, App, wait_for
from procs import port_range

APP_SOURCE = (APPS / "console_app.py").read_text().splitlines()
SLEEP_LINE = next(i for i, line in enumerate(APP_SOURCE, 1) if "# SLEEP-LINE" in line)
REGEX_LINE = next(i for i, line in enumerate(APP_SOURCE, 1) if "# REGEX-LINE" in line)
PROMPT = "monitor >>>"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[>=()][0-9A-Za-z]?|\r")
_TELNET = re.compile(rb"\xff[\xfb-\xfe].|\xff\xfa.*?\xff\xf0|\xff[\xf0-\xfa]", re.S)
TTYPE_SEND = b"\xff\xfa\x18\x01\xff\xf0"  # IAC SB TERMINAL-TYPE SEND IAC SE
TTYPE_IS = b"\xff\xfa\x18\x00VT100\xff\xf0"
NAWS = b"\xff\xfb\x1f\xff\xfa\x1f\x00\xc8\x00\x32\xff\xf0"  # WILL NAWS; 200 columns x 50 rows
CPR_REQUEST, CPR_ANSWER = b"\x1b[6n", b"\x1b[1;1R"


class Telnet:
    """A minimal telnet client, as a terminal user's: answers the terminal-type, window-size and cursor
    questions prompt_toolkit's server asks, types a command, reads until the next prompt."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.settimeout(0.1)
        self.intro = self._read_until_prompt(20)

    def _read_until_prompt(self, timeout: float, after: str = "") -> str:
        raw = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise AssertionError(f"the console closed the connection; so far: {self.clean(raw)!r}")
            if TTYPE_SEND in chunk:
                self.sock.sendall(TTYPE_IS + NAWS)
            if CPR_REQUEST in chunk:
                self.sock.sendall(CPR_ANSWER)
            raw += chunk
            text = self.clean(raw)
            at = text.rfind(after) if after else 0
            if at >= 0 and text[at + len(after):].rstrip().endswith(PROMPT):
                return text[at + len(after):].rstrip()[: -len(PROMPT)]
        raise AssertionError(f"no prompt after {timeout} s; got: {self.clean(raw)!r}")

    @staticmethod
    def clean(raw: bytes) -> str:
        return _ANSI.sub("", _TELNET.sub(b"", raw).decode("utf-8", "replace"))

    def run(self, command: str, timeout: float = 20.0) -> str:
        self.sock.sendall(command.encode() + b"\r")
        return self._read_until_prompt(timeout, after=f"{PROMPT} {command}")

    def close(self) -> None:
        try:
            self.sock.sendall(b"exit\r")
        except OSError:
            pass
        self.sock.close()


class ConsoleApp(App):
    def __init__(self, tmp_path: Path, *options: str, env: dict[str, str] | None = None,
                 console: str | None = None) -> None:
        self.dump_dir = tmp_path / "dumps"
        self.control = tmp_path / "control"
        self.control.mkdir(parents=True)
        if console is None:
            console = str(port_range(1)[0])
        super().__init__("console_app", str(self.dump_dir), str(self.control), f"console={console}", *options,
                         env={"APP_LOGS": "logging", **(env or {})})
        ready = self.wait_line("READY ", timeout=60).split()
        self.pid = int(ready[1])
        self.port = None if ready[2] == "none" else int(ready[2])
        self.task_factory = self.wait_line("TASK-FACTORY ").split(" ", 1)[1]

    def order(self, name: str) -> None:
        (self.control / name).touch()

    def stop(self) -> str:
        self.order("stop")
        return self.finish(timeout=30)


@pytest.fixture
def apps():
    started: list[App] = []
    yield started
    for app in started:
        app.kill()


@pytest.fixture
def clients():
    opened: list[Telnet] = []
    yield opened
    for client in opened:
        client.close()


def listening(pid: int) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_every_command_answers_on_a_loopback_only_console(tmp_path, apps, clients) -> None:
    app = ConsoleApp(tmp_path)
    apps.append(app)
    assert app.port is not None
    # loopback only: the telnet console and aiomonitor's web UI, nothing else (no exporter in this app)
    sockets = listening(app.pid)
    assert ("127.0.0.1", app.port) in sockets
    assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets
    assert len(sockets) == 2, sockets
    console_line = app.marker("loopwatch.console ")
    assert console_line is not None and f"telnet=127.0.0.1:{app.port}" in console_line
    webui = re.search(r"webui=(http://127\.0\.0\.1:\d+)", console_line).group(1)
    assert urllib.request.urlopen(webui, timeout=10).status == 200
    assert app.task_factory == "None"  # aiomonitor's task factory stays off unless asked for

    client = Telnet(app.port)
    clients.append(client)
    assert "Asyncio Monitor" in client.intro

    commands = client.run("help")
    for name in ("lw-lag", "lw-stalls", "lw-dump", "lw-threads", "lw-executors", "lw-pools", "ps", "where"):
        assert re.search(rf"^\s+{name}\b", commands, re.M), commands

    lag = client.run("lw-lag")
    row = next(line for line in lag.splitlines() if line.startswith("main "))
    assert "MainThread" in row and "yes" in row and "STALLED" not in row
    assert float(row.split()[3]) < 0.3, lag
    assert f"pid {app.pid}" in lag
    assert "loopwatch-console" not in lag  # the console's own loop is not the app's: not watched

    stalls = client.run("lw-stalls")
    assert "stalls going on now: 0" in stalls and "last 0 ended stalls" in stalls

    threads = client.run("lw-threads")
    assert re.search(r"^loopwatch_threads_total\s+\d+$", threads, re.M), threads
    assert "thread_name=MainThread" in threads and "thread_name=loopwatch-watchdog" in threads
    assert "loopwatch_gil_switch_interval_seconds" in threads

    executors = client.run("lw-executors")
    assert re.search(r"^loopwatch_to_thread_executor_max_workers\s+executor=work\s+3$", executors, re.M), executors
    pools = client.run("lw-pools")
    assert re.search(r"^loopwatch_db_client_connection_max\s+pool_name=cache\s+7$", pools, re.M), pools

    dumped = client.run("lw-dump")
    path = Path(re.search(r"dump written: (\S+\.json)", dumped).group(1))
    dump = json.loads(path.read_text())
    assert dump["reason"] == "requested" and dump["requested_via"] == "console" and dump["pid"] == app.pid
    assert Path(dump["culprit"]["filename"]).name == "console_app.py"
    assert "not stalled" in dumped

    # aiomonitor's own commands work too; its Python REPL is not enabled
    assert "tasks running" in client.run("ps")
    assert "disabled" in client.run("console")

    output = app.stop()
    assert "UNINSTALLED" in output
    assert app.proc.returncode == 0
    assert not _connectable(app.port)


def _connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def test_mid_stall_the_console_shows_the_stall_and_dumps_the_blocking_line(tmp_path, apps, clients) -> None:
    app = ConsoleApp(tmp_path)
    apps.append(app)
    client = Telnet(app.port)
    clients.append(client)
    app.order("sleep-6")
    app.wait_line("SLEEP-START")
    time.sleep(1.2)

    lag = client.run("lw-lag")
    row = next(line for line in lag.splitlines() if line.startswith("main "))
    assert "STALLED" in row and float(row.split()[3]) >= 1.0, lag

    stalls = client.run("lw-stalls")
    assert "stalls going on now: 1" in stalls, stalls
    assert f"console_app.py:{SLEEP_LINE} in block_in_sleep" in stalls
    assert "kind blocked" in stalls
    stall_dump = Path(re.search(r"dump:\s+(\S+\.json)", stalls).group(1))
    assert json.loads(stall_dump.read_text())["reason"] == "event_loop_lag"

    dumped = client.run("lw-dump")
    answered = time.time()
    path = Path(re.search(r"dump written: (\S+\.json)", dumped).group(1))
    dump = json.loads(path.read_text())
    assert dump["culprit"]["function"] == "block_in_sleep" and dump["culprit"]["lineno"] == SLEEP_LINE
    assert dump["stall_seconds"] >= 1.0 and dump["kind"] == "blocked"
    assert f"console_app.py:{SLEEP_LINE} in block_in_sleep" in dumped and "stuck for" in dumped

    end = float(app.wait_line("SLEEP-END").split()[1])
    assert answered < end, "every answer came while the loop was still stalled"

    # after it: the ended stall, with its duration, kind, culprit and dump
    wait_for(lambda: "last 1 ended stalls" in client.run("lw-stalls"), timeout=5, what="the ended stall listed")
    stalls = client.run("lw-stalls")
    row = next(line for line in stalls.splitlines() if str(stall_dump) in line)
    assert " main " in row and " blocked " in row and f"console_app.py:{SLEEP_LINE} in block_in_sleep" in row
    assert float(row.split()[2]) >= 5.5
    app.stop()


def test_a_stall_that_holds_the_gil_is_answered_once_released(tmp_path, apps, clients) -> None:
    # aiomonitor runs Python in its own thread: while a C call holds the GIL nothing answers; the command
    # typed meanwhile is answered when the GIL is released, and the stall is then listed with its culprit
    # (the loop thread's own stack, written mid-stall by the GIL-held fallback).
    app = ConsoleApp(tmp_path, env={"REGEX_SECONDS": "3"})
    apps.append(app)
    client = Telnet(app.port)
    clients.append(client)
    app.order("regex")
    start = float(app.wait_line("REGEX-START").split()[1])
    time.sleep(0.5)
    lag = client.run("lw-lag")
    answered = time.time()
    end = float(app.wait_line("REGEX-END").split()[1])
    assert end - start > 1.5
    assert answered >= end - 0.05, (answered, end)
    assert "main" in lag
    stalls = wait_for(lambda: (s := client.run("lw-stalls")) and "last 1 ended stalls" in s and s, timeout=5,
                      what="the ended stall")
    assert f"console_app.py:{REGEX_LINE} in match_order_id" in stalls, stalls
    app.stop()


def test_aiomonitors_own_client_in_a_terminal(tmp_path, apps) -> None:
    app = ConsoleApp(tmp_path)
    apps.append(app)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # a 200x50 terminal
    client = subprocess.Popen([sys.executable, "-m", "aiomonitor.cli", "-p", str(app.port)], stdin=slave,
                              stdout=slave, stderr=slave, close_fds=True, env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    seen = b""

    def read_until(predicate, timeout: float) -> str:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if CPR_REQUEST in chunk:
                    os.write(master, CPR_ANSWER)
                seen += chunk
                text = _ANSI.sub("", seen.decode("utf-8", "replace"))
                if predicate(text):
                    return text
        raise AssertionError(f"not seen in {timeout} s: {_ANSI.sub('', seen.decode('utf-8', 'replace'))!r}")

    try:
        read_until(lambda text: PROMPT in text, 20)
        os.write(master, b"lw-lag\r")
        text = read_until(lambda text: f"pid {app.pid}" in text, 20)
        assert re.search(r"^main\s+MainThread\s+yes\s+\d+\.\d{3}", text, re.M), text
    finally:
        client.kill()
        client.wait()
        os.close(master)
    app.stop()


def test_task_factory_only_when_asked(tmp_path, apps, clients) -> None:
    app = ConsoleApp(tmp_path, "console_task_factory=true")
    apps.append(app)
    assert app.task_factory == "Monitor._create_task", app.task_factory
    client = Telnet(app.port)
    clients.append(client)
    assert "tasks running" in client.run("ps")
    app.stop()


def test_another_address_is_explicit_and_logged(tmp_path, apps) -> None:
    app = ConsoleApp(tmp_path, "console_addr=0.0.0.0")
    apps.append(app)
    assert ("0.0.0.0", app.port) in listening(app.pid)
    warning = app.marker("loopwatch.console_exposed")
    assert warning is not None and "addr=0.0.0.0" in warning, "\n".join(app.lines)
    app.stop()


def test_port_range_gives_each_process_its_own_console(tmp_path, apps, clients) -> None:
    first, last = port_range(2)
    one = ConsoleApp(tmp_path / "one", console=f"{first}-{last}")
    apps.append(one)
    two = ConsoleApp(tmp_path / "two", console=f"{first}-{last}")
    apps.append(two)
    assert {one.port, two.port} == {first, last}
    for app in (one, two):
        client = Telnet(app.port)
        clients.append(client)
        assert f"pid {app.pid}" in client.run("lw-lag")
    # a single port another process holds: no console in this one, a clear reason, the rest runs
    three = ConsoleApp(tmp_path / "three", console=str(first))
    apps.append(three)
    assert three.port is None
    degraded = three.marker("loopwatch.degraded")
    assert degraded is not None and "feature=console" in degraded and f"port {first}" in degraded, degraded
    assert "already in use" in degraded


def test_without_aiomonitor_the_console_is_degraded_and_the_rest_works(tmp_path, apps) -> None:
    app = ConsoleApp(tmp_path, env={"HIDE_AIOMONITOR": "1"})
    apps.append(app)
    assert app.port is None
    degraded = app.marker("loopwatch.degraded")
    assert degraded is not None and "feature=console" in degraded and "aiomonitor is not installed" in degraded
    out = subprocess.run([sys.executable, "-m", "loopwatch", "dump", str(app.pid)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "dump written by loopwatch" in out.stdout, out.stdout + out.stderr
    assert "UNINSTALLED" in app.stop()


@pytest.mark.parametrize(("name", "value", "message"), [
    ("console", 80, "console must be True, False, a port in 1024..65535 or a port range 'FIRST-LAST' (one port per "
                    "process), got 80"),
    ("console", "20101-20099", "console must be True, False, a port in 1024..65535 or a port range 'FIRST-LAST' "
                               "(one port per process), got '20101-20099'"),
    ("console_addr", "localhost", "console_addr must be an IPv4 address to bind (aiomonitor's telnet server is "
                                  "IPv4 only), e.g. '127.0.0.1', got 'localhost'"),
    ("console_task_factory", "maybe", "console_task_factory must be a boolean (true/false, 1/0, yes/no, on/off), "
                                      "got 'maybe'"),
])
def test_console_options_are_validated(name: str, value: object, message: str) -> None:
    explicit = {name: value} if name == "console" else {"console": True, name: value}
    with pytest.raises(loopwatch.ConfigError) as info:
        resolve(explicit, environ={})
    assert str(info.value) == message


def test_console_option_values() -> None:
    assert resolve({}, environ={}).console == 0  # off by default
    assert resolve({"console": True}, environ={}).console == 20101  # aiomonitor's own port
    assert resolve({}, environ={"LOOPWATCH_CONSOLE": "on"}).console == 20101
    assert resolve({}, environ={"LOOPWATCH_CONSOLE": "20200"}).console == 20200
    assert resolve({"console": "20200-20203"}, environ={}).console_ports == range(20200, 20204)
    assert resolve({"console": False}, environ={}).console_ports == range(0)
    options = resolve({"console": True}, environ={})
    assert options.console_addr == "127.0.0.1" and options.console_task_factory is False
    with pytest.raises(loopwatch.ConfigError, match=r"^console_addr='0\.0\.0\.0' is set but console is off"):
        resolve({"console_addr": "0.0.0.0"}, environ={})
    with pytest.raises(loopwatch.ConfigError, match=r"^console_task_factory=True is set but console is off"):
        resolve({}, environ={"LOOPWATCH_CONSOLE_TASK_FACTORY": "1"})


def test_console_off_costs_no_import_and_no_thread(tmp_path, registry) -> None:
    before = "aiomonitor" in sys.modules
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    try:
        assert agent.console is None
        assert ("aiomonitor" in sys.modules) == before
        import threading

        assert not [t for t in threading.enumerate() if "console" in t.name]
    finally:
        loopwatch.uninstall()


def test_the_next_loop_gets_the_console_on_the_same_port(tmp_path, apps, clients) -> None:
    # asyncio.run() twice (a CLI that runs several loops): the first loop's console closes with it and lets
    # its port go, and the next loop's console takes the same port.
    port = port_range(1)[0]
    app = App("console_reruns", str(tmp_path / "dumps"), str(port), env={"APP_LOGS": "logging"})
    apps.append(app)
    for n in (1, 2):
        assert app.wait_line(f"CONSOLE {n} ", timeout=60) == f"CONSOLE {n} {port} None"
        client = Telnet(port)
        clients.append(client)
        assert re.search(r"^main\s+MainThread\s+yes\s", client.run("lw-lag"), re.M)
        (tmp_path / f"next-{n}").touch()
    assert "DONE" in app.finish(timeout=30)
    assert not _connectable(port)
