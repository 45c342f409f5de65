"""``loopwatch dump PID``, end to end: real app processes, the real command (console script and ``python -m``),
real signals, real py-spy.

* a process with loopwatch writes a ``requested`` dump on demand -- idle, mid-stall in ``time.sleep`` (the
  dump names the sleeping line), and while a C call holds the GIL (the loop thread's own stack names the
  regex line at once; the dump file follows when the GIL is released);
* an application handler for the signal is still called (chained); an application that handles the
  automatic choice itself keeps it (loopwatch takes another);
* a process without loopwatch gets ``py-spy dump`` instead, and the command says so; py-spy not permitted
  or missing, a pid that does not exist: a clear error and a non-zero status.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import loopwatch
from loopwatch._config import resolve
from loopwatch._remote import BEACON_PREFIX, parse_beacon

from conftest import APPS, App, wait_for

LOOPWATCH = Path(sys.executable).with_name("loopwatch")  # the console script, as an operator runs it
APP_SOURCE = (APPS / "remote_app.py").read_text().splitlines()
SLEEP_LINE = next(i for i, line in enumerate(APP_SOURCE, 1) if "# SLEEP-LINE" in line)
REGEX_LINE = next(i for i, line in enumerate(APP_SOURCE, 1) if "# REGEX-LINE" in line)


def run_dump(*args: object, timeout: float = 60.0, without_ptrace: bool = False) -> subprocess.CompletedProcess[str]:
    command = [str(LOOPWATCH), "dump", *map(str, args)]
    if without_ptrace:  # this user, without CAP_SYS_PTRACE (nor can py-spy, its child, get it back)
        command = ["setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


class RemoteApp(App):
    def __init__(self, tmp_path: Path, *options: str, env: dict[str, str] | None = None) -> None:
        self.dump_dir = tmp_path / "dumps"
        self.control = tmp_path / "control"
        self.control.mkdir()
        super().__init__("remote_app", str(self.dump_dir), str(self.control), *options,
                         env={"APP_LOGS": "logging", **(env or {})})
        ready = self.wait_line("READY ").split()
        self.pid, self.signal = int(ready[1]), ready[2]

    def order(self, name: str) -> None:
        (self.control / name).touch()

    def stop(self) -> str:
        self.order("stop")
        return self.finish(timeout=30)

    def requested(self) -> list[Path]:
        return sorted(self.dump_dir.glob(f"loopwatch-*-{self.pid}-requested*.json"))


@pytest.fixture
def apps():
    started: list[App] = []
    yield started
    for app in started:
        app.kill()  # and closes its pipe


def test_idle_process_writes_a_requested_dump_and_its_beacon_goes_with_uninstall(tmp_path, apps) -> None:
    app = RemoteApp(tmp_path)
    apps.append(app)
    assert app.signal == str(int(signal.SIGRTMAX) - 2)  # the first free one of SIGRTMAX-2..SIGRTMAX
    (beacon,) = app.dump_dir.glob(f"{BEACON_PREFIX}{app.pid}-*.txt")
    assert stat.S_IMODE(beacon.stat().st_mode) == 0o600
    header = parse_beacon(beacon.read_text())
    assert header is not None and header["pid"] == app.pid and header["signal"] == int(app.signal)
    assert header["signal_name"] == "SIGRTMAX-2" and header["dump_dir"] == str(app.dump_dir)

    out = run_dump(app.pid)
    assert out.returncode == 0, out.stderr
    assert f"pid {app.pid}: dump written by loopwatch (asked with SIGRTMAX-2)" in out.stdout
    (path,) = app.requested()
    assert str(path) in out.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    dump = json.loads(path.read_text())
    assert dump["reason"] == "requested" and dump["pid"] == app.pid and dump["source"] == "request"
    assert dump["requested_via"] == "signal"
    assert dump["stall_seconds"] < 0.3  # idle: not stalled
    assert Path(dump["culprit"]["filename"]).name == "remote_app.py"
    assert any(t["name"] == "loopwatch-watchdog" for t in dump["threads"])

    # --json, with python -m loopwatch this time
    out = subprocess.run([sys.executable, "-m", "loopwatch", "dump", "--json", str(app.pid)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] is True and result["via"] == "loopwatch" and result["signal"] == "SIGRTMAX-2"
    assert Path(result["dump"]) in app.requested() and Path(result["dump"]) != path

    output = app.stop()
    assert "UNINSTALLED" in output
    assert not list(app.dump_dir.glob(f"{BEACON_PREFIX}*")), sorted(p.name for p in app.dump_dir.iterdir())
    assert app.proc.returncode == 0


def test_mid_stall_in_sleep_the_dump_names_the_sleeping_line(tmp_path, apps) -> None:
    app = RemoteApp(tmp_path)
    apps.append(app)
    app.order("sleep-5")
    app.wait_line("SLEEP-START")
    time.sleep(0.8)
    asked = time.time()
    out = run_dump(app.pid, "--timeout", "10")
    answered = time.time()
    end = float(app.wait_line("SLEEP-END").split()[1])
    assert out.returncode == 0, out.stdout + out.stderr
    assert answered < end, "the dump was answered while the loop was still stalled"
    assert answered - asked < 3.0
    (path,) = app.requested()
    dump = json.loads(path.read_text())
    assert dump["culprit"]["function"] == "block_in_sleep" and dump["culprit"]["lineno"] == SLEEP_LINE
    assert "SLEEP-LINE" in dump["culprit"]["line"]
    assert dump["stall_seconds"] >= 0.7 and dump["kind"] == "blocked" and dump["source"] == "request"
    assert dump["timestamp"] < end
    assert f"remote_app.py:{SLEEP_LINE} in block_in_sleep" in out.stdout
    assert "stalled for" in out.stdout
    app.stop()


def test_mid_stall_holding_the_gil_the_loop_thread_names_the_line_at_once(tmp_path, apps) -> None:
    app = RemoteApp(tmp_path, env={"REGEX_SECONDS": "6"})
    apps.append(app)
    app.order("regex")
    start = float(app.wait_line("REGEX-START").split()[1])
    time.sleep(0.8)
    # A short wait: the dump file can only come once the GIL is released, but the loop thread's own stack
    # is there at once, and the command says where it is stuck and that it is waiting.
    out = run_dump(app.pid, "--timeout", "1.5")
    answered = time.time()
    end = float(app.wait_line("REGEX-END", timeout=60).split()[1])
    assert end - start > 3.0, "the regex was calibrated to hold the GIL for several seconds"
    assert answered < end, "the command answered mid-stall"
    assert out.returncode == 1, out.stdout + out.stderr  # no dump file yet: says so
    assert "its loop thread holds the GIL in a C call" in out.stdout
    assert f"remote_app.py:{REGEX_LINE} in match_order_id" in out.stdout
    assert "still holds the GIL" in out.stderr and "when it is released" in out.stderr
    # ... and the dump is written once the GIL is free, from that stack
    (path,) = wait_for(app.requested, timeout=10, what="the requested dump after the stall")
    dump = json.loads(path.read_text())
    assert dump["source"] == "faulthandler" and dump["reason"] == "requested"
    assert dump["culprit"]["function"] == "match_order_id" and dump["culprit"]["lineno"] == REGEX_LINE
    assert 0.5 <= dump["stall_seconds"] < end - start
    assert "held the GIL" in dump["note"]
    assert dump["requested_at"] < end <= dump["timestamp"] + 0.05

    # The default wait outlasts a stall of a few seconds: one command, one answer, the dump's path.
    app.order("regex")
    app.wait_line("REGEX-START")
    time.sleep(0.5)
    out = run_dump(app.pid)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "its loop thread holds the GIL" in out.stdout and "dump written by loopwatch" in out.stdout
    assert f"remote_app.py:{REGEX_LINE} in match_order_id" in out.stdout
    assert len(app.requested()) == 2
    app.stop()


def test_a_flood_of_requests_mid_stall_is_bounded(tmp_path, apps) -> None:
    # 300 requests while a C call holds the GIL: the loop thread writes at most ~10 stacks a second, and the
    # requests pending when the watchdog can run again are answered by one dump.
    app = RemoteApp(tmp_path, env={"REGEX_SECONDS": "3"})
    apps.append(app)
    (beacon,) = app.dump_dir.glob(f"{BEACON_PREFIX}{app.pid}-*.txt")
    app.order("regex")
    start = float(app.wait_line("REGEX-START").split()[1])
    time.sleep(0.3)
    sent = time.time()
    for _ in range(300):
        os.kill(app.pid, int(app.signal))
        time.sleep(0.002)
    stacks = beacon.read_text().count("Stack (most recent call first):")
    elapsed = time.time() - sent
    end = float(app.wait_line("REGEX-END", timeout=60).split()[1])
    assert time.time() < end + 5 and sent + elapsed < end, "the flood was sent during the stall"
    assert 1 <= stacks <= elapsed * 10 + 2, (stacks, elapsed)
    wait_for(app.requested, timeout=10, what="the requested dump")
    time.sleep(1.0)
    (path,) = app.requested()
    dump = json.loads(path.read_text())
    assert dump["source"] == "faulthandler" and dump["culprit"]["lineno"] == REGEX_LINE
    assert end - start > 1.0
    assert "REGEX" not in beacon.read_text().split("\n", 1)[1], "the beacon was emptied when answered"
    app.stop()


def test_the_applications_own_handler_is_chained(tmp_path, apps) -> None:
    # The app handles SIGUSR2 itself and asks loopwatch to use it too: each request runs both, once.
    app = RemoteApp(tmp_path, "dump_signal=SIGUSR2", env={"APP_SIGNAL": "SIGUSR2"})
    apps.append(app)
    assert app.signal == str(int(signal.SIGUSR2))
    out = run_dump(app.pid)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "asked with SIGUSR2" in out.stdout
    assert app.wait_line("APP-HANDLER") == "APP-HANDLER 1"
    out = run_dump(app.pid)
    assert out.returncode == 0
    assert app.wait_line("APP-HANDLER") == "APP-HANDLER 2"
    assert len(app.requested()) == 2
    assert "APP-HANDLER 3" not in app.stop()


def test_a_signal_the_application_handles_is_not_taken(tmp_path, apps) -> None:
    # The app handles SIGRTMAX-2 (the first automatic choice): loopwatch takes SIGRTMAX-1, and leaves the
    # app's signal to the app.
    app = RemoteApp(tmp_path, env={"APP_SIGNAL": "SIGRTMAX-2"})
    apps.append(app)
    assert app.signal == str(int(signal.SIGRTMAX) - 1)
    out = run_dump(app.pid)
    assert out.returncode == 0 and "asked with SIGRTMAX-1" in out.stdout, out.stdout + out.stderr
    assert len(app.requested()) == 1
    os.kill(app.pid, int(signal.SIGRTMAX) - 2)
    assert app.wait_line("APP-HANDLER") == "APP-HANDLER 1"
    output = app.stop()
    assert "APP-HANDLER 2" not in output and len(app.requested()) == 1


def test_a_handler_installed_after_loopwatch_turns_requests_off_and_says_so(tmp_path, apps) -> None:
    # The app takes loopwatch's signal for itself after install: loopwatch notices (its watchdog checks the
    # signal is still its own), its beacon stops offering the signal, and the command reads the stacks with
    # py-spy instead of sending a signal the app would take for its own.
    app = RemoteApp(tmp_path, env={"APP_SIGNAL": "SIGRTMAX-2", "APP_SIGNAL_AFTER": "1"})
    apps.append(app)
    (beacon,) = app.dump_dir.glob(f"{BEACON_PREFIX}{app.pid}-*.txt")
    header = wait_for(lambda: (h := parse_beacon(beacon.read_text())) and h["signal"] is None and h, timeout=8,
                      what="the beacon to stop offering the signal")
    assert "another handler replaced loopwatch's for SIGRTMAX-2" in header["note"]
    warning = app.wait_line("loopwatch.dump_signal_replaced")
    assert "SIGRTMAX-2" in warning
    out = run_dump(app.pid)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"loopwatch in pid {app.pid} takes no dump requests: py-spy dump"
    assert "another handler replaced" in out.stderr
    assert app.marker("APP-HANDLER") is None  # nothing was sent to it
    assert not app.requested()
    app.stop()


def test_a_forked_worker_answers_for_itself(tmp_path, apps) -> None:
    # loopwatch installed in a parent that runs no loop (a --preload master), a forked worker runs the loop:
    # each process has its own beacon and handler, and each answers for itself.
    dump_dir, control = tmp_path / "dumps", tmp_path / "control"
    control.mkdir()
    app = App("remote_fork", str(dump_dir), str(control), env={"APP_LOGS": "logging"})
    apps.append(app)
    words = app.wait_line("PARENT ").split()
    parent, child = int(words[1]), int(words[3])
    app.wait_line("CHILD-READY")
    beacons = {parse_beacon(p.read_text())["pid"] for p in dump_dir.glob(f"{BEACON_PREFIX}*.txt")}
    assert beacons == {parent, child}
    (control / "sleep-4").touch()
    app.wait_line("SLEEP-START")
    time.sleep(0.6)
    out = run_dump(child, "--timeout", "10")
    assert out.returncode == 0, out.stdout + out.stderr
    (path,) = dump_dir.glob(f"loopwatch-*-{child}-requested.json")
    dump = json.loads(path.read_text())
    assert dump["culprit"]["function"] == "block_in_sleep" and dump["stall_seconds"] >= 0.5
    out = run_dump(parent, "--timeout", "10")
    assert out.returncode == 0, out.stdout + out.stderr
    (path,) = dump_dir.glob(f"loopwatch-*-{parent}-requested.json")
    dump = json.loads(path.read_text())
    assert dump["pid"] == parent and dump["loop"] is None  # no loop in the master: its threads only
    assert any(t["name"] == "MainThread" for t in dump["threads"])
    (control / "stop").touch()
    assert "PARENT-DONE" in app.finish(timeout=30)
    assert not list(dump_dir.glob(f"{BEACON_PREFIX}*"))


def test_without_loopwatch_it_runs_pyspy_and_says_so(tmp_path, apps) -> None:
    assert shutil.which("py-spy") or Path(sys.executable).with_name("py-spy").exists(), "py-spy must be installed"
    app = App("remote_plain", env={"APP_LOGS": "none"})
    apps.append(app)
    pid = int(app.wait_line("READY ").split()[1])
    out = run_dump(pid)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"no loopwatch in pid {pid}: py-spy dump"
    assert "waiting_without_loopwatch" in out.stdout and "remote_plain.py" in out.stdout
    assert f"no loopwatch beacon for pid {pid}" in out.stderr

    out = run_dump(pid, "--json")
    result = json.loads(out.stdout)
    assert result["via"] == "py-spy" and "waiting_without_loopwatch" in result["output"]

    out = run_dump(pid, "--no-py-spy")
    assert out.returncode == 1 and "--no-py-spy: nothing done" in out.stderr
    out = run_dump(pid, "--py-spy", tmp_path / "no-such-py-spy")
    assert out.returncode == 1 and "py-spy is not at" in out.stderr


def test_pyspy_not_permitted_is_a_clear_error(tmp_path, apps) -> None:
    # The target is not dumpable (as a process that changed credentials is) and the command runs without
    # CAP_SYS_PTRACE: ptrace is refused, whatever the Yama setting.
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop CAP_SYS_PTRACE"
    app = App("remote_plain", env={"APP_LOGS": "none", "NOT_DUMPABLE": "1"})
    apps.append(app)
    pid = int(app.wait_line("READY ").split()[1])
    out = run_dump(pid, without_ptrace=True)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"py-spy is not permitted to read pid {pid} (Error: " in out.stderr, out.stderr
    assert "Permission denied" in out.stderr and "CAP_SYS_PTRACE" in out.stderr
    assert "Stack backtrace" not in out.stderr


def test_dump_signal_off_falls_back_to_pyspy_and_says_why(tmp_path, apps) -> None:
    app = RemoteApp(tmp_path, "dump_signal=off")
    apps.append(app)
    assert app.signal == "off"
    out = run_dump(app.pid)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"loopwatch in pid {app.pid} takes no dump requests: py-spy dump"
    assert "dump_signal is off" in out.stderr
    assert "Thread" in out.stdout and "remote_app.py" in out.stdout  # py-spy's dump
    assert not app.requested()
    app.stop()


def test_no_such_process_is_an_argument_error() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not psutil.pid_exists(gone.pid)
    out = run_dump(gone.pid)
    assert out.returncode == 2
    assert f"argument PID: no process with pid {gone.pid}" in out.stderr
    assert "usage: loopwatch dump" in out.stderr
    out = run_dump("abc")
    assert out.returncode == 2 and "must be a process id (a positive integer), got 'abc'" in out.stderr
    out = run_dump(os.getpid(), "--timeout", "0")
    assert out.returncode == 2 and "--timeout" in out.stderr


def test_a_stale_beacon_is_removed_and_a_planted_link_is_not_followed(tmp_path, registry) -> None:
    from loopwatch._gilheld import host_id

    gone = subprocess.Popen(["true"])
    gone.wait()
    tmp_path.chmod(0o700)
    stale = tmp_path / f"{BEACON_PREFIX}{gone.pid}-{host_id()}.txt"
    stale.write_text('# loopwatch-agent {"pid": %d, "created_ms": 1, "host": "%s"}\n' % (gone.pid, host_id()))
    target = tmp_path / "target"
    target.write_text("keep")
    own = tmp_path / f"{BEACON_PREFIX}{os.getpid()}-{host_id()}.txt"
    own.symlink_to(target)
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    try:
        assert not stale.exists()
        assert target.read_text() == "keep"
        assert not own.is_symlink() and stat.S_IMODE(own.stat().st_mode) == 0o600
        assert parse_beacon(own.read_text())["pid"] == os.getpid()
        assert agent.requests.signal is not None
        service = agent.options.service
        assert registry.get_sample_value("loopwatch_agent_up", {"service": service, "part": "dump_signal"}) == 1.0
        assert registry.get_sample_value("loopwatch_dumps_total", {"service": service, "reason": "requested"}) == 0.0
        samples = [(s.name, tuple(sorted(s.labels.items()))) for f in registry.collect() for s in f.samples]
        assert len(samples) == len(set(samples)), "no duplicate series"
    finally:
        loopwatch.uninstall()
    assert not own.exists()


@pytest.mark.parametrize(("value", "message"), [
    (9, "got 9"),
    ("SIGKILL", "got 'SIGKILL'"),
    ("SIGRTMAX+1", "got 'SIGRTMAX+1'"),
    ("sometimes", "got 'sometimes'"),
])
def test_dump_signal_is_validated(value: object, message: str) -> None:
    low, high = int(signal.SIGRTMIN), int(signal.SIGRTMAX)
    with pytest.raises(loopwatch.ConfigError) as info:
        resolve({"dump_signal": value}, environ={})
    assert str(info.value) == (
        f"dump_signal must be 'auto', 'off' (or 0), or a signal servers leave alone -- SIGUSR1, SIGUSR2 or a "
        f"real-time signal SIGRTMIN..SIGRTMAX ({low}..{high}) -- by name or number, {message}")
    with pytest.raises(loopwatch.ConfigError, match=r"^dump_signal \(from LOOPWATCH_DUMP_SIGNAL\) must be"):
        resolve({}, environ={"LOOPWATCH_DUMP_SIGNAL": "SIGTERM"})


def test_dump_signal_values() -> None:
    high = int(signal.SIGRTMAX)
    assert resolve({}, environ={}).dump_signal == "auto"
    assert resolve({}, environ={"LOOPWATCH_DUMP_SIGNAL": "off"}).dump_signal == "off"
    assert resolve({"dump_signal": 0}, environ={}).dump_signal == "off"
    assert resolve({"dump_signal": "SIGRTMAX-4"}, environ={}).dump_signal == high - 4
    assert resolve({"dump_signal": "usr2"}, environ={}).dump_signal == int(signal.SIGUSR2)
    assert resolve({"dump_signal": str(high)}, environ={}).dump_signal == high


def test_an_explicit_dump_signal_in_the_fallbacks_range_is_left_to_it(tmp_path, registry) -> None:
    wanted = int(signal.SIGRTMAX) - 3  # the GIL-held fallback's first choice
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, dump_signal=wanted)
    try:
        assert agent.requests.signal == wanted
        assert agent.fallback.stacks is not None and agent.fallback.stacks.signal != wanted
    finally:
        loopwatch.uninstall()
