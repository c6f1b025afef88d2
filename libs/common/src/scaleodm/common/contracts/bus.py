"""Publishing commands and events on JetStream, always with a ``Nats-Msg-Id``.

The id is the message's idempotency key, so a publish retried after a timeout, or the same fact
published by two services, is stored once within the stream's duplicate window. The ack is None
only on FastStream's in-memory test broker.
"""

from __future__ import annotations

from faststream.nats import NatsBroker
from nats.js.api import PubAck

from scaleodm.common.contracts import commands, events, streams


async def publish_command(
    broker: NatsBroker,
    cmd: commands.Command,
    *,
    timeout_s: float,
) -> PubAck | None:
    ack: PubAck | None = await broker.publish(
        cmd.model_dump(mode="json"),
        streams.command_subject(cmd.verb),
        stream=streams.TASKS_STREAM,
        headers={"Nats-Msg-Id": commands.idempotency_key(cmd)},
        timeout=timeout_s,
    )
    return ack


async def publish_event(
    broker: NatsBroker, event: events.TaskEvent, *, timeout_s: float
) -> PubAck | None:
    ack: PubAck | None = await broker.publish(
        event.model_dump(mode="json"),
        streams.event_subject(event.task_id, event.kind),
        stream=streams.EVENTS_STREAM,
        headers={"Nats-Msg-Id": event.event_id},
        timeout=timeout_s,
    )
    return ack
