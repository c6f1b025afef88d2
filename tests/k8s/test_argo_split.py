"""The Argo executor and split-merge on the cluster, against the Kubernetes API double: a task
with ``split`` gets a Secret of its own holding ``--sm-cluster``'s URL (the gateway as runs see
it, with the token scoped to the task), created before its Workflow and deleted by ``remove``;
a redelivered start finds it and makes no second one; a task without ``split`` gets none."""

from __future__ import annotations

import uuid

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import SecretStr

from scaleodm.common import splitmerge
from scaleodm.common.contracts.commands import CreateTask
from scaleodm.common.settings import ArgoSettings, SchedulerSettings, SplitSettings
from scaleodm.scheduler import workflows
from scaleodm.scheduler.executors.argo import ArgoExecutor
from scaleodm.scheduler.executors.base import StartOutcome

KEY = "k" * 40
GATEWAY = "http://scaleodm-gateway.scaleodm.svc:3000"


def spec(task_id: str, *options: dict[str, object]) -> CreateTask:
    return CreateTask(task_id=task_id, attempt=1, name="t", options=list(options),
                      sources=[f"s3://b/tasks/{task_id}/inputs/"],
                      output_prefix=f"s3://b/tasks/{task_id}/outputs/", images_count=40,
                      size_class="small")


@pytest.fixture
def executor(api: ApiClient, namespace: str) -> ArgoExecutor:
    settings = SchedulerSettings(
        executor="argo", argo=ArgoSettings(namespace=namespace, capacity_configmap=""),
        split=SplitSettings(token_key=SecretStr(KEY), cluster_url=GATEWAY))
    return ArgoExecutor(api, settings)


async def test_a_splitting_task_gets_its_secret_and_loses_it_with_the_task(
        executor: ArgoExecutor, api: ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    task_id = str(uuid.uuid4())
    assert await executor.start(spec(task_id, {"name": "split", "value": 10})) == (
        StartOutcome.STARTED)
    secret = await core.read_namespaced_secret(workflows.sm_cluster_secret(task_id), namespace)
    url = (secret.string_data or {})["url"]
    assert url == splitmerge.cluster_url(GATEWAY, splitmerge.scoped_token(SecretStr(KEY),
                                                                          task_id))
    assert splitmerge.parent_of(SecretStr(KEY), url.split("token=")[1]) == task_id
    # A redelivery: the Workflow exists, the Secret too; nothing fails.
    assert await executor.start(spec(task_id, {"name": "split", "value": 10})) == (
        StartOutcome.EXISTS)
    await executor.remove(task_id, 1)
    with pytest.raises(ApiException) as gone:
        await core.read_namespaced_secret(workflows.sm_cluster_secret(task_id), namespace)
    assert gone.value.status == 404


async def test_a_task_without_split_gets_no_secret(
        executor: ArgoExecutor, api: ApiClient, namespace: str) -> None:
    task_id = str(uuid.uuid4())
    assert await executor.start(spec(task_id, {"name": "dsm", "value": True})) == (
        StartOutcome.STARTED)
    secrets = await client.CoreV1Api(api).list_namespaced_secret(namespace)
    assert secrets.items == []
    await executor.remove(task_id, 1)
