"""dashboards/: generated from loopwatch._dashboards, checked and unit-tested with promtool, rendered for
another namespace, and held to a contract with what the agent exports and what the README documents."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import re
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch import _dashboards

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS = REPO / "dashboards"


def test_committed_files_are_the_generators_output(tmp_path) -> None:
    written = _dashboards.render("loopwatch", tmp_path)
    for path in written:
        committed = DASHBOARDS / path.name
        assert committed.read_text() == path.read_text(), (
            f"dashboards/{path.name} differs from the generator: run `python -m loopwatch dashboards --out dashboards`")


def test_promtool_checks_the_rules(prometheus_tools) -> None:
    out = subprocess.run([prometheus_tools["promtool"], "check", "rules", str(DASHBOARDS / "loopwatch-rules.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 19 rules found" in out.stdout + out.stderr


def test_promtool_unit_tests_with_the_for_boundaries(prometheus_tools) -> None:
    out = subprocess.run([prometheus_tools["promtool"], "test", "rules", "loopwatch-rules.test.yml"],
                         cwd=DASHBOARDS / "tests", capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_alert_has_severity_annotations_and_a_runbook_section() -> None:
    runbook = (DASHBOARDS / "RUNBOOK.md").read_text()
    sections = set(re.findall(r"^## (\w+)$", runbook, re.M))
    alerts = [rule for group in _dashboards.rule_groups("loopwatch")["groups"] for rule in group["rules"]
              if "alert" in rule]
    names = {rule["alert"] for rule in alerts}
    assert {"LoopwatchEventLoopLagHigh", "LoopwatchEventLoopStalled", "LoopwatchTaskExceptions",
            "LoopwatchExecutorBacklog", "LoopwatchDBPoolExhausted", "LoopwatchDBPoolWaiting",
            "LoopwatchGILContention", "LoopwatchTargetMissing"} <= names
    assert names == sections, names ^ sections
    for rule in alerts:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        assert rule["for"] and set(rule["annotations"]) == {"summary", "description", "runbook_url"}, rule
        assert rule["annotations"]["runbook_url"].endswith("#" + rule["alert"].lower())
    severities = {(rule["alert"], rule["labels"]["severity"]) for rule in alerts}
    assert {("LoopwatchEventLoopLagHigh", "warning"), ("LoopwatchEventLoopLagHigh", "critical"),
            ("LoopwatchExecutorBacklog", "warning"), ("LoopwatchExecutorBacklog", "critical")} <= severities


def test_the_dashboard_is_grafana_ready() -> None:
    board = json.loads((DASHBOARDS / "loopwatch.json").read_text())
    assert board["schemaVersion"] >= 39 and board["uid"] == "loopwatch-asyncio"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "job", "instance", "service"}
    assert variables["datasource"]["type"] == "datasource"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Event loop", "Tasks and exceptions", "Threads and GIL", "Executors", "Connection pools"]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'service=~"$service"' in expr and 'instance=~"$instance"' in expr, (panel["title"], expr)
            for window in re.findall(r"\[([^\]]+)\]", expr):
                assert window == "$__rate_interval", (panel["title"], expr)


def test_dashboards_command_renders_another_namespace(tmp_path, prometheus_tools) -> None:
    out = subprocess.run([sys.executable, "-m", "loopwatch", "dashboards", "--namespace", "oraculo", "--out",
                          str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rules = (tmp_path / "oraculo-rules.yml").read_text()
    board = (tmp_path / "oraculo.json").read_text()
    for text in (rules, board):
        assert "oraculo_event_loop_lag_seconds" in text
        assert "loopwatch_" not in text  # no metric of the default namespace left
    assert json.loads(board)["uid"] != "loopwatch-asyncio"
    check = subprocess.run([prometheus_tools["promtool"], "check", "rules", str(tmp_path / "oraculo-rules.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    bad = subprocess.run([sys.executable, "-m", "loopwatch", "dashboards", "--namespace", "no-dashes"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "namespace must be a Prometheus metric name prefix" in bad.stderr


# -- the contract: dashboards <= exported <= README --------------------------------------------------------
def _exported_names(tmp_path: Path) -> tuple[set[str], set[str]]:
    """Every sample name the agent can export, with every feature in use (the families are there even when
    empty, so the names are complete)."""
    registry = CollectorRegistry()
    names: set[str] = set()
    families: set[str] = set()

    async def main() -> None:
        import redis

        loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, gil_probe_interval=0.01)
        loopwatch.watch_queue(asyncio.Queue(), "q")
        with cf.ThreadPoolExecutor(1) as pool:
            loopwatch.watch_executor(pool, "pool")
            loopwatch.watch_pool(redis.ConnectionPool(), "cache")
            await asyncio.to_thread(sum, [1, 2])
            await asyncio.sleep(0.1)
            for family in registry.collect():
                names.add(family.name)
                families.add(family.name)
                if family.type == "counter":  # prometheus_client names a counter family without _total
                    names.add(family.name + "_total")
                if family.type == "histogram":
                    names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
                names.update(s.name for s in family.samples)
        loopwatch.uninstall()

    asyncio.run(main())
    return names, families


def test_every_metric_in_the_dashboards_is_exported_and_every_exported_one_is_documented(tmp_path) -> None:
    exported, family_names = _exported_names(tmp_path)
    used = set()
    for _, expr in _dashboards.panel_expressions(_dashboards.dashboard("loopwatch")):
        used |= _dashboards.metric_names(expr, "loopwatch")
    for _, expr in _dashboards.rule_expressions(_dashboards.rule_groups("loopwatch")):
        used |= _dashboards.metric_names(expr, "loopwatch")
    assert used, "no metric found in the dashboards"
    assert used - exported == set(), f"used in dashboards/ but not exported: {sorted(used - exported)}"

    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \| (?:gauge|counter|histogram) \|", readme, re.M))
    families = {n.removeprefix("loopwatch_") for n in family_names if n.startswith("loopwatch_")}
    missing = {n for n in families if n not in documented and n + "_total" not in documented}
    assert missing == set(), f"exported but not in the README's catalogue: {sorted(missing)}"
