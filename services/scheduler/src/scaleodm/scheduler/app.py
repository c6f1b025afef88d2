"""Scheduler app: one durable pull consumer on ``tasks.commands.>``.

All replicas share the ``scheduler`` durable, so scaling out needs nothing else (and KEDA scales
on its lag). Handlers run concurrently within a fetched batch.
"""

from __future__ import annotations

from typing import Any

from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.exceptions import NackMessage
from faststream.nats import NatsMessage, PullSub

from scaleodm.common import failpoints, runtime
from scaleodm.common.contracts import commands, streams
from scaleodm.common.emitting import Emitter
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import ExecutorKind, SchedulerSettings
from scaleodm.common.store.s3 import S3
from scaleodm.common.store.tasks import open_store
from scaleodm.scheduler import engines
from scaleodm.scheduler.executors import argo
from scaleodm.scheduler.executors.base import Executor
from scaleodm.scheduler.executors.local import LocalExecutor
from scaleodm.scheduler.handlers import CommandHandler, backoff_s

log = get_logger(__name__)


def create_app(settings: SchedulerSettings) -> AsgiFastStream:
    broker = runtime.make_broker(settings)
    state: dict[str, Any] = {}

    async def on_startup() -> None:
        conn = await broker.connect()
        js = conn.jetstream()
        await streams.ensure_streams(js)
        await streams.ensure_consumers(
            js, only=streams.SCHEDULER_DURABLE,
            ack_wait_s=settings.ack_wait_s, max_deliver=settings.max_deliver,
        )
        mongo = await open_store(settings.mongo, "scheduler")
        s3_cm = S3.open(settings.s3)
        s3 = await s3_cm.__aenter__()
        executor: Executor
        if settings.executor is ExecutorKind.ARGO:
            kubeconfig = settings.argo.kubeconfig
            api = await argo.api_client(str(kubeconfig) if kubeconfig else None)
            executor = argo.ArgoExecutor(api, settings)
            runs = f"argo:{settings.argo.namespace}"
        else:
            engine = await engines.resolve_engine(settings)
            executor = LocalExecutor(settings.local.runs_dir, engine)
            runs = f"local:{engine.value}:{settings.local.runs_dir}"
        state.update(mongo=mongo, s3_cm=s3_cm, executor=executor)
        state["handler"] = CommandHandler(
            mongo.store, executor, Emitter(mongo.store, broker, settings.nats.publish_timeout_s),
            s3, failpoints.Failpoints(settings.failpoints),
            bucket=settings.s3.bucket, max_deliver=settings.max_deliver,
        )
        log.info("scheduler ready", runs=runs)

    async def after_shutdown() -> None:
        if "executor" in state:
            await state["executor"].close()
        if "s3_cm" in state:
            await state["s3_cm"].__aexit__(None, None, None)
        if "mongo" in state:
            await state["mongo"].close()

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
            await state["handler"].handle(cmd, delivered)
        except Exception as exc:
            log.warning("command failed; will retry", error=repr(exc), task_id=cmd.task_id,
                        delivered=delivered)
            raise NackMessage(delay=backoff_s(delivered)) from exc

    async def ready_mongo() -> None:
        await state["mongo"].ping()

    return runtime.make_app(
        broker,
        ready_checks=[("mongo", ready_mongo)],
        on_startup=[on_startup],
        after_shutdown=[after_shutdown],
    )
