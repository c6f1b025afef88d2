"""The gateway's JSON rendering (``scaleodm.gateway.responses``) and route order (``main.py``).

Covered: the content type (with ``charset=utf-8``), that orjson's output is the JSON Starlette's
``JSONResponse`` rendered for the values the routes return, what differs on purpose (a
non-finite float is ``null``), values orjson has no rule for (through ``jsonable_encoder``, as
before) and values only ``json`` takes (ints beyond 64 bits, keys that are not strings); and that
no two routes of the app answer the same method and path, which lets ``main.py`` put the polled
routes first. Left out: the answers on the wire (``tests/conformance/test_content_type.py``).
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re
from typing import Any

import pytest
from fastapi.routing import APIRoute
from starlette.responses import JSONResponse

from scaleodm.gateway import responses
from scaleodm.gateway.routes import auth, creating, events, health, nodeodm, webhooks

TASK_INFO = {
    "uuid": "6824c890-2dc7-444d-ab9b-f0e50b88eea9", "name": "Tâche ✓ \"quoted\" \\ / \n",
    "dateCreated": 1767225600000, "processingTime": -1, "status": {"code": 30,
                                                                 "errorMessage": "x"},
    "options": [{"name": "dsm", "value": True}, {"name": "orthophoto-resolution", "value": 2.5},
                {"name": "crop", "value": 0}, {"name": "boundary", "value": {"a": [None]}}],
    "imagesCount": 12, "progress": 33.3, "output": ["line 1", "\x00\x1f\u2028 end"],
}


def test_content_type_has_the_charset() -> None:
    resp = responses.JsonResponse({"error": "x"})
    assert resp.headers["content-type"] == "application/json; charset=utf-8"
    assert resp.headers["content-length"] == str(len(resp.body))


@pytest.mark.parametrize("value", [
    pytest.param(TASK_INFO, id="task-info"),
    pytest.param([{"uuid": "a"}, {"uuid": "b"}], id="list"),
    pytest.param({"error": "Ünïcode 🚁"}, id="error"),
    pytest.param({"big": 2**63 - 1, "small": -(2**63), "float": 1e-7, "zero": 0.0}, id="numbers"),
])
def test_same_json_as_starlette(value: Any) -> None:
    assert json.loads(responses.JsonResponse(value).body) == json.loads(JSONResponse(value).body)


def test_task_info_byte_for_byte() -> None:
    """Numbers may be spelled differently (``1e-07``/``1e-7``), the task info's are not."""
    assert responses.JsonResponse(TASK_INFO).body == JSONResponse(TASK_INFO).body


def test_a_non_finite_float_is_null() -> None:
    assert json.loads(responses.JsonResponse({"p": float("nan"), "q": float("inf")}).body) == {
        "p": None, "q": None}


def test_other_values_go_through_jsonable_encoder() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    body = json.loads(responses.JsonResponse(
        {"when": when, "d": decimal.Decimal("1.5"), "s": frozenset({1})}).body)
    assert body == {"when": when.isoformat(), "d": 1.5, "s": [1]}


def test_values_only_json_takes() -> None:
    body = responses.JsonResponse({"n": 2**70, "m": {1: "one"}}).body
    assert json.loads(body) == {"n": 2**70, "m": {"1": "one"}}


def _sample(path: str) -> str:
    """A concrete path for a route's path format: every parameter ``x``."""
    return re.sub(r"{[^}]+}", "x", path)


def test_no_two_routes_answer_the_same_method_and_path() -> None:
    routes = [r for router in (nodeodm.router, health.router, auth.router, creating.router,
                               webhooks.router, events.router)
              for r in router.routes if isinstance(r, APIRoute)]
    for route in routes:
        path = _sample(route.path)
        for other in routes:
            if other is not route and other.methods & route.methods:
                assert not other.path_regex.match(path), (route.path, other.path)
