"""Figure 5: requests/s of a small aiohttp JSON service on loopback, loaded by ``wrk`` from a separate
process, with and without loopwatch, in interleaved pairs of fresh server processes (plus the loop
iterations per request at that load, from a separate counting server).

Its server (``--worker http``) is also figure 6's, run under callgrind there (``http_callgrind``)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from .harness import (CALLGRIND_PARKED, READY_PREFIX, TARGET_HTTP_COST, BenchError, _child_env, _install,
                      _install_defaults, _loopwatch_state, _parse_result, _progress, _quantiles, _run,
                      _state_notes, _summarize_states, _worker_cmd)


def worker_http(args: argparse.Namespace) -> dict[str, Any]:
    """Figures 5 and 6: an aiohttp app answering ``GET /`` with a small JSON body, until a line on stdin.

    Prints ``READY {"port", "metrics_url"}`` once it listens on 127.0.0.1.  With loopwatch: installed at
    its defaults, the exporter on a free loopback port.  With ``--marker 1`` (figure 6, under callgrind):
    ``GET /mark`` calls ``os.getsid(0)`` to cut callgrind's count, and loopwatch's periodic parts are
    parked as in figure 2 (no exporter: nothing scrapes it)."""
    from aiohttp import web

    async def main() -> dict[str, Any]:
        agent, metrics_url = None, None
        if args.with_loopwatch and args.marker:
            agent = _install(metrics_port=0, dump_dir=args.dump_dir, **CALLGRIND_PARKED)
        elif args.with_loopwatch:
            agent = _install_defaults(args.dump_dir)
            metrics_url = agent.metrics_url
        body = {"status": "ok", "service": "bench", "items": [1, 2, 3]}

        async def handle(request: web.Request) -> web.Response:
            return web.json_response(body)

        async def mark(request: web.Request) -> web.Response:
            os.getsid(0)
            return web.json_response({"mark": True})

        iterations = [0]

        async def count(request: web.Request) -> web.Response:
            return web.json_response({"iterations": iterations[0]})

        app = web.Application()
        app.router.add_get("/", handle)
        if args.marker:
            app.router.add_get("/mark", mark)
        if args.count_iterations:  # figure 5's calibration server (never with loopwatch): counts select() calls
            selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
            original = selector.select

            def select(timeout: float | None = None) -> Any:
                iterations[0] += 1
                return original(timeout)

            selector.select = select
            app.router.add_get("/iterations", count)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(runner, sock, backlog=1024)
        await site.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def wait_for_stop() -> None:  # blocked in read(): holds no GIL, never wakes the loop
            sys.stdin.readline()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_stop, name="bench-stdin", daemon=True).start()
        print(READY_PREFIX + json.dumps({"port": sock.getsockname()[1], "metrics_url": metrics_url}), flush=True)
        await stop.wait()
        state = _loopwatch_state(agent, loop) if agent is not None else None
        await runner.cleanup()
        return {"state": state}

    return asyncio.run(main())


# -- driver -----------------------------------------------------------------------------------------

_WRK_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_WRK_REQUESTS = re.compile(r"(\d+) requests in ")
_WRK_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_BUSY_SAMPLE = re.compile(r'^\w+_event_loop_busy_seconds_total\{[^}]*loop="main"[^}]*\} (\S+)$', re.M)


def ensure_wrk() -> str:
    """The ``wrk`` executable (installed by ``make bench``'s setup step, ``tools/system-packages``)."""
    path = shutil.which("wrk")
    if path:
        return path
    raise BenchError("wrk (the HTTP load generator) is needed for this figure and is not on PATH: run "
                     "`make bench` (its setup step installs it: tools/system-packages bench), or "
                     "`apt-get install wrk`; or leave the figure out with --skip http")


class _HttpServer:
    """A figure-5 server process (``--worker http``): started, read in the background, stopped via stdin."""

    def __init__(self, with_lw: bool, dump_dir: Path, prefix: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, **params: Any) -> None:
        self.name = "with" if with_lw else "without"
        self.lines: list[str] = []
        self.ready: dict[str, Any] | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen([*prefix, *_worker_cmd("http", with_lw, dump_dir, **params)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env or _child_env())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)
            if self.ready is None and line.startswith(READY_PREFIX):
                self.ready = json.loads(line[len(READY_PREFIX):])
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        self._ready.wait(timeout)
        if self.ready is None:
            raise BenchError(f"http server {self.name}: no READY line; output:\n" + "".join(self.lines)[-3000:])
        return self.ready

    def stop(self, timeout: float = 30) -> dict[str, Any]:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"http server {self.name}: did not stop") from None
        self._reader.join(10)
        output = "".join(self.lines)
        if self.proc.returncode != 0:
            raise BenchError(f"http server {self.name}: exit status {self.proc.returncode}; output:\n{output[-3000:]}")
        return _parse_result(output, f"http server {self.name}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _wrk_cmd(wrk: str, port: int, seconds: int, connections: int) -> list[str]:
    return [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", f"http://127.0.0.1:{port}/"]


def _wrk(wrk: str, port: int, cfg: dict[str, Any], what: str) -> dict[str, Any]:
    output = _run(_wrk_cmd(wrk, port, cfg["seconds"], cfg["connections"]), what, cfg["seconds"] + 60)
    rps, requests = _WRK_RPS.search(output), _WRK_REQUESTS.search(output)
    if rps is None or requests is None:
        raise BenchError(f"{what}: cannot read wrk's output:\n{output[-2000:]}")
    errors = _WRK_SOCKET_ERRORS.search(output)
    socket_errors = sum(int(n) for n in errors.groups()) if errors else 0
    non2xx = _WRK_NON2XX.search(output)
    bad = int(non2xx.group(1)) if non2xx else 0
    if bad or socket_errors > int(requests.group(1)) // 1000:
        raise BenchError(f"{what}: {bad} non-2xx responses, {socket_errors} socket errors:\n{output[-2000:]}")
    return {"rps": float(rps.group(1)), "requests": int(requests.group(1)), "socket_errors": socket_errors}


def _scrape_busy(url: str) -> float | None:
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    found = _BUSY_SAMPLE.search(body)
    return float(found.group(1)) if found else None


def _process_cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds so far of every thread of ``pid`` (``/proc/<pid>/task/*/schedstat``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that just exited
            pass
    return total


def _slice_order(pair: int, slices: int) -> list[bool]:
    """ABBA ABBA ... (B first in odd pairs): who is loaded in each slice; True = with loopwatch."""
    first = pair % 2 == 1
    return [first if k % 4 in (0, 3) else not first for k in range(slices)]


def _http_iterations_per_request(wrk: str, cfg: dict[str, Any], dump_dir: Path) -> dict[str, Any]:
    """Loop iterations per request under this figure's wrk load, natively: a separate server without
    loopwatch that counts its selector's select() calls (kept out of the pairs: counting costs a little).
    Figure 6 multiplies it by its extra instructions per iteration."""
    server = _HttpServer(False, dump_dir, count_iterations=1)
    try:
        port = server.wait_ready(60)["port"]
        url = f"http://127.0.0.1:{port}/iterations"

        def iterations() -> int:
            return int(json.loads(urllib.request.urlopen(url, timeout=10).read())["iterations"])

        _run(_wrk_cmd(wrk, port, cfg["warmup"], cfg["connections"]), "http calibration warm-up", cfg["warmup"] + 60)
        before = iterations()
        load = _wrk(wrk, port, {**cfg, "seconds": cfg["seconds"] * 2}, "http calibration")
        after = iterations()
        server.stop()
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"http calibration: {exc!r}") from None
    finally:
        server.kill()
    return {"requests": load["requests"], "iterations": after - before,
            "iterations_per_request": (after - before) / load["requests"]}


def bench_http(cfg: dict[str, Any], dump_dir: Path) -> dict[str, Any]:
    if importlib.util.find_spec("aiohttp") is None:
        raise BenchError(f"aiohttp is not installed for {sys.executable} (it is in the dev extra: "
                         f"pip install -e '.[dev]')")
    if not Path("/proc/self/task").is_dir():
        raise BenchError("needs Linux's /proc/<pid>/task/*/schedstat for the servers' CPU time")
    wrk = ensure_wrk()
    pairs = []
    states = []
    for i in range(cfg["pairs"]):
        servers: dict[bool, _HttpServer] = {}
        try:
            for with_lw in (False, True):  # fresh processes for every pair; the idle one costs nothing
                servers[with_lw] = _HttpServer(with_lw, dump_dir)
            ports = {w: servers[w].wait_ready(60)["port"] for w in (False, True)}
            warm = [subprocess.Popen(_wrk_cmd(wrk, ports[w], cfg["warmup"], cfg["connections"]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for w in (False, True)]
            for proc in warm:  # both warm up at once: specialization, lazy imports, connection set-up
                proc.wait(timeout=cfg["warmup"] + 60)
            slices = []
            busy = 0.0
            busy_wall = 0.0
            metrics_url = servers[True].ready["metrics_url"]  # type: ignore[index]
            for k, with_lw in enumerate(_slice_order(i, cfg["slices"])):
                what = f"http pair {i + 1} slice {k + 1} {'with' if with_lw else 'without'}"
                busy0 = _scrape_busy(metrics_url) if with_lw else None  # scrapes stay outside the window
                t0 = time.monotonic()
                cpu0 = _process_cpu_ns(servers[with_lw].proc.pid)
                load = _wrk(wrk, ports[with_lw], cfg, what)
                load["server_cpu_s"] = (_process_cpu_ns(servers[with_lw].proc.pid) - cpu0) / 1e9
                if busy0 is not None:
                    busy1 = _scrape_busy(metrics_url)
                    if busy1 is not None:
                        busy += busy1 - busy0
                        busy_wall += time.monotonic() - t0
                slices.append({"with": with_lw, **load})
            results = {w: servers[w].stop() for w in (False, True)}
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"http pair {i + 1}: {exc!r}") from None
        finally:
            for server in servers.values():
                server.kill()
        states.append(results[True].get("state"))
        side = {}
        for with_lw in (False, True):
            mine = [sl for sl in slices if sl["with"] == with_lw]
            requests = sum(sl["requests"] for sl in mine)
            side[with_lw] = {"rps": statistics.fmean(sl["rps"] for sl in mine),
                             "cpu_us_per_request": sum(sl["server_cpu_s"] for sl in mine) / requests * 1e6}
        ratio = side[True]["rps"] / side[False]["rps"]
        cpu_ratio = side[True]["cpu_us_per_request"] / side[False]["cpu_us_per_request"]
        pairs.append({"slices": slices, "without_rps": side[False]["rps"], "with_rps": side[True]["rps"],
                      "ratio": ratio, "without_cpu_us_per_request": side[False]["cpu_us_per_request"],
                      "with_cpu_us_per_request": side[True]["cpu_us_per_request"], "cpu_ratio": cpu_ratio,
                      "with_utilization": busy / busy_wall if busy_wall else None})
        _progress(f"  pair {i + 1:2d}/{cfg['pairs']}: without {side[False]['rps']:8,.0f} req/s  "
                  f"with {side[True]['rps']:8,.0f} req/s  ratio {ratio:.3f}  CPU/request ratio {cpu_ratio:.3f}")
    utilizations = [p["with_utilization"] for p in pairs if p["with_utilization"] is not None]
    calibration = _http_iterations_per_request(wrk, cfg, dump_dir)
    _progress(f"  calibration: {calibration['iterations_per_request']:.2f} loop iterations per request under this load")
    return {
        "calibration": calibration,
        "workload": cfg,
        "with_state": _summarize_states(states),
        "pairs": pairs,
        "without_rps": _quantiles([p["without_rps"] for p in pairs]),
        "with_rps": _quantiles([p["with_rps"] for p in pairs]),
        "ratio": _quantiles([p["ratio"] for p in pairs]),
        "without_cpu_us_per_request": _quantiles([p["without_cpu_us_per_request"] for p in pairs]),
        "with_cpu_us_per_request": _quantiles([p["with_cpu_us_per_request"] for p in pairs]),
        "cpu_ratio": _quantiles([p["cpu_ratio"] for p in pairs]),
        "with_utilization": _quantiles(utilizations) if utilizations else None,
    }


# -- report -----------------------------------------------------------------------------------------

def _http_verdict(http: dict[str, Any]) -> str:
    """requests/s under wall-clock noise: a verdict only when the whole IQR is on one side."""
    floor = 1 - TARGET_HTTP_COST
    if http["ratio"]["q1"] >= floor:
        return "OK"
    if http["ratio"]["q3"] < floor:
        return "MISSED (whole IQR below)"
    return "inconclusive (IQR straddles it)"


def _render_http(http: Any, add: Any) -> None:
    add("5. HTTP service under load: aiohttp JSON endpoint on 127.0.0.1, wrk from a separate process (noisy)")
    if not isinstance(http, dict) or "ratio" not in http:
        add(f"   not measured: {http}")
        return
    w = http["workload"]
    add(f"   {len(http['pairs'])} pairs of fresh server processes (with: install() defaults + exporter), "
        f"{w['warmup']} s warm-up (both at once), then {w['slices']} slices of wrk -t1 -c{w['connections']} -d{w['seconds']}s alternating ABBA")
    add(f"   {'':28}{'median':>10}{'q1':>10}{'q3':>10}{'min':>10}{'max':>10}")
    for key, label, fmt in (("without_rps", "without (requests/s)", "{:10,.0f}"),
                            ("with_rps", "with    (requests/s)", "{:10,.0f}"),
                            ("ratio", "ratio with/without", "{:10.3f}"),
                            ("without_cpu_us_per_request", "without (server CPU us/req)", "{:10.1f}"),
                            ("with_cpu_us_per_request", "with    (server CPU us/req)", "{:10.1f}"),
                            ("cpu_ratio", "CPU/request ratio", "{:10.3f}")):
        q = http[key]
        add(f"   {label:28}" + "".join(fmt.format(q[k]) for k in ("median", "q1", "q3", "min", "max")))
    r = http["ratio"]
    add(f"   => median cost {100 * (1 - r['median']):+.1f}% of requests/s; IQR {100 * (1 - r['q3']):+.1f}% .. "
        f"{100 * (1 - r['q1']):+.1f}%   target <= {100 * TARGET_HTTP_COST:.0f}%: {_http_verdict(http)}")
    c = http["cpu_ratio"]
    add(f"   => server CPU per request (all its threads, schedstat): median {100 * (c['median'] - 1):+.1f}%; "
        f"IQR {100 * (c['q1'] - 1):+.1f}% .. {100 * (c['q3'] - 1):+.1f}%")
    calibration = http.get("calibration")
    if calibration:
        add(f"   loop iterations per request at this load, natively: {calibration['iterations_per_request']:.2f} "
            f"(a separate server without loopwatch counting its select() calls; used by figure 6)")
    util = http.get("with_utilization")
    if util:
        add(f"   loop utilization under load, as loopwatch reports it (rate of event_loop_busy_seconds_total): "
            f"median {util['median']:.2f} [{util['min']:.2f}..{util['max']:.2f}]")
    for note in _state_notes("with", http.get("with_state")):
        add("   " + note)
