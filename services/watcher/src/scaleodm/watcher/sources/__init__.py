"""Run sources: where the watcher learns about runs. ``base`` declares the port, ``local`` (run
directories) and ``argo`` (Workflows and their pods) implement it, and ``open`` builds the one the
settings name."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import assert_never

from scaleodm.common import argoruns
from scaleodm.common.emitting import Emitter
from scaleodm.common.settings import RunPlatform, WatcherSettings
from scaleodm.common.store.tasks import TaskStore
from scaleodm.watcher.sources import argo, local
from scaleodm.watcher.sources.base import RunSource

__all__ = ["RunSource", "open"]


@contextlib.asynccontextmanager
async def open(
    settings: WatcherSettings, store: TaskStore, emitter: Emitter
) -> AsyncIterator[RunSource]:
    """The run source of ``settings.source``; what it holds is closed on exit.

    ``argo``: Workflows through the Kubernetes API (``settings.argo.kubeconfig``, else in-cluster).
    ``local``: the run directories under ``settings.local.runs_dir``.
    """
    match settings.source:
        case RunPlatform.ARGO:
            api = await argoruns.api_client(settings.argo.kubeconfig)
            try:
                yield argo.ArgoRunSource(api, store, emitter, settings)
            finally:
                await api.close()
        case RunPlatform.LOCAL:
            yield local.LocalRunSource(
                settings.local.runs_dir, store, emitter,
                poll_interval_s=settings.poll_interval_s,
                batch_lines=settings.output_batch_lines,
                start_grace_s=settings.run_start_grace_s,
            )
        case _:
            assert_never(settings.source)
