"""Token authentication (nodeodm-api.md §1.3) on a stack of its own with ``SCALEODM_TOKEN=secret``.

Covered: every API route (``/info``, ``/options``, ``/task/list``, ``/task/new``, init, upload,
commit, task info/output/download, cancel/remove/restart) refuses a request without a token,
with a wrong, empty or wrongly-cased token, or with the right token anywhere but the query string
(``Authorization`` header, a ``token`` header, a body field) with HTTP 200
``{"error": "Invalid authentication token: token does not match."}`` — before any other check
(unknown uuids, missing parameters) and without changing anything; the same routes work with
``?token=secret``; ``/auth/*`` and unknown routes (404) need no token; without a configured token
a ``token`` parameter is ignored (session stack).

Left out: the IP allow-list (not implemented), CORS preflights, static UI files and
``/swagger.json`` (optional routes).

The token stack is module-scoped (its own NATS and database, like ``fresh_stack``) so that the
route table below runs against one stack instead of starting four services per case.
"""

from __future__ import annotations

import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from io import BytesIO
from typing import Any

import httpx
import pytest

from tests.harness import api, data, servers
from tests.harness.stack import Stack, running_stack

pytestmark = pytest.mark.integration

TOKEN = "secret"
REFUSED = {"error": "Invalid authentication token: token does not match."}
UNKNOWN = str(uuid.uuid4())
Q = {"token": TOKEN}


def body_of(resp: httpx.Response) -> Any:
    assert resp.status_code == 200, (resp.status_code, resp.text)
    assert "application/json" in resp.headers.get("content-type", ""), resp.headers
    return resp.json()


def image(name: str = "DJI_0001.JPG") -> tuple[str, Any]:
    return ("images", (name, data.JPEG, "image/jpeg"))


@pytest.fixture(scope="module")
def token_stack(
    tmp_path_factory: pytest.TempPathFactory, mongo_url: str, s3: servers.S3Endpoint
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("token-stack")
    with servers.nats_server(tmp / "nats") as nats:
        own = Stack(tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                    database=f"t_{uuid.uuid4().hex[:12]}", extra_env={"SCALEODM_TOKEN": TOKEN})
        with running_stack(own):
            yield own


@pytest.fixture(scope="module")
async def tclient(token_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """No token unless a request adds one."""
    async with httpx.AsyncClient(base_url=token_stack.gateway_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
async def authed(token_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """``?token=secret`` on every request, as PyODM sends it."""
    async with httpx.AsyncClient(base_url=token_stack.gateway_url, params=Q, timeout=30) as c:
        yield c


async def _info(c: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    got: dict[str, Any] = body_of(await c.get(f"/task/{task_id}/info"))
    return got


async def _wait(c: httpx.AsyncClient, task_id: str, *codes: int) -> dict[str, Any]:
    return await api.poll_until(c, task_id, api.status_is(*codes))


async def _create(c: httpx.AsyncClient, name: str = "token") -> str:
    body = body_of(await c.post("/task/new", files=[image(), ("name", (None, name))]))
    assert set(body) == {"uuid"}, body
    task_id: str = body["uuid"]
    return task_id


@pytest.fixture(scope="module")
async def ids(authed: httpx.AsyncClient) -> dict[str, str]:
    """A completed task and an open chunked upload, made with the token."""
    done = await _create(authed, "done")
    assert (await _wait(authed, done, 30, 40, 50))["status"] == {"code": 40}
    init = body_of(await authed.post("/task/new/init", files=[("name", (None, "open"))]))
    return {"task": done, "upload": init["uuid"], "unknown": UNKNOWN}


ROUTES = [
    pytest.param("GET", "/info", {}, id="info"),
    pytest.param("GET", "/options", {}, id="options"),
    pytest.param("GET", "/task/list", {}, id="list"),
    pytest.param("POST", "/task/new", {"files": [image(), ("name", (None, "x"))]}, id="new"),
    pytest.param("POST", "/task/new", {"files": [("name", (None, "x"))]}, id="new-no-files"),
    pytest.param("POST", "/task/new/init", {"files": [("name", (None, "x"))]}, id="init"),
    pytest.param("POST", "/task/new/upload/{upload}", {"files": [image()]}, id="upload"),
    pytest.param("POST", "/task/new/upload/{unknown}", {"files": [image()]},
                 id="upload-unknown"),
    pytest.param("POST", "/task/new/commit/{upload}", {}, id="commit"),
    pytest.param("GET", "/task/{task}/info", {}, id="task-info"),
    pytest.param("GET", "/task/{task}/info", {"params": {"with_output": "0"}},
                 id="task-info-with-output"),
    pytest.param("GET", "/task/{unknown}/info", {}, id="task-info-unknown"),
    pytest.param("GET", "/task/{task}/output", {}, id="task-output"),
    pytest.param("GET", "/task/{task}/download/all.zip", {}, id="download"),
    pytest.param("GET", "/task/{task}/download/orthophoto.tif", {}, id="download-bad-asset"),
    pytest.param("POST", "/task/cancel", {"data": {"uuid": "{task}"}}, id="cancel"),
    pytest.param("POST", "/task/cancel", {"json": {"uuid": "{task}"}}, id="cancel-json"),
    pytest.param("POST", "/task/cancel", {}, id="cancel-no-uuid"),
    pytest.param("POST", "/task/remove", {"data": {"uuid": "{task}"}}, id="remove"),
    pytest.param("POST", "/task/remove", {"json": {"uuid": "{unknown}"}}, id="remove-unknown"),
    pytest.param("POST", "/task/restart", {"data": {"uuid": "{task}"}}, id="restart"),
    pytest.param("POST", "/task/restart",
                 {"data": {"uuid": "{task}", "options": '[{"name":"feature-quality",'
                                                        '"value":"super"}]'}},
                 id="restart-bad-options"),
]

CREDENTIALS = [
    pytest.param({}, {}, id="none"),
    pytest.param({"token": "wrong"}, {}, id="wrong"),
    pytest.param({"token": ""}, {}, id="empty"),
    pytest.param({"token": "SECRET"}, {}, id="case"),
    pytest.param({"token": "secret "}, {}, id="trailing-space"),
    pytest.param({"Token": TOKEN}, {}, id="param-name-case"),
    pytest.param({}, {"authorization": f"Bearer {TOKEN}"}, id="authorization-bearer"),
    pytest.param({}, {"authorization": TOKEN}, id="authorization-raw"),
    pytest.param({}, {"token": TOKEN}, id="token-header"),
    pytest.param({"token": "wrong"}, {"authorization": f"Bearer {TOKEN}"},
                 id="wrong-query-right-header"),
]


def _fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, real in ids.items():
            value = value.replace(f"{{{key}}}", real)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


async def _state(c: httpx.AsyncClient, ids: dict[str, str]) -> tuple[Any, ...]:
    """What a refused request must not change."""
    listed = body_of(await c.get("/task/list"))
    task = await _info(c, ids["task"])
    return (listed, task["status"], task["dateCreated"], task["options"])


@pytest.mark.parametrize(("query", "headers"), CREDENTIALS)
@pytest.mark.parametrize(("method", "path", "kwargs"), ROUTES)
async def test_refused_without_the_right_query_token(
    tclient: httpx.AsyncClient, authed: httpx.AsyncClient, ids: dict[str, str], method: str,
    path: str, kwargs: dict[str, Any], query: dict[str, str], headers: dict[str, str],
) -> None:
    before = await _state(authed, ids)
    kwargs = {k: _fill(v, ids) for k, v in kwargs.items()}
    params = {**kwargs.pop("params", {}), **query}
    resp = await tclient.request(method, _fill(path, ids), params=params, headers=headers,
                                 **kwargs)
    assert body_of(resp) == REFUSED
    assert await _state(authed, ids) == before


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        pytest.param("/task/new", {"files": [image(), ("token", (None, TOKEN))]},
                     id="new-multipart-field"),
        pytest.param("/task/new/init", {"files": [("token", (None, TOKEN))]},
                     id="init-multipart-field"),
        pytest.param("/task/cancel", {"data": {"uuid": "{task}", "token": TOKEN}},
                     id="cancel-urlencoded-field"),
        pytest.param("/task/remove", {"json": {"uuid": "{task}", "token": TOKEN}},
                     id="remove-json-field"),
        pytest.param("/task/restart", {"json": {"uuid": "{task}", "token": TOKEN}},
                     id="restart-json-field"),
    ],
)
async def test_token_in_body_is_ignored(
    tclient: httpx.AsyncClient, authed: httpx.AsyncClient, ids: dict[str, str], path: str,
    kwargs: dict[str, Any],
) -> None:
    before = await _state(authed, ids)
    kwargs = {k: _fill(v, ids) for k, v in kwargs.items()}
    assert body_of(await tclient.post(path, **kwargs)) == REFUSED
    assert await _state(authed, ids) == before


def _zip_ok(resp: httpx.Response) -> None:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/zip"
    assert "odm_orthophoto/odm_orthophoto.tif" in zipfile.ZipFile(BytesIO(resp.content)).namelist()


@pytest.mark.parametrize(
    ("path", "params", "check"),
    [
        pytest.param("/info", {}, lambda b, _: "error" not in b and isinstance(b["version"], str),
                     id="info"),
        pytest.param("/options", {}, lambda b, _: len(b) == 80, id="options"),
        pytest.param("/task/list", {}, lambda b, i: {"uuid": i["task"]} in b, id="list"),
        pytest.param("/task/{task}/info", {},
                     lambda b, i: b["uuid"] == i["task"] and b["status"] == {"code": 40},
                     id="task-info"),
        pytest.param("/task/{task}/info", {"with_output": "0"},
                     lambda b, _: isinstance(b["output"], list) and b["output"],
                     id="task-info-with-output"),
        pytest.param("/task/{task}/output", {"line": "-2"},
                     lambda b, _: isinstance(b, list) and len(b) == 2, id="task-output"),
        pytest.param("/task/{unknown}/info", {},
                     lambda b, i: b == {"error": f"{i['unknown']} not found"},
                     id="task-info-unknown"),
    ],
)
async def test_read_routes_work_with_the_token(
    authed: httpx.AsyncClient, ids: dict[str, str], path: str, params: dict[str, str],
    check: Any,
) -> None:
    body = body_of(await authed.get(_fill(path, ids), params=params))
    assert check(body, ids), body


async def test_download_works_with_the_token(
    authed: httpx.AsyncClient, ids: dict[str, str]
) -> None:
    _zip_ok(await authed.get(f"/task/{ids['task']}/download/all.zip"))


async def test_refused_uploads_stored_nothing(
    authed: httpx.AsyncClient, ids: dict[str, str]
) -> None:
    """Every refused upload above left the open upload empty."""
    assert body_of(await authed.post(f"/task/new/commit/{ids['upload']}")) == {
        "error": "Need at least 1 file."}


async def test_write_routes_work_with_the_token(authed: httpx.AsyncClient) -> None:
    # chunked upload
    upload_id = body_of(await authed.post(
        "/task/new/init", files=[("name", (None, "chunked"))]))["uuid"]
    assert body_of(await authed.post(f"/task/new/upload/{upload_id}",
                                      files=[image(), image("DJI_0002.JPG")])) == {
        "success": True}
    assert body_of(await authed.post(f"/task/new/commit/{upload_id}")) == {
        "uuid": upload_id}
    assert (await _info(authed, upload_id))["imagesCount"] == 2
    # cancel (urlencoded) -> restart (JSON) -> completes -> remove
    task_id = await _create(authed)
    assert body_of(await authed.post("/task/cancel", data={"uuid": task_id})) == {
        "success": True}
    await _wait(authed, task_id, 50)
    assert body_of(await authed.post(
        "/task/restart",
        json={"uuid": task_id, "options": [{"name": "dsm", "value": True}]})) == {
        "success": True}
    final = await _wait(authed, task_id, 30, 40)
    assert final["status"] == {"code": 40}, final
    assert {"name": "dsm", "value": True} in final["options"]
    assert body_of(await authed.post("/task/remove", data={"uuid": task_id})) == {
        "success": True}
    assert body_of(await authed.get(f"/task/{task_id}/info")) == {
        "error": f"{task_id} not found"}
    body_of(await authed.post("/task/cancel", data={"uuid": upload_id}))


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        pytest.param("GET", "/auth/info",
                     {"message": "Authentication not available on this node", "loginUrl": None,
                      "registerUrl": None}, id="auth-info"),
        pytest.param("POST", "/auth/login", {"error": "Not available"}, id="auth-login"),
        pytest.param("POST", "/auth/register", {"error": "Not available"}, id="auth-register"),
    ],
)
@pytest.mark.parametrize("query", [pytest.param({}, id="no-token"),
                                   pytest.param({"token": "wrong"}, id="wrong-token")])
async def test_auth_routes_need_no_token(
    tclient: httpx.AsyncClient, method: str, path: str, expected: dict[str, Any],
    query: dict[str, str],
) -> None:
    assert body_of(await tclient.request(method, path, params=query)) == expected


async def test_unknown_route_is_404_without_token(tclient: httpx.AsyncClient) -> None:
    resp = await tclient.get("/nonexistent")
    assert resp.status_code == 404
    assert "<pre>Cannot GET /nonexistent</pre>" in resp.text


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "key"),
    [
        pytest.param("GET", "/info", {}, "version", id="info"),
        pytest.param("GET", "/task/list", {}, None, id="list"),
        pytest.param("POST", "/task/new", {"files": [image()]}, "uuid", id="new"),
        pytest.param("POST", "/task/new/init", {"files": [("name", (None, "x"))]}, "uuid",
                     id="init"),
    ],
)
async def test_token_ignored_when_none_configured(
    client: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, Any], key: str | None
) -> None:
    body = body_of(await client.request(method, path, params={"token": "abc"}, **kwargs))
    if key is None:
        assert isinstance(body, list)
    else:
        assert key in body, body
    if path == "/task/new":
        await client.post("/task/cancel", data={"uuid": body["uuid"]})


@pytest.mark.parametrize("token", ["é", "\x80", "secret\u00e9"])
async def test_non_ascii_token_is_refused(tclient: httpx.AsyncClient, token: str) -> None:
    """Found by schemathesis (issue 6): ``secrets.compare_digest`` raised on non-ASCII text."""
    assert body_of(await tclient.get("/info", params={"token": token})) == REFUSED
