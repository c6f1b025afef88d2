"""Executors: where a task attempt runs. ``base`` declares the port, ``local`` and ``argo``
implement it, and ``open`` builds the one the settings name."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import assert_never

from scaleodm.common import argoruns
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import RunPlatform, SchedulerSettings
from scaleodm.run import engines
from scaleodm.scheduler.executors import argo, local
from scaleodm.scheduler.executors.base import Executor, StartOutcome

__all__ = ["Executor", "StartOutcome", "open"]

log = get_logger(__name__)


@contextlib.asynccontextmanager
async def open(settings: SchedulerSettings) -> AsyncIterator[Executor]:
    """The executor of ``settings.executor``, closed on exit.

    ``argo``: Workflows through the Kubernetes API (``settings.argo.kubeconfig``, else in-cluster).
    ``local``: runner processes under ``settings.local.runs_dir``, with the engine resolved first
    (``engines.resolve_engine``: ``auto`` without a docker engine refuses to start), forked from
    a fork server that is warm when this returns (``LocalExecutor.prepare``).
    """
    executor: Executor
    match settings.executor:
        case RunPlatform.ARGO:
            api = await argoruns.api_client(settings.argo.kubeconfig)
            executor = argo.ArgoExecutor(api, settings)
            runs = f"argo:{settings.argo.namespace}"
        case RunPlatform.LOCAL:
            engine = await engines.resolve_engine(settings)
            executor = local.LocalExecutor(settings.local.runs_dir, engine, settings.split)
            try:
                await executor.prepare()
            except BaseException:  # a stop during the start
                await executor.close()
                raise
            runs = f"local:{engine.value}:{settings.local.runs_dir}"
        case _:
            assert_never(settings.executor)
    log.info("executor opened", runs=runs)
    try:
        yield executor
    finally:
        await executor.close()
