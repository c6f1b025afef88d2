"""NodeODM error catalogue (nodeodm-api.md §10, §13) through HTTP against the running gateway.

Covered: every error string and envelope of §10 that this node can produce — unknown uuid on
info/output/download (``<uuid> not found``) and on cancel/remove/restart (``success: false``),
``uuid param missing.`` for empty, urlencoded, JSON and multipart bodies, malformed JSON bodies,
``Task cannot be restarted``, restart options errors beating not-found (§3.11), ``/task/new`` and
init errors (files, set-uuid, options, wrong file field), upload/commit errors (``Invalid uuid (not
found)``, ``Need at least 1 file.`` with and without ``noRetry``, ``Unexpected field``), download
errors (``Invalid asset`` including traversal-looking names, ``Asset not ready`` for running,
failed and canceled tasks), 404 HTML for unknown routes and methods, ``/auth/*``, and that every
JSON answer is HTTP 200 with a content type containing ``application/json``. Options messages
are compared byte for byte with the §13 captures. Also: traversal in upload file names stays a
plain name inside the task's S3 prefix, duplicate names are renamed and counted, re-init keeps
uploaded files, init/commit echo ``set-uuid`` in canonical lower case (a deliberate departure),
and an oversize request is refused.

Left out: the IP allow-list (not implemented by this node), ``Malformed body.json`` (needs a
corrupted upload record, not reachable through HTTP), the maxImages messages (need a node with
``max_images``; a different configuration), the text of JSON parse errors (runtime-specific,
§11 #5: only the envelope is checked) and successful-path shapes (other suites).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import boto3
import httpx
import pytest

from tests.harness import api, data
from tests.harness.servers import Nats
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration

UNKNOWN = str(uuid.uuid4())  # never created by anything
NOT_FOUND = {"error": f"{UNKNOWN} not found"}
ACTION_NOT_FOUND = {"success": False, "error": f"{UNKNOWN} not found"}
UUID_MISSING = {"error": "uuid param missing."}
INVALID_UUID = {"error": "Invalid uuid (not found)"}
NEED_FILE_OR_URL = {"error": "Need at least 1 file or a zip file url."}

# §13 captures, verbatim.
THREE_BAD_OPTIONS = (
    '[{"name":"orthophoto-resolution","value":"-5"},{"name":"feature-quality","value":"super"},'
    '{"name":"fast-orthophoto","value":"maybe"}]'
)
THREE_ERRORS = (
    '[{"name":"feature-quality","error":"Invalid value super (not in enum)"},'
    '{"name":"fast-orthophoto","error":"Cannot convert maybe to boolean"},'
    '{"name":"orthophoto-resolution","error":"Invalid value -5 (out of range)"}]'
)
ONE_BAD_OPTION = '[{"name":"feature-quality","value":"super"}]'
ONE_ERROR = '[{"name":"feature-quality","error":"Invalid value super (not in enum)"}]'
# §5.1 step 7 example (user order reversed: errors come in /options order).
CROP_BOUNDARY_OPTIONS = '[{"name":"boundary","value":"{bad"},{"name":"crop","value":-1}]'
CROP_BOUNDARY_ERRORS = (
    '[{"name":"crop","error":"Invalid value -1 (out of range)"},'
    '{"name":"boundary","error":"Invalid value {bad (out of range)"}]'
)

JPEG = ("DJI_0001.JPG", data.JPEG, "image/jpeg")
JSON_CT = {"content-type": "application/json"}


def body_of(resp: httpx.Response) -> Any:
    """An application answer: HTTP 200, JSON content type (PyODM parses only then, §1.1)."""
    assert resp.status_code == 200, (resp.status_code, resp.text)
    ctype = resp.headers.get("content-type", "")
    assert "application/json" in ctype, (ctype, resp.text)
    return resp.json()


def image(name: str = "DJI_0001.JPG", field: str = "images") -> tuple[str, Any]:
    return (field, (name, data.JPEG, "image/jpeg"))


def text(**fields: str) -> list[tuple[str, Any]]:
    return [(k, (None, v)) for k, v in fields.items()]


def raw_multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart body with header values sent verbatim (httpx escapes filenames)."""
    boundary = uuid.uuid4().hex
    out = b""
    for name, filename, payload in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + payload + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


async def task_ids(client: httpx.AsyncClient) -> set[str]:
    return {t["uuid"] for t in body_of(await client.get("/task/list"))}


async def init(client: httpx.AsyncClient, *, headers: dict[str, str] | None = None,
               **fields: str) -> str:
    body = body_of(await client.post("/task/new/init", files=text(name="conf", **fields),
                                     headers=headers))
    assert set(body) == {"uuid"}, body
    task_id: str = body["uuid"]
    return task_id


async def upload(client: httpx.AsyncClient, task_id: str, *names: str) -> Any:
    return body_of(await client.post(f"/task/new/upload/{task_id}",
                                     files=[image(n) for n in names]))


async def commit(client: httpx.AsyncClient, task_id: str) -> Any:
    return body_of(await client.post(f"/task/new/commit/{task_id}"))


def s3_keys(stack: Stack, prefix: str = "") -> list[str]:
    s3 = boto3.client("s3", endpoint_url=stack.s3.url, aws_access_key_id=stack.s3.access_key,
                      aws_secret_access_key=stack.s3.secret_key, region_name=stack.s3.region)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


# --------------------------------------------------------------------------------------------
# Fixtures: tasks in a known state, created once for the module.


async def _task_in(client: httpx.AsyncClient, codes: tuple[int, ...], *names: str) -> str:
    created = await api.create(client, files=[(n, data.JPEG) for n in names], name="conformance")
    task_id: str = created["uuid"]
    await api.poll_until(client, task_id, api.status_is(*codes))
    return task_id


@pytest.fixture(scope="module")
async def done_task(stack: Stack) -> AsyncIterator[str]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as c:
        task_id = await _task_in(c, (40,), "DJI_0001.JPG", "DJI_0002.JPG")
        final = await api.info(c, task_id)
        assert final["status"] == {"code": 40}, final
        yield task_id


@pytest.fixture(scope="module")
async def failed_task(stack: Stack) -> AsyncIterator[str]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as c:
        task_id = await _task_in(c, (30, 40, 50), "DJI_0001.JPG", "odm-test-engine-fail-1.jpg")
        final = await api.info(c, task_id)
        assert final["status"]["code"] == 30, final
        yield task_id


# --------------------------------------------------------------------------------------------
# Requests that need no task: the exact body for each.


def _missing_uuid_cases() -> Iterator[Any]:
    bodies: dict[str, dict[str, Any]] = {
        "no-body": {},
        "urlencoded-other-field": {"data": {"name": "x"}},
        "urlencoded-empty-uuid": {"data": {"uuid": ""}},
        "json-empty-object": {"json": {}},
        "json-empty-uuid": {"json": {"uuid": ""}},
        "json-array": {"json": [UNKNOWN]},
        # §1.5: a multipart body is not parsed, even when it carries a uuid
        "multipart-with-uuid": {"files": text(uuid=UNKNOWN)},
        "text-plain": {"content": f"uuid={UNKNOWN}".encode(),
                       "headers": {"content-type": "text/plain"}},
    }
    for action in ("cancel", "remove", "restart"):
        for label, kwargs in bodies.items():
            yield pytest.param("POST", f"/task/{action}", kwargs, UUID_MISSING,
                               id=f"{action}-uuid-missing-{label}")


def _unknown_action_cases() -> Iterator[Any]:
    for action in ("cancel", "remove", "restart"):
        yield pytest.param("POST", f"/task/{action}", {"data": {"uuid": UNKNOWN}},
                           ACTION_NOT_FOUND, id=f"{action}-unknown-urlencoded")
        yield pytest.param("POST", f"/task/{action}", {"json": {"uuid": UNKNOWN}},
                           ACTION_NOT_FOUND, id=f"{action}-unknown-json")
        yield pytest.param("POST", f"/task/{action}",
                           {"data": {"uuid": UNKNOWN, "token": "whatever"}},
                           ACTION_NOT_FOUND, id=f"{action}-unknown-token-ignored")


def _set_uuid_cases() -> Iterator[Any]:
    bad = {
        "garbage": "not-a-uuid",
        "version-0": "11111111-2222-0333-8444-555555555555",
        "version-8": "11111111-2222-8333-8444-555555555555",
        "variant-c": "11111111-2222-4333-c444-555555555555",
        "no-dashes": "11111111222243338444555555555555",
        "braces": "{11111111-2222-4333-8444-555555555555}",
        "too-long": "11111111-2222-4333-8444-5555555555556",
    }
    for label, value in bad.items():
        expected = {"error": f"Invalid set-uuid: {value}"}
        yield pytest.param("POST", "/task/new",
                           {"files": [image()], "headers": {"set-uuid": value}},
                           expected, id=f"new-set-uuid-{label}")
        yield pytest.param("POST", "/task/new/init",
                           {"files": text(name="x"), "headers": {"set-uuid": value}},
                           expected, id=f"init-set-uuid-{label}")


STATELESS = [
    # unknown uuid on the read routes
    pytest.param("GET", f"/task/{UNKNOWN}/info", {}, NOT_FOUND, id="info-unknown"),
    pytest.param("GET", f"/task/{UNKNOWN}/info?with_output=0", {}, NOT_FOUND,
                 id="info-with-output-unknown"),
    pytest.param("GET", f"/task/{UNKNOWN}/output", {}, NOT_FOUND, id="output-unknown"),
    pytest.param("GET", f"/task/{UNKNOWN}/output?line=-3", {}, NOT_FOUND,
                 id="output-line-unknown"),
    pytest.param("GET", f"/task/{UNKNOWN}/download/all.zip", {}, NOT_FOUND,
                 id="download-unknown"),
    # the task is looked up before the asset is checked
    pytest.param("GET", f"/task/{UNKNOWN}/download/orthophoto.tif", {}, NOT_FOUND,
                 id="download-unknown-invalid-asset"),
    *_unknown_action_cases(),
    *_missing_uuid_cases(),
    # §3.11: an empty options string counts as absent
    pytest.param("POST", "/task/restart", {"data": {"uuid": UNKNOWN, "options": ""}},
                 ACTION_NOT_FOUND, id="restart-unknown-empty-options"),
    # §3.11 step 2: options are validated before the task is looked up
    pytest.param("POST", "/task/restart", {"data": {"uuid": UNKNOWN, "options": ONE_BAD_OPTION}},
                 {"error": ONE_ERROR}, id="restart-unknown-bad-options-urlencoded"),
    pytest.param("POST", "/task/restart", {"json": {"uuid": UNKNOWN, "options": ONE_BAD_OPTION}},
                 {"error": ONE_ERROR}, id="restart-unknown-bad-options-json-string"),
    pytest.param("POST", "/task/restart",
                 {"json": {"uuid": UNKNOWN, "options": [{"name": "feature-quality",
                                                         "value": "super"}]}},
                 {"error": ONE_ERROR}, id="restart-unknown-bad-options-json-array"),
    pytest.param("POST", "/task/restart",
                 {"data": {"uuid": UNKNOWN, "options": THREE_BAD_OPTIONS}},
                 {"error": THREE_ERRORS}, id="restart-unknown-three-bad-options"),
    pytest.param("POST", "/task/restart",
                 {"data": {"uuid": UNKNOWN, "options": CROP_BOUNDARY_OPTIONS}},
                 {"error": CROP_BOUNDARY_ERRORS}, id="restart-unknown-crop-boundary"),
    # /task/new (§3.4 checks in order)
    pytest.param("POST", "/task/new", {}, NEED_FILE_OR_URL, id="new-no-body"),
    pytest.param("POST", "/task/new", {"files": text(name="empty")}, NEED_FILE_OR_URL,
                 id="new-name-only"),
    pytest.param("POST", "/task/new", {"data": {"zipurl": "http://127.0.0.1:1/a.zip",
                                                "name": "urlenc"}},
                 NEED_FILE_OR_URL, id="new-urlencoded-not-parsed"),
    pytest.param("POST", "/task/new", {"json": {"zipurl": "http://127.0.0.1:1/a.zip",
                                                "name": "json"}},
                 NEED_FILE_OR_URL, id="new-json-not-parsed"),
    pytest.param("POST", "/task/new",
                 {"files": [image(), *text(options=THREE_BAD_OPTIONS, name="opts")]},
                 {"error": THREE_ERRORS}, id="new-three-bad-options"),
    pytest.param("POST", "/task/new",
                 {"files": [*text(name="opts-after", options=ONE_BAD_OPTION), image()]},
                 {"error": ONE_ERROR}, id="new-bad-options-before-files"),
    pytest.param("POST", "/task/new",
                 {"files": [image(), *text(options=CROP_BOUNDARY_OPTIONS)]},
                 {"error": CROP_BOUNDARY_ERRORS}, id="new-crop-boundary"),
    pytest.param("POST", "/task/new", {"files": [image(field="file")]},
                 {"error": "Unexpected field"}, id="new-wrong-file-field"),
    # set-uuid is checked before the files (§3.4 step 2)
    pytest.param("POST", "/task/new", {"files": text(name="x"),
                                       "headers": {"set-uuid": "not-a-uuid"}},
                 {"error": "Invalid set-uuid: not-a-uuid"}, id="new-set-uuid-before-files"),
    *_set_uuid_cases(),
    # init
    pytest.param("POST", "/task/new/init", {"files": text(options=ONE_BAD_OPTION)},
                 {"error": ONE_ERROR}, id="init-bad-options"),
    pytest.param("POST", "/task/new/init", {"files": text(options=THREE_BAD_OPTIONS)},
                 {"error": THREE_ERRORS}, id="init-three-bad-options"),
    pytest.param("POST", "/task/new/init", {"files": [image(), *text(name="x")]},
                 {"error": "Unexpected field"}, id="init-file-part"),
    # upload / commit of an unknown uuid
    pytest.param("POST", f"/task/new/upload/{UNKNOWN}", {"files": [image()]}, INVALID_UUID,
                 id="upload-unknown"),
    pytest.param("POST", f"/task/new/upload/{UNKNOWN}", {"files": text(foo="bar")},
                 INVALID_UUID, id="upload-unknown-no-file"),
    pytest.param("POST", f"/task/new/commit/{UNKNOWN}", {}, INVALID_UUID, id="commit-unknown"),
    # /auth/* (never token-protected, §3.12)
    pytest.param("GET", "/auth/info", {},
                 {"message": "Authentication not available on this node", "loginUrl": None,
                  "registerUrl": None}, id="auth-info"),
    pytest.param("POST", "/auth/login", {"json": {"username": "u", "password": "p"}},
                 {"error": "Not available"}, id="auth-login"),
    pytest.param("POST", "/auth/register", {}, {"error": "Not available"}, id="auth-register"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "expected"), STATELESS)
async def test_error_body(
    client: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    before = await task_ids(client)
    resp = await client.request(method, path, **kwargs)
    assert body_of(resp) == expected
    assert await task_ids(client) == before, "a refused request must not create a task"


@pytest.mark.parametrize(
    ("path", "kwargs", "success_key"),
    [
        pytest.param(f"/task/{action}", {"content": b"{bad", "headers": JSON_CT}, False,
                     id=f"{action}-malformed-json-body")
        for action in ("cancel", "remove", "restart")
    ] + [
        pytest.param("/task/restart", {"data": {"uuid": UNKNOWN, "options": "[{"}}, False,
                     id="restart-malformed-options-urlencoded"),
        pytest.param("/task/restart", {"json": {"uuid": UNKNOWN, "options": "[{"}}, False,
                     id="restart-malformed-options-json"),
        pytest.param("/task/new", {"files": [image(), *text(options='[{"name": "dsm",')]},
                     False, id="new-malformed-options"),
        pytest.param("/task/new/init", {"files": text(options='[{"name": "dsm",')}, False,
                     id="init-malformed-options"),
    ],
)
async def test_parse_errors_are_opaque_json(
    client: httpx.AsyncClient, path: str, kwargs: dict[str, Any], success_key: bool
) -> None:
    """§1.5/§5.1: ``{"error": "<parse message>"}``; the text is runtime-specific (§11 #5)."""
    body = body_of(await client.post(path, **kwargs))
    assert set(body) == ({"success", "error"} if success_key else {"error"}), body
    assert isinstance(body["error"], str) and body["error"], body


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", "/nonexistent", id="unknown-path"),
        pytest.param("GET", f"/task/{UNKNOWN}/download", id="download-without-asset"),
        pytest.param("GET", "/task/new", id="get-on-post-route"),
        pytest.param("POST", "/info", id="post-on-get-route"),
        pytest.param("PUT", "/task/list", id="put"),
        pytest.param("DELETE", f"/task/{UNKNOWN}/info", id="delete"),
    ],
)
async def test_unknown_route_is_404_html(client: httpx.AsyncClient, method: str, path: str) -> None:
    resp = await client.request(method, path)
    assert resp.status_code == 404, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("text/html"), resp.headers
    assert f"<pre>Cannot {method} {path}</pre>" in resp.text, resp.text


# --------------------------------------------------------------------------------------------
# Downloads


@pytest.mark.parametrize(
    "asset",
    [
        # orthophoto.tif, dsm.tif, dtm.tif are served (docs/results.md); other names are not
        pytest.param("ORTHOPHOTO.TIF", id="raster-case"),
        pytest.param("odm_orthophoto.tif", id="odm-orthophoto-tif"),
        pytest.param("stac.json", id="stac-item-file"),
        pytest.param("ALL.ZIP", id="case"),
        pytest.param("all.zip.bak", id="suffix"),
        pytest.param("task_output.txt", id="task-output"),
        pytest.param("..%2F..%2Fetc%2Fpasswd", id="traversal-encoded"),
        pytest.param("..%2Fall.zip", id="traversal-to-all-zip"),
        pytest.param("%2E%2E", id="dot-dot"),
        pytest.param("all.zip%00", id="nul"),
    ],
)
async def test_invalid_asset(client: httpx.AsyncClient, done_task: str, asset: str) -> None:
    resp = await client.get(f"/task/{done_task}/download/{asset}")
    assert body_of(resp) == {"error": "Invalid asset"}


async def test_all_zip_of_completed_task_is_not_json(
    client: httpx.AsyncClient, done_task: str
) -> None:
    resp = await client.get(f"/task/{done_task}/download/all.zip")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/zip"
    assert resp.content[:2] == b"PK"


@pytest.mark.parametrize(
    ("state", "asset", "expected"),
    [
        pytest.param("running", "all.zip", "Asset not ready", id="running"),
        pytest.param("running", "odm_orthophoto.tif", "Invalid asset",
                     id="running-invalid-asset"),
        pytest.param("running", "orthophoto.tif", "Asset not ready", id="running-raster"),
        pytest.param("failed", "all.zip", "Asset not ready", id="failed"),
        pytest.param("canceled", "all.zip", "Asset not ready", id="canceled"),
    ],
)
async def test_asset_not_ready(
    client: httpx.AsyncClient, failed_task: str, state: str, asset: str, expected: str
) -> None:
    if state == "failed":
        task_id = failed_task
    else:
        task_id = (await api.create(client, files=[("DJI_0001.JPG", data.JPEG)]))["uuid"]
    try:
        if state == "canceled":
            assert body_of(await client.post("/task/cancel", data={"uuid": task_id})) == {
                "success": True}
            await api.poll_until(client, task_id, api.status_is(50))
        else:
            assert (await api.info(client, task_id))["status"]["code"] in (10, 20, 30)
        resp = await client.get(f"/task/{task_id}/download/{asset}")
        assert body_of(resp) == {"error": expected}
    finally:
        if state == "running":
            await client.post("/task/cancel", data={"uuid": task_id})


# --------------------------------------------------------------------------------------------
# Restart of a task that is not finished


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({}, {"success": False, "error": "Task cannot be restarted"},
                     id="urlencoded"),
        pytest.param({"json": True}, {"success": False, "error": "Task cannot be restarted"},
                     id="json"),
        pytest.param({"options": '[{"name":"dsm","value":true}]'},
                     {"success": False, "error": "Task cannot be restarted"},
                     id="with-valid-options"),
        pytest.param({"options": ONE_BAD_OPTION}, {"error": ONE_ERROR},
                     id="options-error-first"),
    ],
)
async def test_restart_of_unfinished_task(
    client: httpx.AsyncClient, kwargs: dict[str, Any], expected: dict[str, Any]
) -> None:
    task_id = (await api.create(client, files=[("DJI_0001.JPG", data.JPEG)]))["uuid"]
    try:
        payload: dict[str, Any] = {"uuid": task_id}
        if "options" in kwargs:
            payload["options"] = kwargs["options"]
        before = (await api.info(client, task_id))["status"]["code"]
        assert before in (10, 20)
        resp = await client.post("/task/restart", **(
            {"json": payload} if kwargs.get("json") else {"data": payload}))
        assert body_of(resp) == expected
        assert (await api.info(client, task_id))["status"]["code"] in (10, 20, 40)
    finally:
        await client.post("/task/cancel", data={"uuid": task_id})


# --------------------------------------------------------------------------------------------
# set-uuid of an existing task


@pytest.mark.parametrize(
    "route",
    [pytest.param("/task/new", id="new"), pytest.param("/task/new/init", id="init")],
)
@pytest.mark.parametrize("which", [pytest.param("done", id="completed"),
                                   pytest.param("failed", id="failed")])
async def test_set_uuid_of_existing_task(
    client: httpx.AsyncClient, done_task: str, failed_task: str, route: str, which: str
) -> None:
    existing = done_task if which == "done" else failed_task
    files = [image(), *text(name="dup")] if route == "/task/new" else text(name="dup")
    resp = await client.post(route, files=files, headers={"set-uuid": existing})
    assert body_of(resp) == {"error": f"Invalid set-uuid: {existing}"}
    assert (await api.info(client, existing))["status"]["code"] in (30, 40)


# --------------------------------------------------------------------------------------------
# Chunked upload


async def test_upload_and_commit_after_commit(client: httpx.AsyncClient) -> None:
    task_id = await init(client)
    assert await upload(client, task_id, "DJI_0001.JPG") == {"success": True}
    assert await commit(client, task_id) == {"uuid": task_id}
    try:
        assert await upload(client, task_id, "DJI_0002.JPG") == INVALID_UUID
        assert await commit(client, task_id) == INVALID_UUID
        assert (await api.info(client, task_id))["imagesCount"] == 1
    finally:
        await client.post("/task/cancel", data={"uuid": task_id})


async def test_info_of_uncommitted_upload_is_not_found(client: httpx.AsyncClient) -> None:
    task_id = await init(client)
    assert body_of(await client.get(f"/task/{task_id}/info")) == {
        "error": f"{task_id} not found"}
    assert task_id not in await task_ids(client)
    assert body_of(await client.post("/task/cancel", data={"uuid": task_id})) == {
        "success": False, "error": f"{task_id} not found"}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({"files": text(foo="bar")},
                     {"error": "Need at least 1 file.", "noRetry": True}, id="text-field-only"),
        pytest.param({}, {"error": "Need at least 1 file.", "noRetry": True}, id="no-body"),
        pytest.param({"data": {"images": "x"}},
                     {"error": "Need at least 1 file.", "noRetry": True}, id="urlencoded"),
        pytest.param({"files": [image(field="file")]}, {"error": "Unexpected field"},
                     id="wrong-field"),
        pytest.param({"files": [image("DJI_0009.JPG"), image(field="image")]},
                     {"error": "Unexpected field"}, id="wrong-field-after-good-file"),
    ],
)
async def test_bad_upload_leaves_upload_usable(
    client: httpx.AsyncClient, kwargs: dict[str, Any], expected: dict[str, Any]
) -> None:
    task_id = await init(client)
    assert body_of(await client.post(f"/task/new/upload/{task_id}", **kwargs)) == expected
    assert await upload(client, task_id, "DJI_0001.JPG") == {"success": True}
    assert await commit(client, task_id) == {"uuid": task_id}
    try:
        # files of a refused request are not kept
        assert (await api.info(client, task_id))["imagesCount"] == 1
    finally:
        await client.post("/task/cancel", data={"uuid": task_id})


async def test_commit_without_files(client: httpx.AsyncClient) -> None:
    task_id = await init(client)
    assert await commit(client, task_id) == {"error": "Need at least 1 file."}
    # §3.5: the staging is removed, the uuid is unknown from now on
    assert await upload(client, task_id, "DJI_0001.JPG") == INVALID_UUID
    assert await commit(client, task_id) == INVALID_UUID
    assert task_id not in await task_ids(client)


async def test_traversal_in_upload_names_stays_inside_the_task(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    names = ["../../evil.jpg", "..\\..\\evil.jpg", "/abs/evil.jpg", "DJI_0001.JPG"]
    task_id = await init(client)
    for name in names:
        content, ctype = raw_multipart([("images", name, data.JPEG)])
        resp = await client.post(f"/task/new/upload/{task_id}", content=content,
                                 headers={"content-type": ctype})
        assert body_of(resp) == {"success": True}, name
    assert await commit(client, task_id) == {"uuid": task_id}
    try:
        assert (await api.info(client, task_id))["imagesCount"] == len(names)
        keys = s3_keys(stack)
        evil = [k for k in keys if "evil" in k]
        assert len(evil) >= 3, evil
        assert all(k.startswith(f"tasks/{task_id}/") for k in evil), evil
        bad = [k for k in keys if ".." in k.split("/") or "\\" in k or k.startswith("/")]
        assert not bad, bad
        stored = [k.rsplit("/", 1)[1] for k in s3_keys(stack, f"tasks/{task_id}/")
                  if "evil" in k]
        assert len(set(stored)) == 3 and all(re.fullmatch(r"[^/\\]*evil_*\.jpg", n)
                                             for n in stored), stored
    finally:
        await client.post("/task/cancel", data={"uuid": task_id})


async def test_duplicate_upload_names_are_renamed_and_counted(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    task_id = await init(client)
    assert await upload(client, task_id, "a.jpg") == {"success": True}
    assert await upload(client, task_id, "a.jpg") == {"success": True}
    assert await upload(client, task_id, "a.jpg", "b.jpg") == {"success": True}
    assert await commit(client, task_id) == {"uuid": task_id}
    try:
        assert (await api.info(client, task_id))["imagesCount"] == 4
        names = {k.rsplit("/", 1)[1] for k in s3_keys(stack, f"tasks/{task_id}/")}
        assert {"a.jpg", "a_.jpg", "a__.jpg", "b.jpg"} <= names, names
    finally:
        await client.post("/task/cancel", data={"uuid": task_id})


async def test_reinit_with_same_set_uuid_keeps_files(client: httpx.AsyncClient) -> None:
    set_uuid = str(uuid.uuid4())
    first = await init(client, headers={"set-uuid": set_uuid}, options='[{"name":"dsm",'
                       '"value":true}]')
    assert first == set_uuid
    assert await upload(client, set_uuid, "DJI_0001.JPG", "DJI_0002.JPG") == {"success": True}
    body = body_of(await client.post(
        "/task/new/init", headers={"set-uuid": set_uuid},
        files=text(name="second", skipPostProcessing="true",
                   options='[{"name":"orthophoto-resolution","value":"4"}]')))
    assert body == {"uuid": set_uuid}
    assert await upload(client, set_uuid, "DJI_0002.JPG") == {"success": True}
    assert await commit(client, set_uuid) == {"uuid": set_uuid}
    try:
        got = await api.info(client, set_uuid)
        assert got["imagesCount"] == 3
        assert got["name"] == "second"  # saved fields overwritten by the re-init
        assert got["options"] == [{"name": "orthophoto-resolution", "value": 4}]
    finally:
        await client.post("/task/cancel", data={"uuid": set_uuid})


async def test_empty_set_uuid_is_ignored(client: httpx.AsyncClient) -> None:
    """NodeODM tests ``if (req.get('set-uuid'))``: an empty header means "pick one"."""
    got = await init(client, headers={"set-uuid": ""})
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        got), got


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda u: u.upper(), id="upper"),
        pytest.param(lambda u: u[:9] + u[9:].upper(), id="mixed"),
        pytest.param(lambda u: u, id="lower"),
    ],
)
async def test_init_echoes_set_uuid_canonical(client: httpx.AsyncClient, make: Any) -> None:
    """Deliberate departure from §3.5 ("echo exactly as given"): one task has one spelling, so
    init and commit answer the lower-case form. ClusterODM sends lower-case v4 uuids, so the
    echo it compares is unchanged; any spelling still reaches the task."""
    canonical = str(uuid.uuid4())
    given = make(canonical)
    assert await init(client, headers={"set-uuid": given}) == canonical
    assert await upload(client, given, "DJI_0001.JPG") == {"success": True}
    assert await commit(client, given) == {"uuid": canonical}
    try:
        assert (await api.info(client, given))["uuid"] == canonical
    finally:
        await client.post("/task/cancel", data={"uuid": given})


# --------------------------------------------------------------------------------------------
# Oversize requests (a gateway of its own with a 1 MB limit)

LIMIT = 1_000_000


def _big_body() -> tuple[bytes, str]:
    return raw_multipart([("name", None, b"big"),
                          ("images", "big.JPG", data.JPEG + b"\0" * (LIMIT + 500_000))])


async def _chunks(payload: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(payload), 64 * 1024):
        yield payload[i:i + 64 * 1024]


async def test_oversize_request_is_refused(fresh_stack: tuple[Stack, Nats]) -> None:
    own, _ = fresh_stack
    own.extra_env = {"SCALEODM_MAX_REQUEST_BYTES": str(LIMIT)}
    own.start("gateway")
    content, ctype = _big_body()
    async with httpx.AsyncClient(base_url=own.gateway_url, timeout=30) as c:
        upload_id = await init(c)
        cases = {
            "new-content-length": ("/task/new", content),
            "new-streamed": ("/task/new", _chunks(content)),
            "upload-content-length": (f"/task/new/upload/{upload_id}", content),
            "upload-streamed": (f"/task/new/upload/{upload_id}", _chunks(content)),
        }
        for label, (path, payload) in cases.items():
            resp = await c.post(path, content=payload, headers={"content-type": ctype})
            body = body_of(resp)
            assert set(body) == {"error"}, (label, body)
            assert re.search(r"too large|limit|exceed", body["error"], re.IGNORECASE), (
                label, body)
            assert str(LIMIT) in body["error"], (label, body)
        assert body_of(await c.get("/task/list")) == []
        # nothing of the refused files is kept; the upload still works below the limit
        assert await upload(c, upload_id, "DJI_0001.JPG") == {"success": True}
        assert await commit(c, upload_id) == {"uuid": upload_id}
        assert (await api.info(c, upload_id))["imagesCount"] == 1
    assert not [k for k in s3_keys(own) if k.endswith("big.JPG")]
