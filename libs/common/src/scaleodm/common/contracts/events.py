"""Task events (past-tense names); subjects ``events.task.<task_id>.<kind>``.

``event_id`` is deterministic — ``<task>:<attempt>:<kind>[:<key>]`` — so two writers observing the
same fact (the gateway recording a cancel, the watcher seeing the run end) produce one event, and
a redelivered or re-published event is recognised. ``seq`` is the per-task position assigned by the
event log when the event is first recorded (None before that). Events are made by one factory,
:func:`new`, which computes the id.

The set of kinds is closed: the :data:`TaskEvent` union is the one list, and everything else is
derived from it — :data:`KINDS` (the SSE/OpenAPI/AsyncAPI enums), :data:`TERMINAL_KINDS` (from
:data:`TerminalEvent`), the discriminated :data:`AnyTaskEvent`. Code that dispatches on the kind
does so with ``match`` and ``typing.assert_never``, so a new kind fails ``mypy --strict`` until
every place handles it (``tests/unit/test_event_kinds.py`` checks the rest).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from scaleodm.common import clock
from scaleodm.common.contracts.ids import EventId, TaskId


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)
    schema_version: Literal[1] = 1
    event_id: EventId
    task_id: TaskId
    attempt: int = Field(ge=1)
    seq: int | None = None
    occurred_at: dt.datetime = Field(default_factory=clock.now)

    # How ``new`` tells apart events of one kind within an attempt: by the value of the field
    # named ``id_key``, by the caller's ``key`` (``needs_key``), or not at all (once per attempt).
    id_key: ClassVar[str | None] = None
    needs_key: ClassVar[bool] = False

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


# The attempt was given a run slot (scheduler/admission.py): its run is being started. Status
# stays 10 until the run starts; carries the run command. ``cpu_cores`` and ``memory_gib`` are
# what the run requests (the scheduler's sizing), and what its usage record charges per second;
# None in events recorded before they existed.
class TaskAdmitted(_Event):
    kind: Literal["admitted"] = "admitted"
    size_class: str = Field(description="The size class whose slot the run holds.")
    cpu_cores: float | None = Field(
        None, ge=0, description="CPU cores the run requests (None: not recorded).")
    memory_gib: float | None = Field(
        None, ge=0, description="Memory in GiB the run requests (None: not recorded).")


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
    needs_key: ClassVar[bool] = True  # the stage or console line that moved it
    progress: float = Field(ge=0, le=100)


# Console lines [line_start, line_start + len(lines)) of the attempt.
class TaskOutput(_Event):
    kind: Literal["output"] = "output"
    id_key: ClassVar[str | None] = "line_start"
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


# One of the task's children (splitmerge: a task its run created) changed status: on the
# parent's stream, so its SSE clients follow the family. Recorded by the event log when the child's
# own event is (``TaskStore.apply_event``); keyed by that event, so it is recorded once.
class TaskChildChanged(_Event):
    kind: Literal["child"] = "child"
    needs_key: ClassVar[bool] = True  # the child's event id
    child: TaskId
    child_kind: str = Field(description="The child's event: queued, running, completed, "
                            "failed, canceled or removed.")
    status: int | None = Field(
        None, description="The child's NodeODM status code after it (None: removed).")


TaskEvent = (
    TaskQueued
    | TaskAdmitted
    | TaskRunning
    | TaskInputsReady
    | TaskProgressed
    | TaskOutput
    | TaskCompleted
    | TaskFailed
    | TaskCanceled
    | TaskRemoved
    | TaskChildChanged
)
# The events that end an attempt (NodeODM status 40, 30, 50); webhooks fire on these.
TerminalEvent = TaskCompleted | TaskFailed | TaskCanceled
AnyTaskEvent = Annotated[TaskEvent, Field(discriminator="kind")]
EVENT_ADAPTER: TypeAdapter[AnyTaskEvent] = TypeAdapter(AnyTaskEvent)

E = TypeVar("E", bound=_Event)


def kind_of(event_type: type[_Event]) -> str:
    """The ``kind`` of an event class (its discriminator's one value)."""
    default = event_type.model_fields["kind"].default
    assert isinstance(default, str), event_type
    return default


EVENT_TYPES: tuple[type[_Event], ...] = get_args(TaskEvent)
KINDS: tuple[str, ...] = tuple(kind_of(t) for t in EVENT_TYPES)
TERMINAL_KINDS: frozenset[str] = frozenset(kind_of(t) for t in get_args(TerminalEvent))


def new(
    event_type: type[E],
    task_id: str,
    attempt: int,
    *,
    key: str | int | None = None,
    **fields: Any,
) -> E:
    """A new ``event_type`` event of ``task_id``'s attempt ``attempt``, with its deterministic
    ``event_id`` (``<task>:<attempt>:<kind>[:<key>]``).

    ``key`` tells apart events of one kind within an attempt where the class says so:
    ``TaskProgressed`` needs one (the stage or line that moved it); ``TaskOutput`` takes its
    ``line_start``; the others happen once per attempt and take none. ``fields`` are the
    class's own fields, validated by pydantic.
    """
    if event_type.id_key is not None:
        if key is not None:
            raise TypeError(f"{event_type.__name__}: its key is {event_type.id_key}, not key=")
        key = fields.get(event_type.id_key)
    elif event_type.needs_key and key is None:
        raise TypeError(f"{event_type.__name__} needs a key")
    elif not event_type.needs_key and key is not None:
        raise TypeError(f"{event_type.__name__} happens once per attempt: no key")
    return event_type(
        event_id=_Event.make_id(task_id, attempt, kind_of(event_type), key),
        task_id=TaskId(task_id),
        attempt=attempt,
        **fields,
    )
