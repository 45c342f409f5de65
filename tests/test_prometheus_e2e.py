"""A real Prometheus (Debian's package) scraping a real app end to end.

The app (``apps/oraculo_app.py``) runs with ``namespace="oraculo", service="alerts"`` like the seeds'
service; Prometheus scrapes it every second on loopback with the rules rendered for ``oraculo`` by
``python -m loopwatch dashboards``.  After a 3 s stall, through Prometheus' HTTP API: every query of seed
003 §5 returns data, every dashboard panel's expression parses and returns data, and the lag alert is
pending or firing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, prometheus_server, wait_for

from loopwatch import _dashboards

# Seed 003 §5, with the counters' ``_total`` suffix (the seed wrote `oraculo_thread_cpu_seconds`).
SEED_QUERIES = [
    'avg_over_time(oraculo_cpu_process_cores{service="alerts"}[5m])',
    'oraculo_threads_total{service="alerts"}',
    'sum(rate(oraculo_thread_cpu_seconds_total{service="alerts"}[1m]))',
    'topk(10, rate(oraculo_thread_cpu_seconds_total{service="alerts"}[1m]))',
    'oraculo_event_loop_lag_seconds{service="alerts"}',
    'oraculo_to_thread_executor_queue_depth{service="alerts"}',
    'oraculo_to_thread_executor_threads{service="alerts"}',
    'oraculo_to_thread_executor_max_workers{service="alerts"}',
    'increase(oraculo_event_loop_lag_spikes_total{service="alerts",threshold=~"0.5|2.0|10.0"}[15m])',
    'increase(oraculo_task_exceptions_total{service="alerts"}[15m])',
    'oraculo_last_exception_timestamp_seconds{service="alerts"}',
    'increase(oraculo_dumps_total{service="alerts",reason="event_loop_lag"}[1h])',
]


def _api(base: str, path: str, **params: str) -> dict:
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def _query(base: str, expr: str) -> list:
    return _api(base, "query", query=expr)["result"]


def _panel_query(expr: str) -> str:
    return (expr.replace("$__rate_interval", "1m").replace('"$job"', '".*"').replace('"$instance"', '".*"')
            .replace('"$service"', '"alerts"'))


@pytest.fixture
def stack(tmp_path: Path, prometheus_tools, app_runner):
    """The app, and a Prometheus scraping it with the oraculo rules; yields (app, prometheus URL, ctl dir)."""
    render = subprocess.run([sys.executable, "-m", "loopwatch", "dashboards", "--namespace", "oraculo", "--out",
                             str(tmp_path / "rendered")], capture_output=True, text=True)
    assert render.returncode == 0, render.stderr
    app_port = free_port()
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    app = app_runner("oraculo_app", str(app_port), str(tmp_path / "dumps"), str(ctl))
    app.wait_line("READY")
    config = ("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
              f"rule_files:\n  - {tmp_path / 'rendered' / 'oraculo-rules.yml'}\n"
              "scrape_configs:\n  - job_name: alerts\n    static_configs:\n"
              f"      - targets: ['127.0.0.1:{app_port}']\n")
    try:
        with prometheus_server(prometheus_tools["prometheus"], tmp_path, config) as base:
            yield app, base, ctl
    finally:
        (ctl / "stop").touch()


def test_real_prometheus_seed_queries_dashboard_panels_and_the_lag_alert(stack) -> None:
    app, base, ctl = stack
    wait_for(lambda: _query(base, 'up{job="alerts"} == 1'), timeout=30, what="the app to be scraped")
    time.sleep(5)  # a few scrapes of healthy behaviour: rates need two samples
    (ctl / "stall-1").touch()
    app.wait_line("STALLED 1", timeout=30)
    # The stall is in the lag histogram and the dump counter once the next scrapes land.
    wait_for(lambda: _query(base, 'increase(oraculo_dumps_total{reason="event_loop_lag"}[1h]) > 0'), timeout=30,
             what="the stall's dump to reach Prometheus")
    # Series born with the stall (its slow callback) need two samples before rate()/increase() see them.
    wait_for(lambda: _query(base, "count_over_time(oraculo_slow_callbacks_total[1m]) >= 2"), timeout=30,
             what="two samples of the stall's slow-callback series")

    empty = [q for q in SEED_QUERIES if not _query(base, q)]
    assert empty == [], f"seed 003 §5 queries without data: {empty}"

    board = _dashboards.dashboard("oraculo")
    no_data = []
    for title, expr in _dashboards.panel_expressions(board):
        result = _query(base, _panel_query(expr))  # parses, or _api fails with Prometheus' error
        if not result:
            no_data.append((title, expr))
    assert no_data == [], f"dashboard panels without data: {no_data}"

    def lag_alert() -> list:
        alerts = _api(base, "alerts")["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "LoopwatchEventLoopLagHigh"
                and a["labels"]["service"] == "alerts" and a["state"] in ("pending", "firing")]

    found = wait_for(lag_alert, timeout=30, what="LoopwatchEventLoopLagHigh to be pending or firing")
    assert found[0]["labels"]["severity"] in ("warning", "critical")
    rules = _api(base, "rules")["groups"]
    unhealthy = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r.get("health") != "ok"]
    assert unhealthy == [], unhealthy
