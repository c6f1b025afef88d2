"""Emitting an event: apply it to MongoDB (read-your-writes), then publish it on JetStream.

The event log doubles as an outbox: a recorded event stays ``published: false`` until JetStream
acknowledges it, and the watcher's relay re-publishes what a crashed emitter left behind. The
``Nats-Msg-Id`` (the event id) makes a re-publish inside the duplicate window a no-op; consumers
are idempotent for the rest.
"""

from __future__ import annotations

from faststream.nats import NatsBroker

from scaleodm.common.contracts import bus, events
from scaleodm.common.logging import get_logger
from scaleodm.common.store.tasks import ApplyResult, Doc, Outcome, TaskStore

log = get_logger(__name__)


class Emitter:
    def __init__(self, store: TaskStore, broker: NatsBroker, publish_timeout_s: float) -> None:
        self.store = store
        self.broker = broker
        self.publish_timeout_s = publish_timeout_s

    async def emit(self, ev: events.TaskEvent) -> ApplyResult:
        result = await self.store.apply_event(ev)
        if result.outcome is Outcome.APPLIED:
            await self.publish(ev.model_copy(update={"seq": result.seq}))
        elif result.outcome is Outcome.IGNORED:
            log.debug("event ignored", event_id=ev.event_id, task_id=ev.task_id)
        return result

    async def publish(self, ev: events.TaskEvent) -> bool:
        try:
            await bus.publish_event(self.broker, ev, timeout_s=self.publish_timeout_s)
        except Exception as exc:  # the outbox relay retries it
            log.warning("event publish failed; left to the outbox", event_id=ev.event_id,
                        task_id=ev.task_id, error=repr(exc))
            return False
        await self.store.mark_published(ev.event_id)
        return True

    async def republish(self, doc: Doc) -> bool:
        """Publish a recorded event document (outbox relay)."""
        ev = events.EVENT_ADAPTER.validate_python({**doc["body"], "seq": doc["seq"]})
        return await self.publish(ev)
