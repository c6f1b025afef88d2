"""Task actions on behalf of a client: create, restart, cancel, remove.

The only code in the gateway that changes a task. Each action is one durable write to MongoDB —
the event, with the command it causes (``Emitter.emit``) — and returns once that write is done,
whether NATS is up or not: the publisher (or later the watcher's relay) delivers the command.
A created or restarted task waits queued for its admission (the scheduler's, which gives it a
run slot and carries its run command); a cancel or remove carries its command itself.
An answer of success means the command will be delivered. A refusal (``ActionError``: unknown
task, uuid taken, not restartable) means this request recorded nothing; the routes turn it into
NodeODM's answer. A storage error ("Storage unavailable") means the write may or may not have
happened — MongoDB can apply a write whose answer timed out — and a retry is safe: event ids are
deterministic, so a cancel, remove or restart is recorded once; only a creation without
``set-uuid`` cannot be recognised when retried (the client never learnt its uuid).

Every action is taken **by** a tenant (``tenants.Tenant``): a task belongs to the tenant that
created it (``tenant`` in its document), and restart, cancel and remove of a task the caller may
not access (another tenant's, unless the caller is an admin) fail exactly as for an unknown task:
the same error, after the same read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from scaleodm.common import clock, failpoints, tenants, tracing
from scaleodm.common.contracts import events
from scaleodm.common.domain import options as odm_options
from scaleodm.common.domain.status import TERMINAL_STATES, TaskState
from scaleodm.common.emitting import Emitter, Outbound
from scaleodm.common.logging import bind_task, get_logger
from scaleodm.common.store.tasks import Outcome, TaskExistsError, TaskStore

log = get_logger(__name__)


class ActionError(Exception):
    """The action cannot be done (nothing was recorded)."""


class UnknownTaskError(ActionError):
    """No task with this id (or it was removed)."""


class TaskExistsAlreadyError(ActionError):
    """A task with this id exists already (``set-uuid`` taken)."""


class NotRestartableError(ActionError):
    """Only a finished task (completed, failed, canceled) can run again."""


@dataclass(frozen=True)
class NewTask:
    """A validated submission: the task document's fields, before the first attempt."""

    task_id: str
    name: str
    date_created_ms: int
    options: list[dict[str, Any]]
    images_count: int
    webhook: str | None
    skip_post_processing: bool
    outputs: list[str] | None
    sources: list[str]
    output_prefix: str
    tenant: str  # the creator's: who may see and act on it (tenants.Tenant.may_access)
    priority: int = 0
    parent: str | None = None  # the task whose run created it (splitmerge), if any

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "_id": self.task_id, "name": self.name, "date_created_ms": self.date_created_ms,
            "options": self.options, "images_count": self.images_count, "webhook": self.webhook,
            "skip_post_processing": self.skip_post_processing, "outputs": self.outputs,
            "sources": self.sources, "output_prefix": self.output_prefix,
            "tenant": self.tenant, "priority": self.priority,
        }
        if self.parent is not None:
            doc["parent"] = self.parent
        traceparent = tracing.current_traceparent()  # the creating request's (tracing.py)
        if traceparent is not None:
            doc["traceparent"] = traceparent
        return doc


# Told of each write once it is recorded: (task id, seq of its last event, if known).
Written = Callable[[str, int | None], Awaitable[None]]


class TaskActions:
    def __init__(self, store: TaskStore, emitter: Emitter, points: failpoints.Failpoints,
                 written: Written | None = None) -> None:
        self.store = store
        self.emitter = emitter
        self.points = points
        # The read model (readmodel.py): drops the task, waits for its event to come back.
        self._written = written

    async def written(self, task_id: str, seq: int | None) -> None:
        if self._written is not None:
            await self._written(task_id, seq)

    async def create(self, new: NewTask, *, failure: str | None = None) -> None:
        """The task at status 10 with its run queued; ``failure`` fails it at once instead
        (NodeODM §3.5: too many images after a commit is an asynchronous failure)."""
        doc = new.document()
        queued = events.new(events.TaskQueued, new.task_id, 1)
        failed = None if failure is None else events.new(
            events.TaskFailed, new.task_id, 1, error_message=failure)
        with bind_task(new.task_id, attempt=1):
            try:
                created = await self.store.create_task(doc, queued, failed=failed)
            except TaskExistsError as exc:
                raise TaskExistsAlreadyError(new.task_id) from exc
            await self.points.hit("gateway.run.before_publish")
            self.emitter.send_soon(Outbound(queued.model_copy(update={"seq": created.seq})))
            if created.told is not None:  # the parent's ``child`` event (splitmerge)
                self.emitter.send_soon(Outbound(created.told))
            if failed is not None:
                seq = await self.store.event_seq(failed.event_id)
                self.emitter.send_soon(Outbound(failed.model_copy(update={"seq": seq})))
                log.info("task created failed", error=failure)
                await self.written(new.task_id, seq)
                return
            log.info("task created", images=new.images_count, sources=len(new.sources))
            await self.written(new.task_id, created.seq)

    async def restart(self, task_id: str, new_options: list[dict[str, Any]] | None, *,
                      by: tenants.Tenant) -> None:
        """A new attempt under the same id, with new options (replacing the old ones, the
        automatic ones added again: §3.11 step 5, §5.4) or the old ones."""
        doc = await self._task(task_id, by)
        if TaskState(doc["state"]) not in TERMINAL_STATES:
            raise NotRestartableError(task_id)
        attempt = doc["attempt"] + 1
        options = doc.get("options", []) if new_options is None else (
            odm_options.add_post_processing_options(
                new_options, skip_post_processing=bool(doc.get("skip_post_processing"))
            )
        )
        with bind_task(task_id, attempt=attempt):
            queued = events.new(events.TaskQueued, task_id, attempt, options=options,
                                date_created_ms=clock.now_ms())
            result = await self.store.apply_event(queued)
            if result.outcome is not Outcome.APPLIED:
                # Another request recorded this attempt first: its options apply.
                raise NotRestartableError(task_id)
            traceparent = tracing.current_traceparent()
            if traceparent is not None:  # the new attempt's admission continues this request
                await self.store.set_traceparent(task_id, attempt, traceparent)
            await self.points.hit("gateway.run.before_publish")
            self.emitter.send_soon(Outbound(queued.model_copy(update={"seq": result.seq})))
            log.info("task restarted")
            await self.written(task_id, result.seq)

    async def cancel(self, task_id: str, *, by: tenants.Tenant) -> None:
        """Status 50 and the run stopped (NodeODM §3.9)."""
        doc = await self._task(task_id, by)
        with bind_task(task_id, attempt=doc["attempt"]):
            result = await self.emitter.cancel(task_id, doc["attempt"])
            log.info("task canceled")
            await self.written(task_id, result.seq)

    async def remove(self, task_id: str, *, by: tenants.Tenant) -> None:
        """The task gone for clients at once; its run, files and records deleted by the
        scheduler (NodeODM §3.10)."""
        doc = await self._task(task_id, by)
        with bind_task(task_id, attempt=doc["attempt"]):
            result = await self.emitter.remove(task_id, doc["attempt"])
            log.info("task removed")
            await self.written(task_id, result.seq)

    async def _task(self, task_id: str, by: tenants.Tenant) -> dict[str, Any]:
        """The task ``by`` may act on; another tenant's is as unknown as no task."""
        doc = await self.store.get_task(task_id)
        if doc is None or not by.may_access(doc.get("tenant"), doc.get("parent")):
            raise UnknownTaskError(task_id)
        return doc
