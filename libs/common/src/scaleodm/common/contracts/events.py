"""Task events (past-tense names); subjects ``events.task.<task_id>.<kind>``.

``event_id`` is deterministic — ``<task>:<attempt>:<kind>[:<key>]`` — so two writers observing the
same fact (the gateway recording a cancel, the watcher seeing the run end) produce one event, and
a redelivered or re-published event is recognised. ``seq`` is the per-task position assigned by the
event log when the event is first recorded (None before that).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from scaleodm.common.contracts.ids import EventId, TaskId


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)
    schema_version: Literal[1] = 1
    event_id: EventId
    task_id: TaskId
    attempt: int = Field(ge=1)
    seq: int | None = None
    occurred_at: dt.datetime = Field(default_factory=utcnow)

    @staticmethod
    def make_id(task_id: str, attempt: int, kind: str, key: str | int | None = None) -> EventId:
        base = f"{task_id}:{attempt}:{kind}"
        return EventId(base if key is None else f"{base}:{key}")


# A task (or a new attempt of it, after a restart) waits for a run.
class TaskQueued(_Event):
    kind: Literal["queued"] = "queued"
    options: list[dict[str, Any]] | None = Field(
        None, description="Effective options of the new attempt (restart), None = unchanged."
    )
    date_created_ms: int | None = Field(None, description="New dateCreated (restart resets it).")


# The run started (status 20).
class TaskRunning(_Event):
    kind: Literal["running"] = "running"


# The run fetched its inputs: how many images it will process (NodeODM §3.5: imagesCount
# after initialization is the images actually present).
class TaskInputsReady(_Event):
    kind: Literal["inputs"] = "inputs"
    images_count: int = Field(ge=0)


# Progress moved forward (0-100, monotonic).
class TaskProgressed(_Event):
    kind: Literal["progress"] = "progress"
    progress: float = Field(ge=0, le=100)


# Console lines [line_start, line_start + len(lines)) of the attempt.
class TaskOutput(_Event):
    kind: Literal["output"] = "output"
    line_start: int = Field(ge=0)
    lines: list[str]


# The run finished and its outputs are in S3 (status 40).
class TaskCompleted(_Event):
    kind: Literal["completed"] = "completed"


# The run failed (status 30).
class TaskFailed(_Event):
    kind: Literal["failed"] = "failed"
    error_message: str


# The task was canceled (status 50).
class TaskCanceled(_Event):
    kind: Literal["canceled"] = "canceled"


# The task was removed; it no longer exists for clients.
class TaskRemoved(_Event):
    kind: Literal["removed"] = "removed"


TaskEvent = (
    TaskQueued
    | TaskRunning
    | TaskInputsReady
    | TaskProgressed
    | TaskOutput
    | TaskCompleted
    | TaskFailed
    | TaskCanceled
    | TaskRemoved
)
AnyTaskEvent = Annotated[TaskEvent, Field(discriminator="kind")]
EVENT_ADAPTER: TypeAdapter[AnyTaskEvent] = TypeAdapter(AnyTaskEvent)
TERMINAL_KINDS = frozenset({"completed", "failed", "canceled"})


def queued(task_id: str, attempt: int, **kw: Any) -> TaskQueued:
    return TaskQueued(
        event_id=_Event.make_id(task_id, attempt, "queued"),
        task_id=TaskId(task_id),
        attempt=attempt,
        **kw,
    )


def running(task_id: str, attempt: int) -> TaskRunning:
    return TaskRunning(
        event_id=_Event.make_id(task_id, attempt, "running"), task_id=TaskId(task_id),
        attempt=attempt,
    )


def inputs_ready(task_id: str, attempt: int, images_count: int) -> TaskInputsReady:
    return TaskInputsReady(
        event_id=_Event.make_id(task_id, attempt, "inputs"), task_id=TaskId(task_id),
        attempt=attempt, images_count=images_count,
    )


def progressed(task_id: str, attempt: int, progress: float, key: str | int) -> TaskProgressed:
    return TaskProgressed(
        event_id=_Event.make_id(task_id, attempt, "progress", key), task_id=TaskId(task_id),
        attempt=attempt, progress=progress,
    )


def output(task_id: str, attempt: int, line_start: int, lines: list[str]) -> TaskOutput:
    return TaskOutput(
        event_id=_Event.make_id(task_id, attempt, "output", line_start), task_id=TaskId(task_id),
        attempt=attempt, line_start=line_start, lines=lines,
    )


def completed(task_id: str, attempt: int) -> TaskCompleted:
    return TaskCompleted(
        event_id=_Event.make_id(task_id, attempt, "completed"), task_id=TaskId(task_id),
        attempt=attempt,
    )


def failed(task_id: str, attempt: int, error_message: str) -> TaskFailed:
    return TaskFailed(
        event_id=_Event.make_id(task_id, attempt, "failed"), task_id=TaskId(task_id),
        attempt=attempt, error_message=error_message,
    )


def canceled(task_id: str, attempt: int) -> TaskCanceled:
    return TaskCanceled(
        event_id=_Event.make_id(task_id, attempt, "canceled"), task_id=TaskId(task_id),
        attempt=attempt,
    )


def removed(task_id: str, attempt: int) -> TaskRemoved:
    return TaskRemoved(
        event_id=_Event.make_id(task_id, attempt, "removed"), task_id=TaskId(task_id),
        attempt=attempt,
    )
