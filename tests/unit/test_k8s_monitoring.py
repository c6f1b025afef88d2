"""The monitoring component (deploy/k8s/components/monitoring) and its example overlay.

``overlays/monitoring`` (dev + the component) is rendered with the real kustomize, as
``test_k8s_manifests.py`` renders base and dev, and checked:

- it is the dev overlay plus the component's objects, the others unchanged; the built-in kinds
  validate against the Kubernetes schemas (strict);
- ServiceMonitor, PodMonitor and PrometheusRule are ``monitoring.coreos.com/v1`` with the spec
  fields the Prometheus Operator knows; the ServiceMonitor selects the gateway's Service and
  scrapes a port it declares; the PodMonitor selects exactly the scheduler, watcher and notifier
  pods and scrapes their ``health`` port (SCALEODM_HEALTH_PORT, where ``/metrics`` is served);
  both name jobs after the service (``jobLabel``), as the alert rules expect;
- the NetworkPolicy admits Prometheus to exactly those pods' health port;
- the copies cannot drift: the PrometheusRule's ``spec.groups`` equal alerts.yaml's groups, the
  dashboard ConfigMap (label ``grafana_dashboard: "1"``) holds dashboard.json byte for byte, and
  the component's copy of it equals the source. ``SCALEODM_REGENERATE_GOLDEN=1`` rewrites both
  copies (kustomize loads no file from outside the component's directory).

Left out: the Prometheus Operator's CRD schemas, applying anything to a cluster.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import yaml

from scaleodm.common.settings import BaseServiceSettings, GatewaySettings
from tests.unit.test_alert_rules import ALERTS, MONITORING
from tests.unit.test_k8s_manifests import (
    K8S,
    K8S_VERSION,
    NAMESPACE,
    Obj,
    build_settings,
    container_port,
    containers,
    find,
    object_id,
    of_kind,
    pod_template,
    render,
    rendered,
    the_container,
)

COMPONENT = K8S / "components" / "monitoring"
OVERLAY = K8S / "overlays" / "monitoring"
RULE_COPY = COMPONENT / "prometheusrule.yaml"
DASHBOARD = MONITORING / "dashboard.json"
DASHBOARD_COPY = COMPONENT / "dashboard.json"
REGENERATE = os.environ.get("SCALEODM_REGENERATE_GOLDEN") == "1"

MONITORING_API = "monitoring.coreos.com/v1"
# Spec fields of the Prometheus Operator's CRDs that we may use (a typo fails here).
SPEC_FIELDS = {
    "ServiceMonitor": {"jobLabel", "selector", "namespaceSelector", "endpoints",
                       "targetLabels", "podTargetLabels", "sampleLimit"},
    "PodMonitor": {"jobLabel", "selector", "namespaceSelector", "podMetricsEndpoints",
                   "podTargetLabels", "sampleLimit"},
    "PrometheusRule": {"groups"},
}
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                   "relabelings", "metricRelabelings"}
JOB_LABEL = "app.kubernetes.io/component"
BUS_SERVICES = {"scaleodm-scheduler": "scheduler", "scaleodm-watcher": "watcher",
                "scaleodm-notifier": "notifier"}
DASHBOARD_KEY = "scaleodm.json"


@functools.cache
def _overlay() -> str:
    return json.dumps(render(OVERLAY))


def overlay() -> list[Obj]:
    result: list[Obj] = json.loads(_overlay())
    return result


def component_objects(objects: list[Obj]) -> list[Obj]:
    dev = {object_id(o) for o in rendered("dev")}
    return [o for o in objects if object_id(o) not in dev]


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against ``labels``."""
    if not (selector.get("matchLabels") or {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def rule_document() -> Obj:
    """The PrometheusRule alerts.yaml's groups make (what RULE_COPY must hold)."""
    return {
        "apiVersion": MONITORING_API,
        "kind": "PrometheusRule",
        "metadata": {
            "name": "scaleodm",
            "labels": {"app.kubernetes.io/name": "scaleodm",
                       "app.kubernetes.io/component": "monitoring"},
        },
        "spec": {"groups": yaml.safe_load(ALERTS.read_text())["groups"]},
    }


RULE_HEADER = (
    "# DO NOT MODIFY: generated from deploy/monitoring/alerts.yaml by\n"
    "# `SCALEODM_REGENERATE_GOLDEN=1 uv run pytest tests/unit/test_k8s_monitoring.py`.\n"
)


def test_copies_are_current() -> None:
    if REGENERATE:
        RULE_COPY.write_text(RULE_HEADER + yaml.safe_dump(rule_document(), sort_keys=False,
                                                          width=100))
        DASHBOARD_COPY.write_bytes(DASHBOARD.read_bytes())
    assert RULE_COPY.read_text().startswith(RULE_HEADER)
    assert yaml.safe_load(RULE_COPY.read_text()) == rule_document(), (
        "prometheusrule.yaml is not alerts.yaml's groups: SCALEODM_REGENERATE_GOLDEN=1")
    assert DASHBOARD_COPY.read_bytes() == DASHBOARD.read_bytes(), (
        "the component's dashboard.json differs from deploy/monitoring's: "
        "SCALEODM_REGENERATE_GOLDEN=1")


def test_overlay_is_dev_plus_the_component() -> None:
    objects = overlay()
    dev = {object_id(o): o for o in rendered("dev")}
    for obj in objects:
        if object_id(obj) in dev:
            assert obj == dev[object_id(obj)], f"the component changed {object_id(obj)}"
    assert set(dev) <= {object_id(o) for o in objects}
    added = component_objects(objects)
    assert sorted((o["kind"], o["metadata"]["name"]) for o in added) == [
        ("ConfigMap", "scaleodm-dashboard"),
        ("NetworkPolicy", "prometheus-scrape"),
        ("PodMonitor", "scaleodm-bus-services"),
        ("PrometheusRule", "scaleodm"),
        ("ServiceMonitor", "scaleodm-gateway"),
    ]
    problems = []
    for obj in added:
        assert obj["metadata"].get("namespace") == NAMESPACE, object_id(obj)
        if obj["apiVersion"] == MONITORING_API:
            extra = set(obj["spec"]) - SPEC_FIELDS[obj["kind"]]
            if extra:
                problems.append(f"{object_id(obj)}: unknown spec fields {extra}")
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{object_id(obj)}: {exc}")
    assert not problems, "\n".join(problems)


def test_prometheus_rule_holds_the_alerts() -> None:
    rule = find(overlay(), "PrometheusRule", "scaleodm")
    assert rule is not None and rule["apiVersion"] == MONITORING_API
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_service_monitor_scrapes_the_gateway() -> None:
    objects = overlay()
    (monitor,) = of_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == MONITORING_API
    spec = monitor["spec"]
    services = [s for s in of_kind(objects, "Service")
                if selects(spec["selector"], s["metadata"].get("labels") or {})]
    assert [s["metadata"]["name"] for s in services] == ["scaleodm-gateway"]
    (service,) = services
    assert service["metadata"]["labels"][spec["jobLabel"]] == "gateway"
    gateway = the_container(objects, "scaleodm-gateway")
    settings = build_settings(objects, gateway)
    assert isinstance(settings, GatewaySettings)
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= ENDPOINT_FIELDS, endpoint
        assert endpoint["path"] == "/metrics"
        (port,) = [p for p in service["spec"]["ports"] if p.get("name") == endpoint["port"]]
        assert container_port(gateway, port["targetPort"]) == settings.gateway_port


def _bus_pods(objects: list[Obj]) -> dict[str, Any]:
    return {
        c.program: c for c in containers(objects, init=False) if c.program in BUS_SERVICES
    }


def test_pod_monitor_scrapes_the_bus_services_health_port() -> None:
    objects = overlay()
    (monitor,) = of_kind(objects, "PodMonitor")
    assert monitor["apiVersion"] == MONITORING_API
    spec = monitor["spec"]
    selected = {
        c.program for c in containers(objects, init=False)
        if selects(spec["selector"], pod_template(c.workload)["metadata"].get("labels") or {})
    }
    assert selected == set(BUS_SERVICES)
    for program, container in _bus_pods(objects).items():
        labels = pod_template(container.workload)["metadata"]["labels"]
        assert labels[spec["jobLabel"]] == BUS_SERVICES[program]
        settings = build_settings(objects, container)
        assert isinstance(settings, BaseServiceSettings)
        for endpoint in spec["podMetricsEndpoints"]:
            assert set(endpoint) <= ENDPOINT_FIELDS, endpoint
            assert endpoint["path"] == "/metrics"
            assert container_port(container, endpoint["port"]) == settings.health_port


def test_network_policy_admits_prometheus_to_the_health_ports() -> None:
    objects = overlay()
    policy = find(objects, "NetworkPolicy", "prometheus-scrape")
    assert policy is not None
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selected = {
        c.program for c in containers(objects, init=False)
        if selects(spec["podSelector"], pod_template(c.workload)["metadata"].get("labels") or {})
    }
    assert selected == set(BUS_SERVICES)
    ports = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
    health = {container_port(c, "health") for c in _bus_pods(objects).values()}
    assert ports == health
    for rule in spec["ingress"]:
        assert rule["from"], "a rule without `from` admits everyone"


def test_dashboard_config_map() -> None:
    cm = find(overlay(), "ConfigMap", "scaleodm-dashboard")
    assert cm is not None
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {DASHBOARD_KEY: DASHBOARD.read_text()}


def test_component_kind() -> None:
    doc = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert doc["kind"] == "Component"
    assert doc["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
