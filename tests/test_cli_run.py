"""``loopwatch run [OPTIONS] -- COMMAND``, end to end: real commands (``python app.py``, ``uvicorn --workers 2``,
``gunicorn -k uvicorn.workers.UvicornWorker -w 2``) started by the real console script, a request whose
handler blocks the loop, every port of the ``--metrics-port`` range scraped over HTTP, and the dump the
blocked worker wrote, naming the app's line.  Also: an app that calls ``loopwatch.install()`` itself, a
``sitecustomize`` the environment already has, bad options refused before the command starts, the
command's exit status, and processes where loopwatch must not (or cannot) install.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import APPS, free_port, sample, scrape, wait_for
from procs import Proc, dumps_of, port_range

BIN = Path(sys.executable).parent
LOOPWATCH = BIN / "loopwatch"  # the console script setup.cfg declares
NS = "loopwatch"
LINE = re.compile(r"loopwatch run: pid=(\d+) service=(\S+) metrics_url=(\S+) dump_dir=(\S+)")


def env() -> dict[str, str]:
    """The venv's ``python``, ``uvicorn`` and ``gunicorn`` first on PATH, as in an activated virtualenv."""
    return {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def loopwatch_run(*args: str) -> list[str]:
    assert LOOPWATCH.is_file() and os.access(LOOPWATCH, os.X_OK), f"console script missing: {LOOPWATCH}"
    return [str(LOOPWATCH), "run", *args]


def blocking_line(app: Path) -> int:
    (lineno,) = [n for n, text in enumerate(app.read_text().splitlines(), 1) if "# BLOCKS THE LOOP" in text]
    return lineno


def get_json(url: str, timeout: float = 30.0) -> Any:
    return json.loads(urllib.request.urlopen(url, timeout=timeout).read())


def targets(ports: tuple[int, int]) -> dict[int, dict]:
    """Every port of the range that answers ``/metrics``: {port: samples}."""
    found = {}
    for port in range(ports[0], ports[1] + 1):
        try:
            found[port] = scrape(f"http://127.0.0.1:{port}/metrics", timeout=5)
        except OSError:
            continue
    return found


def installed(proc: Proc, count: int, timeout: float = 40.0) -> dict[int, str]:
    """{pid: metrics_url} from the bootstrap's ``loopwatch run: pid=...`` lines."""
    lines = proc.wait_lines("loopwatch run: pid=", "metrics_url=", count=count, timeout=timeout)
    return {int(m.group(1)): m.group(3) for m in (LINE.search(line) for line in lines) if m}


def port_of(url: str) -> int:
    match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/metrics", url)
    assert match, url
    return int(match.group(1))


def spikes(samples: dict, threshold: str) -> float | None:
    return sample(samples, f"{NS}_event_loop_lag_spikes_total", loop="main", threshold=threshold)


def lag_dumps(samples: dict) -> float | None:
    return sample(samples, f"{NS}_dumps_total", reason="event_loop_lag")


def block(app_url: str, seconds: float) -> dict[str, Any]:
    return get_json(f"{app_url}/block?seconds={seconds}")


def check_dump(dump_dir: Path, pid: int, app: Path, service: str, threshold: float) -> None:
    """The worker ``pid`` wrote one dump of the stall, mid-stall, naming the app's blocking line."""
    (dump,) = dumps_of(dump_dir, pid)
    assert dump["reason"] == "event_loop_lag" and dump["pid"] == pid and dump["service"] == service
    assert dump["source"] == "watchdog" and dump["stall_seconds"] >= threshold
    culprit = dump["culprit"]
    assert (Path(culprit["filename"]).resolve(), culprit["lineno"], culprit["function"]) == \
        (app.resolve(), blocking_line(app), "block"), culprit
    (path,) = dump_dir.glob(f"loopwatch-*-{pid}-event_loop_lag.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def check_workers(server: Proc, workers: dict[int, str], ports: tuple[int, int], app_url: str,
                  dump_dir: Path, app: Path, service: str) -> None:
    """Two workers, each the only process behind its own port of the range; the stall shows in the one
    that blocked (the kernel picks it) and nowhere else."""
    assert len(workers) == 2 and server.proc.pid not in workers, workers
    seen = targets(ports)
    assert set(seen) == {port_of(url) for url in workers.values()}, (seen.keys(), workers)
    for samples in seen.values():
        assert spikes(samples, "0.5") == 0 and lag_dumps(samples) == 0
        assert sample(samples, f"{NS}_event_loop_lag_seconds", loop="main", service=service) is not None
    answer = block(app_url, 0.8)
    blocked = answer["pid"]
    assert blocked in workers, (answer, workers)
    wait_for(lambda: spikes(scrape(workers[blocked]), "0.5") == 1, timeout=10, what="the spike")
    after = targets(ports)
    assert set(after) == set(seen)
    for port, samples in after.items():
        mine = port == port_of(workers[blocked])
        assert spikes(samples, "0.5") == (1 if mine else 0), (port, workers)
        assert spikes(samples, "5.0") == 0
        assert lag_dumps(samples) == (1 if mine else 0)
    check_dump(dump_dir, blocked, app, service, 0.5)
    (other,) = set(workers) - {blocked}
    assert dumps_of(dump_dir, other) == []


def options(ports: tuple[int, int], dump_dir: Path) -> list[str]:
    return ["--metrics-port", f"{ports[0]}-{ports[1]}", "--metrics-addr", "127.0.0.1", "--dump-dir", str(dump_dir),
            "--lag-thresholds", "0.5,5,20", "--dump-cooldown", "0", "--probe-interval", "0.2"]


# -- the three commands of the issue ---------------------------------------------------------------------

def test_python_app(tmp_path: Path) -> None:
    ports, port, dump_dir = port_range(3), free_port(), tmp_path / "dumps"
    app = APPS / "run_plain.py"
    args = loopwatch_run(*options(ports, dump_dir), "--", "python", str(app), "--port", str(port))
    with Proc(args, env=env()) as server:
        server.wait_lines(f"listening {port}")
        (pid, url), = installed(server, 1).items()
        assert pid == server.proc.pid, "the command replaced loopwatch run (exec): same pid"
        assert url == f"http://127.0.0.1:{ports[0]}/metrics"
        assert server.matching(f"service=run_plain metrics_url={url} dump_dir={dump_dir}")
        assert set(targets(ports)) == {ports[0]}, "one process, one port"
        assert get_json(f"http://127.0.0.1:{port}/")["loops"] == ["main"]

        assert block(f"http://127.0.0.1:{port}", 0.8)["pid"] == pid
        wait_for(lambda: spikes(scrape(url), "0.5") == 1, timeout=10, what="the spike")
        samples = scrape(url)
        assert spikes(samples, "5.0") == 0 and lag_dumps(samples) == 1
        check_dump(dump_dir, pid, app, "run_plain", 0.5)
        assert server.stop(signal.SIGTERM) == 0, server.output  # the app's own exit status
    assert "loopwatch.error" not in server.output and "Traceback" not in server.output, server.output


def test_uvicorn_two_workers(tmp_path: Path) -> None:
    ports, port, dump_dir = port_range(4), free_port(), tmp_path / "dumps"
    args = loopwatch_run(*options(ports, dump_dir), "--", "uvicorn", "run_asgi:app", "--app-dir", str(APPS),
                         "--workers", "2", "--host", "127.0.0.1", "--port", str(port))
    with Proc(args, env=env()) as server:
        workers = installed(server, 2)
        server.wait_lines("Application startup complete", count=2)
        check_workers(server, workers, ports, f"http://127.0.0.1:{port}", dump_dir, APPS / "run_asgi.py", "uvicorn")
        assert server.stop(signal.SIGTERM) == 0, server.output
    assert len(server.matching("loopwatch run: pid=")) == 2, "the supervisor runs no loop: not installed"
    assert "loopwatch.error" not in server.output and "Traceback" not in server.output, server.output


def test_gunicorn_two_uvicorn_workers(tmp_path: Path) -> None:
    ports, port, dump_dir = port_range(4), free_port(), tmp_path / "dumps"
    args = loopwatch_run(*options(ports, dump_dir), "--", "gunicorn", "-k", "uvicorn.workers.UvicornWorker",
                         "-w", "2", "--chdir", str(APPS), "-b", f"127.0.0.1:{port}", "--graceful-timeout", "10",
                         "--control-socket", str(tmp_path / "gunicorn.ctl"), "run_asgi:app")
    with Proc(args, env=env()) as server:
        workers = installed(server, 2)
        server.wait_lines("Application startup complete", count=2)
        check_workers(server, workers, ports, f"http://127.0.0.1:{port}", dump_dir, APPS / "run_asgi.py",
                      "gunicorn")
        # A worker gunicorn forks later (a crash, --max-requests) installs on its own loop, on a free port.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        new = {pid: url for pid, url in installed(server, 3, timeout=30).items() if pid not in workers}
        ((new_pid, new_url),) = new.items()
        samples = scrape(new_url)
        assert spikes(samples, "0.5") == 0 and port_of(new_url) in range(ports[0], ports[1] + 1)
        assert set(targets(ports)) == {port_of(u) for p, u in {**workers, **new}.items() if p != victim}
        assert server.stop(signal.SIGTERM) == 0, server.output
    # The master runs gunicorn's control socket on an asyncio loop of its own: not the service, not installed.
    assert server.proc.pid not in installed(server, 3), server.output
    assert "loopwatch.error" not in server.output and "Traceback" not in server.output, server.output


# -- an app that installs loopwatch itself ---------------------------------------------------------------

@pytest.mark.parametrize("where", ["import", "loop"])
def test_app_that_calls_install_itself(tmp_path: Path, where: str) -> None:
    """Before its loop (at import) the app's call installs and the bootstrap finds it; inside its loop,
    the app's call with its own options replaces the agent the bootstrap installed a moment before: one
    agent, the app's options (service, thresholds), loopwatch run's for the rest (port range, dump_dir)."""
    ports, port, dump_dir = port_range(3), free_port(), tmp_path / "dumps"
    app = APPS / "run_plain.py"
    args = loopwatch_run(*options(ports, dump_dir), "--service", "from-run", "--", "python", str(app),
                         "--port", str(port), "--install-at", where, "--service", "self-installed")
    with Proc(args, env=env()) as server:
        server.wait_lines(f"listening {port}")
        info = get_json(f"http://127.0.0.1:{port}/")
        assert info["service"] == "self-installed" and info["lag_thresholds"] == [0.3, 5.0, 20.0]
        assert info["metrics_url"] == f"http://127.0.0.1:{ports[0]}/metrics" and info["loops"] == ["main"]
        assert set(targets(ports)) == {ports[0]}, "one agent: the bootstrap's released its port"
        (line,) = server.matching("loopwatch run: pid=")  # the agent at the loop's start:
        assert f"service={'from-run' if where == 'loop' else 'self-installed'} " in line  # replaced / the app's

        block(f"http://127.0.0.1:{port}", 0.5)
        wait_for(lambda: sample(scrape(info["metrics_url"]), f"{NS}_event_loop_lag_spikes_total", loop="main",
                                threshold="0.3", service="self-installed") == 1, timeout=10, what="the spike")
        check_dump(dump_dir, info["pid"], app, "self-installed", 0.3)
        assert get_json(f"http://127.0.0.1:{port}/")["agent_id"] == info["agent_id"], "still the same agent"
        assert server.stop(signal.SIGTERM) == 0, server.output
    assert "Traceback" not in server.output and "ConfigError" not in server.output, server.output


# -- the environment's own sitecustomize -----------------------------------------------------------------

PROBE = ("import asyncio, json, sys\n"
         "asyncio.run(asyncio.sleep(0))\n"
         "agent = sys.modules['loopwatch']._agent if 'loopwatch' in sys.modules else None\n"
         "print(json.dumps({'installed': agent is not None, 'service': agent and agent.options.service,\n"
         "                  'bootstrap_on_path': any('_bootstrap' in p for p in sys.path)}))\n")


def run(*args: str, extra_env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env={**os.environ, **env(), **(extra_env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_an_existing_sitecustomize_still_runs_first(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "marker"
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"with open({str(marker)!r}, 'a') as f:\n"
        "    f.write(f\"{os.getpid()} loopwatch-imported={'loopwatch' in sys.modules}\\n\")\n")
    done = run(*loopwatch_run("--metrics-port", "0", "--dump-dir", str(tmp_path / "d"), "--service", "probe",
                              "--", "python", "-c", PROBE), extra_env={"PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"installed": True, "service": "probe", "bootstrap_on_path": False}
    # Twice in one pid: in loopwatch run's own interpreter (PYTHONPATH has the site directory), then in
    # the command's, which replaced it; before loopwatch was imported, each time.
    lines = marker.read_text().splitlines()
    pid = int(lines[0].split()[0])
    assert lines == [f"{pid} loopwatch-imported=False"] * 2
    assert f"loopwatch run: pid={pid} service=probe metrics_url=None dump_dir={tmp_path / 'd'}" in done.stderr


def test_a_failing_sitecustomize_is_reported_as_site_would_and_the_rest_runs(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("raise RuntimeError('broken site setup')\n")
    done = run(*loopwatch_run("--metrics-port", "0", "--dump-dir", str(tmp_path / "d"), "--", "python", "-c", PROBE),
               extra_env={"PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["installed"] is True
    assert "Error in sitecustomize; set PYTHONVERBOSE for traceback:\nRuntimeError: broken site setup\n" in done.stderr


# -- options: refused before the command starts ----------------------------------------------------------

@pytest.mark.parametrize(("args", "extra_env", "message"), [
    (["--lag-thresholds", "2,0.5"], {},
     "lag_thresholds (from --lag-thresholds) must be increasing positive seconds, got '2,0.5'"),
    (["--metrics-port", "9329-9320"], {},
     "metrics_port (from --metrics-port) must be a port range 'FIRST-LAST' with 1 <= FIRST <= LAST <= 65535, "
     "got '9329-9320'"),
    (["--disable", "gil,nope"], {},
     "disable (from --disable) must be feature names among 'threads', 'gil', 'executors', 'pools', 'tasks', "
     "'slow_callbacks' (comma-separated in a string), got 'gil,nope'"),
    (["--faulthandler", "maybe"], {},
     "faulthandler (from --faulthandler) must be a boolean (true/false, 1/0, yes/no, on/off), got 'maybe'"),
    ([], {"LOOPWATCH_PROBE_INTERVAL": "abc"},
     "probe_interval (from LOOPWATCH_PROBE_INTERVAL) must be seconds between 0.001 and 60, got 'abc'"),
    (["--metrics-keyfile", "key.pem"], {},
     "metrics_keyfile (from --metrics-keyfile) must be the path of a readable file, got 'key.pem'"),
])
def test_a_bad_option_exits_2_before_the_command_starts(tmp_path: Path, args: list[str],
                                                        extra_env: dict[str, str], message: str) -> None:
    marker = tmp_path / "started"
    done = run(*loopwatch_run(*args, "--", "python", "-c", f"open({str(marker)!r}, 'w')"), extra_env=extra_env,
               cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == f"loopwatch run: error: {message}"
    assert done.stderr.startswith("usage: loopwatch run [OPTIONS] -- COMMAND [ARGS...]")
    assert done.stdout == "" and not marker.exists()


def test_no_command_is_an_error() -> None:
    done = run(*loopwatch_run("--service", "x"))
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == \
        "loopwatch run: error: a command is required: loopwatch run [OPTIONS] -- COMMAND [ARGS...]"


# -- the command's exit status, pid and environment ------------------------------------------------------

def test_the_commands_exit_status_is_loopwatch_runs(tmp_path: Path) -> None:
    assert run(*loopwatch_run("--", "python", "-c", "import sys; sys.exit(7)")).returncode == 7
    assert run(*loopwatch_run("--", "sh", "-c", "exit 3")).returncode == 3  # not Python: unaffected
    killed = run(*loopwatch_run("--", "python", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    assert killed.returncode == -signal.SIGKILL
    missing = run(*loopwatch_run("--", "no-such-command-here"))
    assert missing.returncode == 127 and missing.stderr == "loopwatch run: no-such-command-here: command not found\n"
    # python -m loopwatch run, the same; and the command is exec'd: the pid Popen saw is the command's
    proc = subprocess.Popen([sys.executable, "-m", "loopwatch", "run", "--", "python", "-c",
                             "import os; print(os.getpid())"], env={**os.environ, **env()}, stdout=subprocess.PIPE,
                            text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and int(out) == proc.pid


def test_the_commands_environment(tmp_path: Path) -> None:
    """Flags become LOOPWATCH_* variables (relative paths made absolute), and win over the environment's;
    the bootstrap goes first on PYTHONPATH, once; the default port is a range."""
    show = ("import json, os\n"
            "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith(('LOOPWATCH_', 'PYTHONPATH'))}))")
    done = run(*loopwatch_run("--dump-dir", "dumps", "--service", "api", "--native-stacks", "-q", "--",
                              "python", "-c", show),
               extra_env={"LOOPWATCH_SERVICE": "env-service", "LOOPWATCH_NAMESPACE": "oraculo",
                          "PYTHONPATH": f"/somewhere{os.pathsep}/else"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    bootstrap = Path(__import__("loopwatch").__file__).parent / "_bootstrap"
    assert seen == {"LOOPWATCH_DUMP_DIR": str(tmp_path / "dumps"), "LOOPWATCH_SERVICE": "api",
                    "LOOPWATCH_NATIVE_STACKS": "true", "LOOPWATCH_NAMESPACE": "oraculo",
                    "LOOPWATCH_METRICS_PORT": "9320-9329", "LOOPWATCH_RUN_QUIET": "1",
                    "PYTHONPATH": os.pathsep.join([str(bootstrap), "/somewhere", "/else"])}
    nested = run(*loopwatch_run("--", str(LOOPWATCH), "run", "--", "python", "-c", show),
                 extra_env={"PYTHONPATH": ""})
    assert json.loads(nested.stdout)["PYTHONPATH"] == str(bootstrap), "a nested loopwatch run adds it once"


# -- processes where loopwatch is not installed ----------------------------------------------------------

def test_a_process_without_an_event_loop_imports_nothing_and_takes_no_port() -> None:
    first, last = port_range(2)
    script = ("import sys, asyncio\n"
              "print(sorted(m for m in sys.modules if m.startswith(('loopwatch', 'prometheus_client', 'psutil'))))")
    done = run(*loopwatch_run("--metrics-port", f"{first}-{last}", "--", "python", "-c", script))
    assert done.returncode == 0 and done.stdout == "[]\n", done
    assert "loopwatch run:" not in done.stderr


def test_install_failures_never_reach_the_host(tmp_path: Path) -> None:
    """A Python that cannot import loopwatch, and an install that fails (the app's registry already has
    loopwatch_* series): one line on stderr each, and the program runs on, with its own exit status."""
    base = getattr(sys, "_base_executable", None)
    assert base and base != sys.executable and \
        subprocess.run([base, "-c", "import loopwatch"], capture_output=True, cwd=tmp_path).returncode != 0, \
        f"{base}: expected the interpreter this venv was made from, without loopwatch"
    done = run(*loopwatch_run("--", base, "-c", "import asyncio; asyncio.run(asyncio.sleep(0)); print('ran')"),
               cwd=tmp_path)
    assert done.returncode == 0 and done.stdout == "ran\n"
    pid = int(re.search(r"loopwatch run: pid=(\d+) not installed: ", done.stderr).group(1))
    assert f"loopwatch run: pid={pid} not installed: loopwatch is not importable by this Python ({base}): " \
           f"install it there\n" in done.stderr

    clash = ("import asyncio, sys\n"
             "from prometheus_client import Gauge\n"
             "Gauge('loopwatch_event_loop_lag_seconds', 'mine')\n"
             "asyncio.run(asyncio.sleep(0))\n"
             "print('ran', sys.modules['loopwatch']._agent)\n"
             "sys.exit(5)")
    done = run(*loopwatch_run("--metrics-port", "0", "--dump-dir", str(tmp_path), "--", "python", "-c", clash))
    assert done.returncode == 5 and done.stdout == "ran None\n", done
    assert re.search(r"loopwatch run: pid=\d+ not installed: ConfigError: registry already has metrics named like "
                     r"loopwatch_\*", done.stderr), done.stderr


def test_a_loop_in_a_thread_installs(tmp_path: Path) -> None:
    """A loop that runs in a thread (a sync app with an asyncio thread) is the one that installs, and is
    watched under its thread's name."""
    script = ("import asyncio, sys, threading\n"
              "async def main():\n"
              "    await asyncio.sleep(0)\n"
              "    return [loop.label for loop in sys.modules['loopwatch']._agent.snapshot().loops]\n"
              "seen = []\n"
              "t = threading.Thread(target=lambda: seen.extend(asyncio.run(main())), name='io-loop')\n"
              "t.start(); t.join()\n"
              "print(seen)")
    done = run(*loopwatch_run("--metrics-port", "0", "--dump-dir", str(tmp_path), "-q", "--", "python", "-c", script))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "['io-loop']\n"
    assert "loopwatch run:" not in done.stderr, "--quiet"


# -- install() over the agent loopwatch run installed (in process) -----------------------------------------

@pytest.fixture
def run_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("LOOPWATCH_METRICS_PORT", "0")
    monkeypatch.setenv("LOOPWATCH_DUMP_DIR", str(tmp_path))
    monkeypatch.setenv("LOOPWATCH_SERVICE", "from-run")
    return tmp_path


def test_the_apps_first_install_with_its_own_options_replaces_the_bootstraps(run_env: Path) -> None:
    import loopwatch

    ours = loopwatch._install_for_run()
    assert ours.options.service == "from-run"
    mine = loopwatch.install(service="app", lag_thresholds=(0.3, 1.0))
    assert mine is not ours and not ours.started and mine.started
    assert (mine.options.service, mine.options.lag_thresholds, mine.options.dump_dir) == ("app", (0.3, 1.0), run_env)
    assert loopwatch.install() is mine and loopwatch._install_for_run() is mine
    with pytest.raises(loopwatch.ConfigError, match=r"^loopwatch is already installed with service='app', "
                                                    r"got service='other'; call loopwatch.uninstall\(\) before"):
        loopwatch.install(service="other")  # the app's own agent: the usual rule


def test_the_apps_first_install_without_options_claims_the_bootstraps(run_env: Path) -> None:
    import loopwatch

    ours = loopwatch._install_for_run()
    assert loopwatch.install() is ours and loopwatch.install(service="from-run") is ours
    with pytest.raises(loopwatch.ConfigError, match="already installed with service='from-run'"):
        loopwatch.install(service="other")
    assert ours.started


def test_a_bad_option_leaves_the_bootstraps_agent_running(run_env: Path) -> None:
    import loopwatch

    ours = loopwatch._install_for_run()
    with pytest.raises(loopwatch.ConfigError, match=r"^probe_interval must be seconds between 0.001 and 60, got -1$"):
        loopwatch.install(probe_interval=-1)
    assert ours.started and loopwatch._agent is ours


def test_an_app_installed_before_the_loop_is_not_replaced(run_env: Path) -> None:
    import loopwatch

    mine = loopwatch.install(service="app")
    assert loopwatch._install_for_run() is mine
    with pytest.raises(loopwatch.ConfigError, match="already installed with service='app'"):
        loopwatch.install(service="other")
