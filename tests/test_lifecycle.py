"""Lifecycle: install() at any moment (before a loop, inside one, with or without uvloop), idempotency,
a full uninstall(), loops that come and go, and configuration from the environment."""

from __future__ import annotations

import _asyncio
import asyncio
import asyncio.events
import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import prometheus_client
import pytest
import structlog
from conftest import APPS, collected, free_port, sample, wait_for

import loopwatch

# The functions asyncio uses before anything could patch them (this module is imported at collection,
# before any test installs loopwatch); they are the C accelerators.
ORIGINAL_EVENTS_SET_RUNNING_LOOP = asyncio.events._set_running_loop
ORIGINAL_ASYNCIO_SET_RUNNING_LOOP = asyncio._set_running_loop

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STALL_OPTIONS = {"lag_thresholds": (0.3,), "dump_cooldown": 0}


def loop_series(registry: prometheus_client.CollectorRegistry, loop: str, namespace: str = "loopwatch") -> list:
    """Every per-loop sample (lag gauge, delay histogram, spikes) carrying ``loop=<loop>``."""
    return [(name, labels) for (name, labels) in collected(registry)
            if name.startswith(f"{namespace}_event_loop_") and ("loop", loop) in labels]


def loopwatch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("loopwatch-") and t.is_alive()]


async def stalling_main(check=None):
    """Healthy beats, a 0.8 s blocking call, then enough healthy time for the stall to be logged."""
    await asyncio.sleep(0.3)
    time.sleep(0.8)
    await asyncio.sleep(0.5)
    return check() if check is not None else None


# -- 1. install() before any loop exists / inside a loop, stdlib and uvloop (subprocesses) ------------
BLOCK_LINE = next(i for i, text in enumerate((APPS / "life_stall.py").read_text().splitlines(), 1)
                  if "# BLOCK" in text)


@pytest.mark.parametrize("mode, loop_class", [
    ("stdlib", "asyncio.unix_events._UnixSelectorEventLoop"),
    ("uvloop_after", "uvloop.Loop"),     # install() before `import uvloop`
    ("uvloop_before", "uvloop.Loop"),    # uvloop imported before install()
    ("uvloop_inside", "uvloop.Loop"),    # install() inside uvloop.run(main())
])
def test_stall_detected_whenever_install_is_called(app_runner, tmp_path, mode, loop_class):
    dump_dir = tmp_path / "dumps"
    app = app_runner("life_stall", mode, str(dump_dir))
    out = ANSI.sub("", app.finish(timeout=60))
    assert app.proc.returncode == 0, out
    assert f"loop-class {loop_class}" in out, out  # the mode really ran on the loop it claims
    assert "snapshot main:True" in out, out
    stalls = [line for line in out.splitlines() if "loopwatch.stall" in line]
    assert len(stalls) == 1, out
    assert "loop=main" in stalls[0]
    assert f"life_stall.py:{BLOCK_LINE} in block" in stalls[0], out
    duration = float(re.search(r"duration=([0-9.]+)", stalls[0]).group(1))
    assert 0.5 <= duration < 5.0, stalls[0]
    dumps = sorted(dump_dir.glob("loopwatch-*-event_loop_lag.json"))
    assert len(dumps) == 1, (sorted(p.name for p in dump_dir.iterdir()), out)
    dump = json.loads(dumps[0].read_text())
    assert dump["reason"] == "event_loop_lag"
    assert dump["loop"] == "main"
    assert dump["source"] == "watchdog"
    assert dump["culprit"]["function"] == "block"
    assert dump["culprit"]["lineno"] == BLOCK_LINE
    assert Path(dump["culprit"]["filename"]).name == "life_stall.py"
    assert dump["stall_seconds"] >= 0.5
    # uninstall() at the end of the app removed the in-flight file
    assert not list(dump_dir.glob("loopwatch-inflight-*")), sorted(p.name for p in dump_dir.iterdir())


# -- 2. idempotency -------------------------------------------------------------------------------
def test_install_twice_returns_the_same_agent(registry, tmp_path):
    first = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    assert first.started
    assert loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path) is first
    assert loopwatch.install() is first
    # only one watchdog, one registration
    assert sorted(t.name for t in loopwatch_threads()) == ["loopwatch-gil", "loopwatch-watchdog"]
    families = [family.name for family in registry.collect()]
    assert families.count("loopwatch_errors") == 1, families
    assert len(families) == len(set(families)), families


@pytest.mark.parametrize("option, first, second", [
    ("probe_interval", 0.25, 0.5),
    ("service", "billing", "alerts"),
    ("lag_thresholds", (0.5, 2.0), (1.0, 3.0)),
])
def test_install_with_other_option_raises(registry, tmp_path, option, first, second):
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, **{option: first})
    with pytest.raises(loopwatch.ConfigError) as info:
        loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, **{option: second})
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert f"{option}={first!r}" in message, message
    assert f"{option}={second!r}" in message, message
    # the running agent is untouched
    assert loopwatch.install() is agent
    assert getattr(agent.options, option) == first
    assert agent.started


def test_install_with_other_dump_dir_or_registry_raises(registry, tmp_path):
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path / "a")
    with pytest.raises(loopwatch.ConfigError) as info:
        loopwatch.install(dump_dir=tmp_path / "b")
    message = str(info.value)
    assert "dump_dir" in message and str(tmp_path / "a") in message and str(tmp_path / "b") in message
    with pytest.raises(loopwatch.ConfigError, match="registry"):
        loopwatch.install(registry=prometheus_client.CollectorRegistry())
    assert loopwatch.install() is agent


def test_uninstall_twice_is_fine(registry, tmp_path):
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    loopwatch.uninstall()
    loopwatch.uninstall()
    assert not agent.started
    with pytest.raises(RuntimeError, match="not installed"):
        loopwatch.dump()
    again = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    assert again is not agent and again.started


# -- 3. uninstall() restores everything -------------------------------------------------------------
def test_uninstall_restores_everything_and_reinstall_works(registry, tmp_path):
    assert ORIGINAL_EVENTS_SET_RUNNING_LOOP is _asyncio._set_running_loop
    assert ORIGINAL_ASYNCIO_SET_RUNNING_LOOP is _asyncio._set_running_loop
    port = free_port()
    agent = loopwatch.install(registry=registry, metrics_port=port, metrics_addr="127.0.0.1",
                              dump_dir=tmp_path, **STALL_OPTIONS)
    # installed: the hooks, the threads, the metrics and the in-flight file are there
    assert agent.metrics_url == f"http://127.0.0.1:{port}/metrics"
    assert asyncio.events._set_running_loop is not ORIGINAL_EVENTS_SET_RUNNING_LOOP
    assert asyncio._set_running_loop is not ORIGINAL_ASYNCIO_SET_RUNNING_LOOP
    assert {t.name for t in loopwatch_threads()} == {"loopwatch-watchdog", "loopwatch-exporter", "loopwatch-gil"}
    assert b"loopwatch_" in prometheus_client.generate_latest(registry)
    assert len(list(tmp_path.glob("loopwatch-inflight-*.txt"))) == 1

    loopwatch.uninstall()

    assert asyncio.events._set_running_loop is ORIGINAL_EVENTS_SET_RUNNING_LOOP
    assert asyncio._set_running_loop is ORIGINAL_ASYNCIO_SET_RUNNING_LOOP
    assert not loopwatch_threads(), loopwatch_threads()
    assert b"loopwatch_" not in prometheus_client.generate_latest(registry)
    assert not list(tmp_path.glob("loopwatch-inflight-*")), sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError):  # the exporter's socket is closed
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    asyncio.run(asyncio.sleep(0.05))  # a loop after uninstall is not watched: nothing comes back
    assert b"loopwatch_" not in prometheus_client.generate_latest(registry)

    # install again (same registry: the first registration was really undone) and catch a real stall
    again = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, **STALL_OPTIONS)
    assert again is not agent

    def spikes():
        return sample(collected(registry), "loopwatch_event_loop_lag_spikes_total", loop="main", threshold="0.3")

    with structlog.testing.capture_logs() as logs:
        counted = asyncio.run(stalling_main(spikes))
    assert counted == 1.0
    stalls = [e for e in logs if e["event"] == "loopwatch.stall"]
    assert len(stalls) == 1, logs
    assert stalls[0]["loop"] == "main"
    assert stalls[0]["thresholds"] == [0.3]
    assert 0.5 <= stalls[0]["duration"] < 5.0
    assert "stalling_main" in stalls[0]["culprit"] and "test_lifecycle.py" in stalls[0]["culprit"]
    assert len(list(tmp_path.glob("loopwatch-*-event_loop_lag.json"))) == 1


# -- 4. a loop that is closed stays as a label at rest; the next one is "main" again and carries on ------
def test_closed_loop_series_stay_at_rest_and_the_next_loop_carries_on(registry, tmp_path):
    """No series is created and dropped as loops come and go: a closed loop's gauges read 0, its counters
    stay, and the next loop with the same label continues them (never a counter reset)."""
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, probe_interval=0.1)

    async def look():
        await asyncio.sleep(0.6)
        return [lp.label for lp in agent.snapshot().loops], loop_series(registry, "main")

    labels, series = asyncio.run(look())
    assert labels == ["main"]
    names = {name for name, _ in series}
    assert {"loopwatch_event_loop_lag_seconds", "loopwatch_event_loop_delay_seconds_count",
            "loopwatch_event_loop_lag_spikes_total", "loopwatch_event_loop_busy_seconds_total"} <= names, names

    wait_for(lambda: agent.snapshot().loops == (), timeout=3.0, what="the closed loop to be detached")
    at_rest = dict(collected(registry))
    assert {name for name, _ in loop_series(registry, "main")} == names  # the same series, still there
    assert sample(at_rest, "loopwatch_event_loop_lag_seconds", loop="main") == 0.0
    delays = sample(at_rest, "loopwatch_event_loop_delay_seconds_count", loop="main")
    busy = sample(at_rest, "loopwatch_event_loop_busy_seconds_total", loop="main")
    assert delays >= 1 and busy > 0

    labels, series = asyncio.run(look())
    assert labels == ["main"]
    assert {name for name, _ in series} == names
    again = dict(collected(registry))
    assert sample(again, "loopwatch_event_loop_delay_seconds_count", loop="main") > delays  # carried on
    assert sample(again, "loopwatch_event_loop_busy_seconds_total", loop="main") >= busy
    assert all(("loop", "main-2") not in ls for _, ls in collected(registry))


def test_loop_labels_are_capped_with_other(registry, tmp_path):
    """Loops in threads with unique names that have no digits: the first MAX_LOOP_LABELS labels keep
    their series, later ones are ``other`` -- the label set never grows past the cap."""
    from loopwatch._probe import MAX_LOOP_LABELS

    loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)

    def run_in(name: str) -> None:
        thread = threading.Thread(target=asyncio.run, args=(asyncio.sleep(0.01),), name=name)
        thread.start()
        thread.join(10)

    names = [f"loop-{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(MAX_LOOP_LABELS + 10)]
    for name in names:
        run_in(name)
    labels = {dict(ls)["loop"] for name, ls in collected(registry) if name == "loopwatch_event_loop_lag_seconds"}
    assert len(labels) == MAX_LOOP_LABELS + 1, sorted(labels)  # the first 20, and other
    assert "other" in labels and names[-1] not in labels


def test_back_to_back_runs_reuse_the_label(registry, tmp_path):
    """No wait between the runs: the closed loop is replaced at once, not labelled 'main-2'."""
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)

    async def labels():
        await asyncio.sleep(0.05)
        return [lp.label for lp in agent.snapshot().loops]

    assert asyncio.run(labels()) == ["main"]
    assert asyncio.run(labels()) == ["main"]
    assert asyncio.run(labels()) == ["main"]


# -- 9. configuration from the environment ---------------------------------------------------------
def test_env_config(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPWATCH_NAMESPACE", "oraculo")
    monkeypatch.setenv("LOOPWATCH_SERVICE", "alerts")
    monkeypatch.setenv("LOOPWATCH_LAG_THRESHOLDS", "0.5,2,10")

    async def main():
        agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
        await asyncio.sleep(0.3)
        return agent, collected(registry)

    agent, samples = asyncio.run(main())
    assert agent.options.namespace == "oraculo"
    assert agent.options.lag_thresholds == (0.5, 2.0, 10.0)
    assert samples
    assert all(name.startswith("oraculo_") for name, _ in samples), sorted(samples)
    assert all(("service", "alerts") in labels for _, labels in samples), sorted(samples)
    thresholds = {dict(labels)["threshold"] for name, labels in samples
                  if name == "oraculo_event_loop_lag_spikes_total" and ("loop", "main") in labels}
    assert thresholds == {"0.5", "2.0", "10.0"}
    assert sample(samples, "oraculo_errors_total", component="dump") == 0.0


def test_invalid_env_value_raises_and_installs_nothing(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPWATCH_PROBE_INTERVAL", "abc")
    with pytest.raises(loopwatch.ConfigError) as info:
        loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    message = str(info.value)
    assert "LOOPWATCH_PROBE_INTERVAL" in message and "'abc'" in message, message
    assert list(registry.collect()) == []
    assert not loopwatch_threads()
    assert asyncio.events._set_running_loop is ORIGINAL_EVENTS_SET_RUNNING_LOOP
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="not installed"):
        loopwatch.dump()


def test_explicit_arguments_win_over_env(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPWATCH_NAMESPACE", "oraculo")
    monkeypatch.setenv("LOOPWATCH_SERVICE", "alerts")
    monkeypatch.setenv("LOOPWATCH_PROBE_INTERVAL", "abc")  # invalid, but overridden: never read
    monkeypatch.setenv("LOOPWATCH_METRICS_PORT", str(free_port()))
    monkeypatch.setenv("LOOPWATCH_DUMP_DIR", str(tmp_path / "from_env"))
    agent = loopwatch.install(registry=registry, namespace="explicit", service="mine", probe_interval=0.1,
                              metrics_port=0, dump_dir=tmp_path / "explicit")
    assert agent.options.namespace == "explicit"
    assert agent.options.service == "mine"
    assert agent.options.probe_interval == 0.1
    assert agent.metrics_url is None
    assert agent.snapshot().dump_dir == tmp_path / "explicit"
    assert not (tmp_path / "from_env").exists()
    samples = collected(registry)
    assert samples and all(name.startswith("explicit_") for name, _ in samples), sorted(samples)
    assert all(("service", "mine") in labels for _, labels in samples)
    # env still fills in what was not given explicitly
    assert agent.options.lag_thresholds == (0.5, 2.0, 10.0)
