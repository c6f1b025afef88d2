"""Notifier app: a durable pull consumer of terminal task events.

Events are handled concurrently (``max_workers``): FastStream's plain pull subscriber waits for a
whole batch before fetching the next, so one hanging receiver would hold every later event; with
workers it holds one. Retry timing comes from the delivery records (``delivery``), so the
durable's ``max_deliver`` is unlimited (contracts/streams.py) and the horizon bounds the retries:
every attempt ends in a record, and a target is pending only until its horizon. An event whose
handling itself fails (MongoDB or S3 away) is retried with backoff, and given up, logged, once it
is older than the horizon plus one backoff step: by then no delivery of it could be retried.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.exceptions import NackMessage
from faststream.nats import NatsMessage, PullSub

from scaleodm.common import netguard, runtime
from scaleodm.common.contracts import events, streams
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import NotifierSettings
from scaleodm.common.store.deliveries import DeliveryStore
from scaleodm.common.store.s3 import S3
from scaleodm.common.store.tasks import open_store
from scaleodm.notifier.delivery import Notifier, RetryLaterError, RetryPolicy

log = get_logger(__name__)


def create_app(settings: NotifierSettings) -> AsgiFastStream:
    broker = runtime.make_broker(settings)
    state: dict[str, Any] = {}

    async def on_startup() -> None:
        conn = await broker.connect()
        js = conn.jetstream()
        await streams.ensure_streams(js)
        await streams.ensure_consumers(
            js, only=streams.NOTIFIER_DURABLE, notifier_ack_wait_s=settings.webhook_ack_wait_s
        )
        mongo = await open_store(settings.mongo, "notifier")
        deliveries = DeliveryStore(mongo.store.db)
        await deliveries.ensure_indexes()
        s3_cm = S3.open(settings.s3)
        s3 = await s3_cm.__aenter__()
        policy = netguard.OutboundPolicy(settings.outbound_allow)
        client = httpx.AsyncClient(
            transport=netguard.GuardedTransport(policy),
            timeout=httpx.Timeout(
                settings.webhook_timeout_s, connect=min(5.0, settings.webhook_timeout_s)
            ),
            follow_redirects=False,  # a 3xx is a failed attempt, never a hop elsewhere
        )
        state.update(mongo=mongo, s3_cm=s3_cm, client=client)
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        state["notifier"] = Notifier(
            mongo.store, deliveries, s3, client, node_webhook=settings.webhook, secret=secret,
            max_response_bytes=settings.webhook_max_response_bytes,
            policy=RetryPolicy(
                timeout_s=settings.webhook_timeout_s,
                backoff_base_s=settings.webhook_backoff_base_s,
                backoff_max_s=settings.webhook_backoff_max_s,
                horizon_s=settings.webhook_horizon_s,
                max_attempts=settings.webhook_max_attempts,
            ),
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
        max_workers=max(settings.webhook_concurrency, 2),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        title="notifier-terminal-events",
    )
    async def on_terminal(ev: events.AnyTaskEvent, msg: NatsMessage) -> None:
        if ev.kind not in events.TERMINAL_KINDS:
            return
        try:
            await state["notifier"].on_terminal(ev)
        except RetryLaterError as exc:
            raise NackMessage(delay=exc.delay_s) from None
        except Exception as exc:  # MongoDB or S3 away: retry later, never in a hot loop
            meta = msg.raw_message.metadata
            age_s = (dt.datetime.now(dt.UTC) - meta.timestamp).total_seconds()
            if age_s > settings.webhook_horizon_s + settings.webhook_backoff_max_s:
                log.error("terminal event not handled, giving up", task_id=ev.task_id,
                          error=repr(exc), age_s=round(age_s))
                return
            delivered = meta.num_delivered or 1
            delay = min(settings.webhook_backoff_base_s * 2 ** min(delivered - 1, 30),
                        settings.webhook_backoff_max_s)
            log.warning("terminal event not handled, retrying", task_id=ev.task_id,
                        error=repr(exc), delay_s=delay)
            raise NackMessage(delay=delay) from exc

    async def ready_mongo() -> None:
        await state["mongo"].ping()

    return runtime.make_app(
        broker, ready_checks=[("mongo", ready_mongo)], on_startup=[on_startup],
        after_shutdown=[after_shutdown],
    )
