"""The bus layout, declared in exactly one place (stack-notes §1.1).

Streams:
- ``TASKS`` — commands ``tasks.commands.<verb>``; work-queue retention: a command is deleted once a
  scheduler acks it, so the stream's depth is the scheduler's backlog.
- ``EVENTS`` — task events ``events.task.<task_id>.<kind>``; limits retention (kept ``max_age``),
  read by the notifier and the gateway's live event streams.

Both are file-backed and stored on ``NatsSettings.stream_replicas`` servers (R3 on a NATS cluster
of three: one node may be lost; ``ensure_streams`` raises, never lowers, an existing count).

Durable consumers are created here too, before any service binds: FastStream and nats-py ignore a
new ``ConsumerConfig`` when the durable exists, so configuration must come from one owner; and
KEDA's JetStream scaler needs the durables to exist. Every other module uses ``JStream(...,
declare=False)`` via the ``*_STREAM_REF`` constants, which never touch the server config.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
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


async def ensure_streams(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create or update both streams to the declared config, stored on ``replicas`` servers
    (``NatsSettings.stream_replicas``; idempotent).

    The replica count is always sent (a config without one means R1 to the server). An existing
    stream with fewer replicas is raised to ``replicas`` (logged): JetStream copies it online,
    and the durables, which declare no count of their own, follow their stream. A stream with
    more replicas keeps them (logged): a process with a stale or lower setting, e.g. one not yet
    rolled during a change to R3, must not shrink it, and two such processes would otherwise
    move the streams back and forth at every start. Lowering is an operator's step
    (``nats stream edit <name> --replicas N``; docs/operations.md). More replicas than servers
    is refused by the server ("insufficient resources") and the service does not start.
    """
    for declared in STREAMS:
        await _patiently(f"stream {declared.name}",
                         functools.partial(_ensure_stream, js, declared, replicas))


async def _ensure_stream(js: JetStreamContext, declared: StreamConfig, replicas: int) -> None:
    assert declared.name is not None
    try:
        info = await js.stream_info(declared.name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(dataclasses.replace(declared, num_replicas=replicas))
        log.info("stream created", stream=declared.name, replicas=replicas)
        return
    current = info.config.num_replicas or 1
    if current < replicas:
        log.warning("stream replicas raised", stream=declared.name, old=current, new=replicas)
    elif current > replicas:
        log.warning("stream keeps more replicas than configured", stream=declared.name,
                    replicas=current, configured=replicas)
    await js.update_stream(dataclasses.replace(declared, num_replicas=max(current, replicas)))


async def ensure_consumers(
    js: JetStreamContext, *, only: str | None = None, **tuning: float
) -> None:
    """Create the durables (or update their mutable fields) before anyone binds to them."""
    for durable in durables(**tuning):  # type: ignore[arg-type]
        if only is not None and durable.config.durable_name != only:
            continue
        await _patiently(f"durable {durable.config.durable_name}",
                         functools.partial(js.add_consumer, durable.stream, durable.config))


API_ATTEMPTS = 3


async def _patiently(what: str, call: Callable[[], Awaitable[object]]) -> None:
    """``call`` (one JetStream API request or two), again after a timeout, ``API_ATTEMPTS``
    times in all: a NATS cluster answers only one of several concurrent creates of one R3
    stream or durable (the others time out after the context's timeout, 5 s by default, while
    the first succeeds), which happens when services start together without the bootstrap
    Job; the next attempt finds the stream and updates it."""
    for attempt in range(1, API_ATTEMPTS + 1):
        try:
            await call()
            return
        except nats.errors.TimeoutError:
            if attempt == API_ATTEMPTS:
                raise
            log.warning("JetStream API request timed out, again", what=what, attempt=attempt)
