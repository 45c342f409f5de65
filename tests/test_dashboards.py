"""dashboards/: generated from loopwatch._dashboards, checked and unit-tested with promtool, rendered for
another namespace, and held to a contract with what the agent exports and what the README documents."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml
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
    assert set(variables) == {"datasource", "trace_datasource", "job", "instance", "service"}
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
    _assert_exemplars_link_to_traces(json.loads(board), "oraculo")
    _assert_datasources_link_exemplars(tmp_path / "grafana-datasources.yml")
    check = subprocess.run([prometheus_tools["promtool"], "check", "rules", str(tmp_path / "oraculo-rules.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    bad = subprocess.run([sys.executable, "-m", "loopwatch", "dashboards", "--namespace", "no-dashes"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "namespace must be a Prometheus metric name prefix" in bad.stderr


def test_every_panel_expression_is_valid_promql(tmp_path, prometheus_tools) -> None:
    """promtool parses each panel's expression (as a recording rule, with Grafana's variables replaced by
    what Grafana sends): a typo in an exemplar query would otherwise show up only in the Prometheus e2e test."""
    grafana = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*", "$service": ".*"}
    rules = []
    for i, (title, expr) in enumerate(_dashboards.panel_expressions(_dashboards.dashboard("loopwatch"))):
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, (title, expr)
        rules.append({"record": f"panel:expr_{i}:check", "expr": expr})
    path = tmp_path / "panels.yml"
    path.write_text(_dashboards.to_yaml({"groups": [{"name": "panels", "rules": rules}]}) + "\n")
    out = subprocess.run([prometheus_tools["promtool"], "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# -- exemplars: from a stall to its trace ----------------------------------------------------------------
# The series the exporter attaches a {trace_id, span_id} exemplar to (issue 14): a stall's increment of the
# spikes counter, a slow callback's bucket of the duration histogram.
EXEMPLAR_SERIES = ("event_loop_lag_spikes_total", "slow_callback_duration_seconds_bucket")
TRACE = "${trace_datasource}"


def _explore_pane(url: str) -> dict[str, Any]:
    """The Explore pane a data link opens, with Grafana's ``${...}`` placeholders left in."""
    parsed = urllib.parse.urlsplit(url)
    assert parsed.path == "/explore", url
    query = urllib.parse.parse_qs(parsed.query)
    assert query["schemaVersion"] == ["1"], url
    (pane,) = json.loads(query["panes"][0]).values()
    return pane


def _assert_exemplars_link_to_traces(board: dict[str, Any], ns: str) -> None:
    variables = {v["name"]: v for v in board["templating"]["list"]}
    trace = variables["trace_datasource"]
    assert trace["type"] == "datasource" and trace["query"] == "tempo", trace
    names = [v["name"] for v in board["templating"]["list"]]
    assert names.index("trace_datasource") == names.index("datasource") + 1, names  # next to it

    carriers = {f"{ns}_{name}" for name in EXEMPLAR_SERIES}
    with_exemplars = {}
    for panel in (p for p in board["panels"] if p["type"] != "row"):
        for target in panel["targets"]:
            used = _dashboards.metric_names(target["expr"], ns)
            if used & carriers:  # a panel on an exemplar series asks for them...
                assert target.get("exemplar") is True, (panel["title"], target)
            if target.get("exemplar"):  # ...and only series that carry them do
                assert used and used <= carriers, (panel["title"], target["expr"])
                with_exemplars[panel["title"]] = panel
    assert set(with_exemplars) == {"Stalls past each threshold", "Slow callback duration p99"}, set(with_exemplars)
    assert {name for panel in with_exemplars.values() for t in panel["targets"]
            for name in _dashboards.metric_names(t["expr"], ns)} == carriers
    for panel in with_exemplars.values():
        assert panel["type"] == "timeseries"  # the panel that draws exemplars (not the old Graph)
        assert panel["fieldConfig"]["defaults"]["links"], panel["title"]

    links = [link for panel in board["panels"] for link in panel.get("fieldConfig", {}).get("defaults", {}).get("links", [])]
    assert links
    for link in links:  # every data link opens the trace data source the variable names
        assert "trace_datasource" in link["title"], link
        pane = _explore_pane(link["url"])
        assert pane["datasource"] == TRACE and pane["queries"][0]["datasource"]["uid"] == TRACE, pane
        assert pane["range"] == {"from": "${__from}", "to": "${__to}"}, pane


def _assert_datasources_link_exemplars(path: Path) -> None:
    """The exemplar dot's own link: Grafana takes it from the Prometheus data source's
    exemplarTraceIdDestinations (never from the panel), so the provisioned data source carries it."""
    text = path.read_text()
    config = yaml.safe_load(text)
    assert config["apiVersion"] == 1
    sources = {source["uid"]: source for source in config["datasources"]}
    (prometheus,) = [s for s in sources.values() if s["type"] == "prometheus"]
    destinations = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert [d["name"] for d in destinations] == ["trace_id"], destinations
    for destination in destinations:
        target = sources[destination["datasourceUid"]]  # a provisioned trace data source...
        assert target["type"] == "tempo", target  # ...of the type the dashboard's variable lists by default
        for value in destination.values():  # Grafana expands ${VAR} from the environment in provisioning files
            assert not re.search(r"(?<!\$)\$\{", str(value)), destination
    assert "--enable-feature=exemplar-storage" in text and "trace_datasource" in text


@pytest.mark.parametrize("ns", ["loopwatch", "oraculo"])
def test_stall_and_slow_callback_panels_link_exemplars_to_the_trace_data_source(ns) -> None:
    board = (json.loads((DASHBOARDS / "loopwatch.json").read_text()) if ns == "loopwatch"
             else _dashboards.dashboard(ns))
    _assert_exemplars_link_to_traces(board, ns)


def test_provisioning_files_parse_and_the_prometheus_data_source_links_exemplars_to_traces() -> None:
    _assert_datasources_link_exemplars(DASHBOARDS / "grafana-datasources.yml")
    providers = yaml.safe_load((DASHBOARDS / "grafana-provisioning.yml").read_text())["providers"]
    assert providers[0]["type"] == "file" and providers[0]["options"]["path"]
    assert "--enable-feature=exemplar-storage" in (DASHBOARDS / "prometheus-snippet.yml").read_text()
    yaml.safe_load((DASHBOARDS / "prometheus-snippet.yml").read_text())


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
