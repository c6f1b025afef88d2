"""Attacks on the Kubernetes deployment, judged from the rendered manifests (base and dev).

The manifests are rendered once per process by ``kubectl kustomize`` (the helpers of
``tests/unit/test_k8s_manifests.py``); the pods of a run come from
``scaleodm.scheduler.workflows.build_workflow`` with the scheduler's rendered settings, so the
labels the NetworkPolicies select on are the ones the code sets.

``allowed`` is a small evaluator of NetworkPolicy (networking.k8s.io/v1) semantics over the
rendered policies: a pod selected by a policy of a given type is isolated in that direction and
admits only what a rule of such a policy allows (rules add up, order is irrelevant); traffic
flows when the source's egress side and the destination's ingress side both admit it; sources and
destinations outside the namespace are not governed by its policies. Peers: ``podSelector``
(same namespace), ``namespaceSelector`` (+ ``podSelector``), ``ipBlock`` (``cidr`` minus
``except``; matched against pod IPs too, the stricter reading — CNIs differ); selectors with
``matchLabels`` and ``matchExpressions``; ports with protocol, number and ``endPort`` (named
ports are refused, the manifests use numbers). Each attack runs with the pod network in the
private ranges clusters use (kind/minikube, k3s, Calico, EKS custom networking).

Covered, per overlay: a run's pod cannot reach MongoDB, NATS (clients and monitoring), the
other services or private networks; no pod reaches the cloud metadata service (IPv4, and the
IPv6 addresses of AWS and GCP) on any port tried; outside clients and other namespaces reach the
gateway only (and KEDA NATS monitoring only); the notifier cannot send webhooks to private
networks (base); the flows the system needs are allowed (services to NATS, MongoDB, S3 and the
API server; runs to S3, zipurls, the gateway and the API server; DNS; dev MinIO) and the
bootstrap Job gets no MongoDB; a default-deny policy isolates every pod both ways.

NATS and MongoDB require credentials: their config/env come from Secrets (``secretKeyRef``)
shared with every client, nothing secret is in a ConfigMap, ``nats-server`` accepts the rendered
config only with the credentials set, the services' settings carry them and
``open_store``/``make_broker`` pass them on; the dev overlay's published passwords are flagged by
``insecure_defaults`` (production refuses them). No container of a Deployment/StatefulSet/Job or
of a run's pod adds a capability. PodDisruptionBudgets select every service, one each.
``SCALEODM_OUTBOUND_ALLOW`` in base lets no private address through the outbound guard.
Integration (real ``nats-server``): the rendered NATS config refuses a client without
credentials and admits the services' broker.

Left out: a real CNI, the Argo controller, the images' own behaviour.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.errors import Error as NatsError
from pydantic import SecretStr

from scaleodm.common import netguard, runtime
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.settings import BaseServiceSettings, MongoSettings, SchedulerSettings
from scaleodm.common.store import tasks
from scaleodm.scheduler import workflows
from tests.harness import servers
from tests.unit.test_k8s_manifests import (
    WORKLOAD_KINDS,
    Container,
    Obj,
    build_settings,
    containers,
    environment,
    find,
    of_kind,
    ours,
    pod_template,
    rendered,
    secret_value,
    the_container,
)

NAMESPACE = "scaleodm"
OVERLAYS = ("base", "dev")
# Pod networks of common clusters: kind/minikube/flannel, k3s, Calico, EKS custom networking.
POD_CIDRS = ("10.244.0.0/16", "10.42.0.0/16", "192.168.0.0/16", "100.64.0.0/16")
PROGRAMS_ON_NATS = (
    "scaleodm-gateway", "scaleodm-scheduler", "scaleodm-watcher", "scaleodm-notifier",
    "scaleodm-bootstrap",
)
PROGRAMS_ON_MONGO = PROGRAMS_ON_NATS[:4]
SERVICE_COMPONENTS = ("gateway", "scheduler", "watcher", "notifier")
# Cloud metadata services: everywhere, AWS IPv6, GCP IPv6.
METADATA = ("169.254.169.254", "fd00:ec2::254", "fd20:ce::254")
INTERNET = "8.8.8.8"  # any public address
API_SERVER = "172.18.0.2"  # a control-plane node's address (kind); the Service port maps to 6443
PRIVATE_HOSTS = ("10.1.2.3", "172.16.0.5", "192.168.1.10", "100.64.1.1", "fd12:3456::1")
PRIVATE_PROBES = (
    "10.0.0.1", "10.96.0.10", "172.16.0.1", "192.168.0.1", "127.0.0.1", "169.254.169.254",
    "100.64.0.1", "fd00::1", "::1", "fe80::1",
)


# --- the NetworkPolicy evaluator --------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One side of a connection: a pod (``labels`` set) or an address outside any pod."""

    name: str
    ip: str
    namespace: str | None = None
    labels: Mapping[str, str] | None = None

    @property
    def is_pod(self) -> bool:
        return self.labels is not None


@dataclass
class Cluster:
    """The rendered NetworkPolicies of the namespace and the labels of every namespace."""

    policies: list[Obj]
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)

    def namespace_labels(self, name: str) -> dict[str, str]:
        # The API server sets kubernetes.io/metadata.name on every namespace.
        return {**self.namespaces.get(name, {}), "kubernetes.io/metadata.name": name}


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector; an empty one selects everything."""
    selector = selector or {}
    if set(selector) - {"matchLabels", "matchExpressions"}:
        raise NotImplementedError(f"selector {selector}")
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In":
            ok = key in labels and labels[key] in values
        elif op == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif op == "Exists":
            ok = key in labels
        elif op == "DoesNotExist":
            ok = key not in labels
        else:
            raise NotImplementedError(f"operator {op}")
        if not ok:
            return False
    return True


def _in_block(block: Mapping[str, Any], ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    cidr = ipaddress.ip_network(block["cidr"])
    if cidr.version != address.version or address not in cidr:
        return False
    return not any(address in ipaddress.ip_network(e) for e in block.get("except") or [])


def peer_matches(cluster: Cluster, peer: Mapping[str, Any], endpoint: Endpoint) -> bool:
    if set(peer) - {"podSelector", "namespaceSelector", "ipBlock"}:
        raise NotImplementedError(f"peer {peer}")
    if "ipBlock" in peer:
        return _in_block(peer["ipBlock"], endpoint.ip)
    if not endpoint.is_pod or endpoint.namespace is None or endpoint.labels is None:
        return False
    if "namespaceSelector" in peer:
        ns_ok = selector_matches(
            peer["namespaceSelector"], cluster.namespace_labels(endpoint.namespace)
        )
    else:
        ns_ok = endpoint.namespace == NAMESPACE
    return ns_ok and selector_matches(peer.get("podSelector"), endpoint.labels)


def port_matches(ports: list[Mapping[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        number = entry["port"]
        if not isinstance(number, int):
            raise NotImplementedError(f"named port {number!r}: use numbers")
        if number <= port <= entry.get("endPort", number):
            return True
    return False


def _types(policy: Obj) -> set[str]:
    spec = policy["spec"]
    return set(spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])])


def _selecting(cluster: Cluster, pod: Endpoint, direction: str) -> list[Obj]:
    assert pod.labels is not None
    return [
        p for p in cluster.policies
        if direction in _types(p) and selector_matches(p["spec"]["podSelector"], pod.labels)
    ]


def _side_allows(
    cluster: Cluster, own: Endpoint, other: Endpoint, direction: str, port: int, protocol: str
) -> bool:
    if not own.is_pod or own.namespace != NAMESPACE:
        return True  # not governed by this namespace's policies
    policies = _selecting(cluster, own, direction)
    if not policies:
        return True  # not isolated
    rules_key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    return any(
        port_matches(rule.get("ports"), port, protocol)
        and (
            not rule.get(peers_key)
            or any(peer_matches(cluster, peer, other) for peer in rule[peers_key])
        )
        for policy in policies
        for rule in policy["spec"].get(rules_key) or []
    )


def allowed(
    cluster: Cluster, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP"
) -> bool:
    """Whether a connection from ``src`` to ``dst``:``port`` passes every NetworkPolicy."""
    return _side_allows(cluster, src, dst, "Egress", port, protocol) and _side_allows(
        cluster, dst, src, "Ingress", port, protocol
    )


# --- the cluster under attack -----------------------------------------------------------------


def scheduler_settings(objects: list[Obj]) -> SchedulerSettings:
    settings = build_settings(objects, the_container(objects, "scaleodm-scheduler"))
    assert isinstance(settings, SchedulerSettings)
    return settings


def run_workflow(objects: list[Obj]) -> dict[str, Any]:
    """The Workflow the rendered scheduler would create for a run."""
    settings = scheduler_settings(objects)
    spec = RunSpec(
        task_id="6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f", attempt=1, name="attack",
        sources=["https://example.com/x.zip"], output_prefix="s3://scaleodm/tasks/x/outputs/",
    )
    return workflows.build_workflow(
        spec, settings.argo, shard=0, step_env={"SCALEODM_S3__BUCKET": settings.s3.bucket}
    )


@dataclass
class World:
    cluster: Cluster
    pods: dict[str, Endpoint]  # workload name (and "workflow", "kube-dns", ...) -> pod

    def __getitem__(self, name: str) -> Endpoint:
        return self.pods[name]

    def namespace_pods(self) -> Iterator[Endpoint]:
        return (p for p in self.pods.values() if p.namespace == NAMESPACE)


def world(overlay: str, pod_cidr: str) -> World:
    objects = rendered(overlay)
    (namespace,) = of_kind(objects, "Namespace")
    cluster = Cluster(
        policies=of_kind(objects, "NetworkPolicy"),
        namespaces={NAMESPACE: namespace["metadata"].get("labels") or {}},
    )
    addresses = ipaddress.ip_network(pod_cidr).hosts()
    next(addresses)
    pods: dict[str, Endpoint] = {}

    def add(name: str, namespace: str, labels: Mapping[str, str]) -> None:
        pods[name] = Endpoint(name, str(next(addresses)), namespace, dict(labels))

    for workload in of_kind(objects, *WORKLOAD_KINDS):
        add(workload["metadata"]["name"], NAMESPACE, pod_template(workload)["metadata"]["labels"])
    manifest = run_workflow(objects)
    add("workflow", NAMESPACE, {
        **manifest["spec"]["podMetadata"]["labels"],
        # Labels Argo's controller adds to a Workflow's pods.
        "workflows.argoproj.io/workflow": manifest["metadata"]["name"],
        "workflows.argoproj.io/completed": "false",
    })
    add("kube-dns", "kube-system", {"k8s-app": "kube-dns"})
    add("keda", "keda", {"app": "keda-operator"})
    add("intruder", "default", {"app": "intruder"})
    return World(cluster, pods)


def outside(name: str, ip: str) -> Endpoint:
    return Endpoint(name, ip)


def worlds() -> list[Any]:
    return [
        pytest.param(overlay, cidr, id=f"{overlay}-{cidr}")
        for overlay in OVERLAYS for cidr in POD_CIDRS
    ]


in_each_world = pytest.mark.parametrize(("overlay", "pod_cidr"), worlds())
overlays = pytest.mark.parametrize("overlay", OVERLAYS)


# --- the evaluator itself ---------------------------------------------------------------------


def test_evaluator_semantics() -> None:
    web = Endpoint("web", "10.0.0.2", NAMESPACE, {"app": "web"})
    db = Endpoint("db", "10.0.0.3", NAMESPACE, {"app": "db", "tier": "data"})
    other = Endpoint("other", "10.0.1.2", "other", {"app": "web"})

    def policy(spec: Obj) -> Obj:
        return {"kind": "NetworkPolicy", "metadata": {"name": "p"}, "spec": spec}

    open_cluster = Cluster([])
    assert allowed(open_cluster, web, db, 5432)  # nothing selects: not isolated
    deny = policy({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    assert not allowed(Cluster([deny]), web, db, 5432)
    db_in = policy({
        "podSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                     "ports": [{"port": 5000, "endPort": 5500}]}],
    })
    web_out = policy({
        "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.9/32"]}}]}],
    })
    cluster = Cluster([deny, db_in, web_out])
    assert allowed(cluster, web, db, 5432)
    assert not allowed(cluster, web, db, 5432, "UDP")
    assert not allowed(cluster, web, db, 6000)
    assert not allowed(cluster, db, web, 5432)  # ingress of web: denied
    assert not allowed(cluster, other, db, 5432)  # podSelector alone: same namespace only
    assert not allowed(cluster, web, outside("x", "10.0.0.9"), 80)
    assert allowed(cluster, web, outside("x", "10.0.0.8"), 80)
    from_ns = policy({
        "podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [NAMESPACE]}
        ]}}]}],
    })
    assert allowed(Cluster([from_ns]), other, db, 1)
    assert not allowed(Cluster([from_ns]), web, db, 1)


# --- attacks: network -------------------------------------------------------------------------


@in_each_world
def test_run_pod_cannot_reach_the_data_plane(overlay: str, pod_cidr: str) -> None:
    """A compromised run (hostile images, a zipurl server's payload) stays in its lane."""
    w = world(overlay, pod_cidr)
    run = w["workflow"]
    targets = [
        (w["mongo"], 27017), (w["nats"], 4222), (w["nats"], 8222), (w["nats"], 6222),
        (w["scaleodm-scheduler"], 8080), (w["scaleodm-watcher"], 8080),
        (w["scaleodm-notifier"], 8080), (w["scaleodm-gateway"], 8080),
        (w["scaleodm-bootstrap"], 8080),
    ]
    for target, port in targets:
        assert not allowed(w.cluster, run, target, port), (target.name, port)
    for host in PRIVATE_HOSTS:
        for port in (22, 80, 27017, 4222):
            assert not allowed(w.cluster, run, outside("lan", host), port), (host, port)


@in_each_world
def test_nothing_reaches_cloud_metadata(overlay: str, pod_cidr: str) -> None:
    w = world(overlay, pod_cidr)
    for pod in w.namespace_pods():
        for ip in METADATA:
            for port in (80, 443, 53, 6443, 8080, 9000):
                for protocol in ("TCP", "UDP"):
                    assert not allowed(
                        w.cluster, pod, outside("metadata", ip), port, protocol
                    ), (pod.name, ip, port, protocol)


@in_each_world
def test_outsiders_reach_only_the_gateway(overlay: str, pod_cidr: str) -> None:
    w = world(overlay, pod_cidr)
    internet = outside("internet", INTERNET)
    for intruder in (w["intruder"], internet):
        assert allowed(w.cluster, intruder, w["scaleodm-gateway"], 3000)
        for target, port in (
            (w["mongo"], 27017), (w["nats"], 4222), (w["nats"], 8222),
            (w["scaleodm-scheduler"], 8080), (w["scaleodm-watcher"], 8080),
            (w["scaleodm-notifier"], 8080), (w["workflow"], 8080), (w["workflow"], 2746),
        ):
            assert not allowed(w.cluster, intruder, target, port), (intruder.name, target.name)
    # KEDA reads NATS monitoring (/jsz), nothing else.
    assert allowed(w.cluster, w["keda"], w["nats"], 8222)
    assert not allowed(w.cluster, w["keda"], w["nats"], 4222)
    assert not allowed(w.cluster, w["keda"], w["mongo"], 27017)


@pytest.mark.parametrize("pod_cidr", POD_CIDRS)
def test_webhooks_cannot_target_private_networks(pod_cidr: str) -> None:
    w = world("base", pod_cidr)
    notifier = w["scaleodm-notifier"]
    for host in (*PRIVATE_HOSTS, "127.0.0.1", "169.254.169.254"):
        for port in (80, 443, 8080):
            assert not allowed(w.cluster, notifier, outside("lan", host), port), (host, port)
    assert not allowed(w.cluster, notifier, w["intruder"], 8080)  # pods of other namespaces
    assert allowed(w.cluster, notifier, outside("receiver", INTERNET), 8443)


@in_each_world
def test_the_system_still_works(overlay: str, pod_cidr: str) -> None:
    """Every flow the components need passes the policies (no self-inflicted outage)."""
    w = world(overlay, pod_cidr)
    c = w.cluster
    api = outside("api-server", API_SERVER)
    internet = outside("s3-or-zipurl", INTERNET)
    for name in ("scaleodm-gateway", "scaleodm-scheduler", "scaleodm-watcher",
                 "scaleodm-notifier", "scaleodm-bootstrap"):
        assert allowed(c, w[name], w["nats"], 4222), name
    for name in ("scaleodm-gateway", "scaleodm-scheduler", "scaleodm-watcher",
                 "scaleodm-notifier"):
        assert allowed(c, w[name], w["mongo"], 27017), name
    assert not allowed(c, w["scaleodm-bootstrap"], w["mongo"], 27017)  # it has no business there
    for name in ("scaleodm-gateway", "scaleodm-scheduler", "scaleodm-watcher",
                 "scaleodm-notifier", "workflow"):
        assert allowed(c, w[name], internet, 443), name
        assert allowed(c, w[name], internet, 9000), name
    for name in ("scaleodm-scheduler", "scaleodm-watcher", "workflow"):
        assert allowed(c, w[name], api, 6443) and allowed(c, w[name], api, 443), name
    for port in (80, 8080, 8443):
        assert allowed(c, w["workflow"], internet, port)  # zipurls on any port
    assert allowed(c, w["workflow"], w["scaleodm-gateway"], 3000)  # split-merge
    assert allowed(c, w["scaleodm-notifier"], internet, 443)
    for pod in w.namespace_pods():
        assert allowed(c, pod, w["kube-dns"], 53, "UDP") and allowed(c, pod, w["kube-dns"], 53)
    if overlay == "dev":
        minio = w["minio"]
        for name in ("scaleodm-gateway", "scaleodm-scheduler", "scaleodm-watcher",
                     "scaleodm-notifier", "workflow", "minio-bucket"):
            assert allowed(c, w[name], minio, 9000), name
        assert not allowed(c, w["scaleodm-bootstrap"], minio, 9000)
        assert allowed(c, w["scaleodm-notifier"], w["intruder"], 8080)  # dev webhook receivers


@overlays
def test_default_deny_isolates_every_pod(overlay: str) -> None:
    w = world(overlay, POD_CIDRS[0])
    deny = [
        p for p in w.cluster.policies
        if p["spec"]["podSelector"] == {} and _types(p) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    assert deny, "no default-deny NetworkPolicy"
    for pod in w.namespace_pods():
        for direction in ("Ingress", "Egress"):
            assert _selecting(w.cluster, pod, direction), (pod.name, direction)


# --- attacks: credentials ---------------------------------------------------------------------


def _secret_refs(container: Container) -> dict[str, tuple[str, str]]:
    refs = {}
    for var in container.spec.get("env") or []:
        assert "value" not in var or not re.search(r"pass|secret|token", var["name"], re.I), (
            f"{container.name}: {var['name']} is a plain value"
        )
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            refs[var["name"]] = (ref["name"], ref["key"])
    return refs


def _foreign(objects: list[Obj], workload: str, name: str) -> Container:
    (container,) = [
        c for c in containers(objects)
        if c.workload["metadata"]["name"] == workload and c.spec["name"] == name
    ]
    return container


def _nats_config(objects: list[Obj]) -> tuple[Container, str]:
    server = _foreign(objects, "nats", "nats")
    args = [str(a) for a in server.spec["args"]]
    path = Path(args[args.index("-c") + 1])
    mount = next(m for m in server.spec["volumeMounts"] if path.parent == Path(m["mountPath"]))
    volume = next(v for v in server.pod["volumes"] if v["name"] == mount["name"])
    cm = find(objects, "ConfigMap", volume["configMap"]["name"])
    assert cm is not None
    return server, cm["data"][path.name]


@overlays
def test_nats_requires_credentials(overlay: str) -> None:
    objects = rendered(overlay)
    server, config = _nats_config(objects)
    auth = re.search(r"authorization\s*\{(?P<body>[^}]*)\}", config)
    assert auth is not None, "nats.conf has no authorization block"
    fields = dict(re.findall(r"^\s*(\w+)\s*[:=]\s*(\S+)\s*$", auth["body"], re.M))
    assert fields["user"] == "$NATS_USER" and fields["password"] == "$NATS_PASSWORD"
    assert "no_auth_user" not in config and "NATS_USER" not in str(server.spec.get("args"))
    refs = _secret_refs(server)
    assert set(refs) >= {"NATS_USER", "NATS_PASSWORD"}
    for program in PROGRAMS_ON_NATS:
        client = _secret_refs(the_container(objects, program))
        assert client["SCALEODM_NATS__USER"] == refs["NATS_USER"], program
        assert client["SCALEODM_NATS__PASSWORD"] == refs["NATS_PASSWORD"], program
        settings = build_settings(objects, the_container(objects, program))
        assert settings.nats.user and settings.nats.password, program
        security = runtime.nats_security(settings.nats)
        assert security is not None and security.username == settings.nats.user
        assert security.password == settings.nats.password.get_secret_value()
        # The dev overlay's published password is flagged: production refuses to run with it.
        assert ("nats.password" in settings.insecure_defaults()) == (overlay == "dev"), program
    password = secret_value(objects, *refs["NATS_PASSWORD"])
    for cm in of_kind(objects, "ConfigMap"):
        assert password is None or password not in str(cm.get("data")), cm["metadata"]["name"]


@overlays
def test_nats_server_takes_the_config_only_with_credentials(overlay: str, tmp_path: Path) -> None:
    objects = rendered(overlay)
    server, config = _nats_config(objects)
    conf = tmp_path / "nats.conf"
    conf.write_text(config)
    refs = _secret_refs(server)
    credentials = {
        var: secret_value(objects, *ref) or f"p{var.lower()}" for var, ref in refs.items()
    }

    def check(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
        return subprocess.run(
            [str(servers.BIN / "nats-server"), "-t", "-c", str(conf)],
            env={**clean, **env}, capture_output=True, text=True, timeout=30, check=False,
        )

    assert check(credentials).returncode == 0
    assert check({}).returncode != 0  # no credentials, no server


@overlays
def test_mongo_requires_credentials(overlay: str) -> None:
    objects = rendered(overlay)
    server = _foreign(objects, "mongo", "mongo")
    assert not {"--noauth", "--noAuth"} & {str(a) for a in server.spec.get("args") or []}
    refs = _secret_refs(server)
    for program in PROGRAMS_ON_MONGO:
        client = _secret_refs(the_container(objects, program))
        assert client["SCALEODM_MONGO__USERNAME"] == refs["MONGO_INITDB_ROOT_USERNAME"], program
        assert client["SCALEODM_MONGO__PASSWORD"] == refs["MONGO_INITDB_ROOT_PASSWORD"], program
        settings = build_settings(objects, the_container(objects, program))
        assert settings.mongo.username and settings.mongo.password, program
        assert "@" not in settings.mongo.url, "credentials belong in the Secret, not the URL"
        assert ("mongo.password" in settings.insecure_defaults()) == (overlay == "dev"), program
    bootstrap = environment(objects, the_container(objects, "scaleodm-bootstrap"))
    assert not {"SCALEODM_MONGO__USERNAME", "SCALEODM_MONGO__PASSWORD"} & set(bootstrap)


class _Recorded(Exception):
    pass


async def test_open_store_logs_in_with_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def client(url: str, **kwargs: Any) -> Any:
        seen.update(url=url, **kwargs)
        raise _Recorded

    monkeypatch.setattr(tasks, "AsyncMongoClient", client)
    settings = MongoSettings(url="mongodb://mongo:27017", username="u", password=SecretStr("p"))
    with pytest.raises(_Recorded):
        await tasks.open_store(settings, "test")
    assert seen["username"] == "u" and seen["password"] == "p"
    seen.clear()
    with pytest.raises(_Recorded):
        await tasks.open_store(MongoSettings(), "test")
    assert "username" not in seen and "password" not in seen


@pytest.mark.integration
async def test_rendered_nats_refuses_anonymous_clients(tmp_path: Path) -> None:
    objects = rendered("dev")
    server, config = _nats_config(objects)
    conf = tmp_path / "nats.conf"
    conf.write_text(config)
    env = {
        var: secret_value(objects, *ref) or "" for var, ref in _secret_refs(server).items()
    }
    port, monitor = servers.free_port(), servers.free_port()
    log = (tmp_path / "nats.log").open("ab")
    proc = subprocess.Popen(
        [str(servers.BIN / "nats-server"), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port),
         "-m", str(monitor), "-js", "-sd", str(tmp_path / "js")],
        env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        servers.wait_http(f"http://127.0.0.1:{monitor}/healthz", proc=proc)
        url = f"nats://127.0.0.1:{port}"
        with pytest.raises(NatsError, match="Authorization"):
            await asyncio.wait_for(
                nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0,
                             connect_timeout=2),
                timeout=10,
            )
        settings = build_settings(objects, the_container(objects, "scaleodm-scheduler"))
        local = settings.model_copy(
            update={"nats": settings.nats.model_copy(update={"url": url})}
        )
        broker = runtime.make_broker(local, "gateway")
        await asyncio.wait_for(broker.connect(), timeout=10)
        await broker.stop()
        # The bootstrap Job (streams and durables) logs in with the same settings.
        job_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SCALEODM_")},
            "SCALEODM_NATS__URL": url,
            "SCALEODM_NATS__USER": local.nats.user or "",
            "SCALEODM_NATS__PASSWORD": (
                local.nats.password.get_secret_value() if local.nats.password else ""
            ),
        }
        done = subprocess.run(
            [sys.executable, "-c", "from scaleodm.common import bootstrap; bootstrap.cli()"],
            env=job_env, capture_output=True, timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    finally:
        servers.stop_process(proc)
        log.close()


# --- attacks: privileges ----------------------------------------------------------------------


def _privilege_problems(name: str, pod: Obj, container: Obj) -> list[str]:
    ctx = container.get("securityContext") or {}
    caps = ctx.get("capabilities") or {}
    problems = []
    if caps.get("add"):
        problems.append(f"{name}: adds capabilities {caps['add']}")
    if caps.get("drop") != ["ALL"]:
        problems.append(f"{name}: does not drop ALL capabilities")
    if ctx.get("privileged"):
        problems.append(f"{name}: privileged")
    if ctx.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: may escalate privileges")
    if (pod.get("securityContext") or {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: no RuntimeDefault seccomp profile")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append(f"{name}: shares a host namespace")
    return problems


@overlays
def test_no_container_adds_capabilities(overlay: str) -> None:
    objects = rendered(overlay)
    problems = []
    for container in containers(objects):
        problems += _privilege_problems(container.name, container.pod, container.spec)
    manifest = run_workflow(objects)
    (template,) = manifest["spec"]["templates"]
    for container in template["containerSet"]["containers"]:
        problems += _privilege_problems(f"workflow/{container['name']}", manifest["spec"],
                                        container)
    assert not problems, "\n".join(problems)


@overlays
def test_run_containers_get_no_kubernetes_token(overlay: str) -> None:
    """ODM works on hostile input: a token of the run's service account (allowed to write
    workflowtaskresults) must not be readable by it, nor by fetch/upload. Kubernetes mounts the
    token only where a container has no mount at its directory; ours all have an empty one."""
    manifest = run_workflow(rendered(overlay))
    (template,) = manifest["spec"]["templates"]
    volumes = {v["name"]: v for v in template["volumes"]}
    shared = template["containerSet"].get("volumeMounts", [])
    for container in template["containerSet"]["containers"]:
        mounts = [*shared, *container.get("volumeMounts", [])]
        [cover] = [mt for mt in mounts if mt["mountPath"] == workflows.SERVICE_ACCOUNT_DIR]
        assert cover.get("readOnly") is True, container["name"]
        volume = volumes[cover["name"]]
        assert set(volume) == {"name", "emptyDir"}, volume  # empty: no projected token in it


# --- availability -----------------------------------------------------------------------------


@overlays
def test_pod_disruption_budgets_cover_every_service(overlay: str) -> None:
    objects = rendered(overlay)
    budgets = of_kind(objects, "PodDisruptionBudget")
    for budget in budgets:
        spec = budget["spec"]
        # Never 0 (a drain would hang) and never minAvailable (one replica would block drains).
        assert "minAvailable" not in spec and spec.get("maxUnavailable", 0) >= 1, budget
        assert spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow", budget
    for component in SERVICE_COMPONENTS:
        workload = the_container(objects, f"scaleodm-{component}").workload
        labels = pod_template(workload)["metadata"]["labels"]
        covering = [b for b in budgets if selector_matches(b["spec"]["selector"], labels)]
        assert len(covering) == 1, (component, [b["metadata"]["name"] for b in covering])
        assert covering[0]["spec"]["selector"] == workload["spec"]["selector"], component
    for container in ours(objects):
        if container.workload["kind"] == "Job":
            continue
        labels = pod_template(container.workload)["metadata"]["labels"]
        assert any(selector_matches(b["spec"]["selector"], labels) for b in budgets)


# --- outbound guard ---------------------------------------------------------------------------


def test_base_outbound_allow_opens_nothing_private() -> None:
    objects = rendered("base")
    for container in ours(objects):
        settings: BaseServiceSettings = build_settings(objects, container)
        policy = netguard.OutboundPolicy(settings.outbound_allow)
        for address in PRIVATE_PROBES:
            assert policy.refusal(address) is not None, (container.name, address)
        assert policy.refusal(INTERNET) is None
    # The runs' fetch step gets no SCALEODM_OUTBOUND_ALLOW at all (the settings default, []).
    (template,) = run_workflow(objects)["spec"]["templates"]
    for container in template["containerSet"]["containers"]:
        assert not any(v["name"] == "SCALEODM_OUTBOUND_ALLOW" for v in container.get("env", []))
