"""The README's server recipes, run for real: FastAPI under uvicorn, aiohttp, gunicorn with two uvicorn
workers (loopwatch installed in each worker's lifespan, or in the master with ``--preload``).

Each test starts the example app from ``examples/servers/`` in a subprocess, sends a request whose handler
blocks the loop (``time.sleep``), scrapes ``/metrics`` over HTTP -- during the stall and after it -- and
checks that the right worker's loop was measured: its own port from the ``metrics_port`` range, its lag,
its spikes, its dump.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from conftest import free_port, sample, scrape, wait_for
from procs import SERVERS, Proc, dumps_of, fields, port_range, python

NS = "loopwatch"
STALL = 2.0  # seconds the /block handler sleeps on the loop
THRESHOLD = "1.0"  # the first lag threshold: well under STALL, well over what a busy machine adds


def env_for(tmp_path: Path, ports: tuple[int, int]) -> dict[str, str]:
    return {"LOOPWATCH_METRICS_PORT": f"{ports[0]}-{ports[1]}", "LOOPWATCH_METRICS_ADDR": "127.0.0.1",
            "LOOPWATCH_DUMP_DIR": str(tmp_path / "dumps"), "LOOPWATCH_LAG_THRESHOLDS": f"{THRESHOLD},10,30",
            "LOOPWATCH_DUMP_COOLDOWN": "0", "LOOPWATCH_PROBE_INTERVAL": "0.1"}


def get_json(url: str, timeout: float = 30.0) -> Any:
    return json.loads(urllib.request.urlopen(url, timeout=timeout).read())


def wait_http(url: str, server: Proc, timeout: float = 30.0) -> Any:
    def answer() -> Any:
        assert server.proc.poll() is None, server.output
        try:
            return get_json(url, timeout=5)
        except OSError:
            return None
    return wait_for(answer, timeout=timeout, interval=0.1, what=f"{url} to answer")


def port_of(url: str) -> int:
    match = re.match(r"http://127\.0\.0\.1:(\d+)/metrics$", url)
    assert match, url
    return int(match.group(1))


def spikes(samples: dict, threshold: str, loop: str = "main") -> float | None:
    return sample(samples, f"{NS}_event_loop_lag_spikes_total", loop=loop, threshold=threshold)


def loops_of(samples: dict) -> set[str]:
    return {dict(labels)["loop"] for name, labels in samples if name == f"{NS}_event_loop_lag_seconds"}


def block_and_watch(app_url: str, *metrics_urls: str) -> tuple[dict[str, Any], dict[str, float]]:
    """GET /block (the handler sleeps STALL s on the loop) while scraping ``metrics_urls``; returns the
    handler's answer and, per URL, the largest lag a scrape saw while the request was in flight."""
    answer: dict[str, Any] = {}

    def request() -> None:
        answer.update(get_json(f"{app_url}/block?seconds={STALL}"))

    thread = threading.Thread(target=request)
    thread.start()
    seen = dict.fromkeys(metrics_urls, 0.0)
    while thread.is_alive():
        for url in metrics_urls:
            value = sample(scrape(url), f"{NS}_event_loop_lag_seconds", loop="main")
            seen[url] = max(seen[url], value or 0.0)
        time.sleep(0.1)
    thread.join()
    return answer, seen


def check_stall(metrics_url: str, dump_dir: Path, pid: int, seen: float, app_file: str) -> None:
    """The worker ``pid`` behind ``metrics_url`` saw one stall, live, and dumped the blocking line."""
    assert seen >= 1.0, f"the lag gauge must grow while the loop is stalled; saw at most {seen}"
    wait_for(lambda: spikes(scrape(metrics_url), THRESHOLD) == 1, timeout=10, what="the spike")
    samples = scrape(metrics_url)
    assert spikes(samples, "10.0") == 0
    assert sample(samples, f"{NS}_dumps_total", reason="event_loop_lag") == 1
    (dump,) = dumps_of(dump_dir, pid)
    assert dump["pid"] == pid and dump["loop"] == "main" and dump["source"] == "watchdog"
    assert dump["culprit"]["function"] == "block", dump["culprit"]
    assert Path(dump["culprit"]["filename"]).name == app_file


def test_fastapi_under_uvicorn(tmp_path: Path) -> None:
    ports, port = port_range(3), free_port()
    args = python("-m", "uvicorn", "fastapi_app:app", "--app-dir", str(SERVERS), "--host", "127.0.0.1",
                  "--port", str(port))
    with Proc(args, env=env_for(tmp_path, ports)) as server:
        app_url = f"http://127.0.0.1:{port}"
        info = wait_http(f"{app_url}/", server)
        assert info["pid"] == server.proc.pid
        assert port_of(info["metrics_url"]) == ports[0]
        assert info["loops"] == ["main"], "installed in the lifespan: the server's loop is watched"
        assert spikes(scrape(info["metrics_url"]), THRESHOLD) == 0

        answer, seen = block_and_watch(app_url, info["metrics_url"])
        assert answer["pid"] == server.proc.pid
        check_stall(info["metrics_url"], tmp_path / "dumps", server.proc.pid, seen[info["metrics_url"]],
                    "fastapi_app.py")

        # uvicorn shuts down gracefully, then re-raises the signal it caught (recent versions).
        assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM), server.output
        assert server.matching("Application shutdown complete"), server.output
        assert server.matching("loopwatch.uninstalled"), "the lifespan's shutdown uninstalls"


def test_aiohttp_on_startup(tmp_path: Path) -> None:
    ports, port = port_range(3), free_port()
    with Proc(python(str(SERVERS / "aiohttp_app.py"), "--port", str(port)), env=env_for(tmp_path, ports)) as server:
        app_url = f"http://127.0.0.1:{port}"
        info = wait_http(f"{app_url}/", server)
        assert info["pid"] == server.proc.pid
        assert port_of(info["metrics_url"]) == ports[0]
        assert info["loops"] == ["main"]

        answer, seen = block_and_watch(app_url, info["metrics_url"])
        assert answer["pid"] == server.proc.pid
        check_stall(info["metrics_url"], tmp_path / "dumps", server.proc.pid, seen[info["metrics_url"]],
                    "aiohttp_app.py")

        assert server.stop(signal.SIGTERM) == 0, server.output
        assert server.matching("loopwatch.uninstalled"), "on_cleanup uninstalls"


def gunicorn(app: str, port: int, *extra: str) -> list[str]:
    return python("-m", "gunicorn", "-w", "2", "-k", "uvicorn_worker.UvicornWorker", "--chdir", str(SERVERS),
                  "-b", f"127.0.0.1:{port}", "--graceful-timeout", "10", *extra, app)


def check_workers(server: Proc, workers: dict[int, str], tmp_path: Path, port: int) -> None:
    """Two workers, each its own target; a stall in one shows on its target only."""
    assert len(workers) == 2 and server.proc.pid not in workers, workers
    assert len(set(workers.values())) == 2, workers
    for url in workers.values():
        samples = scrape(url)
        assert "main" in loops_of(samples), samples
        assert spikes(samples, THRESHOLD) == 0
    app_url = f"http://127.0.0.1:{port}"
    wait_http(f"{app_url}/", server)
    answer, seen = block_and_watch(app_url, *workers.values())  # the kernel picks the worker
    blocked = answer["pid"]
    assert answer["metrics_url"] == workers[blocked]
    check_stall(workers[blocked], tmp_path / "dumps", blocked, seen[workers[blocked]], "fastapi_app.py")
    (other,) = set(workers) - {blocked}
    assert seen[workers[other]] < 1.0, seen
    calm = scrape(workers[other])
    assert spikes(calm, THRESHOLD) == 0, "the other worker's loop was not stalled"
    assert sample(calm, f"{NS}_dumps_total", reason="event_loop_lag") == 0
    assert dumps_of(tmp_path / "dumps", other) == []


def test_gunicorn_two_uvicorn_workers_each_its_own_target(tmp_path: Path) -> None:
    ports, port = port_range(4), free_port()
    with Proc(gunicorn("fastapi_app:app", port), env=env_for(tmp_path, ports)) as server:
        installed = server.wait_lines("loopwatch.installed", count=2, timeout=40)
        workers = {int(fields(line)["pid"]): fields(line)["metrics_url"] for line in installed}
        assert {port_of(url) for url in workers.values()} <= set(range(ports[0], ports[1] + 1))
        check_workers(server, workers, tmp_path, port)
        assert server.stop(signal.SIGTERM) == 0, server.output
        assert len(server.matching("loopwatch.uninstalled")) == 2, server.output


def test_gunicorn_preload_agent_installed_in_the_master_before_fork(tmp_path: Path) -> None:
    ports, port = port_range(4), free_port()
    with Proc(gunicorn("preload_app:app", port, "--preload"), env=env_for(tmp_path, ports)) as server:
        (master_line,) = server.wait_lines("loopwatch.installed", timeout=40)
        master = fields(master_line)
        assert int(master["pid"]) == server.proc.pid
        assert port_of(master["metrics_url"]) == ports[0]
        forked = server.wait_lines("loopwatch.forked", count=2, timeout=40)
        workers = {int(fields(line)["pid"]): fields(line)["metrics_url"] for line in forked}
        assert all(fields(line)["parent_pid"] == str(server.proc.pid) for line in forked), forked
        assert {port_of(url) for url in workers.values()} <= set(range(ports[0] + 1, ports[1] + 1))
        check_workers(server, workers, tmp_path, port)
        master_samples = scrape(master["metrics_url"])
        assert "main" not in loops_of(master_samples), "the master runs no request loop"
        assert sample(master_samples, f"{NS}_dumps_total", reason="event_loop_lag") == 0
        assert server.stop(signal.SIGTERM) == 0, server.output
        assert "loopwatch.error" not in server.output, server.output
