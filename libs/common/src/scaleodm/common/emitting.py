"""Emitting an event: record it (with the command it causes) in MongoDB, then publish both.

The one path of every change to a task and of every command, in every service:

1. ``emit`` records the event in the log and applies it to the task document
   (``TaskStore.apply_event``). An event that causes a command — ``queued`` (run the attempt),
   ``canceled`` (stop the run), ``removed`` (delete the run and the data) — carries it in the same
   document, written by the same insert. The caller's answer depends on this write only, never
   on NATS.
2. The event is handed to the publisher, a background task that publishes the event, then its
   command, each with its ``Nats-Msg-Id`` (a re-publish inside the stream's duplicate window is a
   no-op; consumers are idempotent for the rest), and marks the document published. While NATS
   is away it keeps trying the message at the head of its queue; what does not fit in the queue
   stays recorded for the relay.
3. Whatever the publisher could not send (NATS away, the process killed, its queue full) stays
   ``published: false``; the watcher's relay hands it to the same ``deliver`` later
   (``republish``), so there is one way a message reaches the bus.

A message that can never be published (larger than NATS's ``max_payload``, unreadable, or failing
for an unexplained reason ``MAX_PUBLISH_FAILURES`` times) is set aside: kept in the log with the
reason, logged as an error, and no longer holds up the others. A ``queued`` event whose task does
not exist is a creation cut off between its two writes (``TaskStore.create_task``): the relay
waits ``ORPHAN_GRACE_S`` for the client's retry to complete it, then sets it aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
from dataclasses import dataclass

from faststream.nats import NatsBroker
from pydantic import ValidationError

from scaleodm.common import clock, failpoints, tracing
from scaleodm.common.contracts import bus, commands, events
from scaleodm.common.contracts.ids import TaskId
from scaleodm.common.logging import get_logger
from scaleodm.common.store.tasks import ApplyResult, Doc, Outcome, TaskStore

log = get_logger(__name__)
ORPHAN_GRACE_S = 300.0
QUEUE_SIZE = 1000
RETRY_PAUSE_S = 1.0  # between two tries of the queue's head while NATS is away
MAX_PUBLISH_FAILURES = 100  # unexplained failures of one message before it is set aside


class Delivery(enum.Enum):
    """What became of one try to publish a recorded event (and its command)."""

    SENT = "sent"
    FAILED = "failed"  # NATS away or busy: the same message goes through later
    UNEXPECTED = "unexpected"  # an error of no known kind: counted by the relay
    SET_ASIDE = "set_aside"  # can never be published


class Relayed(enum.Enum):
    """What ``Emitter.republish`` did with a recorded event."""

    SENT = "sent"
    WAITING = "waiting"  # a creation that may still be completed (``ORPHAN_GRACE_S``)
    FAILED = "failed"  # NATS did not take it: left for the next pass
    SKIPPED = "skipped"  # set aside, or an unexplained failure counted


@dataclass(frozen=True)
class Outbound:
    """A recorded event (with its ``seq``) and the command it carries, if any."""

    event: events.TaskEvent
    command: commands.Command | None = None
    traceparent: str | None = None  # the span current when it was queued (tracing.py)


def outbound(doc: Doc) -> Outbound:
    """The message(s) of a recorded event document (``ValidationError`` when unreadable)."""
    ev = events.EVENT_ADAPTER.validate_python({**doc["body"], "seq": doc["seq"]})
    raw = doc.get("command")
    return Outbound(ev, commands.COMMAND_ADAPTER.validate_python(raw) if raw else None)


class Emitter:
    def __init__(self, store: TaskStore, broker: NatsBroker, publish_timeout_s: float,
                 points: failpoints.Failpoints | None = None) -> None:
        self.store = store
        self.broker = broker
        self.publish_timeout_s = publish_timeout_s
        self.points = points or failpoints.Failpoints()
        self._queue: asyncio.Queue[Outbound] = asyncio.Queue(QUEUE_SIZE)
        self._worker: asyncio.Task[None] | None = None
        self._dropped = 0  # events of the current queue overflow, left to the relay

    async def emit(self, ev: events.TaskEvent, *,
                   command: commands.Command | None = None) -> ApplyResult:
        """Record ``ev`` (and ``command``), apply it, and queue both for publishing."""
        result = await self.store.apply_event(ev, command)
        if result.outcome is Outcome.APPLIED:
            self.send_soon(Outbound(ev.model_copy(update={"seq": result.seq}), command))
        if result.told is not None:  # its parent's ``child`` event (splitmerge)
            self.send_soon(Outbound(result.told))
        elif result.outcome is Outcome.IGNORED:
            log.debug("event ignored", event_id=ev.event_id, task_id=ev.task_id)
        return result

    async def cancel(self, task_id: str, attempt: int) -> ApplyResult:
        """The ``canceled`` event of an attempt, carrying its ``CancelTask``."""
        return await self.emit(events.new(events.TaskCanceled, task_id, attempt),
                               command=commands.CancelTask(task_id=TaskId(task_id),
                                                           attempt=attempt))

    async def remove(self, task_id: str, attempt: int) -> ApplyResult:
        """The ``removed`` event of a task, carrying its ``RemoveTask`` (a client's /task/remove
        and retention alike)."""
        return await self.emit(events.new(events.TaskRemoved, task_id, attempt),
                               command=commands.RemoveTask(task_id=TaskId(task_id),
                                                           attempt=attempt))

    def send_soon(self, out: Outbound) -> None:
        """Queue a recorded event for the publisher; when the queue is full it is left to the
        relay (it is recorded unpublished)."""
        if out.traceparent is None:
            traceparent = tracing.current_traceparent()
            if traceparent is not None:
                out = dataclasses.replace(out, traceparent=traceparent)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._publish_queued(), name="event-publisher")
        try:
            self._queue.put_nowait(out)
        except asyncio.QueueFull:
            self._dropped += 1
            if self._dropped == 1:  # once per overflow, not once per event
                log.warning("publish queue full; events left to the outbox",
                            first=out.event.event_id)
        else:
            if self._dropped:
                log.info("publish queue has room again", left_to_outbox=self._dropped)
                self._dropped = 0

    async def _publish_queued(self) -> None:
        while True:
            out = await self._queue.get()
            try:
                while await self.deliver(out) is Delivery.FAILED:
                    await asyncio.sleep(RETRY_PAUSE_S)  # NATS away: the same message again
            except Exception:  # never the end of the publisher; the relay has the message
                log.exception("publisher failed on an event", event_id=out.event.event_id)
            finally:
                self._queue.task_done()

    async def flush(self) -> None:
        """Wait until everything queued so far was published (or set aside)."""
        await self._queue.join()

    async def deliver(self, out: Outbound) -> Delivery:
        """Publish the event, then its command; mark it published."""
        ev = out.event
        await self.points.hit("emitter.before_publish")
        try:
            await bus.publish_event(self.broker, ev, timeout_s=self.publish_timeout_s,
                                    traceparent=out.traceparent)
            if out.command is not None:
                ack = await bus.publish_command(self.broker, out.command,
                                                timeout_s=self.publish_timeout_s,
                                                traceparent=out.traceparent)
                if ack is not None and ack.duplicate:
                    log.info("command already on the bus", verb=out.command.verb,
                             task_id=ev.task_id, attempt=out.command.attempt)
        except Exception as exc:
            if bus.is_transient(exc):
                log.warning("publish failed; tried again later", event_id=ev.event_id,
                            task_id=ev.task_id, error=repr(exc))
                return Delivery.FAILED
            if bus.is_permanent(exc):
                await self.set_aside(ev.event_id, ev.task_id, exc)
                return Delivery.SET_ASIDE
            log.warning("publish failed unexpectedly", event_id=ev.event_id,
                        task_id=ev.task_id, error=repr(exc))
            return Delivery.UNEXPECTED
        await self.store.mark_published(ev.event_id)
        if out.command is not None:
            log.info("command published", verb=out.command.verb, task_id=ev.task_id,
                     attempt=out.command.attempt)
        return Delivery.SENT

    async def set_aside(self, event_id: str, task_id: str, exc: BaseException) -> None:
        log.error("event can never be published; set aside", event_id=event_id,
                  task_id=task_id, error=repr(exc)[:500])
        await self.store.set_aside(event_id, repr(exc)[:500])

    async def republish(self, doc: Doc) -> Relayed:
        """Publish a recorded event document left unpublished (the watcher's relay).

        Its emitter may have died between recording it and applying it to the task document, so
        it is applied first (``TaskStore.reapply``, a no-op if it was): consumers such as the
        notifier must find the task in the state the event announces.
        """
        try:
            out = outbound(doc)
        except ValidationError as exc:
            await self.set_aside(doc["_id"], doc["task_id"], exc)
            return Relayed.SKIPPED
        await self.store.reapply(out.event)
        if isinstance(out.event, events.TaskQueued) and not await self._task_exists(doc):
            if (clock.now() - doc["recorded_at"]).total_seconds() <= ORPHAN_GRACE_S:
                return Relayed.WAITING
            await self.set_aside(doc["_id"], doc["task_id"],
                                 LookupError("creation never completed"))
            return Relayed.SKIPPED
        outcome = await self.deliver(out)
        if outcome is Delivery.UNEXPECTED:
            failures = await self.store.count_publish_failure(doc["_id"])
            if failures >= MAX_PUBLISH_FAILURES:
                await self.set_aside(doc["_id"], doc["task_id"],
                                     RuntimeError(f"{failures} unexplained publish failures"))
        return {Delivery.SENT: Relayed.SENT, Delivery.FAILED: Relayed.FAILED}.get(
            outcome, Relayed.SKIPPED)

    async def _task_exists(self, doc: Doc) -> bool:
        return await self.store.get_task(doc["task_id"], include_removed=True) is not None

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
