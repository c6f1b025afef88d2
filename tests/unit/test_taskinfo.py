"""The NodeODM task info object and status mapping (domain/taskinfo.py, domain/status.py).

Covered (nodeodm-api §3.6, §4.1, §4.2):
- ``task_info``: the field order and JSON types of §3.6 for every state, ``status`` with
  ``errorMessage`` only for a failed task with a message, integral progress as an int, option
  numbers as JS numbers (a stored ``7.0`` shown ``7``);
- ``processingTime``: -1 before start (and for a re-queued restart), now - start while running,
  finish - start once ended, -1 when canceled, never negative;
- ``slice_start`` / ``parse_line_param``: the ``with_output`` slicing rules (negative = last |N|,
  beyond the length = [], empty or non-numeric = 0);
- ``to_nodeodm_code`` for every state (only 10/20/30/40/50 exist), ``engine_exit_message``.

Left out: the ``output`` field and the HTTP route that adds it (gateway tests), and reading the
stored document from MongoDB.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from scaleodm.common.domain.status import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    NodeOdmStatus,
    TaskState,
    engine_exit_message,
    to_nodeodm_code,
)
from scaleodm.common.domain.taskinfo import (
    parse_line_param,
    processing_time_ms,
    slice_start,
    task_info,
)

UUID = "6824c890-2dc7-444d-ab9b-f0e50b88eea9"
CREATED = 1_795_323_496_602
STARTED = CREATED + 1_000
FINISHED = STARTED + 15_180
NOW = FINISHED + 60_000
FIELDS = [
    "uuid", "name", "dateCreated", "processingTime", "status", "options", "imagesCount", "progress",
]
OPTIONS = [{"name": "fast-orthophoto", "value": True}, {"name": "orthophoto-resolution",
                                                        "value": 2.5}]


def _doc(state: str, **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": UUID,
        "name": "test-task-1",
        "date_created_ms": CREATED,
        "state": state,
        "options": OPTIONS,
        "images_count": 3,
        "progress": 0.0,
    }
    return doc | kw


# --------------------------------------------------------------------------------------------
# task_info
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [pytest.param(s.value, id=s.value) for s in TaskState])
def test_field_order_and_types(state: str) -> None:
    doc = _doc(state, started_at_ms=STARTED, finished_at_ms=FINISHED, progress=45.5,
               error_message="Not enough memory")
    info = task_info(doc, NOW)

    assert list(info) == FIELDS
    assert list(json.loads(json.dumps(info))) == FIELDS  # order survives serialisation
    assert info["uuid"] == UUID
    assert info["name"] == "test-task-1"
    assert type(info["dateCreated"]) is int
    assert info["dateCreated"] == CREATED
    assert type(info["processingTime"]) is int
    assert type(info["status"]["code"]) is int
    assert info["status"]["code"] in (10, 20, 30, 40, 50)
    assert info["options"] == OPTIONS
    assert type(info["imagesCount"]) is int
    assert info["imagesCount"] == 3
    assert info["progress"] == 45.5


def test_reference_exchange() -> None:
    """§3.6's example, rebuilt from a stored document."""
    doc = _doc("completed", started_at_ms=STARTED, finished_at_ms=FINISHED, progress=100.0)
    expected = {
        "uuid": UUID, "name": "test-task-1", "dateCreated": CREATED, "processingTime": 15180,
        "status": {"code": 40}, "options": OPTIONS, "imagesCount": 3, "progress": 100,
    }
    info = task_info(doc, NOW)
    assert json.dumps(info, separators=(",", ":")) == json.dumps(expected, separators=(",", ":"))


@pytest.mark.parametrize(
    ("progress", "shown", "kind"),
    [
        pytest.param(100.0, 100, int, id="integral-float-as-int"),
        pytest.param(0.0, 0, int, id="zero"),
        pytest.param(22.5, 22.5, float, id="fraction-kept"),
        pytest.param(7, 7, int, id="stored-int"),
    ],
)
def test_progress(progress: float, shown: float, kind: type) -> None:
    value = task_info(_doc("running", started_at_ms=STARTED, progress=progress), NOW)["progress"]
    assert value == shown
    assert type(value) is kind


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        pytest.param(7.0, "7", id="integral-double-as-int"),
        pytest.param(7, "7", id="stored-int"),
        pytest.param(7.5, "7.5", id="fraction-kept"),
        pytest.param(1e20, "100000000000000000000", id="beyond-int64-double-in-full"),
        pytest.param(True, "true", id="bool-untouched"),
        pytest.param("7.0", '"7.0"', id="string-untouched"),
    ],
)
def test_option_numbers_shown_as_js_numbers(stored: object, shown: str) -> None:
    """NodeODM's option values are JS numbers: a stored double 7.0 reads back 7 (documents
    stored before validation held JS numbers as ints, and integers beyond int64)."""
    doc = _doc("queued", options=[{"name": "crop", "value": stored}])
    [option] = task_info(doc, NOW)["options"]
    assert json.dumps(option, separators=(",", ":")) == f'{{"name":"crop","value":{shown}}}'
    assert doc["options"] == [{"name": "crop", "value": stored}]  # the document is not changed


@pytest.mark.parametrize(
    ("doc", "status"),
    [
        pytest.param(_doc("queued"), {"code": 10}, id="queued"),
        pytest.param(_doc("running", started_at_ms=STARTED), {"code": 20}, id="running"),
        pytest.param(
            _doc("failed", error_message="Cannot process dataset"),
            {"code": 30, "errorMessage": "Cannot process dataset"},
            id="failed-with-message",
        ),
        pytest.param(_doc("failed"), {"code": 30}, id="failed-without-message"),
        pytest.param(_doc("failed", error_message=""), {"code": 30}, id="failed-empty-message"),
        pytest.param(_doc("failed", error_message=None), {"code": 30}, id="failed-none-message"),
        pytest.param(
            _doc("completed", error_message="stale"), {"code": 40}, id="completed-stale-message"
        ),
        pytest.param(
            _doc("canceled", error_message="stale"), {"code": 50}, id="canceled-stale-message"
        ),
        pytest.param(
            _doc("queued", error_message="stale"), {"code": 10}, id="restarted-stale-message"
        ),
    ],
)
def test_status(doc: dict[str, Any], status: dict[str, Any]) -> None:
    assert task_info(doc, NOW)["status"] == status


def test_defaults_for_missing_optional_fields() -> None:
    doc = {"_id": UUID, "name": "", "date_created_ms": CREATED, "state": "queued"}
    info = task_info(doc, NOW)
    assert info["options"] == []
    assert info["imagesCount"] == 0
    assert info["progress"] == 0
    assert info["processingTime"] == -1
    assert info["name"] == ""


# --------------------------------------------------------------------------------------------
# processingTime
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        pytest.param(_doc("queued"), -1, id="queued-never-started"),
        pytest.param(
            _doc("queued", started_at_ms=STARTED, finished_at_ms=FINISHED), -1,
            id="queued-after-restart",
        ),
        pytest.param(_doc("running"), -1, id="running-without-start-yet"),
        pytest.param(_doc("running", started_at_ms=STARTED), NOW - STARTED, id="running"),
        pytest.param(
            _doc("running", started_at_ms=STARTED, finished_at_ms=FINISHED), NOW - STARTED,
            id="running-ignores-stale-finish",
        ),
        pytest.param(
            _doc("completed", started_at_ms=STARTED, finished_at_ms=FINISHED), 15_180,
            id="completed",
        ),
        pytest.param(
            _doc("failed", started_at_ms=STARTED, finished_at_ms=FINISHED), 15_180, id="failed"
        ),
        pytest.param(_doc("failed"), -1, id="failed-before-start"),
        pytest.param(
            _doc("canceled", started_at_ms=STARTED, finished_at_ms=FINISHED), -1, id="canceled"
        ),
        pytest.param(_doc("canceled"), -1, id="canceled-before-start"),
        pytest.param(
            _doc("running", started_at_ms=NOW + 5), 0, id="clock-skew-never-negative"
        ),
    ],
)
def test_processing_time(doc: dict[str, Any], expected: int) -> None:
    assert processing_time_ms(doc, NOW) == expected
    assert task_info(doc, NOW)["processingTime"] == expected


def test_processing_time_grows_while_running_and_freezes_once_ended() -> None:
    running = _doc("running", started_at_ms=STARTED)
    assert processing_time_ms(running, NOW + 1_000) - processing_time_ms(running, NOW) == 1_000
    ended = _doc("completed", started_at_ms=STARTED, finished_at_ms=FINISHED)
    assert processing_time_ms(ended, NOW + 1_000) == processing_time_ms(ended, NOW)


# --------------------------------------------------------------------------------------------
# with_output
# --------------------------------------------------------------------------------------------

LINES = ["l0", "l1", "l2", "l3", "l4"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(None, LINES, id="absent"),
        pytest.param("0", LINES, id="zero-all"),
        pytest.param("", LINES, id="empty-all"),
        pytest.param("   ", LINES, id="blank-all"),
        pytest.param("abc", LINES, id="non-numeric-all"),
        pytest.param("2", ["l2", "l3", "l4"], id="from-2"),
        pytest.param(" 3 ", ["l3", "l4"], id="spaces-trimmed"),
        pytest.param("4", ["l4"], id="last-index"),
        pytest.param("5", [], id="at-length"),
        pytest.param("99", [], id="beyond-length"),
        pytest.param("-2", ["l3", "l4"], id="negative-last-2"),
        pytest.param("-5", LINES, id="negative-length"),
        pytest.param("-99", LINES, id="negative-beyond-length"),
    ],
)
def test_with_output_slicing(raw: str | None, expected: list[str]) -> None:
    assert LINES[slice_start(parse_line_param(raw), len(LINES)):] == expected


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        pytest.param(None, 0, id="none"),
        pytest.param("", 0, id="empty"),
        pytest.param("abc", 0, id="letters"),
        pytest.param("7", 7, id="int"),
        pytest.param("-3", -3, id="negative"),
        pytest.param("+4", 4, id="plus"),
        pytest.param(" 12\n", 12, id="whitespace"),
    ],
)
def test_parse_line_param(raw: str | None, value: int) -> None:
    assert parse_line_param(raw) == value


@pytest.mark.parametrize(
    ("n", "total", "start"),
    [
        pytest.param(0, 10, 0, id="zero"),
        pytest.param(3, 10, 3, id="positive"),
        pytest.param(15, 10, 15, id="beyond"),
        pytest.param(-3, 10, 7, id="negative"),
        pytest.param(-10, 10, 0, id="negative-total"),
        pytest.param(-11, 10, 0, id="negative-beyond"),
        pytest.param(-1, 0, 0, id="no-lines"),
    ],
)
def test_slice_start(n: int, total: int, start: int) -> None:
    assert slice_start(n, total) == start


# --------------------------------------------------------------------------------------------
# status codes and exit messages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "code"),
    [
        pytest.param(TaskState.QUEUED, 10, id="queued"),
        pytest.param(TaskState.RUNNING, 20, id="running"),
        pytest.param(TaskState.FAILED, 30, id="failed"),
        pytest.param(TaskState.COMPLETED, 40, id="completed"),
        pytest.param(TaskState.CANCELED, 50, id="canceled"),
    ],
)
def test_to_nodeodm_code(state: TaskState, code: int) -> None:
    assert to_nodeodm_code(state) == code
    assert isinstance(to_nodeodm_code(state), NodeOdmStatus)


def test_state_sets() -> None:
    assert {int(to_nodeodm_code(s)) for s in TaskState} == {10, 20, 30, 40, 50}
    assert {int(s) for s in NodeOdmStatus} == {10, 20, 30, 40, 50}
    assert TERMINAL_STATES | ACTIVE_STATES == set(TaskState)
    assert not TERMINAL_STATES & ACTIVE_STATES


@pytest.mark.parametrize(
    ("code", "message"),
    [
        pytest.param(1, "Cannot process dataset", id="1"),
        pytest.param(134, "Cannot process dataset", id="134"),
        pytest.param(139, "Cannot process dataset", id="139"),
        pytest.param(137, "Not enough memory", id="137"),
        pytest.param(132, "Unsupported CPU", id="132"),
        pytest.param(3, "Installation issue", id="3"),
        pytest.param(2, "Processing failed (2)", id="2"),
        pytest.param(143, "Processing failed (143)", id="143"),
        pytest.param(255, "Processing failed (255)", id="255"),
        pytest.param(-9, "Processing failed (-9)", id="negative-signal"),
    ],
)
def test_engine_exit_message(code: int, message: str) -> None:
    assert engine_exit_message(code) == message
