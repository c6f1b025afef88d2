"""The Grafana dashboard (deploy/monitoring/dashboard.json).

- it is JSON of Grafana's schema version 39, importable with a ``DS_PROMETHEUS`` input that every
  panel and query uses (also a datasource variable of that name, so that a provisioned copy, the
  ConfigMap of deploy/k8s/components/monitoring, works without the import step);
- panel ids are unique, every panel has a title, a description and queries;
- every query parses: promtool has no command that parses a bare expression, so each becomes a
  recording rule (Grafana's ``$__rate_interval`` & co. replaced by a duration) of a temporary
  rules file that ``promtool check rules`` reads;
- every query reads only metrics the services export and labels of ``KNOWN_LABELS`` (legends
  included): no label holds a task id (helpers of ``test_alert_rules.py``);
- the panels cover what operators look at (``REQUIRED``: each name read by some panel).

Left out: how the panels look; Grafana itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.unit.test_alert_rules import (
    MONITORING,
    is_exported,
    label_names,
    label_problems,
    metric_names,
    run_promtool,
    template_labels,
)

DASHBOARD = MONITORING / "dashboard.json"
# Grafana's interval variables, as promtool-parsable durations.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
# Metrics some panel must read: tasks, queue, runs, webhooks, outbox, dead letters, the bus,
# HTTP, errors, SSE and uploads.
REQUIRED = frozenset({
    "scaleodm_tasks", "scaleodm_runs_admitted_total", "scaleodm_queue_wait_seconds_bucket",
    "scaleodm_runs_ended_total", "scaleodm_run_duration_seconds_bucket",
    "scaleodm_webhook_deliveries_total", "scaleodm_outbox_backlog",
    "scaleodm_outbox_oldest_seconds", "scaleodm_events_set_aside_total",
    "scaleodm_commands_given_up_total", "faststream_received_messages_total",
    "faststream_received_processed_messages_duration_seconds_bucket",
    "faststream_received_processed_messages_exceptions_total", "scaleodm_http_requests_total",
    "scaleodm_http_request_duration_seconds_bucket", "scaleodm_mongo_command_errors_total",
    "scaleodm_sse_clients", "scaleodm_uploads_active", "scaleodm_upload_bytes_total",
})
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows, also those nested in collapsed rows."""
    found = []
    for panel in dash["panels"]:
        found += panel.get("panels", [])
        if panel["type"] != "row":
            found.append(panel)
    return found


def queries(dash: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every query."""
    return [(p["title"], t) for p in panels(dash) for t in p.get("targets", [])]


def as_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def test_dashboard_is_importable_json() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] == 39
    assert dash["uid"] and dash["title"]
    (ds_input,) = dash["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS"
    assert (ds_input["type"], ds_input["pluginId"]) == ("datasource", "prometheus")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    ids += [child["id"] for p in dash["panels"] for child in p.get("panels", [])]
    assert len(ids) == len(set(ids)), ids


def test_every_panel_queries_the_prometheus_input() -> None:
    problems = []
    for panel in panels(dashboard()):
        title = panel.get("title")
        if not title or not panel.get("description"):
            problems.append(f"panel {panel['id']}: needs a title and a description")
        if panel.get("datasource") != DATASOURCE:
            problems.append(f"{title}: datasource must be {DATASOURCE}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{title}: no query")
        for target in targets:
            if target.get("datasource") != DATASOURCE or not target.get("expr"):
                problems.append(f"{title}/{target.get('refId')}: no expr on {DATASOURCE}")
    assert not problems, "\n".join(problems)


def test_every_query_parses(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": as_promql(target["expr"])}
        for i, (_, target) in enumerate(queries(dashboard()))
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_queries_read_exported_metrics_and_no_per_task_label() -> None:
    problems = []
    read: set[str] = set()
    for title, target in queries(dashboard()):
        where = f"{title}/{target['refId']}"
        expr = as_promql(target["expr"])
        used = metric_names(expr)
        read |= used
        problems += [f"{where}: {m} is exported by no service" for m in used
                     if not is_exported(m)]
        legend = str(target.get("legendFormat", ""))
        problems += label_problems(where, label_names(expr) | template_labels(legend))
    assert not problems, "\n".join(problems)
    assert REQUIRED <= read, f"no panel reads {sorted(REQUIRED - read)}"
