"""The Argo Workflow of one task attempt: fetch → ODM → upload in one pod (scaleodm.md §4).

``build_workflow`` is pure: it returns the manifest the Argo executor creates as a custom object
(no Argo Server). It builds Hera 7.1's pydantic models (``hera.workflows.models``, the generated
Argo/Kubernetes schema), so a misspelt field or a wrong type fails here, and dumps them camelCase
with ``None`` omitted; the golden tests (``tests/golden/``) pin the result.

Why a full Workflow built per attempt, not a deployed ``WorkflowTemplate`` + a small Workflow
with ``workflowTemplateRef`` (stack-notes §4): what differs per attempt is not only parameter
*values* but the shape — the ODM container's resources come from the sizing table
(``sizing.py``: image count × options), the ODM argv is a variable-length list of
``to_engine_args`` items, the labels carry the task, attempt and shard, the node selector is
optional. A template would need all of that as string parameters (argv lists cannot be spliced
in without a shell — exactly what scaleodm.md §10 #9/#15 says not to do) and would be a second,
separately deployed object that can drift from the code creating Workflows against it. Here one
function owns the whole manifest and a golden file shows every change in review.

Design points (scaleodm.md §4 kept, §10 gaps avoided):

- ``metadata.name`` = ``run_name(task_id, attempt)``, never ``generateName``: a redelivered
  create meets 409 and changes nothing (§10 #14).
- Labels ``app.kubernetes.io/managed-by``, ``scaleodm.io/{task,attempt,shard}`` on the Workflow
  and, through ``spec.podMetadata``, on its pods: the watcher selects its shards by label. Their
  names, the container names and ``shard_of`` are the Argo run contract the watcher shares
  (``scaleodm.common.argoruns``).
- One template ``odm``: a **containerSet** (one pod, so the three steps share an emptyDir
  ``workspace`` at ``/workspace``): ``fetch`` (our image, ``scaleodm.run.stages fetch``) → ``main``
  (the ODM image, ``python3 /code/run.py <options…> --project-path /workspace <task_id>``) →
  ``upload`` (``scaleodm.run.stages upload``). Every value is its own argv item; no container
  runs a shell (§10 #9/#15). The ODM container is named ``main``: Argo reads a container set's
  outputs and result from the container of that name.
- The pod is scheduled for the *sum* of the three containers' requests (all are created at once
  and wait on their dependencies), so ``fetch``/``upload`` ask for little.
- S3 credentials reach ``fetch``/``upload`` only via ``secretKeyRef`` to ``settings.s3_secret``
  (ADR 0002 in §9); endpoint, region and bucket are plain values from the caller
  (``step_env``), with the fetch limits and the outbound allow-list (``STEP_SETTINGS``).
  The ODM container gets no S3 access at all, and none of our containers gets the service
  account's Kubernetes token: an empty read-only volume covers its directory
  (``NO_TOKEN_VOLUME``), so only Argo's injected ``wait`` sidecar keeps it.
- ``retryStrategy`` on the template (a retry is a new pod, the whole pipeline re-runs on a fresh
  workspace) for transient errors only, with a bounded backoff; ``activeDeadlineSeconds``,
  ``podGC`` with a delete delay (logs stay readable for the watcher), ``ttlStrategy``.
- Hardening: seccomp ``RuntimeDefault`` and ``fsGroup`` (= our uid/gid 10001) for the pod;
  **no container has any Linux capability** (``drop: [ALL]``, nothing added) and none may
  escalate privileges. ``fetch``/``upload`` run as our image's non-root user with a read-only
  root filesystem. What ODM (opendronemap/odm, container ``main``) needs, exactly:

  - the **root user** (uid 0), the image's default: ODM writes into its own tree under
    ``/code``, which only root owns in that image (as its *owner*, so no capability is needed);
  - **no capabilities**: the only other place it writes is the project ``/workspace/<task_id>``,
    which ``fetch`` (uid 10001) creates group-writable for gid 10001 with setgid directories
    (``scaleodm.run.stages.share_with_group``: umask 002, then an explicit ``chmod`` of the
    whole tree). Kubernetes adds the pod's ``fsGroup`` 10001 to every container's supplementary
    groups, so ODM's processes write there through the *group* permission bits; ``CHOWN``,
    ``DAC_OVERRIDE`` and ``FOWNER`` (which this container used to add) are not needed. New
    entries inherit gid 10001 from the setgid directories, and with the image's umask (022)
    ODM's outputs are readable by all, so ``upload`` can read them.
- Two template languages read the argv and env strings of the containers, and user text (task
  name, zipurl, outputs, option values) reaches both:

  - **Kubernetes** expands ``$(NAME)`` in a container's ``command``, ``args`` and env values
    from the container's environment (env values see the variables defined before them) —
    ``$(SCALEODM_S3__SECRET_ACCESS_KEY)`` in a zipurl would hand the S3 key to the URL's host.
    Argo's emissary executor does not change that: the controller only prepends
    ``/var/run/argo/argoexec emissary … --`` to ``command``; ``args`` stay in the pod spec, and
    the kubelet expands both before argoexec starts. ``$$`` is the only escape (it becomes
    ``$``), so the **last step** of ``build_workflow`` doubles every ``$`` in every command,
    args and env value string of every container of the manifest (``escape_for_kubernetes``,
    one function over the whole container list: a field added later cannot miss it).
  - **Argo** substitutes ``{{…}}`` (and evaluates ``{{=…}}``) in every string of a template.
    In the ``--spec`` JSON a ``{{`` can only sit inside a JSON string and is written
    ``{\\u007b`` (the same JSON value); an ODM option value holding ``{{`` cannot be escaped in a
    raw argv item, so ``build_workflow`` refuses it (``ArgoTemplateError``) rather than let
    Argo interpret it (the gateway refuses such values up front).
- Every container has ``terminationMessagePolicy: FallbackToLogsOnError``: a failed step's last
  log lines (``stages`` ends with the reason; ODM with its error explanation) become the
  container's termination message, which Argo puts into the node's message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from hera.workflows import models as m

from scaleodm.common import argoruns, splitmerge
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.contracts.ids import is_task_id, run_name
from scaleodm.common.domain.options import to_engine_args
from scaleodm.common.settings import ArgoSettings
from scaleodm.run import stages
from scaleodm.scheduler import sizing

__all__ = [
    "ArgoTemplateError",
    "SECRET_KEYS",
    "STAGES_MODULE",
    "STEP_RESOURCES",
    "argo_safe_json",
    "build_workflow",
    "escape_for_kubernetes",
    "kubernetes_literal",
    "labels",
]

TEMPLATE: Final = "odm"
WORKSPACE_VOLUME: Final = "workspace"
# An empty, read-only volume mounted over the service account token's directory in each of our
# containers: Kubernetes then mounts no token there. Argo's own `wait` sidecar (not one of ours)
# keeps the pod's token to record step results; fetch, ODM and upload need no Kubernetes access.
NO_TOKEN_VOLUME: Final = "no-service-account-token"
SERVICE_ACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
WORKSPACE: Final = "/workspace"
# The fetch/upload steps' module, run with ``python -m`` (named from the module, so it follows it).
STAGES_MODULE: Final = stages.__name__
ODM_RUN: Final = "/code/run.py"

# Env var of the fetch/upload steps → key in the Secret ``ArgoSettings.s3_secret``.
SECRET_KEYS: Final[dict[str, str]] = {
    "SCALEODM_S3__ACCESS_KEY_ID": "access_key_id",
    "SCALEODM_S3__SECRET_ACCESS_KEY": "secret_access_key",
}
S3_ENV_PREFIX: Final = "SCALEODM_S3__"
# The scheduler's own settings the fetch/upload steps read (``stages`` builds SchedulerSettings
# from its environment): without them an Argo run would fetch with the defaults, not the
# operator's limits and outbound allow-list.
STEP_SETTINGS: Final = frozenset({
    "SCALEODM_ZIP_MAX_BYTES",
    "SCALEODM_ZIP_MAX_EXPANDED_BYTES",
    "SCALEODM_ZIP_MAX_RATIO",
    "SCALEODM_ZIP_MAX_ENTRIES",
    "SCALEODM_TASK_DISK_BUDGET_BYTES",
    "SCALEODM_FETCH_TIMEOUT_S",
    "SCALEODM_OUTBOUND_ALLOW",
})

# The runtime user of our image (Dockerfile: scaleodm, uid/gid 10001).
RUNNER_UID: Final = 10001
# fetch/upload: streaming downloads, zip extraction, part-sized upload buffers.
STEP_RESOURCES: Final = sizing.Resources(
    cpu_request="250m",
    cpu_limit="1000m",
    memory_request="512Mi",
    memory_limit="1024Mi",
    ephemeral_request="1024Mi",
    ephemeral_limit="2048Mi",
)
RETRY_POLICY: Final = "OnTransientError"
BACKOFF_DURATION: Final = "60s"
BACKOFF_FACTOR: Final = 2
BACKOFF_MAX_DURATION: Final = "1h"
TERMINATION_MESSAGE_POLICY: Final = "FallbackToLogsOnError"


class ArgoTemplateError(ValueError):
    """A value of the run would be read by Argo as template syntax (``{{``)."""


def argo_safe_json(text: str) -> str:
    """``text`` (compact JSON) without ``{{``: the same JSON value, Argo cannot see a tag in it.

    Structural braces never follow each other in JSON (an object's first token is a string), so
    every ``{{`` is inside a string, where ``\\u007b`` is the same character.
    """
    return text.replace("{{", "{\\u007b")


def kubernetes_literal(text: str) -> str:
    """``text`` as a container string Kubernetes passes on unchanged: every ``$`` doubled.

    Kubernetes' expansion turns ``$$`` into ``$`` and never reads a ``$(`` that follows an
    escaped ``$``, so the process receives exactly ``text``, whatever follows each ``$``.
    """
    return text.replace("$", "$$")


def escape_for_kubernetes(containers: Iterable[dict[str, Any]]) -> None:
    """Escape, in place, every string Kubernetes expands ``$(VAR)`` in: each item of
    ``command`` and ``args`` and each env ``value`` of every container given."""
    for container in containers:
        for key in ("command", "args"):
            if key in container:
                container[key] = [kubernetes_literal(item) for item in container[key]]
        for var in container.get("env", []):
            if "value" in var:
                var["value"] = kubernetes_literal(var["value"])


def _containers(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container of every template of a dumped Workflow, whatever the template kind."""
    for template in manifest["spec"]["templates"]:
        for key in ("container", "script"):
            if key in template:
                yield template[key]
        for key in ("initContainers", "sidecars"):
            yield from template.get(key, [])
        yield from template.get("containerSet", {}).get("containers", [])


def labels(spec: RunSpec, shard: int) -> dict[str, str]:
    """The labels of an attempt's Workflow and of its pods (``argoruns``: the watcher's too)."""
    return {
        argoruns.LABEL_MANAGED_BY: argoruns.MANAGED_BY,
        argoruns.LABEL_TASK: spec.task_id,
        argoruns.LABEL_ATTEMPT: str(spec.attempt),
        argoruns.LABEL_SHARD: str(shard),
    }


def _resources(res: sizing.Resources) -> m.ResourceRequirements:
    return m.ResourceRequirements(
        requests={k: m.Quantity(v) for k, v in res.requests().items()},
        limits={k: m.Quantity(v) for k, v in res.limits().items()},
    )


def _step_env(step_env: Mapping[str, str], secret: str) -> list[m.EnvVar]:
    env = [
        m.EnvVar(
            name=name,
            value_from=m.EnvVarSource(secret_key_ref=m.SecretKeySelector(name=secret, key=key)),
        )
        for name, key in SECRET_KEYS.items()
    ]
    for name in sorted(step_env):
        plain_s3 = name.startswith(S3_ENV_PREFIX) and name not in SECRET_KEYS
        if not (plain_s3 or name in STEP_SETTINGS):
            raise ValueError(
                f"step_env takes plain {S3_ENV_PREFIX}* values and the step settings "
                f"{sorted(STEP_SETTINGS)}; credentials come from the Secret: {name!r}"
            )
        env.append(m.EnvVar(name=name, value=step_env[name]))
    return env


def _step(
    name: str, image: str, spec_json: str, env: list[m.EnvVar], depends_on: str | None
) -> m.ContainerNode:
    """A ``stages`` step in our image, as its non-root user."""
    return m.ContainerNode(
        name=name,
        image=image,
        command=["python", "-m", STAGES_MODULE],
        args=[name, "--spec", spec_json, "--workspace", WORKSPACE],
        dependencies=[depends_on] if depends_on else None,
        env=env,
        resources=_resources(STEP_RESOURCES),
        termination_message_policy=TERMINATION_MESSAGE_POLICY,
        security_context=m.SecurityContext(
            run_as_non_root=True,
            run_as_user=RUNNER_UID,
            run_as_group=RUNNER_UID,
            allow_privilege_escalation=False,
            read_only_root_filesystem=True,
            capabilities=m.Capabilities(drop=["ALL"]),
        ),
    )


def _engine_args(spec: RunSpec) -> list[str]:
    args = to_engine_args(spec.options)
    for arg in args:
        if "{{" in arg:
            raise ArgoTemplateError(
                f"Option value {arg!r} contains '{{{{', which Argo Workflows reads as template "
                "syntax; it cannot be passed to an Argo run"
            )
    return args


def _odm(spec: RunSpec, settings: ArgoSettings) -> m.ContainerNode:
    """ODM itself: options as separate argv items, project ``/workspace/<task_id>``."""
    return m.ContainerNode(
        name=argoruns.ENGINE_CONTAINER,
        image=settings.odm_image,
        command=["python3"],
        args=[ODM_RUN, *_engine_args(spec), "--project-path", WORKSPACE, spec.task_id],
        dependencies=[argoruns.FETCH_CONTAINER],
        env=[m.EnvVar(name="ODM_NONINTERACTIVE", value="1")],
        resources=_resources(sizing.size(spec.images_count, spec.options, settings)),
        termination_message_policy=TERMINATION_MESSAGE_POLICY,
        # The image's root user, without any capability (see the module docstring).
        security_context=m.SecurityContext(
            allow_privilege_escalation=False,
            capabilities=m.Capabilities(drop=["ALL"]),
        ),
    )


def _synchronization(spec: RunSpec, settings: ArgoSettings) -> m.Synchronization | None:
    """The semaphores the Workflow waits on (``argo.capacity_configmap``): ``all`` and its size
    class's. The scheduler admits no more runs than they allow; they hold back what a stale
    admission would start beyond it (Argo keeps such a Workflow pending, without pods)."""
    if not settings.capacity_configmap:
        return None
    # The class's first: Argo queues a Workflow on each lock in turn, and a lock it cannot set
    # up (a class missing from the ConfigMap) would leave its place in the earlier queues,
    # holding back every later Workflow on ``all`` (Argo 3.7 ``prepAcquire``).
    keys = ([spec.size_class] if spec.size_class else []) + [CAPACITY_ALL]
    return m.Synchronization(semaphores=[
        m.SemaphoreRef(config_map_key_ref=m.ConfigMapKeySelector(
            name=settings.capacity_configmap, key=key))
        for key in keys
    ])


# The key of the global cap in the capacity ConfigMap (the others are the size classes' names).
CAPACITY_ALL = "all"

# Split-merge on the cluster (``splitmerge``): ODM's ``--sm-cluster`` URL holds a token, so it
# lives in a Secret of its task (the executor creates it before the Workflow) and reaches ODM
# through an env var Kubernetes expands in the args: the manifest never holds it.
SM_CLUSTER_ENV: Final = "SCALEODM_SM_CLUSTER"
SM_CLUSTER_KEY: Final = "url"
SM_CLUSTER_REFERENCE: Final = f"$({SM_CLUSTER_ENV})"


def sm_cluster_secret(task_id: str) -> str:
    """The name of the Secret holding a splitting task's ``--sm-cluster`` URL."""
    return f"scaleodm-sm-{task_id}"


def _add_sm_cluster(manifest: dict[str, Any], task_id: str) -> None:
    """ODM's ``--sm-cluster`` from the task's Secret, after the escaping: the one ``$(VAR)``
    of the manifest Kubernetes is meant to expand (a name of ours, no user text)."""
    (template,) = manifest["spec"]["templates"]
    main = next(c for c in template["containerSet"]["containers"]
                if c["name"] == argoruns.ENGINE_CONTAINER)
    at = main["args"].index("--project-path")
    main["args"][at:at] = ["--sm-cluster", SM_CLUSTER_REFERENCE]
    main.setdefault("env", []).append({"name": SM_CLUSTER_ENV, "valueFrom": {"secretKeyRef": {
        "name": sm_cluster_secret(task_id), "key": SM_CLUSTER_KEY}}})


def build_workflow(
    spec: RunSpec, settings: ArgoSettings, *, shard: int, step_env: Mapping[str, str],
    sm_cluster: bool = False, traceparent: str | None = None,
) -> dict[str, Any]:
    """The Workflow manifest of ``spec``'s attempt, camelCase, ``None`` fields omitted.

    ``step_env`` holds the plain settings of the fetch/upload steps by env var name: S3's
    (``SCALEODM_S3__ENDPOINT_URL``, ``…__REGION``, ``…__BUCKET``, ``…__INPUT_ALLOW``) and the
    ``STEP_SETTINGS`` (fetch limits, outbound allow-list); the credentials always come
    from the Secret ``settings.s3_secret``. ``ValueError`` for a task id that is not a uuid or
    for credentials in ``step_env``; ``ArgoTemplateError`` for an option value holding ``{{``.
    Every container string Kubernetes would expand is escaped (``$`` → ``$$``, module docstring).
    ``sm_cluster``: split-merge on the cluster is configured; a task that splits then gets
    ``--sm-cluster`` from its Secret (``sm_cluster_secret``). ``traceparent``: the trace the run
    belongs to (tracing.py), as the annotation ``argoruns.TRACE_ANNOTATION`` and ODM's
    ``TRACEPARENT``.
    """
    if not is_task_id(spec.task_id):
        raise ValueError(f"not a task uuid: {spec.task_id!r}")
    # Only the RunSpec's own fields (a CreateTask/RestartTask also carries its verb).
    spec_json = argo_safe_json(spec.model_dump_json(include=set(RunSpec.model_fields)))
    env = _step_env(step_env, settings.s3_secret)
    own_labels = labels(spec, shard)
    template = m.Template(
        name=TEMPLATE,
        volumes=[
            m.Volume(name=WORKSPACE_VOLUME, empty_dir=m.EmptyDirVolumeSource()),
            m.Volume(name=NO_TOKEN_VOLUME,
                     empty_dir=m.EmptyDirVolumeSource(size_limit=m.Quantity("1Ki"))),
        ],
        container_set=m.ContainerSetTemplate(
            volume_mounts=[
                m.VolumeMount(name=WORKSPACE_VOLUME, mount_path=WORKSPACE),
                m.VolumeMount(name=NO_TOKEN_VOLUME, mount_path=SERVICE_ACCOUNT_DIR,
                              read_only=True),
            ],
            containers=[
                _step(argoruns.FETCH_CONTAINER, settings.runner_image, spec_json, env, None),
                _odm(spec, settings),
                _step(argoruns.UPLOAD_CONTAINER, settings.runner_image, spec_json, env,
                      argoruns.ENGINE_CONTAINER),
            ],
        ),
        retry_strategy=m.RetryStrategy(
            limit=m.IntOrString(settings.retry_limit),
            retry_policy=RETRY_POLICY,
            backoff=m.Backoff(
                duration=BACKOFF_DURATION,
                factor=m.IntOrString(BACKOFF_FACTOR),
                max_duration=BACKOFF_MAX_DURATION,
            ),
        ),
    )
    workflow = m.Workflow(
        api_version=argoruns.API_VERSION,
        kind="Workflow",
        metadata=m.ObjectMeta(
            name=run_name(spec.task_id, spec.attempt),
            namespace=settings.namespace,
            labels=own_labels,
            annotations={argoruns.TRACE_ANNOTATION: traceparent} if traceparent else None,
        ),
        spec=m.WorkflowSpec(
            entrypoint=TEMPLATE,
            templates=[template],
            service_account_name=settings.service_account,
            pod_metadata=m.Metadata(labels=dict(own_labels)),
            node_selector=dict(settings.node_selector) or None,
            security_context=m.PodSecurityContext(
                fs_group=RUNNER_UID,
                seccomp_profile=m.SeccompProfile(type="RuntimeDefault"),
            ),
            active_deadline_seconds=settings.active_deadline_s,
            priority=spec.priority,
            synchronization=_synchronization(spec, settings),
            pod_gc=m.PodGC(
                strategy="OnWorkflowCompletion",
                delete_delay_duration=f"{settings.pod_gc_delay_s}s",
            ),
            ttl_strategy=m.TTLStrategy(
                seconds_after_success=settings.ttl_after_success_s,
                seconds_after_failure=settings.ttl_after_failure_s,
            ),
        ),
    )
    manifest: dict[str, Any] = workflow.model_dump(mode="json", by_alias=True, exclude_none=True)
    # Last step, over every container: nothing the kubelet expands is left unescaped.
    if traceparent:
        (template,) = manifest["spec"]["templates"]
        for container in template["containerSet"]["containers"]:
            if container["name"] == argoruns.ENGINE_CONTAINER:
                container["env"].append({"name": "TRACEPARENT", "value": traceparent})
    escape_for_kubernetes(_containers(manifest))
    if sm_cluster and splitmerge.splits(spec.options):
        _add_sm_cluster(manifest, spec.task_id)
    return manifest
