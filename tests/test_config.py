"""Option validation: exact messages naming the option, the value and what is accepted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch._config import Options, resolve


def test_defaults() -> None:
    options = resolve({}, environ={})
    assert options.namespace == "loopwatch"
    assert options.lag_thresholds == (0.5, 2.0, 10.0)
    assert options.probe_interval == 1.0
    assert options.metrics_port == 9320
    assert options.dump_keep == 20
    assert options.faulthandler is True
    assert options.accelerator is True
    assert options.dump_threshold == 0.5
    assert options.gil_probe_interval == 1.0
    assert options.executor_wait_threshold == 0.5
    assert resolve({"gil_probe_interval": "0"}, environ={}).gil_probe_interval == 0.0


def test_design_example_message() -> None:
    with pytest.raises(loopwatch.ConfigError,
                       match=r"^lag_thresholds must be increasing positive seconds, got \(2\.0, 0\.5\)$"):
        resolve({"lag_thresholds": (2.0, 0.5)}, environ={})


@pytest.mark.parametrize(("name", "value", "message"), [
    ("namespace", "bad-name", r"^namespace must be a Prometheus metric name prefix \(\[a-zA-Z_\]\[a-zA-Z0-9_\]\*\), got 'bad-name'$"),
    ("service", "", r"^service must be a non-empty string of at most 128 characters, got ''$"),
    ("metrics_port", 70000, r"^metrics_port must be an integer port in 0\.\.65535 \(0 = no built-in exporter\), got 70000$"),
    ("metrics_port", True, r"^metrics_port must be an integer port in 0\.\.65535 \(0 = no built-in exporter\), got True$"),
    ("metrics_addr", "local host", r"^metrics_addr must be a host name or IP address to bind, e\.g\. '0\.0\.0\.0' or '127\.0\.0\.1', got 'local host'$"),
    ("registry", object, r"^registry must be a prometheus_client\.CollectorRegistry, got <class 'object'>$"),
    ("probe_interval", 0, r"^probe_interval must be seconds between 0\.001 and 60, got 0$"),
    ("probe_interval", float("nan"), r"^probe_interval must be seconds between 0\.001 and 60, got nan$"),
    ("lag_thresholds", (0.5, -1), r"^lag_thresholds must be increasing positive seconds, got \(0\.5, -1\.0\)$"),
    ("lag_thresholds", (), r"^lag_thresholds must be 1 to 8 increasing positive seconds, got \(\)$"),
    ("lag_thresholds", 0.5, r"^lag_thresholds must be increasing positive seconds, got 0\.5$"),
    ("lag_thresholds", ("a",), r"^lag_thresholds must be increasing positive seconds, got \('a',\)$"),
    ("dump_dir", "", r"^dump_dir must be a directory path, got ''$"),
    ("dump_cooldown", -1, r"^dump_cooldown must be seconds between 0 and 86400, got -1$"),
    ("dump_keep", 1.5, r"^dump_keep must be an integer between 0 and 100000 \(0 = no dumps\), got 1\.5$"),
    ("faulthandler", "maybe", r"^faulthandler must be a boolean \(true/false, 1/0, yes/no, on/off\), got 'maybe'$"),
    ("accelerator", 2, r"^accelerator must be a boolean \(true/false, 1/0, yes/no, on/off\), got 2$"),
    ("gil_probe_interval", 0.001, r"^gil_probe_interval must be seconds between 0\.01 and 60, or 0 to turn the GIL probe off, got 0\.001$"),
    ("gil_probe_interval", "often", r"^gil_probe_interval must be seconds between 0\.01 and 60, or 0 to turn the GIL probe off, got 'often'$"),
    ("executor_wait_threshold", 0, r"^executor_wait_threshold must be seconds between 0\.001 and 3600, got 0$"),
])
def test_invalid_explicit_options(name: str, value: object, message: str) -> None:
    with pytest.raises(loopwatch.ConfigError, match=message):
        resolve({name: value}, environ={})


def test_config_error_is_value_error() -> None:
    assert issubclass(loopwatch.ConfigError, ValueError)


def test_environment_values_are_parsed() -> None:
    env = {"LOOPWATCH_NAMESPACE": "oraculo", "LOOPWATCH_SERVICE": "alerts", "LOOPWATCH_METRICS_PORT": "9999",
           "LOOPWATCH_LAG_THRESHOLDS": "0.5, 2, 10", "LOOPWATCH_PROBE_INTERVAL": "0.1",
           "LOOPWATCH_DUMP_DIR": "/tmp/x", "LOOPWATCH_DUMP_KEEP": "3", "LOOPWATCH_FAULTHANDLER": "off",
           "LOOPWATCH_DUMP_COOLDOWN": "5"}
    options = resolve({}, environ=env)
    assert options == Options(namespace="oraculo", service="alerts", metrics_port=9999,
                              lag_thresholds=(0.5, 2.0, 10.0), probe_interval=0.1, dump_dir=Path("/tmp/x"),
                              dump_keep=3, faulthandler=False, dump_cooldown=5.0)


def test_environment_error_names_the_variable() -> None:
    with pytest.raises(loopwatch.ConfigError, match=re.escape(
            "probe_interval (from LOOPWATCH_PROBE_INTERVAL) must be seconds between 0.001 and 60, got 'abc'")):
        resolve({}, environ={"LOOPWATCH_PROBE_INTERVAL": "abc"})
    with pytest.raises(loopwatch.ConfigError, match=re.escape(
            "lag_thresholds (from LOOPWATCH_LAG_THRESHOLDS) must be increasing positive seconds, got '2,1'")):
        resolve({}, environ={"LOOPWATCH_LAG_THRESHOLDS": "2,1"})


def test_explicit_wins_over_environment() -> None:
    options = resolve({"service": "explicit"}, environ={"LOOPWATCH_SERVICE": "from-env"})
    assert options.service == "explicit"


def test_install_refuses_bad_input_and_installs_nothing(registry: CollectorRegistry, tmp_path: Path) -> None:
    import asyncio.events

    original = asyncio.events._set_running_loop
    with pytest.raises(loopwatch.ConfigError, match="^dump_keep must be"):
        loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, dump_keep=-1)
    assert asyncio.events._set_running_loop is original
    assert list(registry.collect()) == []
    assert not list(tmp_path.iterdir())


def test_registry_clash_is_a_config_error(registry: CollectorRegistry, tmp_path: Path) -> None:
    from prometheus_client import Counter

    Counter("loopwatch_dumps", "clash", registry=registry)
    with pytest.raises(loopwatch.ConfigError, match="namespace"):
        loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)


def test_public_surface() -> None:
    assert set(loopwatch.__all__) == {"Agent", "AgentSnapshot", "ConfigError", "LoopSnapshot", "Options",
                                      "__version__", "dump", "install", "uninstall", "watch_executor",
                                      "watch_pool", "watch_queue"}
    assert re.match(r"^\d+\.\d+\.\d+", loopwatch.__version__)
