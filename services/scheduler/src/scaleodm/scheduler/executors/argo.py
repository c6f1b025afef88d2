"""Argo executor: each task attempt is one Argo Workflow, created as a custom object.

The Workflow's name derives from uuid + attempt (``run_name``), so a redelivered create meets
409 Conflict and changes nothing. Cancel is a merge patch ``spec.shutdown: Terminate`` (the
watcher maps the resulting Failed phase to 50, never 30); remove deletes every attempt's
Workflow; restart is simply the next attempt's create. The scheduler needs no Argo Server:
``workflows`` create/patch/delete on the Kubernetes API (RBAC in deploy/k8s).
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from scaleodm.common import argoruns, metrics, splitmerge, tracing
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.contracts.ids import run_name
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import SchedulerSettings
from scaleodm.scheduler import workflows
from scaleodm.scheduler.executors.base import StartOutcome

log = get_logger(__name__)

MERGE_PATCH = "application/merge-patch+json"


def step_env(settings: SchedulerSettings) -> dict[str, str]:
    """What the run's fetch/upload steps must know of this scheduler's settings, by env var:
    S3's plain values and the ``workflows.STEP_SETTINGS`` (limits, outbound allow-list)."""
    s3 = settings.s3
    env = {
        "SCALEODM_S3__REGION": s3.region,
        "SCALEODM_S3__BUCKET": s3.bucket,
        "SCALEODM_ZIP_MAX_BYTES": str(settings.zip_max_bytes),
        "SCALEODM_ZIP_MAX_EXPANDED_BYTES": str(settings.zip_max_expanded_bytes),
        "SCALEODM_ZIP_MAX_RATIO": repr(settings.zip_max_ratio),
        "SCALEODM_ZIP_MAX_ENTRIES": str(settings.zip_max_entries),
        "SCALEODM_TASK_DISK_BUDGET_BYTES": str(settings.task_disk_budget_bytes),
        "SCALEODM_FETCH_TIMEOUT_S": repr(settings.fetch_timeout_s),
        "SCALEODM_OUTBOUND_ALLOW": json.dumps([str(n) for n in settings.outbound_allow]),
    }
    if s3.endpoint_url:
        env["SCALEODM_S3__ENDPOINT_URL"] = s3.endpoint_url
    if s3.input_allow:  # the fetch step applies the same s3:// input rule as a local run
        env["SCALEODM_S3__INPUT_ALLOW"] = json.dumps(s3.input_allow)
    return env


class ArgoExecutor:
    def __init__(self, api: client.ApiClient, settings: SchedulerSettings) -> None:
        self.api = api
        self.settings = settings
        self.argo = settings.argo
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    async def start(self, spec: RunSpec) -> StartOutcome:
        split = self.settings.split
        manifest = workflows.build_workflow(
            spec, self.argo, shard=argoruns.shard_of(spec.task_id, self.argo.shards),
            step_env=step_env(self.settings), sm_cluster=split.enabled,
            traceparent=tracing.current_traceparent(),
        )
        if split.enabled and splitmerge.splits(spec.options):
            await self._sm_cluster_secret(spec.task_id)
        try:
            with metrics.kubernetes_call("create", "workflows"):
                await self.custom.create_namespaced_custom_object(
                    argoruns.GROUP, argoruns.VERSION, self.argo.namespace, argoruns.PLURAL,
                    manifest, _request_timeout=self.argo.request_timeout_s,
                )
        except ApiException as exc:
            if exc.status == 409:  # the deterministic name exists: a redelivery
                return StartOutcome.EXISTS
            raise
        log.info("workflow created", workflow=manifest["metadata"]["name"])
        return StartOutcome.STARTED

    async def _sm_cluster_secret(self, task_id: str) -> None:
        """The task's ``--sm-cluster`` URL, token included, in a Secret of its own (the
        Workflow reads it by name; ``remove`` deletes it). Its content is a function of the
        task, so an existing one (a redelivery) is the same."""
        split = self.settings.split
        assert split.token_key is not None and split.cluster_url is not None
        url = splitmerge.cluster_url(split.cluster_url,
                                     splitmerge.scoped_token(split.token_key, task_id))
        body = client.V1Secret(
            api_version="v1", kind="Secret", type="Opaque",
            metadata=client.V1ObjectMeta(
                name=workflows.sm_cluster_secret(task_id), namespace=self.argo.namespace,
                labels={argoruns.LABEL_TASK: task_id,
                        argoruns.LABEL_MANAGED_BY: argoruns.MANAGED_BY}),
            string_data={workflows.SM_CLUSTER_KEY: url})
        try:
            with metrics.kubernetes_call("create", "secrets"):
                await self.core.create_namespaced_secret(
                    self.argo.namespace, body, _request_timeout=self.argo.request_timeout_s)
        except ApiException as exc:
            if exc.status != 409:
                raise

    async def cancel(self, task_id: str, attempt: int) -> bool:
        name = run_name(task_id, attempt)
        body: dict[str, Any] = {"spec": {"shutdown": "Terminate"}}
        try:
            with metrics.kubernetes_call("patch", "workflows"):
                await self.custom.patch_namespaced_custom_object(
                    argoruns.GROUP, argoruns.VERSION, self.argo.namespace, argoruns.PLURAL, name,
                    body,
                    _content_type=MERGE_PATCH,  # type: ignore[call-arg]  # accepted via **kwargs
                    _request_timeout=self.argo.request_timeout_s,
                )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        log.info("workflow terminated", workflow=name)
        return True

    async def remove(self, task_id: str, attempt: int) -> None:
        for n in range(1, attempt + 1):
            try:
                with metrics.kubernetes_call("delete", "workflows"):
                    await self.custom.delete_namespaced_custom_object(
                        argoruns.GROUP, argoruns.VERSION, self.argo.namespace, argoruns.PLURAL,
                        run_name(task_id, n),
                        propagation_policy="Background",
                        _request_timeout=self.argo.request_timeout_s,
                    )
            except ApiException as exc:
                if exc.status != 404:
                    raise
        try:
            with metrics.kubernetes_call("delete", "secrets"):
                await self.core.delete_namespaced_secret(
                    workflows.sm_cluster_secret(task_id), self.argo.namespace,
                    _request_timeout=self.argo.request_timeout_s)
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def close(self) -> None:
        await self.api.close()
