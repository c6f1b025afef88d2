"""How one event changes a task document: pure planning, no I/O.

``plan(snapshot, event)`` returns the guarded MongoDB update for the event, or ``None`` when the
event must be ignored. The rules:

- state is per attempt: events of an older attempt are ignored; a ``queued`` event for the next
  attempt opens it (restart) only from a terminal state;
- a task never moves backwards: queued -> running -> terminal; progress only rises (``$max``);
- terminal states stick — completed/failed never replace another terminal state — except that
  ``canceled`` wins over everything (NodeODM §3.9: cancel turns 40 and 30 into 50), so a cancel
  racing a run's failure ends 50 whichever arrives first;
- every update repeats its preconditions in the filter, so a concurrent writer cannot slip a
  transition in between the read and the write, and applying an event twice changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scaleodm.common.contracts import events
from scaleodm.common.domain.status import ACTIVE_STATES, TERMINAL_STATES, TaskState


@dataclass(frozen=True)
class Snapshot:
    """The fields of a task document the rules look at."""

    attempt: int
    state: TaskState
    removed: bool = False


@dataclass(frozen=True)
class Plan:
    guard: dict[str, Any] = field(default_factory=dict)
    update: dict[str, Any] = field(default_factory=dict)


def _ms(event: events.TaskEvent) -> int:
    return int(event.occurred_at.timestamp() * 1000)


def _states(states: frozenset[TaskState]) -> dict[str, Any]:
    return {"$in": sorted(s.value for s in states)}


def plan(snap: Snapshot, ev: events.TaskEvent) -> Plan | None:  # noqa: C901 - one rule per kind
    if isinstance(ev, events.TaskRemoved):
        return Plan(update={"$set": {"removed": True, "removed_at_ms": _ms(ev)}})
    if snap.removed:
        return None
    if isinstance(ev, events.TaskQueued):
        if ev.attempt == snap.attempt:
            return Plan()  # the creation's own event: recorded, nothing to change
        if ev.attempt != snap.attempt + 1 or snap.state not in TERMINAL_STATES:
            return None
        reset: dict[str, Any] = {
            "attempt": ev.attempt,
            "state": TaskState.QUEUED.value,
            "progress": 0.0,
            "output_lines": 0,
            "started_at_ms": None,
            "finished_at_ms": None,
            "error_message": None,
        }
        if ev.options is not None:
            reset["options"] = ev.options
        if ev.date_created_ms is not None:
            reset["date_created_ms"] = ev.date_created_ms
        guard = {"attempt": snap.attempt, "state": _states(TERMINAL_STATES)}
        return Plan(guard=guard, update={"$set": reset})
    if ev.attempt != snap.attempt:
        return None
    same = {"attempt": ev.attempt}
    if isinstance(ev, events.TaskOutput):
        return Plan(guard=same, update={"$max": {"output_lines": ev.line_start + len(ev.lines)}})
    if isinstance(ev, events.TaskInputsReady):
        return Plan(guard=same, update={"$set": {"images_count": ev.images_count}})
    if isinstance(ev, events.TaskRunning):
        if snap.state not in ACTIVE_STATES:
            return None
        return Plan(
            guard={**same, "state": TaskState.QUEUED.value},
            update={"$set": {"state": TaskState.RUNNING.value, "started_at_ms": _ms(ev)}},
        )
    if isinstance(ev, events.TaskProgressed):
        if snap.state not in ACTIVE_STATES:
            return None
        return Plan(
            guard={**same, "state": _states(ACTIVE_STATES)},
            update={"$max": {"progress": ev.progress}},
        )
    if isinstance(ev, events.TaskCompleted | events.TaskFailed):
        if snap.state not in ACTIVE_STATES:
            return None  # terminal states stick
        final = TaskState.COMPLETED if isinstance(ev, events.TaskCompleted) else TaskState.FAILED
        values: dict[str, Any] = {
            "state": final.value,
            "progress": 100.0,  # NodeODM §4.4: 100 at the end whatever the outcome
            "finished_at_ms": _ms(ev),
        }
        if isinstance(ev, events.TaskFailed):
            values["error_message"] = ev.error_message
        return Plan(guard={**same, "state": _states(ACTIVE_STATES)}, update={"$set": values})
    if isinstance(ev, events.TaskCanceled):
        if snap.state == TaskState.CANCELED:
            return None
        values = {"state": TaskState.CANCELED.value, "finished_at_ms": _ms(ev)}
        if snap.state == TaskState.RUNNING:
            values["progress"] = 100.0
        return Plan(guard={**same, "state": {"$ne": TaskState.CANCELED.value}},
                    update={"$set": values})
    return None
