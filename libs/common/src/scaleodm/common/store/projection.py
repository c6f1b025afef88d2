"""How one event changes a task document: pure planning, no I/O.

``plan(snapshot, event)`` returns the guarded MongoDB update for the event, or ``None`` when the
event must be ignored. The rules:

- state is per attempt: events of an older attempt are ignored; a ``queued`` event for the next
  attempt opens it (restart) only from a terminal state;
- an attempt is ``admitted`` (given a run slot) once, while it is queued; it holds the slot
  while queued or running, so an end or a removal frees it (scheduler/admission.py); the
  admission also records what the run requests (``requested_cpu_cores``,
  ``requested_memory_gib``: what its usage record charges, ``store/usage.py``);
- a task never moves backwards: queued -> running -> terminal; progress only rises (``$max``);
- an attempt's end sets progress 100 whatever the outcome (NodeODM §4.4): completed, failed
  (also a run that did not start: it stands for NodeODM's failure to start the engine), and
  canceled while running. NodeODM 2.2.4 sets 100 in the step every end of a started run goes
  through, including the exit of a canceled task's killed engine, which follows the cancel
  within moments (only in between does NodeODM still show the progress reached; a test-mode
  node, having no engine, shows 0 there). This node has no such in-between: the cancel records
  the end state. A task canceled while queued keeps its progress (0): its run never started;
- terminal states stick — completed/failed never replace another terminal state — except that
  ``canceled`` wins over everything (NodeODM §3.9: cancel turns 40 and 30 into 50), so a cancel
  racing a run's failure ends 50 whichever arrives first;
- every update repeats its preconditions in the filter, so a concurrent writer cannot slip a
  transition in between the read and the write, and applying an event twice changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, assert_never

from scaleodm.common import clock
from scaleodm.common.contracts import events
from scaleodm.common.domain.status import ACTIVE_STATES, TERMINAL_STATES, TaskState


@dataclass(frozen=True)
class Snapshot:
    """The fields of a task document the rules look at."""

    attempt: int
    state: TaskState
    removed: bool = False
    admitted: bool = False  # the attempt holds a run slot (``admitted`` event)
    parent: str | None = None  # the task whose run created it (splitmerge), if any


@dataclass(frozen=True)
class Plan:
    guard: dict[str, Any] = field(default_factory=dict)
    update: dict[str, Any] = field(default_factory=dict)


def _states(states: frozenset[TaskState]) -> dict[str, Any]:
    return {"$in": sorted(s.value for s in states)}


def fresh_attempt(attempt: int) -> dict[str, Any]:
    """The fields of an attempt that has not run yet (a new task, or a restart)."""
    return {
        "attempt": attempt,
        "state": TaskState.QUEUED.value,
        "progress": 0.0,
        "output_lines": 0,
        "started_at_ms": None,
        "finished_at_ms": None,
        "error_message": None,
        "admitted": False,
        "size_class": None,
        "admitted_at_ms": None,
        "requested_cpu_cores": None,
        "requested_memory_gib": None,
    }


def plan(snap: Snapshot, ev: events.TaskEvent) -> Plan | None:
    """The guarded update ``ev`` makes to the task ``snap`` describes; None: ignore it.

    One case per event class, checked by ``mypy --strict`` (``assert_never``): a new kind does
    not type-check until it has its rule here.
    """
    match ev:
        case events.TaskRemoved():
            if snap.removed:  # recorded (its command too), but the first removal's time stays
                return Plan()
            return Plan(
                guard={"removed": False},
                update={"$set": {"removed": True, "removed_at_ms": clock.to_ms(ev.occurred_at)}},
            )
        case _ if snap.removed:
            return None  # a removed task changes no more
        case events.TaskQueued():
            return _next_attempt(snap, ev)
        case _ if ev.attempt != snap.attempt:
            return None  # another attempt's: an older one, or one not opened yet
        case events.TaskAdmitted():
            # Once per attempt, and only while it waits: a canceled task takes no slot.
            if snap.admitted or snap.state != TaskState.QUEUED:
                return None
            return Plan(
                guard={"attempt": ev.attempt, "state": TaskState.QUEUED.value,
                       "admitted": {"$ne": True}},
                update={"$set": {"admitted": True, "size_class": ev.size_class,
                                 "admitted_at_ms": clock.to_ms(ev.occurred_at),
                                 "requested_cpu_cores": ev.cpu_cores,
                                 "requested_memory_gib": ev.memory_gib}},
            )
        case events.TaskOutput():
            end = ev.line_start + len(ev.lines)
            return Plan(guard={"attempt": ev.attempt}, update={"$max": {"output_lines": end}})
        case events.TaskInputsReady():
            return Plan(
                guard={"attempt": ev.attempt}, update={"$set": {"images_count": ev.images_count}}
            )
        case events.TaskRunning():
            if snap.state not in ACTIVE_STATES:
                return None
            return Plan(
                guard={"attempt": ev.attempt, "state": TaskState.QUEUED.value},
                update={
                    "$set": {
                        "state": TaskState.RUNNING.value,
                        "started_at_ms": clock.to_ms(ev.occurred_at),
                    }
                },
            )
        case events.TaskProgressed():
            if snap.state not in ACTIVE_STATES:
                return None
            return Plan(
                guard={"attempt": ev.attempt, "state": _states(ACTIVE_STATES)},
                update={"$max": {"progress": ev.progress}},
            )
        case events.TaskCompleted():
            return _finish(snap, ev, TaskState.COMPLETED, {})
        case events.TaskFailed():
            return _finish(snap, ev, TaskState.FAILED, {"error_message": ev.error_message})
        case events.TaskCanceled():
            if snap.state == TaskState.CANCELED:
                return None
            values: dict[str, Any] = {
                "state": TaskState.CANCELED.value,
                "finished_at_ms": clock.to_ms(ev.occurred_at),
            }
            if snap.state == TaskState.RUNNING:
                values["progress"] = 100.0  # the killed run's end (module docstring)
            return Plan(
                guard={"attempt": ev.attempt, "state": {"$ne": TaskState.CANCELED.value}},
                update={"$set": values},
            )
        case events.TaskChildChanged():
            # Recorded on the parent's stream; the document only notes when (which moves its
            # ``seq`` on, as every event applied does).
            return Plan(guard={"attempt": ev.attempt},
                        update={"$set": {"child_changed_at_ms": clock.to_ms(ev.occurred_at)}})
        case _:
            assert_never(ev)


def _next_attempt(snap: Snapshot, ev: events.TaskQueued) -> Plan | None:
    """``queued``: the creation's own event, or a restart opening the next attempt."""
    if ev.attempt == snap.attempt:
        return Plan()  # the creation's own event: recorded, nothing to change
    if ev.attempt != snap.attempt + 1 or snap.state not in TERMINAL_STATES:
        return None
    reset = fresh_attempt(ev.attempt)
    if ev.options is not None:
        reset["options"] = ev.options
    if ev.date_created_ms is not None:
        reset["date_created_ms"] = ev.date_created_ms
    guard = {"attempt": snap.attempt, "state": _states(TERMINAL_STATES)}
    return Plan(guard=guard, update={"$set": reset})


def _finish(
    snap: Snapshot, ev: events.TerminalEvent, final: TaskState, extra: dict[str, Any]
) -> Plan | None:
    """``completed``/``failed``: end an active attempt; terminal states stick."""
    if snap.state not in ACTIVE_STATES:
        return None
    values: dict[str, Any] = {
        "state": final.value,
        "progress": 100.0,  # NodeODM §4.4: 100 at the end of a run whatever the outcome
        "finished_at_ms": clock.to_ms(ev.occurred_at),
        **extra,
    }
    return Plan(
        guard={"attempt": ev.attempt, "state": _states(ACTIVE_STATES)}, update={"$set": values}
    )
