"""Notifier app: a durable pull consumer of terminal task events.

Events are handled concurrently (``max_workers``): FastStream's plain pull subscriber waits for a
whole batch before fetching the next, so one hanging receiver would hold every later event; with
workers it holds one. Retry timing comes from the delivery records (``delivery``), so the
durable's ``max_deliver`` is unlimited (contracts/streams.py) and the horizon bounds the retries:
every attempt ends in a record, and a target is pending only until its horizon. An event whose
handling itself fails (MongoDB or S3 away) is retried with backoff, and given up, logged, once it
is older than the horizon plus one backoff step: by then no delivery of it could be retried.

The resources (MongoDB, S3, the guarded HTTP client) are opened by one lifespan
(``open_resources``) and reach the handler as a frozen ``Resources``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.exceptions import NackMessage
from faststream.nats import NatsBroker, NatsMessage, PullSub

from scaleodm.common import clock, netguard, runtime, tracing
from scaleodm.common.contracts import events, streams
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import NotifierSettings
from scaleodm.common.store.deliveries import DeliveryStore
from scaleodm.common.store.s3 import S3
from scaleodm.common.store.tasks import MongoHandle, open_store
from scaleodm.notifier.delivery import Notifier, RetryLaterError, RetryPolicy

log = get_logger(__name__)


@dataclass(frozen=True)
class Resources:
    """What the notifier holds while it runs (``open_resources``)."""

    mongo: MongoHandle
    s3: S3
    notifier: Notifier


@contextlib.asynccontextmanager
async def open_resources(
    settings: NotifierSettings, broker: NatsBroker
) -> AsyncIterator[Resources]:
    """Streams and the ``notifier`` durable declared, then MongoDB, S3 and the HTTP client;
    closed in reverse order."""
    conn = await runtime.open_bus(broker, settings, durable=streams.NOTIFIER_DURABLE,
                                  notifier_ack_wait_s=settings.webhook_ack_wait_s)
    async with contextlib.AsyncExitStack() as stack:
        runtime.start_loop(stack, runtime.consumer_lag(
            conn, streams.EVENTS_STREAM, streams.NOTIFIER_DURABLE), "consumer-lag")
        mongo = await open_store(settings.mongo, "notifier")
        stack.push_async_callback(mongo.close)
        deliveries = DeliveryStore(mongo.store.db)
        await deliveries.ensure_indexes()
        s3 = await stack.enter_async_context(S3.open(settings.s3))
        client = await stack.enter_async_context(httpx.AsyncClient(
            transport=netguard.GuardedTransport(netguard.OutboundPolicy(settings.outbound_allow)),
            timeout=httpx.Timeout(
                settings.webhook_timeout_s, connect=min(5.0, settings.webhook_timeout_s)
            ),
            follow_redirects=False,  # a 3xx is a failed attempt, never a hop elsewhere
        ))
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        notifier = Notifier(
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
        yield Resources(mongo, s3, notifier)


def create_app(settings: NotifierSettings) -> AsgiFastStream:
    broker = runtime.make_broker(settings, "notifier")
    lifecycle = runtime.Lifecycle(lambda: open_resources(settings, broker))

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
            with tracing.span("notifier.deliver", (msg.headers or {}).get("traceparent"),
                              consumer=True, kind=ev.kind):
                await lifecycle.current.notifier.on_terminal(ev)
        except RetryLaterError as exc:
            raise NackMessage(delay=exc.delay_s) from None
        except Exception as exc:  # MongoDB or S3 away: retry later, never in a hot loop
            meta = msg.raw_message.metadata
            age_s = (clock.now() - meta.timestamp).total_seconds()
            if age_s > settings.webhook_horizon_s + settings.webhook_backoff_max_s:
                log.error("terminal event not handled, giving up", task_id=ev.task_id,
                          error=repr(exc), age_s=round(age_s))
                return
            delivered = meta.num_delivered or 1
            delay = clock.backoff_s(delivered, base_s=settings.webhook_backoff_base_s,
                                    max_s=settings.webhook_backoff_max_s)
            log.warning("terminal event not handled, retrying", task_id=ev.task_id,
                        error=repr(exc), delay_s=delay)
            raise NackMessage(delay=delay) from exc

    async def ready_mongo() -> None:
        await lifecycle.current.mongo.ping()

    async def ready_s3() -> None:
        await lifecycle.current.s3.ping()

    return runtime.make_app(
        broker,
        lifespan=lifecycle.lifespan,
        ready_checks=[("mongo", ready_mongo), ("s3", ready_s3)],
    )
