"""Scheduler app: one durable pull consumer on ``tasks.commands.>``, and admission.

Admission (``admission.py``) gives waiting tasks their run slots; the run commands it records
come back through the consumer like any other command. A tenant's ``max_active_runs`` (the
gateway's tenants file, ``SCALEODM_TENANTS_FILE``) bounds its runs there: the file is looked at
again at most once a second while admission passes run, so a change applies at the next pass.

All replicas share the ``scheduler`` durable, so scaling out needs nothing else (and KEDA scales
on its lag). Handlers run concurrently within a fetched batch. The resources (MongoDB, S3, the
executor ``executors.open`` picks) are opened by one lifespan (``open_resources``) and reach the
handler as a frozen ``Resources``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.exceptions import NackMessage
from faststream.nats import NatsBroker, NatsMessage, PullSub

from scaleodm.common import failpoints, runtime, tenants, tracing
from scaleodm.common.contracts import commands, streams
from scaleodm.common.emitting import Emitter
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import SchedulerSettings
from scaleodm.common.store.admission import AdmissionStore
from scaleodm.common.store.leases import Leases
from scaleodm.common.store.s3 import S3
from scaleodm.common.store.tasks import MongoHandle, open_store
from scaleodm.scheduler import executors
from scaleodm.scheduler.admission import Admitter
from scaleodm.scheduler.handlers import CommandHandler, backoff_s

log = get_logger(__name__)


@dataclass(frozen=True)
class Resources:
    """What the scheduler holds while it runs (``open_resources``)."""

    mongo: MongoHandle
    s3: S3
    handler: CommandHandler


def tenant_limits(directory: tenants.TenantDirectory) -> Callable[[str], int | None]:
    """Admission's ``tenant_limit``: a tenant's ``max_active_runs`` (None: no limit, also for a
    tenant not in the file), from the tenants file as it is now."""
    def limit(name: str) -> int | None:
        directory.reload_if_changed()  # a stat at most once a second
        tenant = directory.tenant(name)
        return tenant.max_active_runs if tenant is not None else None

    return limit


@contextlib.asynccontextmanager
async def open_resources(
    settings: SchedulerSettings, broker: NatsBroker
) -> AsyncIterator[Resources]:
    """Streams and the ``scheduler`` durable declared, then MongoDB, S3 and the executor;
    closed in reverse order."""
    # First: a tenants file that cannot be used stops the start before anything is opened.
    directory = tenants.TenantDirectory(settings.tenants_file)
    conn = await runtime.open_bus(broker, settings, durable=streams.SCHEDULER_DURABLE,
                           ack_wait_s=settings.ack_wait_s, max_deliver=settings.max_deliver)
    async with contextlib.AsyncExitStack() as stack:
        mongo = await open_store(settings.mongo, "scheduler")
        stack.push_async_callback(mongo.close)
        s3 = await stack.enter_async_context(S3.open(settings.s3))
        executor = await stack.enter_async_context(executors.open(settings))
        points = failpoints.Failpoints(settings.failpoints)
        emitter = Emitter(mongo.store, broker, settings.nats.publish_timeout_s, points)
        stack.push_async_callback(emitter.aclose)  # before MongoDB closes
        handler = CommandHandler(
            mongo.store, executor, emitter, s3, points,
            bucket=settings.s3.bucket, max_deliver=settings.max_deliver,
        )
        admission_store = AdmissionStore(mongo.store.db, settings.capacity)
        await admission_store.ensure_indexes()
        admitter = Admitter(admission_store, Leases(mongo.store.db), emitter, settings.capacity,
                            interval_s=settings.admission_interval_s,
                            tenant_limit=tenant_limits(directory), argo=settings.argo)
        await admitter.subscribe(conn)
        admitter.wake()  # a first pass at once: tasks may have waited while none ran
        runtime.start_loop(stack, admitter.run(), "admission")
        runtime.start_loop(stack, runtime.consumer_lag(
            conn, streams.TASKS_STREAM, streams.SCHEDULER_DURABLE), "consumer-lag")
        log.info("scheduler ready", executor=settings.executor.value,
                 tenants_file=str(settings.tenants_file) if settings.tenants_file else None,
                 max_active=settings.capacity.max_active,
                 classes={c.name: c.slots for c in settings.capacity.classes})
        yield Resources(mongo, s3, handler)


def create_app(settings: SchedulerSettings) -> AsgiFastStream:
    broker = runtime.make_broker(settings, "scheduler")
    lifecycle = runtime.Lifecycle(lambda: open_resources(settings, broker))

    @broker.subscriber(
        streams.COMMAND_SUBJECTS,
        stream=streams.TASKS_STREAM_REF,
        durable=streams.SCHEDULER_DURABLE,
        pull_sub=PullSub(batch_size=8, timeout=2),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        title="scheduler-commands",
    )
    async def on_command(cmd: commands.AnyCommand, msg: NatsMessage) -> None:
        delivered = msg.raw_message.metadata.num_delivered or 1
        try:
            with tracing.span(f"scheduler.{cmd.verb}", (msg.headers or {}).get("traceparent"),
                              consumer=True):
                await lifecycle.current.handler.handle(cmd, delivered)
        except Exception as exc:
            log.warning("command failed; will retry", error=repr(exc), task_id=cmd.task_id,
                        delivered=delivered)
            raise NackMessage(delay=backoff_s(delivered)) from exc

    async def ready_mongo() -> None:
        await lifecycle.current.mongo.ping()

    async def ready_s3() -> None:
        await lifecycle.current.s3.ping()

    return runtime.make_app(
        broker,
        lifespan=lifecycle.lifespan,
        ready_checks=[("mongo", ready_mongo), ("s3", ready_s3)],
    )
