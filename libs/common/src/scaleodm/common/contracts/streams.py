"""The bus layout, declared in exactly one place (stack-notes §1.1).

Streams:
- ``TASKS`` — commands ``tasks.commands.<verb>``; work-queue retention: a command is deleted once a
  scheduler acks it, so the stream's depth is the scheduler's backlog.
- ``EVENTS`` — task events ``events.task.<task_id>.<kind>``; limits retention (kept ``max_age``),
  read by the watcher's projection, the notifier, and (later) live event streams.

Durable consumers are created here too, before any service binds: FastStream and nats-py ignore a
new ``ConsumerConfig`` when the durable exists, so configuration must come from one owner; and
KEDA's JetStream scaler needs the durables to exist. Every other module uses ``JStream(...,
declare=False)`` via the ``*_STREAM_REF`` constants, which never touch the server config.
"""

from __future__ import annotations

from dataclasses import dataclass

import nats.js.errors
from faststream.nats import JStream
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from scaleodm.common.logging import get_logger

log = get_logger(__name__)

TASKS_STREAM = "TASKS"
EVENTS_STREAM = "EVENTS"
COMMAND_SUBJECTS = "tasks.commands.>"
EVENT_SUBJECTS = "events.task.>"
DUPLICATE_WINDOW_S = 120.0
EVENTS_MAX_AGE_S = 7 * 24 * 3600.0

TASKS_STREAM_REF = JStream(TASKS_STREAM, declare=False)
EVENTS_STREAM_REF = JStream(EVENTS_STREAM, declare=False)

SCHEDULER_DURABLE = "scheduler"
PROJECTION_DURABLE = "projection"
NOTIFIER_DURABLE = "notifier"


def command_subject(verb: str) -> str:
    return f"tasks.commands.{verb}"


def event_subject(task_id: str, kind: str) -> str:
    return f"events.task.{task_id}.{kind}"


TERMINAL_EVENT_SUBJECTS = [event_subject("*", k) for k in ("completed", "failed", "canceled")]

STREAMS = (
    StreamConfig(
        name=TASKS_STREAM,
        subjects=[COMMAND_SUBJECTS],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
    ),
    StreamConfig(
        name=EVENTS_STREAM,
        subjects=[EVENT_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=EVENTS_MAX_AGE_S,
        duplicate_window=DUPLICATE_WINDOW_S,
    ),
)


@dataclass(frozen=True)
class Durable:
    stream: str
    config: ConsumerConfig


def durables(
    *, ack_wait_s: float = 60.0, max_deliver: int = 10, notifier_ack_wait_s: float = 60.0
) -> tuple[Durable, ...]:
    """The durable consumers; ``ack_wait_s``/``max_deliver`` tune the scheduler's."""
    return (
        Durable(
            TASKS_STREAM,
            ConsumerConfig(
                durable_name=SCHEDULER_DURABLE,
                filter_subject=COMMAND_SUBJECTS,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=ack_wait_s,
                max_deliver=max_deliver,
                max_ack_pending=1000,
            ),
        ),
        Durable(
            EVENTS_STREAM,
            ConsumerConfig(
                durable_name=PROJECTION_DURABLE,
                filter_subject=EVENT_SUBJECTS,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=30.0,
                max_deliver=20,
                max_ack_pending=5000,
            ),
        ),
        Durable(
            EVENTS_STREAM,
            ConsumerConfig(
                durable_name=NOTIFIER_DURABLE,
                filter_subjects=TERMINAL_EVENT_SUBJECTS,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=notifier_ack_wait_s,
                # Unlimited: each delivery is a due webhook attempt (or an early one that NAKs
                # to the due time); the notifier's horizon, kept in MongoDB, ends the retries.
                max_deliver=-1,
                max_ack_pending=1000,
            ),
        ),
    )


async def ensure_streams(js: JetStreamContext) -> None:
    """Create or update both streams to the declared config (idempotent)."""
    for cfg in STREAMS:
        assert cfg.name is not None
        try:
            await js.stream_info(cfg.name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(cfg)
            log.info("stream created", stream=cfg.name)
        else:
            await js.update_stream(cfg)


async def ensure_consumers(
    js: JetStreamContext, *, only: str | None = None, **tuning: float
) -> None:
    """Create the durables (or update their mutable fields) before anyone binds to them."""
    for durable in durables(**tuning):  # type: ignore[arg-type]
        if only is not None and durable.config.durable_name != only:
            continue
        await js.add_consumer(durable.stream, durable.config)
