"""Publishing commands and events on JetStream, always with a ``Nats-Msg-Id``.

The id is the message's idempotency key, so a publish retried after a timeout, or the same fact
published by two services, is stored once within the stream's duplicate window. The ack is None
only on FastStream's in-memory test broker.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from faststream.nats import NatsBroker
from nats import errors as nats_errors
from nats.errors import NoRespondersError
from nats.js.api import PubAck
from pydantic import ValidationError

from scaleodm.common.contracts import commands, events, streams

NO_RESPONDERS_PAUSE_S = 0.25

# NATS away or busy: the same message goes through later.
TRANSIENT: tuple[type[BaseException], ...] = (
    TimeoutError,  # nats.errors.TimeoutError is one too
    ConnectionError,
    NoRespondersError,
    nats_errors.StaleConnectionError,
    nats_errors.OutboundBufferLimitError,
    nats_errors.ConnectionClosedError,
    nats_errors.ConnectionReconnectingError,
    nats_errors.ConnectionDrainingError,
    nats_errors.NoServersError,
    nats_errors.SlowConsumerError,
)
# The message itself can never be published (too large, or unreadable).
PERMANENT: tuple[type[BaseException], ...] = (nats_errors.MaxPayloadError, ValidationError)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT)


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, PERMANENT)


async def publish_command(
    broker: NatsBroker,
    cmd: commands.Command,
    *,
    timeout_s: float,
    traceparent: str | None = None,
) -> PubAck | None:
    return await _publish(broker, cmd.model_dump(mode="json"), streams.command_subject(cmd.verb),
                          streams.TASKS_STREAM, commands.idempotency_key(cmd), timeout_s,
                          traceparent)


async def publish_event(
    broker: NatsBroker, event: events.TaskEvent, *, timeout_s: float,
    traceparent: str | None = None,
) -> PubAck | None:
    return await _publish(broker, event.model_dump(mode="json"),
                          streams.event_subject(event.task_id, event.kind), streams.EVENTS_STREAM,
                          event.event_id, timeout_s, traceparent)


async def _publish(broker: NatsBroker, body: dict[str, Any], subject: str, stream: str,
                   msg_id: str, timeout_s: float, traceparent: str | None = None
                   ) -> PubAck | None:
    """One publish, within ``timeout_s`` in all: "no responders" (a stream electing its leader
    after a server died, 4-7 s on loopback: docs/operations.md) is tried again until then."""
    deadline = time.monotonic() + timeout_s
    headers = {"Nats-Msg-Id": msg_id}
    if traceparent is not None:  # the trace it belongs to (tracing.py)
        headers["traceparent"] = traceparent
    while True:
        try:
            ack: PubAck | None = await broker.publish(
                body, subject, stream=stream, headers=headers,
                timeout=max(deadline - time.monotonic(), 0.05),
            )
            return ack
        except NoRespondersError:
            if time.monotonic() + NO_RESPONDERS_PAUSE_S >= deadline:
                raise
            await asyncio.sleep(NO_RESPONDERS_PAUSE_S)
