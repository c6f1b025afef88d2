"""The typed lifecycles of the bus services: ``runtime.Lifecycle``, ``executors.open`` (scheduler)
and ``sources.open`` (watcher), and the Argo run contract they share (``argoruns``).

Covered: ``Lifecycle.current`` only inside its lifespan (``RuntimeError`` before and after), the
resources closed on exit, also when the body fails; ``executors.open`` builds the executor the
settings name (local: the engine resolved, the runner started as ``scaleodm.run.runner``, its
fork server ``scaleodm.run.forking`` running while it is open; argo:
a Kubernetes client from a kubeconfig, closed on exit) and ``sources.open`` the run source (the
Argo one selecting its shards by the ``argoruns`` labels); ``SCALEODM_EXECUTOR`` and
``SCALEODM_SOURCE`` both name a ``RunPlatform``. That every platform has a branch in both
factories is checked by mypy (``assert_never``).

Left out: the apps' lifespans against real servers (``tests/integration/test_skeleton.py``,
``test_argo.py``), what the executors and sources do (their own tests).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from scaleodm.common import argoruns, runtime
from scaleodm.common.emitting import Emitter
from scaleodm.common.settings import (
    ArgoSettings,
    EngineKind,
    LocalRunSettings,
    RunPlatform,
    SchedulerSettings,
    WatcherSettings,
)
from scaleodm.common.store.tasks import TaskStore
from scaleodm.run import forking, runner
from scaleodm.scheduler import executors
from scaleodm.scheduler.executors import argo as argo_executor
from scaleodm.scheduler.executors import local as local_executor
from scaleodm.watcher import sources
from scaleodm.watcher.sources import argo as argo_source
from scaleodm.watcher.sources import local as local_source

TASK_ID = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"


@dataclass(frozen=True)
class _Resources:
    name: str


async def test_lifecycle_current_only_inside_the_lifespan() -> None:
    closed: list[str] = []

    @contextlib.asynccontextmanager
    async def open_() -> AsyncIterator[_Resources]:
        try:
            yield _Resources("r")
        finally:
            closed.append("r")

    lifecycle = runtime.Lifecycle(open_)
    with pytest.raises(RuntimeError, match="not open"):
        _ = lifecycle.current
    async with lifecycle.lifespan():
        assert lifecycle.current == _Resources("r")
    assert closed == ["r"]
    with pytest.raises(RuntimeError, match="not open"):
        _ = lifecycle.current


async def test_lifecycle_closes_when_the_body_fails() -> None:
    closed: list[str] = []

    @contextlib.asynccontextmanager
    async def open_() -> AsyncIterator[_Resources]:
        try:
            yield _Resources("r")
        finally:
            closed.append("r")

    lifecycle = runtime.Lifecycle(open_)
    with pytest.raises(ValueError, match="boom"):
        async with lifecycle.lifespan():
            raise ValueError("boom")
    assert closed == ["r"]
    with pytest.raises(RuntimeError):
        _ = lifecycle.current


def _kubeconfig(path: Path) -> Path:
    """A kubeconfig for a server nobody listens on: building a client connects to nothing."""
    path.write_text(json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }))
    return path


async def test_executors_open_local(tmp_path: Path) -> None:
    settings = SchedulerSettings(
        executor=RunPlatform.LOCAL, engine=EngineKind.TEST,
        local=LocalRunSettings(runs_dir=tmp_path / "runs"),
    )
    async with executors.open(settings) as executor:
        assert isinstance(executor, local_executor.LocalExecutor)
        assert executor.engine is EngineKind.TEST
        assert (tmp_path / "runs").is_dir()
        reaper = executor._reaper
        server = executor.forker._proc  # the runner fork server, warm before the scheduler
        assert server is not None and server.returncode is None
    assert reaper.done()  # closed on exit
    assert server.returncode is not None
    assert local_executor.RUNNER_MODULE == runner.__name__ == "scaleodm.run.runner"
    assert local_executor.FORK_SERVER_MODULE == forking.__name__ == "scaleodm.run.forking"


async def test_executors_open_argo(tmp_path: Path) -> None:
    settings = SchedulerSettings(
        executor=RunPlatform.ARGO,
        argo=ArgoSettings(kubeconfig=_kubeconfig(tmp_path / "kubeconfig")),
    )
    async with executors.open(settings) as executor:
        assert isinstance(executor, argo_executor.ArgoExecutor)
        assert executor.api.configuration.host == "http://127.0.0.1:9"
        api = executor.api
    assert api.rest_client.pool_manager.closed


async def test_sources_open_local(tmp_path: Path) -> None:
    settings = WatcherSettings(source=RunPlatform.LOCAL,
                               local=LocalRunSettings(runs_dir=tmp_path))
    store, emitter = cast(TaskStore, object()), cast(Emitter, object())
    async with sources.open(settings, store, emitter) as source:
        assert isinstance(source, local_source.LocalRunSource)
        assert source.runs_dir == tmp_path


async def test_sources_open_argo(tmp_path: Path) -> None:
    settings = WatcherSettings(
        source=RunPlatform.ARGO,
        argo=ArgoSettings(kubeconfig=_kubeconfig(tmp_path / "kubeconfig"), shards=4),
        replica=1, replicas=2,
    )
    store, emitter = cast(TaskStore, object()), cast(Emitter, object())
    async with sources.open(settings, store, emitter) as source:
        assert isinstance(source, argo_source.ArgoRunSource)
        assert source.selector == (
            f"{argoruns.LABEL_MANAGED_BY}={argoruns.MANAGED_BY},{argoruns.LABEL_SHARD} in (1,3)"
        )
        api = source.api
    assert api.rest_client.pool_manager.closed


@pytest.mark.parametrize("platform", [pytest.param(p, id=p.value) for p in RunPlatform])
def test_settings_name_the_platform(platform: RunPlatform, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEODM_EXECUTOR", platform.value)
    monkeypatch.setenv("SCALEODM_SOURCE", platform.value)
    assert SchedulerSettings().executor is platform
    assert WatcherSettings().source is platform
