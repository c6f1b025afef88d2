"""Command handling: idempotent, retried with back-off, never a lost task.

A create/restart is acked only after its run exists (the executor's start is idempotent), so a
scheduler that dies in between leaves the command unacked and JetStream redelivers it to another
replica, whose start then finds the run and changes nothing. The task document is checked first:
a command for an attempt that is no longer current, or already canceled, starts nothing.

The handler depends on narrow ports declared here (``TaskRecords``, ``EventSink``,
``ObjectStore``; ``TaskStore``, ``Emitter`` and ``S3`` implement them) and on the ``Executor``
port, so tests run it against in-memory fakes.
"""

from __future__ import annotations

from typing import Any, Protocol, assert_never

from scaleodm.common import clock, failpoints
from scaleodm.common.contracts import commands, events
from scaleodm.common.domain.status import ACTIVE_STATES, TaskState
from scaleodm.common.logging import bind_task, get_logger
from scaleodm.common.store.s3 import S3Url, parse_s3_url, task_prefix
from scaleodm.scheduler.executors.base import Executor, StartOutcome

log = get_logger(__name__)

RUN_NOT_STARTED = "Could not start the run (internal error; the operator's logs have the details)"


BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0


def backoff_s(delivered: int) -> float:
    """Delay before redelivery number ``delivered + 1``: ``clock.backoff_s``, 1, 2, 4 ... 60 s."""
    return clock.backoff_s(delivered, base_s=BACKOFF_BASE_S, max_s=BACKOFF_MAX_S)


class TaskRecords(Protocol):
    """The task documents the handler reads and deletes (``TaskStore``)."""

    async def get_task(self, task_id: str, *, include_removed: bool = False
                       ) -> dict[str, Any] | None: ...

    async def delete_task(self, task_id: str) -> None: ...


class EventSink(Protocol):
    """Records and publishes an event (``Emitter``)."""

    async def emit(self, ev: events.TaskEvent) -> object: ...


class ObjectStore(Protocol):
    """Deletes a task's data (``S3``)."""

    async def delete_prefix(self, prefix: S3Url) -> int: ...


class CommandHandler:
    def __init__(
        self,
        store: TaskRecords,
        executor: Executor,
        emitter: EventSink,
        s3: ObjectStore,
        points: failpoints.Failpoints,
        *,
        bucket: str,
        max_deliver: int,
    ) -> None:
        self.store = store
        self.executor = executor
        self.emitter = emitter
        self.s3 = s3
        self.points = points
        self.bucket = bucket
        self.max_deliver = max_deliver

    async def handle(self, cmd: commands.AnyCommand, delivered: int) -> None:
        with bind_task(cmd.task_id, attempt=cmd.attempt, verb=cmd.verb, delivered=delivered):
            try:
                await self._dispatch(cmd)
            except Exception as exc:
                if delivered >= self.max_deliver and isinstance(
                    cmd, commands.CreateTask | commands.RestartTask
                ):
                    log.error("giving up on command", error=repr(exc))
                    # The reason stays in the log: the exception's text may hold internal
                    # names and addresses (Kubernetes API, paths), never shown to clients.
                    await self.emitter.emit(events.new(
                        events.TaskFailed, cmd.task_id, cmd.attempt, error_message=RUN_NOT_STARTED
                    ))
                    return
                raise

    async def _dispatch(self, cmd: commands.Command) -> None:
        match cmd:
            case commands.CreateTask() | commands.RestartTask():
                await self._start(cmd)
            case commands.CancelTask():
                signalled = await self.executor.cancel(cmd.task_id, cmd.attempt)
                log.info("run canceled", signalled=signalled)
            case commands.RemoveTask():
                await self.executor.remove(cmd.task_id, cmd.attempt)
                await self.s3.delete_prefix(task_prefix(self.bucket, cmd.task_id))
                await self.store.delete_task(cmd.task_id)
                log.info("task removed")
            case _:
                assert_never(cmd)

    async def _start(self, spec: commands.CreateTask | commands.RestartTask) -> None:
        doc = await self.store.get_task(spec.task_id)
        if doc is None or doc["attempt"] != spec.attempt:
            log.info("command is not for the current attempt; skipped")
            return
        if TaskState(doc["state"]) not in ACTIVE_STATES:
            log.info("task already ended; no run started", state=doc["state"])
            return
        parse_s3_url(spec.output_prefix)  # a malformed command fails here, not in the run
        await self.points.hit("scheduler.create.before_start")
        outcome = await self.executor.start(spec)
        log.info("run requested", outcome=outcome.value)
        await self.points.hit("scheduler.create.before_ack")
        if outcome is StartOutcome.EXISTS:
            log.info("redelivered command: run already exists, nothing changed")
        await self._overtaken(spec)

    async def _overtaken(self, spec: commands.CreateTask | commands.RestartTask) -> None:
        """A cancel or remove handled while this run was being started (commands of one batch
        run concurrently) found no run to stop: stop it now."""
        doc = await self.store.get_task(spec.task_id, include_removed=True)
        if doc is None or doc.get("removed"):
            log.info("task removed while its run started; removing the run")
            await self.executor.remove(spec.task_id, spec.attempt)
        elif doc["attempt"] == spec.attempt and doc["state"] == TaskState.CANCELED.value:
            log.info("task canceled while its run started; canceling the run")
            await self.executor.cancel(spec.task_id, spec.attempt)
