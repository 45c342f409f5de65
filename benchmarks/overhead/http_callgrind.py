"""Figure 6: figure 5's service under callgrind, instructions per request on the loop thread at capacity
and at low load, with loop iterations per request (``epoll_wait`` calls): the <= 1% HTTP verdict.

The server is figure 5's (``--worker http --marker 1``); the client is a plain-socket one, here."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .harness import (MARKER, TARGET_HTTP_COST, BenchError, _callgrind_total, _check_parked_state, _child_env,
                      _parked_text, _verdict)
from .http_wrk import _HttpServer


# Two load shapes for the callgrind HTTP figure.  Under valgrind the server is ~50x slower than the
# client, so each shape's batching is fixed by the client, and the counts repeat from run to run.
HTTP_CG_SHAPES: dict[str, dict[str, Any]] = {
    "load": {"connections": 16, "pause": 0.0,
             "text": "16 keep-alive connections, 16 requests sent at once and answered before the next 16: "
                     "the loop always has requests waiting (capacity: requests/s)"},
    "sparse": {"connections": 1, "pause": 0.02,
               "text": "1 connection, 20 ms pause after each answer: every request wakes an idle loop "
                       "(CPU per request at low load; no effect on capacity)"},
}
_CG_PART = re.compile(r"^callgrind\.out\.(\d+)\.(\d+)-(\d+)$")
_EPOLL_CALLS = re.compile(r"^cfn=(?:.*:)?epoll_wait(?:\s|$)")


class _HttpConnection:
    """A keep-alive HTTP/1.1 client connection that reads whole responses (Content-Length framing)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=300)
        self.buffer = b""

    def send(self, path: str) -> None:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())

    def response(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 200"):
            raise BenchError(f"HTTP client: unexpected response {lines[0]!r}")
        length = next((int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:")),
                      None)
        if length is None:
            raise BenchError(f"HTTP client: no Content-Length in {head!r}")
        while len(self.buffer) < length:
            self._read()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return body

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise BenchError("HTTP client: the server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def _drive_http(port: int, connections: int, pause: float, warmup: int, requests: int) -> None:
    """Warm up, ``GET /mark``, ``requests`` requests in rounds of ``connections``, ``GET /mark``."""
    conns = [_HttpConnection(port) for _ in range(connections)]
    try:
        def rounds(total: int) -> None:
            done = 0
            while done < total:
                batch = conns[:min(connections, total - done)]
                for conn in batch:
                    conn.send("/")
                for conn in batch:
                    conn.response()
                done += len(batch)
                if pause:
                    time.sleep(pause)

        def mark() -> None:
            conns[0].send("/mark")
            conns[0].response()

        rounds(warmup)
        mark()
        rounds(requests)
        mark()
    finally:
        for conn in conns:
            conn.close()


def _callgrind_part(directory: Path, part: int, thread: int = 1) -> Path:
    for path in directory.iterdir():
        match = _CG_PART.match(path.name)
        if match and int(match.group(2)) == part and int(match.group(3)) == thread:
            return path
    raise BenchError(f"no callgrind part {part} of thread {thread} in {directory}: "
                     f"{sorted(p.name for p in directory.iterdir())}")


def count_epoll_waits(path: Path) -> int:
    """Calls to ``epoll_wait`` in a callgrind file written with ``--compress-strings=no``: one per loop
    iteration (each ``select()`` of the loop's selector makes exactly one)."""
    calls = 0
    expect_calls = False
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if expect_calls and line.startswith("calls="):
                calls += int(line[6:].split()[0])
                expect_calls = False
            elif line.startswith("cfn="):
                expect_calls = bool(_EPOLL_CALLS.match(line))
    return calls


def _http_callgrind_run(with_lw: bool, shape: str, cfg: dict[str, Any], dump_dir: Path, work: Path) -> dict[str, Any]:
    tag = f"http-{shape}-{'with' if with_lw else 'without'}"
    what = f"callgrind {tag}"
    out_dir = work / tag
    out_dir.mkdir()
    prefix = ("valgrind", "--tool=callgrind", "--separate-threads=yes", f"--dump-before={MARKER}",
              "--compress-strings=no", f"--callgrind-out-file={out_dir}/callgrind.out.%p")
    spec = HTTP_CG_SHAPES[shape]
    server = _HttpServer(with_lw, dump_dir, prefix=prefix, env=_child_env(PYTHONHASHSEED="0"), marker=1)
    try:
        port = server.wait_ready(600)["port"]
        _drive_http(port, spec["connections"], spec["pause"], cfg["warmup"], cfg[shape])
        result = server.stop(timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{what}: {exc!r}") from None
    finally:
        server.kill()
    _check_parked_state(result.get("state"), what, exact=False)
    part = _callgrind_part(out_dir, 2)  # between the two GET /mark
    instructions = _callgrind_total(part)
    iterations = count_epoll_waits(part)
    return {"with": with_lw, "shape": shape, "requests": cfg[shape], "instructions": instructions,
            "iterations": iterations, "per_request": instructions / cfg[shape],
            "iterations_per_request": iterations / cfg[shape]}


def bench_http_callgrind(cfg: dict[str, Any], dump_dir: Path, work: Path) -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        raise BenchError("valgrind not found on PATH (make bench installs it: tools/system-packages bench)")
    if importlib.util.find_spec("aiohttp") is None:
        raise BenchError(f"aiohttp is not installed for {sys.executable} (it is in the dev extra)")
    jobs = [(with_lw, shape) for shape in HTTP_CG_SHAPES for with_lw in (False, True)]
    # Counts do not depend on timing (see HTTP_CG_SHAPES): the with/without runs of a shape go side by side.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda job: _http_callgrind_run(job[0], job[1], cfg, dump_dir, work), jobs))
    out: dict[str, Any] = {"workload": cfg, "runs": runs}
    for shape in HTTP_CG_SHAPES:
        side = {r["with"]: r for r in runs if r["shape"] == shape}
        without, with_ = side[False], side[True]
        out[shape] = {
            "without_per_request": without["per_request"], "with_per_request": with_["per_request"],
            "extra_per_request": with_["per_request"] - without["per_request"],
            "ratio": with_["per_request"] / without["per_request"],
            "without_iterations_per_request": without["iterations_per_request"],
            "with_iterations_per_request": with_["iterations_per_request"],
        }
    return out


def _http_wrk_estimate(cg: Any, http: Any) -> dict[str, float] | None:
    """Figure 6's per-iteration cost scaled to the iteration rate figure 5's wrk load makes natively."""
    if not isinstance(cg, dict) or not isinstance(http, dict) or not http.get("calibration"):
        return None
    sparse = cg["sparse"]
    per_iteration = sparse["extra_per_request"] / sparse["with_iterations_per_request"]
    iterations = http["calibration"]["iterations_per_request"]
    return {"iterations_per_request": iterations, "extra_per_iteration": per_iteration,
            "cost": iterations * per_iteration / cg["load"]["without_per_request"]}


def _http_cg_verdict(cg: dict[str, Any], http: Any) -> bool:
    """Requests/s at capacity is instructions per request under load: <= 1% more, in the load shape and,
    when figure 5 ran, at its native iteration rate."""
    estimate = _http_wrk_estimate(cg, http)
    return cg["load"]["ratio"] - 1 <= TARGET_HTTP_COST and (estimate is None or estimate["cost"] <= TARGET_HTTP_COST)


# -- report -----------------------------------------------------------------------------------------

def _render_http_callgrind(cg: Any, add: Any, http: Any) -> None:
    add("6. HTTP service, instructions per request on the loop thread (callgrind; stable): same server, "
        "a Python client in a separate process")
    if not isinstance(cg, dict) or "load" not in cg:
        add(f"   not measured: {cg}")
        return
    w = cg["workload"]
    add(f"   with: defaults, selector wrapper on; periodic parts parked ({_parked_text()}); "
        f"{w['warmup']} warm-up requests, then counted between two GET /mark")
    add(f"   {'':10}{'requests':>9}{'without':>12}{'with':>12}{'extra':>9}{'ratio':>9}"
        f"{'loop iterations/request':>26}")
    for shape, spec in HTTP_CG_SHAPES.items():
        r = cg[shape]
        iters = f"{r['without_iterations_per_request']:.2f} / {r['with_iterations_per_request']:.2f}"
        add(f"   {shape:10}{w[shape]:>9,}{r['without_per_request']:>12,.0f}{r['with_per_request']:>12,.0f}"
            f"{r['extra_per_request']:>+9,.0f}{r['ratio']:>9.4f}{iters:>26}")
    for shape, spec in HTTP_CG_SHAPES.items():
        add(f"   {shape}: {spec['text']}")
    load = cg["load"]
    add(f"   => under load: {100 * (load['ratio'] - 1):+.2f}% instructions per request, i.e. of requests/s at "
        f"capacity")
    sparse = cg["sparse"]
    add(f"   => at low load: {sparse['extra_per_request']:+,.0f} instructions ({100 * (sparse['ratio'] - 1):+.1f}%) "
        f"per request, {sparse['with_iterations_per_request']:.1f} loop iterations each: CPU the idle loop had "
        f"to spare")
    estimate = _http_wrk_estimate(cg, http)
    if estimate is not None:
        add(f"   => at figure 5's wrk load ({estimate['iterations_per_request']:.2f} iterations/request natively, "
            f"{estimate['extra_per_iteration']:,.0f} extra instructions per iteration as at low load): "
            f"{100 * estimate['cost']:+.2f}% instructions per request")
    add(f"   target: loopwatch's defaults cost <= {100 * TARGET_HTTP_COST:.0f}% of requests/s under load "
        f"(both lines above): {_verdict(_http_cg_verdict(cg, http))}")
