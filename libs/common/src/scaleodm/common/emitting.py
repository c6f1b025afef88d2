"""Emitting an event: apply it to MongoDB (read-your-writes), then publish it on JetStream.

The event log doubles as an outbox: a recorded event stays ``published: false`` until JetStream
acknowledges it, and the watcher's relay re-publishes what a crashed emitter left behind. The
``Nats-Msg-Id`` (the event id) makes a re-publish inside the duplicate window a no-op; consumers
are idempotent for the rest.

The outbox also carries run commands: the gateway records a task's (or a restart's) ``queued``
event, publishes the run command, and only then publishes the event, so an unpublished ``queued``
event may stand for a command that never reached JetStream; the relay publishes the command
(rebuilt from the task document) before the event. A ``queued`` event whose task does not exist
is a creation cut off between its two writes (``TaskStore.create_task``): it waits
``ORPHAN_GRACE_S`` for the client's retry to complete it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from faststream.nats import NatsBroker

from scaleodm.common.contracts import bus, commands, events
from scaleodm.common.contracts.ids import TaskId
from scaleodm.common.domain.status import TaskState
from scaleodm.common.logging import get_logger
from scaleodm.common.store.tasks import ApplyResult, Doc, Outcome, TaskStore

log = get_logger(__name__)
ORPHAN_GRACE_S = 300.0


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
        """Publish a recorded event document (outbox relay).

        Its emitter may have died between recording it and applying it to the task document, so
        it is applied first (a no-op if it was): consumers such as the notifier must find the
        task in the state the event announces.
        """
        ev = events.EVENT_ADAPTER.validate_python({**doc["body"], "seq": doc["seq"]})
        await self.store.apply_event(ev)
        if isinstance(ev, events.TaskQueued) and not await self._queue_run(ev, doc):
            return False
        return await self.publish(ev)

    async def _queue_run(self, ev: events.TaskQueued, doc: Doc) -> bool:
        """Publish the run command of a still-queued attempt; False: not now (failed, or the
        task is not written yet)."""
        task = await self.store.get_task(ev.task_id, include_removed=True)
        if task is None:
            recorded: dt.datetime = doc["recorded_at"]
            age = (dt.datetime.now(dt.UTC) - recorded).total_seconds()
            return age > ORPHAN_GRACE_S  # then an abandoned creation: publish, nothing to run
        if (task.get("removed") or task["attempt"] != ev.attempt
                or task["state"] != TaskState.QUEUED):
            return True  # the run started, or the attempt is over: nothing to queue
        cmd = run_command(task)
        try:
            await bus.publish_command(self.broker, cmd, timeout_s=self.publish_timeout_s)
        except Exception as exc:
            log.warning("run command publish failed; retried later", task_id=ev.task_id,
                        error=repr(exc))
            return False
        log.info("run command published by the outbox", task_id=ev.task_id, attempt=ev.attempt)
        return True


def run_command(task: dict[str, Any]) -> commands.CreateTask | commands.RestartTask:
    """The command the gateway published for the task's current attempt (same fields)."""
    kind = commands.CreateTask if task["attempt"] == 1 else commands.RestartTask
    return kind(
        task_id=TaskId(task["_id"]), attempt=task["attempt"], name=task["name"],
        options=task.get("options") or [], sources=task["sources"],
        output_prefix=task["output_prefix"],
        skip_post_processing=bool(task.get("skip_post_processing")),
        outputs=task.get("outputs"), images_count=task.get("images_count") or None,
    )
