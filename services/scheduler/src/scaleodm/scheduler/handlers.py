"""Command handling: idempotent, retried with back-off, never a lost task.

A run command comes with its task's admission (``admission.py``): only an admitted attempt, one
holding a run slot, is started.

A create/restart is acked only after its run exists (the executor's start is idempotent), so a
scheduler that dies in between leaves the command unacked and JetStream redelivers it to another
replica, whose start then finds the run and changes nothing. The task document is read before and
again after the start: a run of an attempt that is not the task's current *active* one (canceled,
ended, restarted since, removed or deleted) is stopped — a cancel, restart or remove handled while
the start was in flight (commands of one batch run concurrently), or a redelivery of a create whose
first delivery did start the run (an Argo create that timed out client-side but succeeded), must
not leave it running. Stopping is idempotent (``Executor.cancel``/``remove``), so a run that never
existed costs nothing; a command for an attempt the task does not have yet starts and stops nothing.

A remove is for the task it was recorded for: when the task under its uuid exists and is not
removed, it is another task (the uuid is only free again long after the deletion, see
``TaskStore.delete_task``'s tombstone) and the command does nothing.

Giving up: a create/restart that fails on its last delivery (``max_deliver``) fails the task with a
generic message; a cancel or remove cannot be turned into an event, so it is logged at ERROR with
the task (JetStream delivers it no more; the watcher's retention resumes a stalled removal, see
``store.retention``).

The handler depends on narrow ports declared here (``TaskRecords``, ``EventSink``,
``ObjectStore``; ``TaskStore``, ``Emitter`` and ``S3`` implement them) and on the ``Executor``
port, so tests run it against in-memory fakes.
"""

from __future__ import annotations

from typing import Any, Protocol, assert_never

from scaleodm.common import clock, failpoints, metrics
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
                if delivered < self.max_deliver:
                    raise
                if isinstance(cmd, commands.CreateTask | commands.RestartTask):
                    metrics.COMMANDS_GIVEN_UP.labels(cmd.verb).inc()
                    log.error("giving up on command", error=repr(exc))
                    # The reason stays in the log: the exception's text may hold internal
                    # names and addresses (Kubernetes API, paths), never shown to clients.
                    await self.emitter.emit(events.new(
                        events.TaskFailed, cmd.task_id, cmd.attempt, error_message=RUN_NOT_STARTED
                    ))
                    return
                # JetStream delivers it no more: the run may go on (cancel) or the task's data
                # stay (remove) until an operator acts or retention resumes it.
                metrics.COMMANDS_GIVEN_UP.labels(cmd.verb).inc()
                log.error("giving up on command: its last delivery failed", task_id=cmd.task_id,
                          attempt=cmd.attempt, verb=cmd.verb, error=repr(exc))
                raise

    async def _dispatch(self, cmd: commands.Command) -> None:
        match cmd:
            case commands.CreateTask() | commands.RestartTask():
                await self._start(cmd)
            case commands.CancelTask():
                signalled = await self.executor.cancel(cmd.task_id, cmd.attempt)
                log.info("run canceled", signalled=signalled)
            case commands.RemoveTask():
                doc = await self.store.get_task(cmd.task_id, include_removed=True)
                if doc is not None and not doc.get("removed"):
                    log.warning("remove of a task that is not removed (another task under this "
                                "uuid); nothing deleted", task_attempt=doc.get("attempt"))
                    return
                await self.executor.remove(cmd.task_id, cmd.attempt)
                await self.s3.delete_prefix(task_prefix(self.bucket, cmd.task_id))
                await self.store.delete_task(cmd.task_id)
                log.info("task removed")
            case _:
                assert_never(cmd)

    async def _start(self, spec: commands.CreateTask | commands.RestartTask) -> None:
        doc = await self.store.get_task(spec.task_id, include_removed=True)
        if not _is_current(doc, spec.attempt):
            log.info("command is not for the task's current active attempt; no run started")
            await self._stop_unless_current(spec, doc)
            return
        parse_s3_url(spec.output_prefix)  # a malformed command fails here, not in the run
        await self.points.hit("scheduler.create.before_start")
        outcome = await self.executor.start(spec)
        log.info("run requested", outcome=outcome.value)
        await self.points.hit("scheduler.create.before_ack")
        if outcome is StartOutcome.EXISTS:
            log.info("redelivered command: run already exists, nothing changed")
        # A cancel, restart or remove handled while this run was being started found no run to
        # stop: read the task again.
        await self._stop_unless_current(
            spec, await self.store.get_task(spec.task_id, include_removed=True)
        )

    async def _stop_unless_current(
        self, spec: commands.CreateTask | commands.RestartTask, doc: dict[str, Any] | None
    ) -> None:
        """Stop the run of ``spec``'s attempt unless it is the task's current active attempt.

        The run may exist (an earlier delivery, or a start in flight elsewhere) or not; both
        executor calls are idempotent. A local cancel of a run that never started leaves a bare
        claim (a directory with a cancel file), which keeps a start racing on another replica
        from spawning it and is deleted with the task's other runs when the task is removed.
        """
        if doc is None or doc.get("removed"):
            log.info("task removed; removing the run")
            await self.executor.remove(spec.task_id, spec.attempt)
        elif doc["attempt"] < spec.attempt:
            # Not this task's attempt (yet): stopping could claim a run the task will want.
            log.warning("command for an attempt the task does not have; ignored",
                        task_attempt=doc["attempt"])
        elif doc["attempt"] > spec.attempt:
            log.info("task restarted since; stopping this attempt's run",
                     task_attempt=doc["attempt"])
            await self.executor.cancel(spec.task_id, spec.attempt)
        elif TaskState(doc["state"]) not in ACTIVE_STATES:
            log.info("task no longer active; stopping the run", state=doc["state"])
            await self.executor.cancel(spec.task_id, spec.attempt)
        elif not doc.get("admitted"):
            # Not given a slot (a command of a node before admission control): admission will
            # start it; nothing runs, nothing to stop.
            log.info("attempt not admitted yet; no run started")


def _is_current(doc: dict[str, Any] | None, attempt: int) -> bool:
    """``attempt`` is the task's current attempt, admitted (it holds a run slot), and the task
    is queued or running."""
    return (doc is not None and not doc.get("removed") and doc["attempt"] == attempt
            and bool(doc.get("admitted")) and TaskState(doc["state"]) in ACTIVE_STATES)
