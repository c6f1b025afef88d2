"""The Prometheus alerting rules (deploy/monitoring/alerts.yaml) and their promtool unit tests.

- ``promtool check rules`` accepts the rules (PromQL parses, templates compile);
- ``promtool test rules alerts.test.yaml`` passes: synthetic series in which each alert fires
  (labels and rendered annotations checked) and series in which it must not;
- every alert has a ``severity`` label, ``summary`` and ``description`` annotations, and at least
  one firing case in the unit tests;
- every metric an expression reads is one the services export (``METRIC_NAMES`` of
  ``scaleodm.common.metrics``, plus Prometheus' ``up`` and the default ``process_*``/``python_*``
  collectors), and every label it selects or groups by is a known low-cardinality label: none
  holds a task id.

The PromQL helpers here (``metric_names``, ``label_names``, ``promtool``) are shared with
``test_dashboard.py`` and ``test_k8s_monitoring.py``. They read PromQL lexically (strings,
matchers, grouping clauses, ranges stripped), enough for the expressions we write; parsing
proper is promtool's job. promtool comes from Debian's ``prometheus`` package (``.ci/run``
installs it): without it these tests skip, unless ``CI`` is set, where they fail.

Left out: evaluating the rules against live services (``tests/harness/prometheus.py`` can).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from scaleodm.common import metrics

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
ALERT_TESTS = MONITORING / "alerts.test.yaml"
PROMTOOL_TIMEOUT_S = 60

# Series Prometheus itself makes, and the default collectors of prometheus_client.
BUILTIN_METRICS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
BUILTIN_PREFIXES = ("process_", "python_")
# What the exposition adds to a counter's or histogram's name.
SUFFIXES = ("_bucket", "_sum", "_count", "_created", "_total")

# Every label an expression, legend or annotation may use. All are small closed sets or scrape
# labels; none is per task (see scaleodm.common.metrics, "Low cardinality").
KNOWN_LABELS = frozenset({
    # scrape and alert labels
    "job", "instance", "le", "severity",
    # scaleodm_*
    "status", "kind", "size_class", "outcome", "verb", "method", "route", "command",
    "operation", "resource", "consumer",
    # faststream_*
    "app_name", "broker", "handler", "destination", "exception_type",
})
# Labels that would hold a task id or another per-task value: never on a panel or in a rule.
PER_TASK_LABELS = frozenset({"task_id", "task", "uuid", "event_id", "workflow", "subject",
                             "tenant", "path", "url"})

_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on",
                       "ignoring", "group_left", "group_right", "inf", "nan", "atan2"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_OFFSET = re.compile(r"\boffset\s+-?[\w$]+")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_LEGEND_LABEL = re.compile(r"\{\{\s*\.?([A-Za-z_]\w*)\s*\}\}")
_TEMPLATE_LABEL = re.compile(r"\$labels\.([A-Za-z_]\w*)")


def exported_names() -> frozenset[str]:
    """What the services export, as written in ``scaleodm.common.metrics.METRIC_NAMES``."""
    return frozenset(metrics.METRIC_NAMES)


def _without_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, labels excluded)."""
    text = _without_strings(expr)
    text = _MATCHERS.sub("{}", text)
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    return {m for m in _IDENT.findall(text) if m.lower() not in _KEYWORDS}


def label_names(expr: str) -> set[str]:
    """The label names a PromQL expression matches on, groups by or joins on."""
    text = _without_strings(expr)
    names: set[str] = set()
    for body in _MATCHERS.findall(text):
        names |= set(_MATCHER_LABEL.findall(body))
    for body in _GROUPING.findall(text):
        names |= {n.strip() for n in body.split(",") if n.strip()}
    return names


def template_labels(text: str) -> set[str]:
    """Labels a Grafana legend (``{{route}}``) or an alert template (``$labels.job``) shows."""
    return set(_LEGEND_LABEL.findall(text)) | set(_TEMPLATE_LABEL.findall(text))


def is_exported(name: str, exported: frozenset[str] | None = None) -> bool:
    """``name`` as a query spells it (``_bucket``, ``_total``, ...) is a series some service
    exports, or one Prometheus and the default collectors make."""
    exported = exported_names() if exported is None else exported
    if name in BUILTIN_METRICS or name.startswith(BUILTIN_PREFIXES):
        return True
    bases = {name} | {name.removesuffix(s) for s in SUFFIXES if name.endswith(s)}
    known = set(exported) | {n.removesuffix("_total") for n in exported}
    return bool(bases & known)


def label_problems(where: str, labels: set[str]) -> list[str]:
    """Per-task labels, or labels outside ``KNOWN_LABELS``, that ``where`` uses."""
    problems = [f"{where}: label {n!r} holds per-task values" for n in labels & PER_TASK_LABELS]
    problems += [f"{where}: unknown label {n!r}" for n in labels - KNOWN_LABELS - PER_TASK_LABELS]
    return problems


def promtool() -> str:
    """The promtool binary; skips (outside CI) or fails (``CI`` set) without it."""
    found = shutil.which("promtool")
    if found is not None:
        return found
    reason = "promtool not on PATH (Debian: apt-get install prometheus; .ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this is an error")
    pytest.skip(reason)


def run_promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=PROMTOOL_TIMEOUT_S, check=False)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# --- the PromQL reader itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names", "labels"),
    [
        pytest.param('sum by (le, route) (rate(x_bucket{status=~"5.."}[5m]))', {"x_bucket"},
                     {"le", "route", "status"}, id="grouping-and-matchers"),
        pytest.param("a unless a offset 15m", {"a"}, set(), id="offset"),
        pytest.param('max(t{status="queued"}) > 0 and on() (sum(increase(c[15m])) or on() '
                     "vector(0)) == 0", {"t", "c"}, {"status"}, id="vector-matching"),
        pytest.param("histogram_quantile(0.95, sum by (le) (rate(h_bucket[$__rate_interval])))",
                     {"h_bucket"}, {"le"}, id="grafana-variable"),
        pytest.param('up{job=~"a|b"} == 0', {"up"}, {"job"}, id="regex"),
    ],
)
def test_promql_reader(expr: str, names: set[str], labels: set[str]) -> None:
    assert metric_names(expr) == names
    assert label_names(expr) == labels


def test_exported_name_spellings() -> None:
    exported = frozenset({"a_total", "h_seconds", "g"})
    for name in ("a_total", "h_seconds_bucket", "h_seconds_count", "g", "up",
                 "process_cpu_seconds_total"):
        assert is_exported(name, exported), name
    for name in ("a_bucket_x", "h", "gg", "other_total"):
        assert not is_exported(name, exported), name


# --- the rules ------------------------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_documented_and_tested() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), names
    assert {
        "ScaleODMQueueStuck", "ScaleODMDeadLetters", "ScaleODMOutboxBacklog",
        "ScaleODMWatcherLag", "ScaleODMWebhooksFailing", "ScaleODMTaskCountsStale",
        "ScaleODMServiceDown",
    } <= set(names)
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    problems = []
    for rule in rules:
        name = rule["alert"]
        if rule.get("labels", {}).get("severity") not in ("critical", "warning"):
            problems.append(f"{name}: severity must be critical or warning")
        for key in ("summary", "description"):
            if len(rule.get("annotations", {}).get(key, "")) < 20:
                problems.append(f"{name}: no {key} annotation worth the name")
        if name not in fires:
            problems.append(f"{name}: no unit test in which it fires")
        if name not in quiet:
            problems.append(f"{name}: no unit test in which it stays quiet")
    assert not problems, "\n".join(problems)


def test_rules_read_only_exported_metrics_and_known_labels() -> None:
    problems = []
    for rule in alert_rules():
        name, expr = rule["alert"], rule["expr"]
        used = metric_names(expr)
        assert used, f"{name}: no metric found in {expr!r}"
        problems += [f"{name}: {m} is exported by no service" for m in used
                     if not is_exported(m)]
        shown = "".join(str(v) for v in rule.get("annotations", {}).values())
        problems += label_problems(name, label_names(expr) | template_labels(shown))
    assert not problems, "\n".join(problems)
