"""Watcher app: the run source (``sources.open``: local run directories or Argo Workflows), the
outbox relay (``relaying``) and retention (``retention``: expired tasks removed, abandoned uploads
deleted), three loops that live as long as the app.

The watcher consumes nothing from the bus; it emits events (``Emitter``: recorded in MongoDB, then
published). One lifespan (``open_resources``) opens MongoDB, S3 and the source and runs the loops;
FastStream leaves it after the broker stopped, so an event emitted in that last moment is recorded
and left to the outbox, which the next start relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from faststream.asgi import AsgiFastStream
from faststream.nats import NatsBroker

from scaleodm.common import runtime
from scaleodm.common.emitting import Emitter
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import WatcherSettings
from scaleodm.common.store.leases import Leases
from scaleodm.common.store.s3 import S3
from scaleodm.common.store.tasks import MongoHandle, open_store
from scaleodm.watcher import relaying, retention, sources

log = get_logger(__name__)


@dataclass(frozen=True)
class Resources:
    """What the watcher holds while it runs (``open_resources``)."""

    mongo: MongoHandle
    s3: S3
    loops: tuple[asyncio.Task[None], ...]


@contextlib.asynccontextmanager
async def open_resources(settings: WatcherSettings, broker: NatsBroker) -> AsyncIterator[Resources]:
    """Streams declared, MongoDB, S3 and the run source opened, the loops started; on exit the
    loops are cancelled first, then the rest closed in reverse order."""
    await runtime.open_bus(broker, settings)
    async with contextlib.AsyncExitStack() as stack:
        mongo = await open_store(settings.mongo, "watcher")
        stack.push_async_callback(mongo.close)
        emitter = Emitter(mongo.store, broker, settings.nats.publish_timeout_s)
        stack.push_async_callback(emitter.aclose)  # after the loops stopped, before MongoDB
        s3 = await stack.enter_async_context(S3.open(settings.s3))
        source = await stack.enter_async_context(sources.open(settings, mongo.store, emitter))
        loops = (
            runtime.start_loop(stack, source.run(), f"runs-{settings.source.value}"),
            runtime.start_loop(stack, relaying.relay_outbox(
                mongo.store, emitter, Leases(mongo.store.db),
                holder=f"{socket.gethostname()}/{settings.replica}",
                interval_s=settings.outbox_interval_s, min_age_s=settings.outbox_min_age_s,
            ), "outbox"),
            runtime.start_loop(stack, retention.sweep_forever(mongo.store, emitter, s3, settings),
                   "retention"),
        )
        log.info("watcher ready", source=settings.source.value)
        yield Resources(mongo, s3, loops)


def create_app(settings: WatcherSettings) -> AsgiFastStream:
    broker = runtime.make_broker(settings, "watcher")
    lifecycle = runtime.Lifecycle(lambda: open_resources(settings, broker))

    async def ready_mongo() -> None:
        await lifecycle.current.mongo.ping()

    async def ready_s3() -> None:
        await lifecycle.current.s3.ping()

    return runtime.make_app(
        broker,
        lifespan=lifecycle.lifespan,
        ready_checks=[("mongo", ready_mongo), ("s3", ready_s3)],
    )
