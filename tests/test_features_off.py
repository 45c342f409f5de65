"""``disable`` switches features off (issue: "features can be switched off"): a feature named there exports
no series, patches nothing and runs nothing, and every other feature keeps working.  Real loops, a real
registry, real executors and a real Redis pool."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch._config import FEATURES, resolve

FAMILIES = {  # a family each feature exports (without the namespace), checked on the scrape
    "threads": "thread_cpu_seconds",
    "gil": "gil_enabled",
    "executors": "to_thread_executor_queue_wait_seconds",
    "pools": "db_client_connection_max",
    "tasks": "tasks",
    "slow_callbacks": "slow_callbacks",
}


def scrape_names(registry: CollectorRegistry) -> set[str]:
    return {family.name for family in registry.collect()}


def run_app(tmp_path: Path, **options: object) -> tuple[set[str], dict[str, object]]:
    """Install, run a loop that uses every feature, scrape; returns the family names and what was seen."""
    registry = CollectorRegistry()
    seen: dict[str, object] = {}

    async def main() -> None:
        agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, namespace="lwoff",
                                  slow_callback_threshold=0.05, **options)
        loop = asyncio.get_running_loop()
        seen["run_in_executor_patched"] = "run_in_executor" in vars(loop)
        seen["exception_handler_patched"] = "call_exception_handler" in vars(loop)
        pool = redis.ConnectionPool(host="127.0.0.1", port=6379)
        seen["pool_returned"] = loopwatch.watch_pool(pool, "cache") is pool
        executor = concurrent.futures.ThreadPoolExecutor(2)
        seen["executor_returned"] = loopwatch.watch_executor(executor, "work") is executor
        queue: asyncio.Queue[int] = asyncio.Queue()
        seen["queue_returned"] = loopwatch.watch_queue(queue, "jobs") is queue
        await asyncio.to_thread(time.sleep, 0.01)
        await loop.run_in_executor(executor, time.sleep, 0.01)
        for _ in range(3):  # slow callbacks that come back (exact timing switches on in auto mode)
            time.sleep(0.08)
            await asyncio.sleep(0)
        seen["handle_run_wrapped"] = asyncio.events.Handle._run is not ORIGINAL_HANDLE_RUN
        seen["gil_thread"] = any(t.name == "loopwatch-gil" for t in threading.enumerate())
        seen["names"] = scrape_names(registry)
        seen["options"] = agent.options
        executor.shutdown()
        pool.disconnect()

    asyncio.run(main())
    loopwatch.uninstall()
    return seen.pop("names"), seen  # type: ignore[return-value]


ORIGINAL_HANDLE_RUN = asyncio.events.Handle._run


def test_every_feature_is_on_by_default_and_exports_its_families(tmp_path: Path) -> None:
    names, seen = run_app(tmp_path)
    for feature, family in FAMILIES.items():
        assert f"lwoff_{family}" in names, (feature, sorted(names))
    assert seen["run_in_executor_patched"] and seen["exception_handler_patched"]
    assert seen["handle_run_wrapped"] and seen["gil_thread"]


@pytest.mark.parametrize("feature", FEATURES)
def test_a_disabled_feature_exports_patches_and_runs_nothing_and_the_rest_keeps_working(tmp_path: Path,
                                                                                       feature: str) -> None:
    names, seen = run_app(tmp_path, disable=feature)
    assert f"lwoff_{FAMILIES[feature]}" not in names, sorted(names)
    for other, family in FAMILIES.items():  # every other feature still exports
        if other != feature:
            assert f"lwoff_{family}" in names, (other, sorted(names))
    assert "lwoff_event_loop_lag_seconds" in names and "lwoff_event_loop_busy_seconds" in names
    assert seen["run_in_executor_patched"] is (feature != "executors")
    assert seen["exception_handler_patched"] is (feature != "tasks")
    assert seen["handle_run_wrapped"] is (feature != "slow_callbacks")
    assert seen["gil_thread"] is (feature != "gil")
    assert seen["pool_returned"] and seen["executor_returned"] and seen["queue_returned"]
    if feature == "tasks":
        assert "lwoff_queue_depth" not in names
    if feature == "executors":
        assert not [n for n in names if n.startswith("lwoff_to_thread_executor")], sorted(names)
    if feature == "pools":
        assert not [n for n in names if n.startswith("lwoff_db_client_connection")], sorted(names)


def test_all_features_off_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPWATCH_DISABLE", "threads, gil,executors pools,tasks,slow_callbacks")
    names, seen = run_app(tmp_path)
    assert not {f"lwoff_{family}" for family in FAMILIES.values()} & names
    assert seen["options"].disable == frozenset(FEATURES)  # type: ignore[attr-defined]
    assert seen["options"].slow_callback_mode == "off" and seen["options"].gil_probe_interval == 0  # type: ignore[attr-defined]
    assert "lwoff_event_loop_lag_seconds" in names and "lwoff_event_loop_lag_spikes" in names


@pytest.mark.parametrize("value, bad", [("gil,threadz", "gil,threadz"), (("gil", 3), ("gil", 3)), (5, 5)])
def test_an_unknown_feature_fails_at_install_naming_the_option_the_value_and_what_is_accepted(
        tmp_path: Path, value: object, bad: object) -> None:
    with pytest.raises(loopwatch.ConfigError) as caught:
        loopwatch.install(registry=CollectorRegistry(), metrics_port=0, dump_dir=tmp_path, disable=value)
    message = str(caught.value)
    assert message.startswith("disable must be feature names among") and repr(bad) in message
    for feature in FEATURES:
        assert repr(feature) in message
    assert loopwatch.install.__module__ == "loopwatch" and loopwatch._agent is None  # nothing installed


def test_the_environment_variable_is_named_in_its_error() -> None:
    with pytest.raises(loopwatch.ConfigError, match=r"disable \(from LOOPWATCH_DISABLE\) must be"):
        resolve({}, environ={"LOOPWATCH_DISABLE": "pool"})


def test_nothing_disabled_by_an_empty_value() -> None:
    assert resolve({"disable": ""}, environ={}).disable == frozenset()
    assert resolve({"disable": ()}, environ={}).disable == frozenset()


def test_watch_pool_still_rejects_what_it_does_not_know_when_pools_are_off(tmp_path: Path) -> None:
    loopwatch.install(registry=CollectorRegistry(), metrics_port=0, dump_dir=tmp_path, disable="pools")
    with pytest.raises(loopwatch.ConfigError, match="does not know"):
        loopwatch.watch_pool(object(), "x")
