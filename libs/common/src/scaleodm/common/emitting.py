"""Emitting an event: record it (with the command it causes) in MongoDB, then publish both.

The one path of every change to a task and of every command, in every service:

1. ``emit`` records the event in the log and applies it to the task document
   (``TaskStore.apply_event``). An event that causes a command — ``queued`` (run the attempt),
   ``canceled`` (stop the run), ``removed`` (delete the run and the data) — carries it in the same
   document, written by the same insert: once the write is durable, the command cannot be lost.
   The caller's answer depends on this write only, never on NATS.
2. The event is handed to the publisher, a background task that publishes the event, then its
   command, each with its ``Nats-Msg-Id`` (a re-publish inside the stream's duplicate window is a
   no-op; consumers are idempotent for the rest), and marks the document published.
3. Whatever the publisher could not send (NATS away, the process killed, its queue full) stays
   ``published: false``; the watcher's relay hands it to the same ``deliver`` later
   (``republish``), so there is one way a message reaches the bus.

A ``queued`` event whose task does not exist is a creation cut off between its two writes
(``TaskStore.create_task``): the relay waits ``ORPHAN_GRACE_S`` for the client's retry to
complete it, then publishes it anyway (the scheduler finds no task and starts nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import time
from dataclasses import dataclass

from faststream.nats import NatsBroker

from scaleodm.common import clock
from scaleodm.common.contracts import bus, commands, events
from scaleodm.common.logging import get_logger
from scaleodm.common.store.tasks import ApplyResult, Doc, Outcome, TaskStore

log = get_logger(__name__)
ORPHAN_GRACE_S = 300.0
QUEUE_SIZE = 10_000
PAUSE_AFTER_FAILURE_S = 1.0  # while NATS is away, leave events to the relay instead of waiting


class Relayed(enum.Enum):
    """What ``Emitter.republish`` did with a recorded event."""

    SENT = "sent"
    WAITING = "waiting"  # a creation that may still be completed (``ORPHAN_GRACE_S``)
    FAILED = "failed"  # NATS did not take it: left for the next pass


@dataclass(frozen=True)
class Outbound:
    """A recorded event (with its ``seq``) and the command it carries, if any."""

    event: events.TaskEvent
    command: commands.Command | None = None


def outbound(doc: Doc) -> Outbound:
    """The message(s) of a recorded event document."""
    ev = events.EVENT_ADAPTER.validate_python({**doc["body"], "seq": doc["seq"]})
    raw = doc.get("command")
    return Outbound(ev, commands.COMMAND_ADAPTER.validate_python(raw) if raw else None)


class Emitter:
    def __init__(self, store: TaskStore, broker: NatsBroker, publish_timeout_s: float) -> None:
        self.store = store
        self.broker = broker
        self.publish_timeout_s = publish_timeout_s
        self._queue: asyncio.Queue[Outbound] = asyncio.Queue(QUEUE_SIZE)
        self._worker: asyncio.Task[None] | None = None
        self._paused_until = 0.0

    async def emit(self, ev: events.TaskEvent, *,
                   command: commands.Command | None = None) -> ApplyResult:
        """Record ``ev`` (and ``command``), apply it, and queue both for publishing."""
        result = await self.store.apply_event(ev, command)
        if result.outcome is Outcome.APPLIED:
            self.send_soon(Outbound(ev.model_copy(update={"seq": result.seq}), command))
        elif result.outcome is Outcome.IGNORED:
            log.debug("event ignored", event_id=ev.event_id, task_id=ev.task_id)
        return result

    def send_soon(self, out: Outbound) -> None:
        """Queue a recorded event for the publisher; when the queue is full it is left to the
        relay (it is recorded unpublished)."""
        if self._worker is None:
            self._worker = asyncio.create_task(self._publish_queued(), name="event-publisher")
        try:
            self._queue.put_nowait(out)
        except asyncio.QueueFull:
            log.warning("publish queue full; left to the outbox", event_id=out.event.event_id)

    async def _publish_queued(self) -> None:
        while True:
            out = await self._queue.get()
            try:
                if time.monotonic() < self._paused_until:
                    continue  # NATS failed a moment ago: the relay sends it
                if not await self.deliver(out):
                    self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
            finally:
                self._queue.task_done()

    async def flush(self) -> None:
        """Wait until everything queued so far was published (or left to the relay)."""
        await self._queue.join()

    async def deliver(self, out: Outbound) -> bool:
        """Publish the event, then its command; mark it published. False: left to the relay."""
        try:
            await bus.publish_event(self.broker, out.event, timeout_s=self.publish_timeout_s)
            if out.command is not None:
                await bus.publish_command(self.broker, out.command,
                                          timeout_s=self.publish_timeout_s)
        except Exception as exc:
            log.warning("publish failed; left to the outbox", event_id=out.event.event_id,
                        task_id=out.event.task_id, error=repr(exc))
            return False
        await self.store.mark_published(out.event.event_id)
        if out.command is not None:
            log.info("command published", verb=out.command.verb, task_id=out.command.task_id,
                     attempt=out.command.attempt)
        return True

    async def republish(self, doc: Doc) -> Relayed:
        """Publish a recorded event document left unpublished (the watcher's relay).

        Its emitter may have died between recording it and applying it to the task document, so
        it is applied first (a no-op if it was): consumers such as the notifier must find the
        task in the state the event announces.
        """
        out = outbound(doc)
        await self.store.apply_event(out.event)
        if isinstance(out.event, events.TaskQueued) and not await self._creation_done(doc):
            return Relayed.WAITING
        return Relayed.SENT if await self.deliver(out) else Relayed.FAILED

    async def _creation_done(self, doc: Doc) -> bool:
        """False while a ``queued`` event has no task yet and its creation may still be retried."""
        if await self.store.get_task(doc["task_id"], include_removed=True) is not None:
            return True
        recorded: dt.datetime = doc["recorded_at"]
        return (clock.now() - recorded).total_seconds() > ORPHAN_GRACE_S

    async def aclose(self, drain_s: float = 2.0) -> None:
        """Publish what is queued, for at most ``drain_s``, then stop the publisher; what it has
        not sent is recorded unpublished (the relay's)."""
        if self._worker is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), drain_s)
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
