"""The Grafana dashboard and the Prometheus rules, generated for a namespace.

``dashboards/`` in the repository holds this module's output for the default namespace (a test checks
that they match); ``python -m loopwatch dashboards --namespace oraculo --out DIR`` writes them for
another.  Generating rather than templating means every expression is built from the metric names in
one place, and the contract test can read them back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

DEFAULT_NAMESPACE = "loopwatch"
DASHBOARD_UID = "loopwatch-asyncio"
RUNBOOK = "https://github.com/loopwatch/loopwatch/blob/main/dashboards/RUNBOOK.md"
SELECTOR = 'job=~"$job", instance=~"$instance", service=~"$service"'
TRACE_DATASOURCE_VAR = "trace_datasource"
# The exemplar label that holds the trace id (what the exporter attaches to a stall's increment and to a slow
# callback's observation) and the uid of the trace data source that ``grafana-datasources.yml`` provisions.
EXEMPLAR_TRACE_LABEL = "trace_id"
TRACE_DATASOURCE_UID = "tempo"
PROMETHEUS_DATASOURCE_UID = "prometheus"


# -- Prometheus rules -----------------------------------------------------------------------------------
def recording_rules(ns: str) -> list[dict[str, Any]]:
    by = "job, instance, service"

    def quantile(q: float, metric: str, labels: str) -> str:
        return f"histogram_quantile({q}, sum by ({by}, {labels}, le) (rate({ns}_{metric}_bucket[5m])))"

    rules = []
    for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        rules.append({"record": f"{ns}:event_loop_delay_seconds:{name}_rate5m",
                      "expr": quantile(q, "event_loop_delay_seconds", "loop")})
    rules += [
        {"record": f"{ns}:event_loop_utilization:rate5m",
         "expr": f"sum by ({by}, loop) (rate({ns}_event_loop_busy_seconds_total[5m]))"},
        {"record": f"{ns}:thread_cpu_seconds:rate5m",
         "expr": f"sum by ({by}, thread_name) (rate({ns}_thread_cpu_seconds_total[5m]))"},
        {"record": f"{ns}:to_thread_executor_queue_wait_seconds:p95_rate5m",
         "expr": quantile(0.95, "to_thread_executor_queue_wait_seconds", "executor")},
        {"record": f"{ns}:db_client_connection_wait_time_seconds:p95_rate5m",
         "expr": quantile(0.95, "db_client_connection_wait_time_seconds", "pool_name")},
    ]
    return rules


def alert_rules(ns: str, runbook: str = RUNBOOK) -> list[dict[str, Any]]:
    def _alert(name: str, severity: str, expr: str, for_: str, summary: str, description: str) -> dict[str, Any]:
        return {"alert": name, "expr": expr, "for": for_, "labels": {"severity": severity},
                "annotations": {"summary": summary, "description": description,
                                "runbook_url": f"{runbook}#{name.lower()}"}}

    where = "{{ $labels.service }} on {{ $labels.instance }}"
    rules = []
    for severity, threshold, for_ in (("warning", 0.5, "10m"), ("critical", 2, "5m")):
        rules.append(_alert(
            "LoopwatchEventLoopLagHigh", severity, f"{ns}:event_loop_delay_seconds:p99_rate5m > {threshold}", for_,
            f"Event loop lag p99 above {threshold}s.",
            f"The event loop {{{{ $labels.loop }}}} of {where} had a p99 lag of {{{{ $value | humanizeDuration }}}} "
            f"over the last 5 minutes: callbacks and requests wait that long before they run."))
    rules.append(_alert(
        "LoopwatchEventLoopStalled", "critical", f"max by (job, instance, service, loop) ({ns}_event_loop_lag_seconds) >= 10",
        "30s", "Event loop stalled.",
        f"The event loop {{{{ $labels.loop }}}} of {where} has not run for {{{{ $value | humanizeDuration }}}}: "
        f"the service is frozen. loopwatch wrote a stack dump naming the blocking line."))
    rules.append(_alert(
        "LoopwatchStallDumpsWritten", "warning",
        f'sum by (job, instance, service) (increase({ns}_dumps_total{{reason="event_loop_lag"}}[15m])) > 0', "1m",
        "Event loop stalls are being dumped.",
        f"{where} wrote {{{{ $value | humanize }}}} stall dumps in the last 15 minutes: each names the line that "
        f"blocked the loop."))
    rules.append(_alert(
        "LoopwatchTaskExceptions", "warning",
        f"sum by (job, instance, service, exception) (increase({ns}_task_exceptions_total[10m])) > 0", "5m",
        "Tasks are failing with unretrieved exceptions.",
        f"{where}: {{{{ $value | humanize }}}} {{{{ $labels.exception }}}} exceptions reached the loop's exception "
        f"handler in 10 minutes (tasks nobody awaited, failing callbacks)."))
    rules.append(_alert(
        "LoopwatchExecutorBacklog", "warning",
        f"max by (job, instance, service, executor) ({ns}_to_thread_executor_queue_depth) > 0 "
        f"and on (job, instance, service, executor) "
        f"({ns}_to_thread_executor_threads >= {ns}_to_thread_executor_max_workers)", "5m",
        "Executor saturated, work is queueing.",
        f"The executor {{{{ $labels.executor }}}} of {where} runs at max_workers with {{{{ $value }}}} work items "
        f"queued: asyncio.to_thread / run_in_executor calls wait for a thread."))
    rules.append(_alert(
        "LoopwatchExecutorBacklog", "critical",
        f"{ns}:to_thread_executor_queue_wait_seconds:p95_rate5m > 1", "5m",
        "Executor queue wait p95 above 1s.",
        f"Work given to the executor {{{{ $labels.executor }}}} of {where} waits {{{{ $value | humanizeDuration }}}} "
        f"(p95) before a thread picks it up."))
    rules.append(_alert(
        "LoopwatchDBPoolWaiting", "warning",
        f"max by (job, instance, service, pool_name) ({ns}_db_client_connection_pending_requests) > 0", "5m",
        "Callers are waiting for database connections.",
        f"{{{{ $value }}}} callers of {where} are waiting for a connection of pool {{{{ $labels.pool_name }}}}."))
    rules.append(_alert(
        "LoopwatchDBPoolExhausted", "critical",
        f'max by (job, instance, service, pool_name) ({ns}_db_client_connection_count{{state="used"}}) '
        f">= on (job, instance, service, pool_name) max by (job, instance, service, pool_name) "
        f"({ns}_db_client_connection_max) "
        f"and on (job, instance, service, pool_name) {ns}_db_client_connection_pending_requests > 0", "5m",
        "Database pool exhausted.",
        f"Pool {{{{ $labels.pool_name }}}} of {where} has every connection in use and callers waiting."))
    rules.append(_alert(
        "LoopwatchDBPoolTimeouts", "critical",
        f"sum by (job, instance, service, pool_name) (increase({ns}_db_client_connection_timeouts_total[5m])) > 0",
        "1m", "Database pool acquires are timing out.",
        f"{{{{ $value | humanize }}}} acquires from pool {{{{ $labels.pool_name }}}} of {where} timed out in 5 minutes."))
    rules.append(_alert(
        "LoopwatchGILContention", "warning", f"max by (job, instance, service) ({ns}_gil_contention) > 1", "15m",
        "Threads are fighting over the GIL.",
        f"In {where} a thread that wakes up waits behind {{{{ $value | humanize }}}} other threads for the GIL: "
        f"CPU-bound Python threads are slowing the event loop."))
    rules.append(_alert(
        "LoopwatchTargetMissing", "critical",
        f"up == 0 and on (job, instance) max by (job, instance) (last_over_time({ns}_errors_total[1h]))", "2m",
        "A loopwatch target is down.",
        "Prometheus cannot scrape {{ $labels.instance }} (job {{ $labels.job }}), which exported loopwatch "
        "metrics in the last hour."))
    return rules


def rule_groups(ns: str, runbook: str = RUNBOOK) -> dict[str, Any]:
    """One group: rules of a group run in order at the same evaluation time, so the alerts that read a
    recording rule see this evaluation's value (across groups the order is not defined: an alert could
    lag its recording rule by one interval, and promtool's tests would be flaky)."""
    return {"groups": [{"name": ns, "rules": recording_rules(ns) + alert_rules(ns, runbook)}]}


def to_yaml(value: Any, indent: int = 0) -> str:
    """YAML for the rule files (dicts, lists, strings, numbers); strings are JSON-quoted, which is
    valid YAML, so no PyYAML is needed."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines.append(to_yaml(item, indent + 1))
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return "\n".join(lines)
    if isinstance(value, list):
        lines = []
        for item in value:
            text = to_yaml(item, indent + 1) if isinstance(item, (dict, list)) else f"{pad}  {_scalar(item)}"
            first, _, rest = text.lstrip(" ").partition("\n")
            lines.append(f"{pad}- {first}" + (f"\n{rest}" if rest else ""))
        return "\n".join(lines)
    return pad + _scalar(value)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[]"
    return json.dumps(str(value))


# -- Grafana ----------------------------------------------------------------------------------------------
class _Panels:
    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.next_id = 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += 8
            self.x = 0
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def panel(self, title: str, unit: str, targets: list[tuple[str, str]], *, description: str = "",
              width: int = 8, kind: str = "timeseries", stack: bool = False, exemplar: bool = False,
              links: list[dict[str, Any]] | None = None) -> None:
        """``exemplar=True`` asks Prometheus for the exemplars of every target's series (Grafana draws them
        as dots; their trace links come from the Prometheus data source, see ``grafana_datasources``);
        ``links`` are data links on the panel's series points."""
        if self.x + width > 24:
            self.y += 8
            self.x = 0
        panel: dict[str, Any] = {
            "type": kind, "title": title, "id": self._id(), "description": description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": width, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit, **({"links": links} if links else {})}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"},
                         **({"exemplar": True} if exemplar else {})}
                        for i, (expr, legend) in enumerate(targets)],
        }
        if stack:
            panel["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal", "group": "A"}}
        self.panels.append(panel)
        self.x += width


def dashboard(ns: str) -> dict[str, Any]:
    s = SELECTOR
    p = _Panels(ns)
    m = lambda name: f"{ns}_{name}"  # noqa: E731

    def quantile(q: float, metric: str, labels: str) -> str:
        return (f"histogram_quantile({q}, sum by (instance, {labels}, le) "
                f"(rate({m(metric)}_bucket{{{s}}}[$__rate_interval])))")

    p.row("Event loop")
    # Exemplars: the exporter puts a trace_id exemplar on the increment of each stall's lag_spikes_total and on
    # the slow-callback histogram's bucket, when the blocked task had an active OpenTelemetry span.  The
    # targets below ask for them; Grafana's trace link on an exemplar dot is the Prometheus data source's
    # exemplarTraceIdDestinations (grafana-datasources.yml); the panels' own data links use $trace_datasource.
    traces = [trace_search_link()]
    p.panel("Live lag", "s", [(f"max by (instance, loop) ({m('event_loop_lag_seconds')}{{{s}}})",
                               "{{instance}} {{loop}}")],
            description="How overdue the loop's probe is; grows live during a stall.", width=6)
    p.panel("Lag p50 / p95 / p99", "s", [(quantile(q, "event_loop_delay_seconds", "loop"), f"p{int(q * 100)} {{{{instance}}}} {{{{loop}}}}")
                                          for q in (0.5, 0.95, 0.99)], width=6)
    p.panel("Stalls past each threshold", "short",
            [(f"sum by (instance, loop, threshold) (increase({m('event_loop_lag_spikes_total')}{{{s}}}[$__rate_interval]))",
              "{{instance}} {{loop}} > {{threshold}}s")], width=6, exemplar=True, links=traces,
            description="Stalls counted live as they cross each threshold. A dot is an exemplar: the trace of the "
                        "request whose task was blocked (when it had an OpenTelemetry span); hover it for the link.")
    p.panel("Loop utilization", "percentunit",
            [(f"sum by (instance, loop) (rate({m('event_loop_busy_seconds_total')}{{{s}}}[$__rate_interval]))",
              "{{instance}} {{loop}}")], description="Share of time the loop ran callbacks rather than waiting for I/O.",
            width=6)
    p.panel("Slow callbacks", "short",
            [(f"topk(10, sum by (instance, loop, callback) (increase({m('slow_callbacks_total')}{{{s}}}[$__rate_interval])))",
              "{{instance}} {{callback}}")])
    p.panel("Slow callback duration p99", "s",
            [(quantile(0.99, "slow_callback_duration_seconds", "loop"), "p99 {{instance}} {{loop}}")],
            exemplar=True, links=traces,
            description="How long the slow callbacks ran. A dot is an exemplar: one slow callback's duration and the "
                        "trace of the request it served (when it had an OpenTelemetry span); hover it for the link.")
    p.panel("Stack dumps written", "short",
            [(f"sum by (instance, reason) (increase({m('dumps_total')}{{{s}}}[$__rate_interval]))", "{{instance}} {{reason}}")],
            description="Each event_loop_lag dump names the line that blocked the loop (see dump_dir).")
    p.row("Tasks and exceptions")
    p.panel("Live tasks", "short", [(f"sum by (instance, loop) ({m('tasks')}{{{s}}})", "{{instance}} {{loop}}")])
    p.panel("Task exceptions", "short",
            [(f"sum by (instance, exception) (increase({m('task_exceptions_total')}{{{s}}}[$__rate_interval]))",
              "{{instance}} {{exception}}"),
             (f"sum by (instance) (increase({m('tasks_destroyed_pending_total')}{{{s}}}[$__rate_interval]))",
              "{{instance}} destroyed while pending")])
    p.panel("Queues", "short", [(f"max by (instance, queue) ({m('queue_depth')}{{{s}}})", "{{instance}} {{queue}}"),
                                (f"max by (instance, queue) ({m('queue_maxsize')}{{{s}}})", "{{instance}} {{queue}} max")])
    p.row("Threads and GIL")
    p.panel("Process CPU", "short", [(f"max by (instance) ({m('cpu_process_cores')}{{{s}}})", "{{instance}} cores"),
                                     (f"max by (instance) ({m('threads_total')}{{{s}}})", "{{instance}} threads")],
            description="1.0 = one core saturated: the ceiling of Python code under the GIL.")
    p.panel("Top threads by CPU", "short",
            [(f"topk(10, sum by (instance, thread_name) (rate({m('thread_cpu_seconds_total')}{{{s}}}[$__rate_interval])))",
              "{{instance}} {{thread_name}}")], stack=True)
    p.panel("GIL contention", "short",
            [(f"max by (instance) ({m('gil_contention')}{{{s}}})", "{{instance}} contention"),
             (f"sum by (instance) (rate({m('gil_wait_seconds_sum')}{{{s}}}[$__rate_interval])) / "
              f"sum by (instance) (rate({m('gil_wait_seconds_count')}{{{s}}}[$__rate_interval])) / "
              f"max by (instance) ({m('gil_switch_interval_seconds')}{{{s}}})", "{{instance}} mean wait (switch intervals)")],
            description="About how many other threads a waking thread waits behind for the GIL (0 = none).")
    p.row("Executors")
    p.panel("Queue depth", "short",
            [(f"max by (instance, executor) ({m('to_thread_executor_queue_depth')}{{{s}}})", "{{instance}} {{executor}}")])
    p.panel("Queue wait p95", "s", [(quantile(0.95, "to_thread_executor_queue_wait_seconds", "executor"),
                                     "{{instance}} {{executor}}")])
    p.panel("Busy vs max workers", "short",
            [(f"max by (instance, executor) ({m('to_thread_executor_busy_threads')}{{{s}}})", "{{instance}} {{executor}} busy"),
             (f"max by (instance, executor) ({m('to_thread_executor_threads')}{{{s}}})", "{{instance}} {{executor}} threads"),
             (f"max by (instance, executor) ({m('to_thread_executor_max_workers')}{{{s}}})", "{{instance}} {{executor}} max")])
    p.row("Connection pools")
    p.panel("Connections used / idle / max", "short",
            [(f"max by (instance, pool_name, state) ({m('db_client_connection_count')}{{{s}}})",
              "{{instance}} {{pool_name}} {{state}}"),
             (f"max by (instance, pool_name) ({m('db_client_connection_max')}{{{s}}})", "{{instance}} {{pool_name}} max")],
            width=6)
    p.panel("Pending requests", "short",
            [(f"max by (instance, pool_name) ({m('db_client_connection_pending_requests')}{{{s}}})",
              "{{instance}} {{pool_name}}")], width=6)
    p.panel("Acquire wait p95", "s", [(quantile(0.95, "db_client_connection_wait_time_seconds", "pool_name"),
                                       "{{instance}} {{pool_name}}")], width=6)
    p.panel("Acquire timeouts", "short",
            [(f"sum by (instance, pool_name) (increase({m('db_client_connection_timeouts_total')}{{{s}}}[$__rate_interval]))",
              "{{instance}} {{pool_name}}")], width=6)

    def variable(name: str, label: str, query: str) -> dict[str, Any]:
        return {"name": name, "label": label, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "query": {"query": query, "refId": f"{name}-query"}, "definition": query, "refresh": 2,
                "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}

    return {
        "uid": DASHBOARD_UID if ns == DEFAULT_NAMESPACE else f"{DASHBOARD_UID}-{ns}"[:40],
        "title": "loopwatch: asyncio service health" + ("" if ns == DEFAULT_NAMESPACE else f" ({ns})"),
        "description": "Event loop lag and stalls, tasks, threads and the GIL, executors and connection pools, "
                       "as exported by loopwatch.",
        "tags": ["loopwatch", "asyncio", "python"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
            # The trace data source the panels' data links open: any Tempo by default; Jaeger or Zipkin by
            # changing "query" to "jaeger" / "zipkin" (the plugin id of the data source type).
            {"name": TRACE_DATASOURCE_VAR, "label": "Trace data source", "type": "datasource", "query": "tempo",
             "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [],
             "description": "Where the data links of the stall and slow-callback panels open. An exemplar "
                            "dot's own trace link is set on the Prometheus data source (exemplars)."},
            variable("job", "Job", f"label_values({ns}_errors_total, job)"),
            variable("instance", "Instance", f'label_values({ns}_errors_total{{job=~"$job"}}, instance)'),
            variable("service", "Service", f'label_values({ns}_errors_total{{job=~"$job", instance=~"$instance"}}, service)'),
        ]},
        "panels": p.panels,
    }


def trace_search_link() -> dict[str, Any]:
    """A data link from a point of a panel's series to Explore on ``$trace_datasource``, over the dashboard's
    time range.  A dashboard can do no more: Grafana applies a panel's field config (and so its data links)
    to the series only, never to the exemplar frame (PanelQueryRunner / scenes' VizPanel give exemplars empty
    defaults), and the series are sums without a trace_id label.  The trace_id link of an exemplar dot is the
    Prometheus data source's ``exemplarTraceIdDestinations`` (``grafana-datasources.yml``)."""
    var = "${%s}" % TRACE_DATASOURCE_VAR
    pane = {"loopwatch": {"datasource": var, "queries": [{"refId": "A", "datasource": {"uid": var}}],
                          "range": {"from": "${__from}", "to": "${__to}"}}}
    url = "/explore?schemaVersion=1&panes=" + quote(json.dumps(pane, separators=(",", ":")), safe="")
    for placeholder in (var, "${__from}", "${__to}"):  # Grafana interpolates these before the URL is decoded
        url = url.replace(quote(placeholder, safe=""), placeholder)
    return {"title": "Traces in ${%s:text} over this time range" % TRACE_DATASOURCE_VAR, "url": url,
            "targetBlank": True}


def panel_expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """``[(panel title, expr), ...]`` of a dashboard."""
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]


def rule_expressions(groups: dict[str, Any]) -> list[tuple[str, str]]:
    return [(rule.get("record") or rule["alert"], rule["expr"]) for group in groups["groups"] for rule in group["rules"]]


def metric_names(expr: str, ns: str) -> set[str]:
    """The ``<ns>_*`` metric names an expression reads (recording-rule names, with ``:``, excluded)."""
    return set(re.findall(rf"\b({re.escape(ns)}_[a-zA-Z0-9_]+)\b", expr))


PROVISIONING = """\
# Grafana provisioning: put this file in /etc/grafana/provisioning/dashboards/ and the dashboard JSON in
# the folder named by `path`.  Grafana loads it at start-up and reloads it when the file changes.
# The exemplar -> trace links need the data sources of grafana-datasources.yml (or its jsonData in yours).
apiVersion: 1
providers:
  - name: loopwatch
    folder: asyncio
    type: file
    disableDeletion: false
    updateIntervalSeconds: 60
    allowUiUpdates: false
    options:
      path: /var/lib/grafana/dashboards/loopwatch
"""

GRAFANA_DATASOURCES = """\
# Grafana data sources: put this file in /etc/grafana/provisioning/datasources/ (Grafana reads data sources
# there, dashboards from ../dashboards/).  Edit the two URLs; if you already have a Prometheus data source,
# copy its `exemplarTraceIdDestinations` instead.
#
# Which part does what, from a stall to the request:
# - the exporter attaches an exemplar {{trace_id, span_id}} to a stall's increment of
#   *_event_loop_lag_spikes_total and to a slow callback's bucket of *_slow_callback_duration_seconds;
# - Prometheus keeps it when run with --enable-feature=exemplar-storage (it scrapes OpenMetrics by default);
# - the dashboard's stall and slow-callback panels query with "exemplar": true and draw each one as a dot;
# - the dot's "trace" link is THIS file's exemplarTraceIdDestinations: a dashboard cannot set it (Grafana
#   applies no panel field config to exemplars).  `name` is the exemplar label holding the trace id,
#   `datasourceUid` the trace data source it opens: the Tempo below (uid "{trace_uid}"); for Jaeger or Zipkin,
#   provision that data source and put its uid here;
# - the dashboard's `trace_datasource` variable picks the data source of the panels' own data links.
# `$$` is a literal `$`: Grafana expands environment variables ($VAR, ${{VAR}}) in provisioning files.
apiVersion: 1
datasources:
  - name: Prometheus
    type: prometheus
    uid: {prometheus_uid}
    access: proxy
    url: http://prometheus:9090
    jsonData:
      exemplarTraceIdDestinations:
        - name: {label}
          datasourceUid: {trace_uid}
          urlDisplayLabel: "Trace $${{__value.raw}}"
  - name: Tempo
    type: tempo
    uid: {trace_uid}
    access: proxy
    url: http://tempo:3200
""".format(label=EXEMPLAR_TRACE_LABEL, trace_uid=TRACE_DATASOURCE_UID, prometheus_uid=PROMETHEUS_DATASOURCE_UID)

PROMETHEUS_SNIPPET = """\
# prometheus.yml: load the rules and scrape the services' loopwatch exporters.
# Run Prometheus with --enable-feature=exemplar-storage to keep the trace_id exemplars of stalls and slow
# callbacks (Prometheus asks for OpenMetrics when it scrapes, the only format that carries exemplars).
rule_files:
  - /etc/prometheus/rules/{ns}-rules.yml
scrape_configs:
  - job_name: asyncio-services
    scrape_interval: 15s
    static_configs:
      - targets: ["app-1:9320", "app-2:9320"]
"""


def render(namespace: str, out: Path, runbook: str = RUNBOOK) -> list[Path]:
    """Write the dashboard, the rule file and the provisioning examples (dashboards, data sources with the
    exemplar trace link, Prometheus) for ``namespace`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        out / f"{namespace}.json": json.dumps(dashboard(namespace), indent=2) + "\n",
        out / f"{namespace}-rules.yml": (f"# Generated by `python -m loopwatch dashboards --namespace {namespace}`.\n"
                                         f"# Recording rules and alerts for loopwatch's metrics; see RUNBOOK.md.\n"
                                         + to_yaml(rule_groups(namespace, runbook)) + "\n"),
        out / "grafana-provisioning.yml": PROVISIONING,
        out / "grafana-datasources.yml": GRAFANA_DATASOURCES,
        out / "prometheus-snippet.yml": PROMETHEUS_SNIPPET.format(ns=namespace),
    }
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    return list(files)
