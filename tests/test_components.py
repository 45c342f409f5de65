"""The shape of every feature (issue 11): a component that is its own collector, registered and
unregistered on its own, that never holds the agent, with no import cycle in the package, and whose
``after_fork`` runs in a real forked child."""

from __future__ import annotations

import ast
import asyncio
import gc
import os
import threading
import warnings
import weakref
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge

import loopwatch
from loopwatch import _forksafe
from loopwatch._component import Component
from loopwatch._dumps import Dumps
from loopwatch._executors import Executors
from loopwatch._exporter import MetricsEndpoint
from loopwatch._gil import GilContention
from loopwatch._gilheld import FaulthandlerFallback
from loopwatch._metrics import AgentUp, Errors, LoopLag
from loopwatch._pools import Pools
from loopwatch._remote import DumpRequests
from loopwatch._slow import SlowCallbackMetrics
from loopwatch._tasks import TaskHealth
from loopwatch._threads import ThreadCpu
from loopwatch._watchdog import Watchdog

PACKAGE = Path(loopwatch.__file__).parent
EVERY = {LoopLag, SlowCallbackMetrics, TaskHealth, ThreadCpu, Executors, Pools, Dumps, FaulthandlerFallback,
         MetricsEndpoint, DumpRequests, Watchdog, GilContention, AgentUp, Errors}  # Console: only with console=


def registered(registry: CollectorRegistry) -> list[object]:
    return list(registry._collector_to_names)  # prometheus_client keeps no public list


def loopwatch_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("loopwatch-")}


def test_each_feature_is_its_own_collector_registered_and_unregistered_on_its_own(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    try:
        ours = registered(registry)
        assert {type(c) for c in ours} == EVERY - {MetricsEndpoint}  # metrics_port=0: no exporter
        assert len(ours) == len(EVERY) - 1, "one registration per component"
        assert all(isinstance(c, Component) for c in ours)
        assert ours[-1] is agent.errors, "errors_total last: a scrape counts its own failures"
        names = {name for c in ours for name in registry._collector_to_names[c]}
        assert {"loopwatch_thread_cpu_seconds_total", "loopwatch_gil_wait_seconds", "loopwatch_tasks",
                "loopwatch_dumps_total", "loopwatch_errors_total"} <= names
    finally:
        loopwatch.uninstall()
    assert registered(registry) == []


def test_a_feature_switched_off_is_never_built(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    before = loopwatch_threads()
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, disable=("threads", "gil"))
    try:
        assert agent.threads is None and agent.gil is None
        assert not {ThreadCpu, GilContention} & {type(c) for c in registered(registry)}
        assert "loopwatch-gil" not in loopwatch_threads() - before
    finally:
        loopwatch.uninstall()


def test_a_name_clash_leaves_nothing_registered_and_names_the_clash(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    theirs = Gauge("loopwatch_threads_total", "the app's own series, same name", registry=registry)
    with pytest.raises(loopwatch.ConfigError, match="loopwatch_threads_total"):
        loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    assert registered(registry) == [theirs], "no component left registered"
    # Switching the clashing feature off is enough: the others register.
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, disable=("threads",))
    try:
        assert agent.started and ThreadCpu not in {type(c) for c in registered(registry)}
    finally:
        loopwatch.uninstall()
    assert registered(registry) == [theirs]


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, at run time or for typing alike."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loopwatch."):
            found.add(node.module.split(".")[1])
    return found


def test_there_is_no_import_cycle_in_the_package() -> None:
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        for dep in graph[module]:
            if dep in path:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(module)

    done: set[str] = set()
    for module in graph:
        if module not in done:
            visit(module, [module])
    assert cycles == []
    assert [m for m, deps in graph.items() if "_agent" in deps] == ["__init__"], "only the API holds the agent"


def test_no_component_holds_the_agent(tmp_path: Path) -> None:
    """With the components still alive, an uninstalled agent is freed: none of them keeps it."""
    registry = CollectorRegistry()

    async def main() -> tuple[weakref.ref[object], tuple[Component, ...]]:
        agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
        await asyncio.sleep(0.05)
        components = agent.components
        loopwatch.uninstall()
        return weakref.ref(agent), components

    ref, components = asyncio.run(main())
    gc.collect()
    assert len(components) == len(EVERY) - 1
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]


class _Counting(Component):
    def __init__(self) -> None:
        super().__init__()
        self.forks = 0

    def after_fork(self) -> None:
        self.forks += 1


def _in_child(check: callable) -> int:  # type: ignore[valid-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() in a threaded process
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if check() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_after_fork_runs_for_registered_components_only_in_the_child(tmp_path: Path) -> None:
    registered_one, forgotten = _Counting(), _Counting()
    _forksafe.at_fork(registered_one)
    _forksafe.at_fork(forgotten)
    _forksafe.forget(forgotten)
    try:
        assert _in_child(lambda: registered_one.forks == 1 and forgotten.forks == 0) == 0
        assert registered_one.forks == 0, "the parent is untouched"
    finally:
        _forksafe.forget(registered_one)


def test_the_agents_components_forget_the_parent_in_a_real_child(tmp_path: Path) -> None:
    registry = CollectorRegistry()

    async def main() -> int:
        agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, lag_thresholds=(0.3,))
        await asyncio.sleep(0.05)
        agent.lag.count_spike("main", 0.3)
        agent.dumps.count("manual")
        assert agent.watchdog.waker is not None and agent.fallback.stacks is not None

        def child() -> bool:
            spikes = registry.get_sample_value("loopwatch_event_loop_lag_spikes_total",
                                               {"service": agent.options.service, "loop": "main", "threshold": "0.3"})
            return (agent.watchdog.waker is None and not agent.watchdog.alive and agent.fallback.stacks is None
                    and agent.loops() == () and spikes is None and agent.fork_pending
                    and registry.get_sample_value("loopwatch_dumps_total",
                                                  {"service": agent.options.service, "reason": "manual"}) == 0)

        try:
            return _in_child(child)
        finally:
            loopwatch.uninstall()

    assert asyncio.run(main()) == 0
