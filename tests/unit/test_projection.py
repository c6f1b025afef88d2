"""The projection rules (``scaleodm.common.store.projection.plan``): pure, no I/O.

Covered, table-driven over every event kind and the relevant snapshot states:
- events of the current attempt: which (kind, state) pairs produce an update and which are ignored
  (never backwards, terminal completed/failed stick, ``canceled`` wins over everything but itself,
  progress via ``$max``, output lines via ``$max``);
- stale attempts are ignored; future attempts are ignored except ``queued`` for attempt + 1 from a
  terminal state (the restart), whose update resets the attempt's fields;
- ``removed`` always applies (to other attempts too), once: on a removed task it is recorded and
  changes nothing (the first removal's time stays); a removed task ignores everything else;
- ``admitted`` (a run slot given) applies once per attempt, only while it is queued: ignored when
  the attempt is admitted already, no longer queued (running, ended, canceled) or another attempt;
  a restart clears it, and the new attempt can be admitted; it stores what the run requests
  (``requested_cpu_cores``/``requested_memory_gib``, None from an event recorded before they
  existed), which a restart clears too;
- the exact guard (preconditions repeated in the filter) and update documents.

Left out: applying the plans to MongoDB (``tests/integration/test_store.py``), event log / seq
allocation, and the NodeODM status mapping (``domain.status``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from scaleodm.common.contracts import events
from scaleodm.common.domain.status import TaskState
from scaleodm.common.store.projection import Plan, Snapshot, plan

TID = "3f2b8f4e-1c2d-4a5b-8c9d-0e1f2a3b4c5d"
AT = dt.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=dt.UTC)
AT_MS = int(AT.timestamp() * 1000)

Q, R, C, F, X = (
    TaskState.QUEUED,
    TaskState.RUNNING,
    TaskState.COMPLETED,
    TaskState.FAILED,
    TaskState.CANCELED,
)
ALL_STATES = (Q, R, C, F, X)
ACTIVE_IN = {"$in": ["queued", "running"]}
TERMINAL_IN = {"$in": ["canceled", "completed", "failed"]}

EventFactory = Callable[[int], events.TaskEvent]


def _at(ev: events.TaskEvent) -> events.TaskEvent:
    return ev.model_copy(update={"occurred_at": AT})


# Every kind, built for a given attempt.
KINDS: dict[str, EventFactory] = {
    "queued": lambda a: _at(events.new(events.TaskQueued, TID, a)),
    "admitted": lambda a: _at(events.new(events.TaskAdmitted, TID, a, size_class="medium",
                                         cpu_cores=2.25, memory_gib=18.0)),
    "running": lambda a: _at(events.new(events.TaskRunning, TID, a)),
    "progress": lambda a: _at(events.new(events.TaskProgressed, TID, a, key="k", progress=42.5)),
    "output": lambda a: _at(events.new(events.TaskOutput, TID, a, line_start=3, lines=["a", "b"])),
    "completed": lambda a: _at(events.new(events.TaskCompleted, TID, a)),
    "failed": lambda a: _at(events.new(
        events.TaskFailed, TID, a, error_message="Cannot process dataset"
    )),
    "canceled": lambda a: _at(events.new(events.TaskCanceled, TID, a)),
    "removed": lambda a: _at(events.new(events.TaskRemoved, TID, a)),
}


def _expected_same_attempt(kind: str, state: TaskState) -> Plan | None:
    """The plan for an event of the snapshot's attempt (2), spelled out per (kind, state)."""
    same = {"attempt": 2}
    if kind == "removed":
        return Plan(guard={"removed": False},
                    update={"$set": {"removed": True, "removed_at_ms": AT_MS}})
    if kind == "queued":
        return Plan()
    if kind == "output":
        return Plan(guard=same, update={"$max": {"output_lines": 5}})
    if kind == "admitted":  # the snapshot is not admitted (Snapshot's default)
        if state != Q:
            return None
        return Plan(
            guard={**same, "state": "queued", "admitted": {"$ne": True}},
            update={"$set": {"admitted": True, "size_class": "medium", "admitted_at_ms": AT_MS,
                         "requested_cpu_cores": 2.25, "requested_memory_gib": 18.0}},
        )
    if kind == "running":
        if state not in (Q, R):
            return None
        return Plan(
            guard={**same, "state": "queued"},
            update={"$set": {"state": "running", "started_at_ms": AT_MS}},
        )
    if kind == "progress":
        if state not in (Q, R):
            return None
        return Plan(guard={**same, "state": ACTIVE_IN}, update={"$max": {"progress": 42.5}})
    if kind in ("completed", "failed"):
        if state not in (Q, R):
            return None
        values: dict[str, Any] = {"state": kind, "progress": 100.0, "finished_at_ms": AT_MS}
        if kind == "failed":
            values["error_message"] = "Cannot process dataset"
        return Plan(guard={**same, "state": ACTIVE_IN}, update={"$set": values})
    assert kind == "canceled"
    if state == X:
        return None
    values = {"state": "canceled", "finished_at_ms": AT_MS}
    if state == R:
        values["progress"] = 100.0
    return Plan(guard={**same, "state": {"$ne": "canceled"}}, update={"$set": values})


SAME_ATTEMPT_CASES = [
    pytest.param(kind, state, _expected_same_attempt(kind, state), id=f"{kind}-from-{state}")
    for kind in KINDS
    for state in ALL_STATES
]


@pytest.mark.parametrize(("kind", "state", "expected"), SAME_ATTEMPT_CASES)
def test_event_of_current_attempt(kind: str, state: TaskState, expected: Plan | None) -> None:
    assert plan(Snapshot(attempt=2, state=state), KINDS[kind](2)) == expected


# The rules in words, independently of the table above (guards against a table copying the code).
@pytest.mark.parametrize(
    ("kind", "state", "applies"),
    [
        pytest.param("running", Q, True, id="queued-to-running"),
        pytest.param("running", C, False, id="no-running-after-completed"),
        pytest.param("running", F, False, id="no-running-after-failed"),
        pytest.param("running", X, False, id="no-running-after-canceled"),
        pytest.param("progress", C, False, id="no-progress-after-completed"),
        pytest.param("completed", F, False, id="failed-sticks-against-completed"),
        pytest.param("failed", C, False, id="completed-sticks-against-failed"),
        pytest.param("completed", X, False, id="canceled-sticks-against-completed"),
        pytest.param("failed", X, False, id="canceled-sticks-against-failed"),
        pytest.param("completed", R, True, id="running-to-completed"),
        pytest.param("failed", Q, True, id="queued-to-failed"),
        pytest.param("canceled", Q, True, id="cancel-queued"),
        pytest.param("canceled", R, True, id="cancel-running"),
        pytest.param("canceled", C, True, id="cancel-wins-over-completed"),
        pytest.param("canceled", F, True, id="cancel-wins-over-failed"),
        pytest.param("canceled", X, False, id="cancel-twice"),
        pytest.param("output", C, True, id="late-output-of-same-attempt"),
        pytest.param("admitted", Q, True, id="admit-queued"),
        pytest.param("admitted", R, False, id="no-admission-while-running"),
        pytest.param("admitted", X, False, id="no-admission-after-canceled"),
    ],
)
def test_transition_rules(kind: str, state: TaskState, applies: bool) -> None:
    step = plan(Snapshot(attempt=1, state=state), KINDS[kind](1))
    assert (step is not None) is applies
    if step is not None and kind != "output":
        assert step.update, "an applied state change must update the document"


@pytest.mark.parametrize(
    ("kind", "state"),
    [
        pytest.param(kind, state, id=f"{kind}-attempt1-vs-{state}-attempt2")
        for kind in KINDS
        if kind != "removed"
        for state in ALL_STATES
    ],
)
def test_stale_attempt_is_ignored(kind: str, state: TaskState) -> None:
    assert plan(Snapshot(attempt=2, state=state), KINDS[kind](1)) is None


@pytest.mark.parametrize(
    ("kind", "state"),
    [
        pytest.param(kind, state, id=f"{kind}-attempt3-vs-{state}-attempt2")
        for kind in KINDS
        if kind not in ("removed", "queued")
        for state in ALL_STATES
    ],
)
def test_future_attempt_is_ignored(kind: str, state: TaskState) -> None:
    assert plan(Snapshot(attempt=2, state=state), KINDS[kind](3)) is None


@pytest.mark.parametrize(
    ("state", "attempt", "applies"),
    [
        pytest.param(C, 3, True, id="next-after-completed"),
        pytest.param(F, 3, True, id="next-after-failed"),
        pytest.param(X, 3, True, id="next-after-canceled"),
        pytest.param(Q, 3, False, id="next-while-queued"),
        pytest.param(R, 3, False, id="next-while-running"),
        pytest.param(C, 4, False, id="skip-an-attempt"),
        pytest.param(X, 4, False, id="skip-an-attempt-canceled"),
        pytest.param(C, 1, False, id="older-attempt"),
    ],
)
def test_restart_only_next_attempt_from_terminal(
    state: TaskState, attempt: int, applies: bool
) -> None:
    step = plan(Snapshot(attempt=2, state=state), KINDS["queued"](attempt))
    assert (step is not None) is applies


def test_restart_plan_resets_the_attempt_and_carries_new_options() -> None:
    opts = [{"name": "dsm", "value": True}]
    ev = events.new(events.TaskQueued, TID, 3, options=opts, date_created_ms=1_700_000_000_000)
    step = plan(Snapshot(attempt=2, state=F), ev)
    assert step == Plan(
        guard={"attempt": 2, "state": TERMINAL_IN},
        update={
            "$set": {
                "attempt": 3,
                "state": "queued",
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
                "options": opts,
                "date_created_ms": 1_700_000_000_000,
            }
        },
    )


def test_restart_without_options_keeps_them() -> None:
    step = plan(Snapshot(attempt=1, state=X), events.new(events.TaskQueued, TID, 2))
    assert step is not None
    assert step.guard == {"attempt": 1, "state": TERMINAL_IN}
    assert "options" not in step.update["$set"]
    assert "date_created_ms" not in step.update["$set"]
    assert step.update["$set"]["attempt"] == 2


@pytest.mark.parametrize(
    ("snap_attempt", "state", "removed", "ev_attempt"),
    [
        pytest.param(1, Q, False, 1, id="queued"),
        pytest.param(2, R, False, 2, id="running"),
        pytest.param(2, C, False, 1, id="stale-attempt"),
        pytest.param(1, F, False, 2, id="future-attempt"),
    ],
)
def test_removed_always_applies(
    snap_attempt: int, state: TaskState, removed: bool, ev_attempt: int
) -> None:
    snap = Snapshot(attempt=snap_attempt, state=state, removed=removed)
    step = plan(snap, KINDS["removed"](ev_attempt))
    assert step == Plan(guard={"removed": False},
                        update={"$set": {"removed": True, "removed_at_ms": AT_MS}})


@pytest.mark.parametrize("ev_attempt", [1, 2])
def test_removed_again_is_recorded_and_changes_nothing(ev_attempt: int) -> None:
    """The first removal's time stays (retention counts from it; and applying the events of a
    task in any order, duplicates included, gives one document: the gateway's read model)."""
    snap = Snapshot(attempt=1, state=X, removed=True)
    assert plan(snap, KINDS["removed"](ev_attempt)) == Plan()


@pytest.mark.parametrize(
    ("kind", "ev_attempt"),
    [pytest.param(kind, 1, id=kind) for kind in KINDS if kind != "removed"]
    + [pytest.param("queued", 2, id="restart")],
)
def test_removed_task_ignores_everything_else(kind: str, ev_attempt: int) -> None:
    snap = Snapshot(attempt=1, state=C, removed=True)
    assert plan(snap, KINDS[kind](ev_attempt)) is None


@pytest.mark.parametrize(
    "kind",
    [pytest.param(k, id=k) for k in ("admitted", "running", "progress", "output", "completed",
                                      "failed", "canceled")],
)
def test_every_update_guards_the_attempt(kind: str) -> None:
    step = plan(Snapshot(attempt=7, state=Q), KINDS[kind](7))
    assert step is not None
    assert step.guard["attempt"] == 7


def test_cancel_of_queued_does_not_touch_progress() -> None:
    step = plan(Snapshot(attempt=1, state=Q), KINDS["canceled"](1))
    assert step is not None
    assert "progress" not in step.update["$set"]


def test_output_lines_come_from_line_start_plus_count() -> None:
    ev = events.new(events.TaskOutput, TID, 1, line_start=10, lines=["x"] * 4)
    step = plan(Snapshot(attempt=1, state=R), ev)
    assert step is not None
    assert step.update == {"$max": {"output_lines": 14}}


# -- admission --------------------------------------------------------------------------------


def test_admission_of_a_queued_attempt_applies_once() -> None:
    """The slot is recorded with its class and time; the guard repeats "queued, not admitted",
    so of two concurrent admissions of the attempt one changes the document."""
    step = plan(Snapshot(attempt=1, state=Q), KINDS["admitted"](1))
    assert step == Plan(
        guard={"attempt": 1, "state": "queued", "admitted": {"$ne": True}},
        update={"$set": {"admitted": True, "size_class": "medium", "admitted_at_ms": AT_MS,
                         "requested_cpu_cores": 2.25, "requested_memory_gib": 18.0}},
    )
    assert plan(Snapshot(attempt=1, state=Q, admitted=True), KINDS["admitted"](1)) is None


@pytest.mark.parametrize("admitted", [False, True], ids=["not-admitted", "admitted"])
@pytest.mark.parametrize("state", [R, C, F, X], ids=lambda s: s.value)
def test_admission_of_an_attempt_no_longer_queued_is_ignored(
    state: TaskState, admitted: bool
) -> None:
    """A task canceled (or ended) while it waited takes no slot."""
    assert plan(Snapshot(attempt=1, state=state, admitted=admitted), KINDS["admitted"](1)) is None


@pytest.mark.parametrize("ev_attempt", [1, 3], ids=["older-attempt", "next-attempt"])
def test_admission_of_another_attempt_is_ignored(ev_attempt: int) -> None:
    assert plan(Snapshot(attempt=2, state=Q), KINDS["admitted"](ev_attempt)) is None


def test_a_restart_clears_the_admission_and_its_attempt_can_be_admitted() -> None:
    step = plan(Snapshot(attempt=1, state=C, admitted=True), KINDS["queued"](2))
    assert step is not None
    reset = step.update["$set"]
    assert (reset["admitted"], reset["size_class"], reset["admitted_at_ms"]) == (False, None, None)
    assert (reset["requested_cpu_cores"], reset["requested_memory_gib"]) == (None, None)
    after = Snapshot(attempt=reset["attempt"], state=TaskState(reset["state"]),
                     admitted=reset["admitted"])
    admission = plan(after, KINDS["admitted"](2))
    assert admission is not None and admission.update["$set"]["admitted"] is True


def test_an_admission_from_before_requests_were_recorded_stores_none() -> None:
    """``admitted`` events recorded before ``cpu_cores``/``memory_gib`` existed still read, and
    store None (their runs are charged no core- or GiB-seconds: ``store/usage.py``)."""
    body = _at(events.new(events.TaskAdmitted, TID, 1, size_class="small")).model_dump(
        mode="json", exclude={"cpu_cores", "memory_gib"})
    old = events.EVENT_ADAPTER.validate_python(body)
    step = plan(Snapshot(attempt=1, state=Q), old)
    assert step is not None
    assert step.update["$set"]["requested_cpu_cores"] is None
    assert step.update["$set"]["requested_memory_gib"] is None
