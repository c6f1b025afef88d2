"""``Content-Type: application/json; charset=utf-8`` on every JSON answer, as NodeODM sends it
(nodeodm-api §1.1), through the running gateway.

Covered: success answers — ``/info``, ``/options``, ``/task/list``, ``/task/{uuid}/info`` with and
without ``with_output``, ``/task/{uuid}/output``, ``/task/new``'s ``{"uuid"}``, an action's
``{"success": true}``; NodeODM error answers — ``{"error"}`` for an unknown uuid (a route that
returns its answer itself and one FastAPI renders), ``uuid param missing.``, and an action's
``{"success": false, "error"}``. Each is HTTP 200 with exactly that content type and a JSON body.

Left out: answers that are not JSON (``all.zip`` is ``application/zip``, §3.8; event streams;
the 404 page of unknown routes, HTML as Express's), and the bad-token error
(``test_token.py``: a gateway with a token).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.harness import api, data
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration

JSON_UTF8 = "application/json; charset=utf-8"
UNKNOWN = str(uuid.uuid4())


def json_body(resp: httpx.Response) -> Any:
    assert resp.status_code == 200, (resp.status_code, resp.text)
    assert resp.headers["content-type"] == JSON_UTF8, resp.headers
    return resp.json()


@pytest.fixture(scope="module")
async def task_id(stack: Stack) -> AsyncIterator[str]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as c:
        created = await api.create(c, files=[("DJI_0001.JPG", data.JPEG)], name="charset")
        yield created["uuid"]


@pytest.mark.parametrize(
    ("path", "shape", "key"),
    [
        pytest.param("/info", dict, "version", id="info"),
        pytest.param("/options", list, "name", id="options"),
        pytest.param("/task/list", list, "uuid", id="task-list"),
        pytest.param("/task/{task}/info", dict, "status", id="task-info"),
        pytest.param("/task/{task}/info?with_output=0", dict, "output",
                     id="task-info-with-output"),
        pytest.param("/task/{task}/output", list, None, id="task-output"),
    ],
)
async def test_success_answers(client: httpx.AsyncClient, task_id: str, path: str,
                               shape: type, key: str | None) -> None:
    body = json_body(await client.get(path.format(task=task_id)))
    assert isinstance(body, shape), body
    if key is not None:  # the first item of a list
        assert key in (body[0] if isinstance(body, list) else body), body


async def test_task_new_and_an_action(client: httpx.AsyncClient) -> None:
    resp = await client.post("/task/new", files=[
        ("name", (None, "charset")), ("images", ("DJI_0001.JPG", data.JPEG, "image/jpeg"))])
    created = json_body(resp)
    assert json_body(await client.post("/task/cancel", data={"uuid": created["uuid"]})) == {
        "success": True}


@pytest.mark.parametrize(
    ("method", "path", "form", "expect"),
    [
        pytest.param("GET", f"/task/{UNKNOWN}/info", None, {"error": f"{UNKNOWN} not found"},
                     id="info-unknown-uuid"),
        pytest.param("GET", f"/task/{UNKNOWN}/download/all.zip", None,
                     {"error": f"{UNKNOWN} not found"}, id="download-unknown-uuid"),
        pytest.param("POST", "/task/cancel", {}, {"error": "uuid param missing."},
                     id="action-uuid-missing"),
        pytest.param("POST", "/task/remove", {"uuid": UNKNOWN},
                     {"success": False, "error": f"{UNKNOWN} not found"},
                     id="action-unknown-uuid"),
    ],
)
async def test_error_answers(client: httpx.AsyncClient, method: str, path: str,
                             form: dict[str, str] | None, expect: dict[str, Any]) -> None:
    resp = await client.request(method, path, data=form)
    assert json_body(resp) == expect
