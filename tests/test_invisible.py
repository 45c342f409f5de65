"""Invisible to the host: loops whose clock is virtual are left alone, nothing goes to stdout, only objects
of known classes are patched, and nothing is imported once install() has returned.

CPython's own test_asyncio, run with and without loopwatch, is ``make asyncio-suite``
(``tools/cpython_asyncio.py``); these are the same promises as unit and end-to-end tests.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import structlog
from conftest import APPS, collected, free_port, sample
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import loopwatch
from loopwatch import _log

DAY = 86400.0


class FastForwardLoop(asyncio.SelectorEventLoop):  # type: ignore[misc, valid-type]
    """A test loop whose clock jumps to the next timer whenever it would sleep (like ``looptime`` or
    aiotools' ``VirtualClock``): ``await asyncio.sleep(86400)`` takes no real time at all."""

    def __init__(self) -> None:
        super().__init__()
        self.virtual = 0.0
        self.iterations = 0

    def time(self) -> float:
        return self.virtual

    def _run_once(self) -> None:
        self.iterations += 1
        if not self._ready and self._scheduled:  # type: ignore[attr-defined]
            self.virtual = max(self.virtual, self._scheduled[0].when())  # type: ignore[attr-defined]
        super()._run_once()  # type: ignore[misc]


def sleep_through_a_day() -> tuple[float, int]:
    """Sleep through a virtual day in steps of a minute; (wall seconds, loop iterations)."""
    loop = FastForwardLoop()
    try:
        async def main() -> None:
            for _ in range(int(DAY // 60)):
                await asyncio.sleep(60)

        started = time.perf_counter()
        loop.run_until_complete(main())
        return time.perf_counter() - started, loop.iterations
    finally:
        loop.close()


def test_a_loop_whose_clock_fast_forwards_is_left_alone(registry, tmp_path: Path) -> None:
    baseline_seconds, baseline_iterations = sleep_through_a_day()
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    with capture_logs() as logs:
        seconds, iterations = sleep_through_a_day()
    assert iterations == baseline_iterations  # no timer of ours for the loop to fast-forward to
    assert seconds < 3 * baseline_seconds + 0.5, (seconds, baseline_seconds)
    assert agent.snapshot().loops == ()  # never watched: no probe, no series
    assert not [key for key in collected(registry) if ("loop", "main") in key[1]]
    (note,) = [e for e in logs if e["event"] == "loopwatch.loop_not_watched"]
    assert note["log_level"] == "debug" and note["loop_class"] == "FastForwardLoop"
    assert "its clock is not the monotonic clock: FastForwardLoop.time() reads 0.0" in note["reason"]


def test_a_loop_whose_time_is_patched_while_it_runs_is_dropped_at_its_next_beat(registry, tmp_path: Path) -> None:
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, probe_interval=0.05)

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.12)  # watched: a few beats
        assert [probe.label for probe in agent.snapshot().loops] == ["main"]
        offset = [0.0]
        real = loop.time
        with mock.patch.object(loop, "time", lambda: real() + offset[0]):  # a virtual clock, from now on
            offset[0] = 3600.0  # ... that jumps an hour ahead: our pending beat fires at once, early
            for _ in range(5):
                await asyncio.sleep(0)
            return [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]

    with capture_logs() as logs:
        scheduled = asyncio.run(main())
    assert scheduled == []  # our probe stopped re-arming: nothing of ours left in the loop's timers
    assert agent.snapshot().loops == ()
    (note,) = [e for e in logs if e["event"] == "loopwatch.loop_not_watched"]
    assert "its clock is not the monotonic clock: _UnixSelectorEventLoop.time() reads " in note["reason"]
    assert sample(collected(registry), "loopwatch_event_loop_lag_seconds", loop="main") == 0.0  # at rest


def test_real_clocks_are_watched(registry, tmp_path: Path) -> None:
    class OwnTime(asyncio.SelectorEventLoop):  # type: ignore[misc, valid-type]
        def time(self) -> float:  # its own time(), but the real clock
            return time.monotonic()

    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    for factory in (asyncio.new_event_loop, OwnTime):
        loop = factory()
        try:
            loop.run_until_complete(asyncio.sleep(0.01))
            assert [p.label for p in agent.snapshot().loops] == ["main"]
        finally:
            loop.close()


# -- nothing on stdout ------------------------------------------------------------------------------

def run_json_pipe(mode: str, dump_dir: Path, logs: str) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run([sys.executable, str(APPS / "json_pipe.py"), mode, str(dump_dir), logs],
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done


@pytest.mark.parametrize("logs", ["none", "logging", "structlog"])
def test_a_program_whose_stdout_is_data_prints_the_same_bytes_with_loopwatch(tmp_path: Path, logs: str) -> None:
    plain = run_json_pipe("plain", tmp_path / "plain", logs)
    watched = run_json_pipe("installed", tmp_path / "watched", logs)
    assert watched.stdout == plain.stdout  # byte-identical
    assert plain.stdout.count(b"\n") == 6 and b"loopwatch" not in plain.stdout
    stderr = watched.stderr.decode()
    stall = [line for line in stderr.splitlines() if "loopwatch.stall" in line]
    assert len(stall) == 1, stderr  # the warning went to stderr, through what the program set up
    assert list((tmp_path / "watched").glob("loopwatch-*-event_loop_lag.json")), "the stall was dumped"
    if logs == "none":  # Python's last-resort handler: warnings and up, the bare message
        assert stall[0].startswith("loopwatch.stall ") and "duration=" in stall[0]
        assert "loopwatch.installed" not in stderr  # info: dropped, as for any library without logging set up
    elif logs == "logging":
        assert stall[0].startswith("WARNING loopwatch loopwatch.stall ")
        assert "INFO loopwatch loopwatch.installed" in stderr
    else:  # structlog's console renderer, printing where the program told it to
        assert "[warning  ] loopwatch.stall" in stall[0]
        assert "loopwatch.installed" in stderr


def test_events_go_through_logging_until_the_app_configures_structlog(caplog) -> None:
    structlog.reset_defaults()  # as in a process that never configured structlog
    try:
        assert _log.configured_structlog() is None
        with caplog.at_level(logging.DEBUG, logger="loopwatch"):
            _log.emit("warning", "loopwatch.stall", loop="main", duration=0.7, culprit="app.py:3 in f",
                      thresholds=[0.5], note=None)
        (record,) = caplog.records
        assert record.name == "loopwatch" and record.levelno == logging.WARNING
        assert record.getMessage() == "loopwatch.stall culprit='app.py:3 in f' duration=0.7 loop=main thresholds=[0.5]"
        assert record.loopwatch == {"event": "loopwatch.stall", "loop": "main", "duration": 0.7,  # type: ignore[attr-defined]
                                    "culprit": "app.py:3 in f", "thresholds": [0.5]}
        caplog.clear()
        with capture_logs() as events:  # configures structlog: from now on, events go through it
            _log.emit("warning", "loopwatch.stall", loop="main", duration=0.7)
        assert events == [{"event": "loopwatch.stall", "loop": "main", "duration": 0.7, "log_level": "warning"}]
        assert caplog.records == []
    finally:
        structlog.reset_defaults()


def test_loopwatch_never_imports_structlog_itself() -> None:
    code = ("import sys, loopwatch; a = loopwatch.install(metrics_port=0, dump_dir=sys.argv[1]); "
            "loopwatch.uninstall(); print('structlog' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent / ".no-dumps")],
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout == "False\n", done.stderr


# -- patch only what loopwatch recognises ---------------------------------------------------------

def test_loops_whose_methods_are_their_own_or_replaced_are_not_chained(registry, tmp_path: Path) -> None:
    class OwnHandler(asyncio.SelectorEventLoop):  # type: ignore[misc, valid-type]
        def call_exception_handler(self, context):  # noqa: ANN001, ANN201
            return super().call_exception_handler(context)

    loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    own = OwnHandler()
    replaced = asyncio.new_event_loop()
    replaced.call_exception_handler = mock.Mock()  # type: ignore[method-assign]
    replaced.run_in_executor = mock.Mock()  # type: ignore[method-assign]
    try:
        with capture_logs() as logs:
            own.run_until_complete(asyncio.sleep(0))
            replaced.run_until_complete(asyncio.sleep(0))
        assert "call_exception_handler" not in vars(own) and "run_in_executor" in vars(own)
        assert isinstance(replaced.call_exception_handler, mock.Mock)  # theirs, untouched
        assert isinstance(replaced.run_in_executor, mock.Mock)
        replaced.call_exception_handler({"message": "x"})
        replaced.call_exception_handler.assert_called_once_with({"message": "x"})
        notes = [e["reason"] for e in logs if e["event"] == "loopwatch.not_patched"]
        assert any("OwnHandler.call_exception_handler is its own" in n for n in notes), notes
        assert any("call_exception_handler was already replaced on the instance" in n for n in notes), notes
        assert any("run_in_executor was already replaced on the instance" in n for n in notes), notes
        assert all(e["log_level"] == "debug" for e in logs if e["event"] == "loopwatch.not_patched")
    finally:
        own.close()
        replaced.close()


# -- nothing imported after install() returns -------------------------------------------------------

def test_nothing_is_imported_by_loopwatch_after_install_returns(app_runner, tmp_path: Path) -> None:
    app = app_runner("no_lazy_imports", str(tmp_path), str(free_port()))
    out = app.finish(timeout=90)
    assert "DONE" in out, out
    assert [line for line in out.splitlines() if line.startswith("IMPORT ")] == [], out
    assert list(tmp_path.glob("loopwatch-*-event_loop_lag.json")), out  # the scenario did stall and dump


def test_the_c_accelerator_is_built_here_and_the_pure_python_twin_is_selectable(registry, tmp_path: Path) -> None:
    """The README's setup builds loopwatch/_accel.c; tests run both paths (LOOPWATCH_ACCELERATOR=0 for the twin)."""
    from loopwatch import _iteration

    assert _iteration.ACCELERATED, "loopwatch._accel was not built: the setup step must compile it"
    for accelerator, clock_type in ((True, "PollClock"), (False, "PySelectClock")):
        agent = loopwatch.install(registry=CollectorRegistry(), metrics_port=0, dump_dir=tmp_path,
                                  accelerator=accelerator)

        async def main() -> str:
            selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
            return type(selector._selector).__name__ if accelerator else selector.select.__qualname__

        assert clock_type in asyncio.run(main())
        assert agent.accelerated is accelerator
        loopwatch.uninstall()
