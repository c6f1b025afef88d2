"""Watcher app: the local run source, the projection consumer and the outbox relay."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.nats import PullSub

from scaleodm.common import runtime
from scaleodm.common.contracts import events, streams
from scaleodm.common.emitting import Emitter
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import ExecutorKind, WatcherSettings
from scaleodm.common.store.tasks import open_store
from scaleodm.watcher import projection
from scaleodm.watcher.sources import argo
from scaleodm.watcher.sources.base import RunSource
from scaleodm.watcher.sources.local import LocalRunSource

log = get_logger(__name__)


def create_app(settings: WatcherSettings) -> AsgiFastStream:
    broker = runtime.make_broker(settings)
    state: dict[str, Any] = {"tasks": []}

    async def on_startup() -> None:
        conn = await broker.connect()
        js = conn.jetstream()
        await streams.ensure_streams(js)
        await streams.ensure_consumers(js, only=streams.PROJECTION_DURABLE)
        state["mongo"] = await open_store(settings.mongo, "watcher")

    async def after_startup() -> None:
        store = state["mongo"].store
        emitter = Emitter(store, broker, settings.nats.publish_timeout_s)
        source: RunSource
        if settings.source is ExecutorKind.ARGO:
            kubeconfig = settings.argo.kubeconfig
            api = await argo.api_client(str(kubeconfig) if kubeconfig else None)
            state["kube"] = api
            source = argo.ArgoRunSource(api, store, emitter, settings)
        else:
            source = LocalRunSource(
                settings.local.runs_dir, store, emitter,
                poll_interval_s=settings.poll_interval_s,
                batch_lines=settings.output_batch_lines,
                start_grace_s=settings.run_start_grace_s,
            )
        state["tasks"] = [
            asyncio.create_task(source.run(), name=f"runs-{settings.source.value}"),
            asyncio.create_task(
                projection.relay_outbox(store, emitter, interval_s=settings.outbox_interval_s,
                                        min_age_s=settings.outbox_min_age_s),
                name="outbox",
            ),
        ]
        log.info("watcher ready", source=settings.source.value)

    async def on_shutdown() -> None:
        for task in state["tasks"]:
            task.cancel()
        for task in state["tasks"]:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def after_shutdown() -> None:
        if "kube" in state:
            await state["kube"].close()
        if "mongo" in state:
            await state["mongo"].close()

    @broker.subscriber(
        streams.EVENT_SUBJECTS,
        stream=streams.EVENTS_STREAM_REF,
        durable=streams.PROJECTION_DURABLE,
        pull_sub=PullSub(batch_size=50, timeout=2),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        title="watcher-projection",
    )
    async def on_event(ev: events.AnyTaskEvent) -> None:
        await projection.apply(state["mongo"].store, ev)

    async def ready_mongo() -> None:
        await state["mongo"].ping()

    return runtime.make_app(
        broker,
        ready_checks=[("mongo", ready_mongo)],
        on_startup=[on_startup],
        after_startup=[after_startup],
        on_shutdown=[on_shutdown],
        after_shutdown=[after_shutdown],
    )
