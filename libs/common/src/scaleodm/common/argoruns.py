"""The Argo run contract: what the scheduler (creates Workflows) and the watcher (follows them)
must agree on, defined once (the Kubernetes counterpart of ``localruns``).

- the Workflow custom resource: ``GROUP``/``VERSION``/``PLURAL`` (``API_VERSION``);
- the labels the scheduler puts on a Workflow and, through ``spec.podMetadata``, on its pods, and
  the watcher selects and reads: ``LABEL_MANAGED_BY`` = ``MANAGED_BY``, ``LABEL_TASK``,
  ``LABEL_ATTEMPT``, ``LABEL_SHARD``; and the label Argo itself puts on a Workflow's pods
  (``LABEL_WORKFLOW``);
- the container names of a run's pod: ``FETCH_CONTAINER`` → ``ENGINE_CONTAINER`` →
  ``UPLOAD_CONTAINER``. The engine's must be ``main``: Argo reads a container set's outputs and
  result from the container of that name, and the watcher follows its log;
- ``shard_of``, the task's shard (the scheduler labels it, watcher replicas split shards);
- ``api_client``, the Kubernetes API client both services build the same way.

Only this module of ``scaleodm.common`` imports the Kubernetes client (import-linter contracts in
pyproject.toml); the gateway and the notifier never import it.
"""

from __future__ import annotations

import os
import zlib
from typing import Final

from kubernetes_asyncio import client, config

__all__ = [
    "API_VERSION",
    "ENGINE_CONTAINER",
    "FETCH_CONTAINER",
    "GROUP",
    "LABEL_ATTEMPT",
    "LABEL_MANAGED_BY",
    "LABEL_SHARD",
    "LABEL_TASK",
    "TRACE_ANNOTATION",
    "LABEL_WORKFLOW",
    "MANAGED_BY",
    "PLURAL",
    "UPLOAD_CONTAINER",
    "VERSION",
    "api_client",
    "shard_of",
]

GROUP: Final = "argoproj.io"
VERSION: Final = "v1alpha1"
PLURAL: Final = "workflows"
API_VERSION: Final = f"{GROUP}/{VERSION}"

LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "scaleodm"
LABEL_TASK: Final = "scaleodm.io/task"
# The trace a Workflow's run belongs to (tracing.py): set by the scheduler, continued by the
# watcher while it follows the Workflow.
TRACE_ANNOTATION: Final = "scaleodm.io/traceparent"
LABEL_ATTEMPT: Final = "scaleodm.io/attempt"
LABEL_SHARD: Final = "scaleodm.io/shard"
# Set by Argo (not by us) on every pod of a Workflow: the Workflow's name.
LABEL_WORKFLOW: Final = "workflows.argoproj.io/workflow"

FETCH_CONTAINER: Final = "fetch"
ENGINE_CONTAINER: Final = "main"
UPLOAD_CONTAINER: Final = "upload"


def shard_of(task_id: str, shards: int) -> int:
    """The task's shard: CRC-32 of the lower-case uuid modulo ``shards`` (stable everywhere)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, not {shards}")
    return zlib.crc32(task_id.lower().encode("ascii")) % shards


async def api_client(kubeconfig: str | os.PathLike[str] | None) -> client.ApiClient:
    """A Kubernetes API client: in-cluster config unless a kubeconfig file is given.

    The caller closes it (``await api.close()``).
    """
    cfg = client.Configuration()
    if kubeconfig:
        await config.load_kube_config(config_file=os.fspath(kubeconfig), client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(cfg)
