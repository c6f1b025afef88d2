"""Notifier app: a durable pull consumer of terminal task events."""

from __future__ import annotations

from typing import Any

import httpx
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.exceptions import NackMessage
from faststream.nats import NatsMessage, PullSub

from scaleodm.common import runtime
from scaleodm.common.contracts import events, streams
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import NotifierSettings
from scaleodm.common.store.deliveries import DeliveryStore
from scaleodm.common.store.s3 import S3
from scaleodm.common.store.tasks import open_store
from scaleodm.notifier.delivery import Notifier, RetryLaterError

log = get_logger(__name__)


def create_app(settings: NotifierSettings) -> AsgiFastStream:
    broker = runtime.make_broker(settings)
    state: dict[str, Any] = {}

    async def on_startup() -> None:
        conn = await broker.connect()
        js = conn.jetstream()
        await streams.ensure_streams(js)
        await streams.ensure_consumers(js, only=streams.NOTIFIER_DURABLE)
        mongo = await open_store(settings.mongo, "notifier")
        deliveries = DeliveryStore(mongo.store.db)
        await deliveries.ensure_indexes()
        s3_cm = S3.open(settings.s3)
        s3 = await s3_cm.__aenter__()
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.webhook_timeout_s, connect=5.0), follow_redirects=False
        )
        state.update(mongo=mongo, s3_cm=s3_cm, client=client)
        state["notifier"] = Notifier(
            mongo.store, deliveries, s3, client,
            node_webhook=settings.webhook, max_attempts=settings.webhook_max_attempts,
        )

    async def after_shutdown() -> None:
        if "client" in state:
            await state["client"].aclose()
        if "s3_cm" in state:
            await state["s3_cm"].__aexit__(None, None, None)
        if "mongo" in state:
            await state["mongo"].close()

    @broker.subscriber(
        streams.EVENT_SUBJECTS,
        stream=streams.EVENTS_STREAM_REF,
        durable=streams.NOTIFIER_DURABLE,
        pull_sub=PullSub(batch_size=16, timeout=2),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        title="notifier-terminal-events",
    )
    async def on_terminal(ev: events.AnyTaskEvent, msg: NatsMessage) -> None:
        if ev.kind not in events.TERMINAL_KINDS:
            return
        delivered = msg.raw_message.metadata.num_delivered or 1
        try:
            await state["notifier"].on_terminal(ev)
        except RetryLaterError:
            delay = min(settings.webhook_backoff_base_s * 2 ** (delivered - 1),
                        settings.webhook_backoff_max_s)
            raise NackMessage(delay=delay) from None

    async def ready_mongo() -> None:
        await state["mongo"].ping()

    return runtime.make_app(
        broker, ready_checks=[("mongo", ready_mongo)], on_startup=[on_startup],
        after_shutdown=[after_shutdown],
    )
