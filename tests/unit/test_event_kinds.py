"""Event kinds are a closed set: adding one fails this module until every place handles it.

Covered:
- the derived names (``events.KINDS``, ``events.EVENT_TYPES``, ``events.TERMINAL_KINDS``) follow
  the ``TaskEvent`` union, and ``KIND_TABLE`` below — the one place a new kind must be described
  (terminal or not, the NodeODM status it moves a task to) — has a row for each kind;
- ``events.new``: the deterministic ``event_id`` and its key rules;
- ``projection.plan`` handles every kind in every snapshot state (an unhandled one would reach
  ``assert_never`` and raise), and a kind outside the union does reach it;
- the gateway: ``?status=N`` filters (``eventstream.STATUS_KINDS``) agree with the table, and the
  OpenAPI document's SSE ``event`` enum lists every kind;
- ``docs/asyncapi.yaml`` has every kind's schema (its freshness: ``test_asyncapi.py``);
- ``mypy --strict`` rejects every exhaustive ``match`` over ``TaskEvent`` once the union grows by
  one class: each such module's copy, with a probe class added to the union, must fail at each of
  its ``assert_never`` lines (about 1 s with mypy's cache warm from ``task lint``, 4 s cold).

Left out: what each kind's projection rule does (``test_projection.py``); the commands' exhaustive
``match`` (``test_command_handler.py`` checks it at run time: type-checking the scheduler's
imports cold takes ~20 s, too slow for this layer).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pytest
import yaml

from scaleodm.common.contracts import events
from scaleodm.common.domain.status import NodeOdmStatus, TaskState
from scaleodm.common.settings import GatewaySettings
from scaleodm.common.store import projection
from scaleodm.gateway import eventstream, main

ROOT = Path(__file__).resolve().parents[2]
TID = "3f2b8f4e-1c2d-4a5b-8c9d-0e1f2a3b4c5d"


class Kind(NamedTuple):
    make: Callable[[int], events.TaskEvent]  # an event of this kind for an attempt
    terminal: bool  # ends the attempt (webhooks fire)
    status: NodeOdmStatus | None  # the NodeODM status it moves a task to (SSE ?status=N)


# One row per kind: a new kind fails test_table_has_every_kind until it is described here.
KIND_TABLE: dict[str, Kind] = {
    "queued": Kind(lambda a: events.new(events.TaskQueued, TID, a), False, NodeOdmStatus.QUEUED),
    # The task was given a run slot; its run is being started; status stays 10.
    "admitted": Kind(
        lambda a: events.new(events.TaskAdmitted, TID, a, size_class="small"), False, None
    ),
    "running": Kind(lambda a: events.new(events.TaskRunning, TID, a), False, NodeOdmStatus.RUNNING),
    "inputs": Kind(
        lambda a: events.new(events.TaskInputsReady, TID, a, images_count=3), False, None
    ),
    "progress": Kind(
        lambda a: events.new(events.TaskProgressed, TID, a, key="k", progress=5), False, None
    ),
    "output": Kind(
        lambda a: events.new(events.TaskOutput, TID, a, line_start=0, lines=["x"]), False, None
    ),
    "completed": Kind(
        lambda a: events.new(events.TaskCompleted, TID, a), True, NodeOdmStatus.COMPLETED
    ),
    "failed": Kind(
        lambda a: events.new(events.TaskFailed, TID, a, error_message="x"),
        True,
        NodeOdmStatus.FAILED,
    ),
    "canceled": Kind(
        lambda a: events.new(events.TaskCanceled, TID, a), True, NodeOdmStatus.CANCELED
    ),
    "removed": Kind(lambda a: events.new(events.TaskRemoved, TID, a), False, None),
    # A child (splitmerge) changed status: on the parent's stream; the parent's status stays.
    "child": Kind(lambda a: events.new(
        events.TaskChildChanged, TID, a, key=f"{TID}:1:running", child=TID,
        child_kind="running", status=20), False, None),
}


class TaskPaused(events._Event):
    """A kind outside the union, as a new one looks before it is handled."""

    kind: Literal["paused"] = "paused"


# -- derived names ----------------------------------------------------------------------------


def test_kinds_follow_the_union() -> None:
    assert events.EVENT_TYPES == events.TaskEvent.__args__
    assert events.KINDS == tuple(events.kind_of(t) for t in events.EVENT_TYPES)
    assert len(set(events.KINDS)) == len(events.KINDS)


def test_table_has_every_kind() -> None:
    assert set(KIND_TABLE) == set(events.KINDS), "describe the new kind in KIND_TABLE"
    for kind, row in KIND_TABLE.items():
        assert row.make(1).kind == kind


def test_terminal_kinds_are_the_terminal_union() -> None:
    assert events.TERMINAL_KINDS == {k for k, row in KIND_TABLE.items() if row.terminal}
    terminal = {events.kind_of(t) for t in events.TerminalEvent.__args__}
    assert events.TERMINAL_KINDS == terminal


# -- the factory ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "event_id"),
    [
        pytest.param(
            lambda: events.new(events.TaskCanceled, TID, 2), f"{TID}:2:canceled", id="once"
        ),
        pytest.param(
            lambda: events.new(events.TaskProgressed, TID, 1, key="opensfm", progress=20),
            f"{TID}:1:progress:opensfm",
            id="caller-key",
        ),
        pytest.param(
            lambda: events.new(events.TaskOutput, TID, 1, line_start=7, lines=[]),
            f"{TID}:1:output:7",
            id="field-key",
        ),
    ],
)
def test_new_computes_the_event_id(make: Callable[[], events.TaskEvent], event_id: str) -> None:
    assert make().event_id == event_id


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: events.new(events.TaskProgressed, TID, 1, progress=1), id="no-key"),
        pytest.param(lambda: events.new(events.TaskRunning, TID, 1, key="x"), id="extra-key"),
        pytest.param(
            lambda: events.new(events.TaskOutput, TID, 1, key=1, line_start=1, lines=[]),
            id="key-and-field",
        ),
    ],
)
def test_new_refuses_a_wrong_key(make: Callable[[], events.TaskEvent]) -> None:
    with pytest.raises(TypeError):
        make()


# -- projection -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KIND_TABLE))
@pytest.mark.parametrize("removed", [False, True], ids=["live", "removed"])
def test_projection_handles_every_kind(kind: str, removed: bool) -> None:
    for state in TaskState:
        for admitted in (False, True):
            for attempt in (1, 2, 3):  # older, current and next attempt against a snapshot at 2
                snap = projection.Snapshot(attempt=2, state=state, removed=removed,
                                           admitted=admitted)
                step = projection.plan(snap, KIND_TABLE[kind].make(attempt))
                assert step is None or isinstance(step, projection.Plan)


def test_projection_refuses_an_unknown_kind() -> None:
    probe = TaskPaused(event_id="x", task_id=TID, attempt=2)  # type: ignore[arg-type]
    snap = projection.Snapshot(attempt=2, state=TaskState.RUNNING)
    with pytest.raises(AssertionError):
        projection.plan(snap, probe)  # type: ignore[arg-type]


# -- gateway: SSE filters and the OpenAPI enum ------------------------------------------------


def test_status_filters_follow_the_table() -> None:
    expected = {row.status: k for k, row in KIND_TABLE.items() if row.status is not None}
    assert eventstream.STATUS_KINDS == expected


def _event_enums(node: Any) -> list[list[str]]:
    """Every SSE ``event`` enum in an OpenAPI document."""
    found: list[list[str]] = []
    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict) and "enum" in props.get("event", {}):
            found.append(props["event"]["enum"])
        for value in node.values():
            found += _event_enums(value)
    elif isinstance(node, list):
        for value in node:
            found += _event_enums(value)
    return found


def test_openapi_event_enum_is_every_kind() -> None:
    doc = main.create_app(GatewaySettings()).openapi()
    enums = _event_enums(doc["paths"])
    assert len(enums) >= 2  # /task/{uuid}/events and /events
    assert all(enum == list(events.KINDS) for enum in enums)


# -- AsyncAPI ---------------------------------------------------------------------------------


def test_asyncapi_has_every_kind() -> None:
    doc = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())
    schemas = doc["components"]["schemas"]
    consts = {
        s["properties"]["kind"].get("const")
        for s in schemas.values()
        if "kind" in s.get("properties", {})
    }
    assert consts == set(events.KINDS), "run `uv run task docs:asyncapi`"
    payload = schemas["task-events:Message:Payload"]["oneOf"]
    assert [ref["$ref"].rsplit("/", 1)[-1] for ref in payload] == [
        t.__name__ for t in events.EVENT_TYPES
    ]


# -- mypy: exhaustive matches -----------------------------------------------------------------

# A kind outside the union, appended to a module's copy (its line numbers stay the same).
PROBE = (
    "\n\nimport typing as _probe_typing\n\n"
    "from scaleodm.common.contracts import events as _probe_events\n\n\n"
    "class _ProbeEvent(_probe_events._Event):\n"
    '    kind: _probe_typing.Literal["probe"] = "probe"\n'
)
# Modules that must keep an exhaustive match; any other module with one is found and checked.
REQUIRED = {"libs/common/src/scaleodm/common/store/projection.py"}


def _event_dispatch(text: str) -> list[int]:
    """Lines of ``assert_never(x)`` where ``x`` is a parameter typed ``events.TaskEvent``."""
    names = set(re.findall(r"(\w+): events\.TaskEvent\b", text))
    return [
        i
        for i, line in enumerate(text.splitlines(), 1)
        if (m := re.search(r"assert_never\((\w+)\)", line)) and m[1] in names
    ]


def _probed(text: str) -> str:
    """``text`` with ``events.TaskEvent`` widened by the probe class."""
    return re.sub(r"\bevents\.TaskEvent\b", "(events.TaskEvent | _ProbeEvent)", text) + PROBE


def test_new_kind_fails_type_checking(tmp_path: Path) -> None:
    copies: dict[str, tuple[str, list[int]]] = {}
    for top in ("libs", "services"):
        for path in sorted((ROOT / top).rglob("*.py")):
            text = path.read_text()
            if not (lines := _event_dispatch(text)):
                continue
            copy = tmp_path / f"probe_{len(copies)}_{path.stem}.py"
            copy.write_text(_probed(text))
            copies[copy.name] = (str(path.relative_to(ROOT)), lines)
    assert {source for source, _ in copies.values()} >= REQUIRED
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--no-error-summary",
            *(str(tmp_path / name) for name in copies),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    flagged = {
        (m["file"], int(m["line"]))
        for m in re.finditer(
            r"(?m)(?P<file>probe_\w+\.py):(?P<line>\d+): error: .*assert_never", proc.stdout
        )
    }
    missed = [
        f"{source}:{line}"
        for name, (source, lines) in copies.items()
        for line in lines
        if (name, line) not in flagged
    ]
    assert not missed, f"these matches accept a new kind: {missed}\n{proc.stdout}{proc.stderr}"
