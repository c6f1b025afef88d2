"""Input attacks on the NodeODM API, each sent over HTTP to a running gateway (security hardening).

One gateway of its own, without scheduler (nothing submitted here runs or fetches anything), with a
small console page (50 lines) and the whole service bucket listed as an S3 input location (so
that the ``tasks/`` rule is shown to hold even against a broad operator entry). One test per item:

1. uuid spellings: upper/lower/mixed case of one uuid are one task, through ``set-uuid``, every
   ``{uuid}`` route, action bodies, the events and webhooks routes and the chunked upload;
2. file names with control characters, over 255 bytes, reserved (``..``, ``CON.jpg``): refused with
   nothing stored in S3, files stored earlier by the same request included;
3. webhook and ``sm-cluster`` URLs checked at submission (malformed, other schemes, 70 KB,
   refused addresses);
4. ``{{`` in option values refused (``$(`` is not);
5. option values that are not scalars of their declared type refused, nothing stored;
6. ``s3://`` zipurls outside the allowed locations (another task's data) refused;
7. a 400 MiB action body refused after 64 KiB with the gateway's peak RSS bounded; multipart
   text fields capped in number, each, and in all;
8. console output served in bounded pages that a client polling like WebODM reads whole; a
   negative N answers the tail (the last ``min(|N|, page)`` lines).

Left out: the fuzzing of ``/task/new`` (``test_fuzz_task_new.py``), internal errors and ``/readyz``
(``test_gateway_leaks.py``), the runs' own checks at fetch and connect time (scheduler and notifier
tests), event streams' caps (their own tests).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient

from scaleodm.common.contracts import events
from scaleodm.common.store.tasks import TaskStore
from tests.harness import data, servers
from tests.harness.stack import Stack
from tests.security.gateway_only import gateway_only, multipart_body, s3_keys

pytestmark = pytest.mark.integration

PAGE_LINES = 50
ZIPURL = "http://127.0.0.1:1/a.zip"  # accepted (loopback is allowed in tests); never fetched here
MAX_ERROR_CHARS = 1000  # an error that echoes input stays short


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, mongo_url: str, s3: servers.S3Endpoint
) -> Iterator[Stack]:
    env = {
        "SCALEODM_OUTPUT_PAGE_LINES": str(PAGE_LINES),
        "SCALEODM_S3__INPUT_ALLOW": '["s3://scaleodm/"]',
    }
    with gateway_only(tmp_path_factory.mktemp("attacks"), mongo_url, s3, env) as stack:
        yield stack


@pytest.fixture
async def gw(gateway: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.gateway_url, timeout=30) as c:
        yield c


def answer(resp: httpx.Response) -> dict[str, Any]:
    """A NodeODM answer: HTTP 200, JSON (nodeodm-api §1.1)."""
    assert resp.status_code == 200, (resp.status_code, resp.text[:300])
    assert "application/json" in resp.headers["content-type"]
    body: dict[str, Any] = resp.json()
    return body


def refused(body: dict[str, Any], prefix: str) -> str:
    assert set(body) <= {"error", "success"} and "error" in body, body
    error: str = body["error"]
    assert error.startswith(prefix), body
    assert len(error) <= MAX_ERROR_CHARS, len(error)
    return error


def image(name: str = "DJI_0001.JPG") -> tuple[str, Any]:
    return ("images", (name, data.JPEG, "image/jpeg"))


def text(**fields: str) -> list[tuple[str, Any]]:
    return [(k, (None, v)) for k, v in fields.items()]


async def create(c: httpx.AsyncClient, *, set_uuid: str | None = None, **kw: Any) -> dict[str, Any]:
    headers = {"set-uuid": set_uuid} if set_uuid else None
    return answer(await c.post("/task/new", headers=headers, **kw))


async def listed(c: httpx.AsyncClient) -> list[str]:
    resp = await c.get("/task/list")
    assert resp.status_code == 200
    return [t["uuid"] for t in resp.json()]


async def store_of(stack: Stack) -> tuple[AsyncMongoClient[dict[str, Any]], TaskStore]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.mongo_url)
    return client, TaskStore(client[stack.database])


# --------------------------------------------------------------------------------------------
# 1. uuid case


async def test_uuid_spellings_are_one_task(gw: httpx.AsyncClient) -> None:
    task_id = str(uuid.uuid4())
    upper, mixed = task_id.upper(), task_id[:9] + task_id[9:].upper()
    assert await create(gw, set_uuid=upper, files=[image()]) == {"uuid": task_id}
    # the other spellings are the existing task, not a new one sharing its run
    for spelling in (task_id, mixed):
        refused(await create(gw, set_uuid=spelling, files=[image()]), "Invalid set-uuid")
        refused(answer(await gw.post("/task/new/init", files=text(name="x"),
                                     headers={"set-uuid": spelling})), "Invalid set-uuid")
    assert (await listed(gw)).count(task_id) == 1
    assert upper not in await listed(gw)
    for spelling in (upper, mixed):
        assert answer(await gw.get(f"/task/{spelling}/info"))["uuid"] == task_id
        assert answer(await gw.get(f"/task/{spelling}/info", params={"with_output": 0}))[
            "output"] == []
        assert (await gw.get(f"/task/{spelling}/output")).json() == []
        assert answer(await gw.get(f"/task/{spelling}/download/all.zip")) == {
            "error": "Asset not ready"}
        assert (await gw.get(f"/task/{spelling}/webhooks")).json() == []
    # canceling through one spelling cancels the task all spellings name
    assert answer(await gw.post("/task/cancel", json={"uuid": upper})) == {"success": True}
    assert answer(await gw.get(f"/task/{task_id}/info"))["status"] == {"code": 50}
    assert answer(await gw.post("/task/cancel", data={"uuid": mixed})) == {"success": True}
    # events: a finished task with the cursor past its end answers 204 (found, nothing to send)
    for spelling in (upper, task_id):
        resp = await gw.get(f"/task/{spelling}/events", params={"since": "1000000"})
        assert resp.status_code == 204, resp.text
    assert answer(await gw.post("/task/remove", data={"uuid": mixed})) == {"success": True}
    assert answer(await gw.get(f"/task/{task_id}/info")) == {"error": f"{task_id} not found"}
    assert answer(await gw.get(f"/task/{upper}/info")) == {"error": f"{upper} not found"}


async def test_chunked_upload_spellings_are_one_upload(gw: httpx.AsyncClient) -> None:
    task_id = str(uuid.uuid4())
    upper = task_id.upper()
    init = answer(await gw.post("/task/new/init", files=text(name="chunked"),
                                headers={"set-uuid": upper}))
    assert init == {"uuid": task_id}  # canonical: what ClusterODM (lower-case v4) sends anyway
    assert answer(await gw.post(f"/task/new/upload/{upper}", files=[image("a.jpg")])) == {
        "success": True}
    assert answer(await gw.post(f"/task/new/upload/{task_id}", files=[image("a.jpg")])) == {
        "success": True}
    assert answer(await gw.post(f"/task/new/commit/{upper}")) == {"uuid": task_id}
    assert answer(await gw.post(f"/task/new/commit/{task_id}")) == {
        "error": "Invalid uuid (not found)"}
    info = answer(await gw.get(f"/task/{upper}/info"))
    assert info["uuid"] == task_id and info["imagesCount"] == 2  # a.jpg and a_.jpg: one upload
    await gw.post("/task/remove", data={"uuid": task_id})


# --------------------------------------------------------------------------------------------
# 2. file names

BAD_NAMES = [
    pytest.param("a\x00b.jpg", "control character", id="nul"),
    pytest.param("evil.jpg\x00.txt", "control character", id="nul-before-extension"),
    pytest.param("a\nb.jpg", "control character", id="newline"),
    pytest.param("a\x1bb.jpg", "control character", id="escape"),
    pytest.param("a\x85b.jpg", "control character", id="c1-control"),
    pytest.param("dir\x00/ok.jpg", "control character", id="nul-in-dropped-directory"),
    pytest.param("photo\u202egpj.exe", "invisible format character", id="bidi-override"),
    pytest.param("a\u200bb.jpg", "invisible format character", id="zero-width-space"),
    pytest.param("a\u2028b.jpg", "invisible format character", id="line-separator"),
    pytest.param("x" * 252 + ".jpg", "longer than 255 bytes", id="256-bytes"),
    pytest.param("\u00e9" * 126 + ".jpg", "longer than 255 bytes", id="256-bytes-utf8"),
    pytest.param("CON.jpg", "reserved name", id="con-jpg"),
    pytest.param("nul", "reserved name", id="nul-device"),
    pytest.param("lpt9.tar.gz", "reserved name", id="lpt9"),
    pytest.param("Com1 .JPG", "reserved name", id="com1-space"),
    pytest.param("..", "reserved name", id="dot-dot"),
    pytest.param("...", "reserved name", id="dots"),
    pytest.param(" . ", "reserved name", id="dots-and-spaces"),
    pytest.param("photos/..", "reserved name", id="dot-dot-after-directory"),
]


@pytest.mark.parametrize(("name", "reason"), BAD_NAMES)
async def test_bad_file_names_are_refused_with_nothing_stored(
    gw: httpx.AsyncClient, gateway: Stack, name: str, reason: str
) -> None:
    task_id = str(uuid.uuid4())
    body, ctype = multipart_body([
        ("name", None, b"bad-name"),
        ("images", "DJI_0001.JPG", data.JPEG),  # stored first, must be cleaned up
        ("images", name, data.JPEG),
    ])
    resp = await gw.post("/task/new", content=body,
                         headers={"content-type": ctype, "set-uuid": task_id})
    error = refused(answer(resp), "Invalid file name: ")
    assert error.endswith(f"({reason})"), error
    assert "\x00" not in error and "\n" not in error
    assert answer(await gw.get(f"/task/{task_id}/info")) == {"error": f"{task_id} not found"}
    assert s3_keys(gateway, f"tasks/{task_id}/") == []

    # chunked: the refused request leaves nothing; the upload stays usable
    upload_id = answer(await gw.post("/task/new/init", files=text(name="x")))["uuid"]
    resp = await gw.post(f"/task/new/upload/{upload_id}", content=body,
                         headers={"content-type": ctype})
    refused(answer(resp), "Invalid file name: ")
    assert s3_keys(gateway, f"tasks/{upload_id}/") == []
    assert answer(await gw.post(f"/task/new/upload/{upload_id}", files=[image()])) == {
        "success": True}
    assert [k.rsplit("/", 1)[1] for k in s3_keys(gateway, f"tasks/{upload_id}/")] == [
        "DJI_0001.JPG"]


async def test_longest_valid_names_are_kept(gw: httpx.AsyncClient, gateway: Stack) -> None:
    longest = "x" * 251 + ".jpg"  # 255 bytes
    task_id = str(uuid.uuid4())
    body, ctype = multipart_body([("images", longest, data.JPEG), ("images", "a/.hidden.jpg",
                                                                   data.JPEG)])
    resp = await gw.post("/task/new", content=body,
                         headers={"content-type": ctype, "set-uuid": task_id})
    assert answer(resp) == {"uuid": task_id}
    names = sorted(k.rsplit("/", 1)[1] for k in s3_keys(gateway, f"tasks/{task_id}/"))
    assert names == sorted([longest, "hidden.jpg"])
    # a duplicate would need 256 bytes ("x..._.jpg"): refused, not truncated
    upload_id = answer(await gw.post("/task/new/init", files=text(name="x")))["uuid"]
    body, ctype = multipart_body([("images", longest, data.JPEG), ("images", longest, data.JPEG)])
    resp = await gw.post(f"/task/new/upload/{upload_id}", content=body,
                         headers={"content-type": ctype})
    refused(answer(resp), "Invalid file name: ")
    assert s3_keys(gateway, f"tasks/{upload_id}/") == []
    await gw.post("/task/cancel", data={"uuid": task_id})


# --------------------------------------------------------------------------------------------
# 3. webhook and sm-cluster URLs

BAD_WEBHOOKS = [
    pytest.param("http://[::1", "malformed URL", id="bad-ipv6-literal"),
    pytest.param("file:///etc/passwd", "unsupported URL scheme", id="file"),
    pytest.param("gopher://127.0.0.1:70/_SET%20x", "unsupported URL scheme", id="gopher"),
    pytest.param("javascript:alert(1)", "unsupported URL scheme", id="javascript"),
    pytest.param("http://h/" + "a" * 70_000, "URL longer than", id="70kb"),
    pytest.param("http://a b/", "URL contains spaces", id="space"),
    pytest.param("http://x/\x00", "URL contains spaces or control", id="nul"),
    pytest.param("http://169.254.169.254/latest/meta-data/", "refused address", id="metadata"),
    pytest.param("http://10.0.0.1/hook", "refused address", id="private"),
    pytest.param("http://:80/", "URL has no host", id="no-host"),
]


@pytest.mark.parametrize(("webhook", "reason"), BAD_WEBHOOKS)
async def test_bad_webhooks_are_refused_at_submission(
    gw: httpx.AsyncClient, webhook: str, reason: str
) -> None:
    before = await listed(gw)
    for route, extra in (("/task/new", {"zipurl": ZIPURL}), ("/task/new/init", {})):
        error = refused(answer(await gw.post(route, files=text(webhook=webhook, **extra))),
                        "Invalid webhook: ")
        assert reason in error, error
    assert await listed(gw) == before


@pytest.mark.parametrize(
    ("webhook", "stored"),
    [
        pytest.param("", None, id="empty-is-none"),
        pytest.param("  ", None, id="blank-is-none"),
        pytest.param("abc", None, id="three-chars-is-none"),  # NodeODM §8
        pytest.param("http://127.0.0.1:9/hook?token=x", "http://127.0.0.1:9/hook?token=x",
                     id="allowed-loopback"),
    ],
)
async def test_acceptable_webhooks(
    gw: httpx.AsyncClient, gateway: Stack, webhook: str, stored: str | None
) -> None:
    task_id = (await create(gw, files=text(zipurl=ZIPURL, webhook=webhook)))["uuid"]
    client, store = await store_of(gateway)
    try:
        doc = await store.get_task(task_id)
        assert doc is not None and doc["webhook"] == stored
    finally:
        await client.close()
        await gw.post("/task/remove", data={"uuid": task_id})


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("file:///etc/passwd", id="file"),
        pytest.param("http://169.254.169.254/", id="metadata"),
        pytest.param("http://[::1", id="malformed"),
        pytest.param("host:3000", id="no-scheme"),
    ],
)
async def test_bad_sm_cluster_urls_are_refused_as_option_errors(
    gw: httpx.AsyncClient, value: str
) -> None:
    options = json.dumps([{"name": "sm-cluster", "value": value}])
    for route, extra in (("/task/new", {"zipurl": ZIPURL}), ("/task/new/init", {})):
        error = refused(answer(await gw.post(route, files=text(options=options, **extra))),
                        '[{"name":"sm-cluster","error":"Invalid value ')
        [entry] = json.loads(error)
        assert entry["name"] == "sm-cluster"


@pytest.mark.parametrize("value", ["None", "", "http://127.0.0.1:3001"])
async def test_acceptable_sm_cluster_values(gw: httpx.AsyncClient, value: str) -> None:
    options = json.dumps([{"name": "sm-cluster", "value": value}])
    body = await create(gw, files=text(zipurl=ZIPURL, options=options))
    assert set(body) == {"uuid"}, body
    await gw.post("/task/remove", data={"uuid": body["uuid"]})


# --------------------------------------------------------------------------------------------
# 4. and 5. option values: template syntax, non-scalars


@pytest.mark.parametrize(
    ("option", "message"),
    [
        pytest.param({"name": "primary-band", "value": "{{workflow.name}}"},
                     "Invalid value {{workflow.name}} ({{ is not accepted)", id="workflow-name"),
        pytest.param({"name": "primary-band", "value": "x{{inputs.parameters.secret}}"},
                     "Invalid value x{{inputs.parameters.secret}} ({{ is not accepted)",
                     id="inputs-parameters"),
        pytest.param({"name": "boundary", "value": '{"type": "{{=sprig.env(\'A\')}}"}'},
                     "({{ is not accepted)", id="json-domain-expression"),
        pytest.param({"name": "primary-band", "value": {"$where": "sleep(1)"}},
                     "Invalid value [object Object] (arrays and objects are not accepted)",
                     id="object-dollar-key"),
        pytest.param({"name": "primary-band", "value": {"a.b": {"$gt": ""}}},
                     "Invalid value [object Object] (arrays and objects are not accepted)",
                     id="object-dotted-key"),
        pytest.param({"name": "mesh-size", "value": [5]},
                     "Invalid value 5 (arrays and objects are not accepted)", id="int-array"),
        pytest.param({"name": "crop", "value": {"$numberDecimal": "1"}},
                     "Invalid value [object Object] (arrays and objects are not accepted)",
                     id="float-extended-json"),
    ],
)
async def test_option_values_must_be_plain_scalars(
    gw: httpx.AsyncClient, option: dict[str, Any], message: str
) -> None:
    before = await listed(gw)
    options = json.dumps([option])
    for route, extra in (("/task/new", {"zipurl": ZIPURL}), ("/task/new/init", {})):
        error = refused(answer(await gw.post(route, files=text(options=options, **extra))),
                        f'[{{"name":"{option["name"]}","error":"')
        [entry] = json.loads(error)
        assert entry["error"].endswith(message), entry
    # restart validates new options before anything else (§3.11)
    resp = await gw.post("/task/restart", data={"uuid": str(uuid.uuid4()), "options": options})
    refused(answer(resp), f'[{{"name":"{option["name"]}","error":"')
    assert await listed(gw) == before


async def test_scalar_option_values_are_stored_as_their_declared_type(
    gw: httpx.AsyncClient,
) -> None:
    options = json.dumps([
        {"name": "primary-band", "value": 7},  # string option: the engine's argument, "7"
        {"name": "mesh-size", "value": "12abc"},  # parseInt, as NodeODM (§5.1)
        {"name": "crop", "value": "2.5x"},
        {"name": "dsm", "value": "1"},
        {"name": "sm-cluster", "value": None},  # no argument either way: dropped
        {"name": "cameras", "value": '{"$(id)": 1}'},  # "$(" is left to the workflow escaping
    ])
    task_id = (await create(gw, files=text(zipurl=ZIPURL, options=options,
                                           skipPostProcessing="true")))["uuid"]
    info = answer(await gw.get(f"/task/{task_id}/info"))
    assert info["options"] == [
        {"name": "cameras", "value": '{"$(id)": 1}'},
        {"name": "mesh-size", "value": 12},
        {"name": "crop", "value": 2.5},
        {"name": "dsm", "value": True},
        {"name": "primary-band", "value": "7"},
    ]
    await gw.post("/task/remove", data={"uuid": task_id})


# --------------------------------------------------------------------------------------------
# 6. s3:// zipurls


async def test_s3_zipurls_cannot_reach_other_tasks(gw: httpx.AsyncClient, gateway: Stack) -> None:
    victim = str(uuid.uuid4())
    assert await create(gw, set_uuid=victim, files=[image("secret.jpg")]) == {"uuid": victim}
    assert s3_keys(gateway, f"tasks/{victim}/inputs/")  # its data is there to be stolen
    before = await listed(gw)
    attacks = [
        f"s3://scaleodm/tasks/{victim}/inputs/",
        f"s3://scaleodm/tasks/{victim}/inputs/secret.jpg",
        f"s3://scaleodm/tasks/{victim}/",
        f"s3://scaleodm/tasks/{victim.upper()}/inputs/",
        "s3://scaleodm/tasks/",
        "s3://scaleodm/",  # a listing of the whole bucket would reach tasks/
        f"s3://scaleodm/tasks/{victim}",
        "s3://scaleodm/shared/../tasks/",
        "s3://another-bucket/images.zip",  # not listed by the operator
    ]
    for zipurl in attacks:
        error = refused(await create(gw, files=text(zipurl=zipurl)), "Invalid zipurl: ")
        assert error.endswith("not an allowed input location"), (zipurl, error)
    assert await listed(gw) == before
    client, store = await store_of(gateway)
    try:
        reaching = [d["_id"] async for d in store.tasks.find({}, {"sources": 1})
                    if any(victim in s.lower() for s in d.get("sources", []))]
    finally:
        await client.close()
    assert reaching == [victim], "only the victim's own task may read its inputs"
    # inside the operator's location: accepted
    ok = await create(gw, files=text(zipurl="s3://scaleodm/shared/images.zip"))
    assert set(ok) == {"uuid"}, ok
    for task_id in (victim, ok["uuid"]):
        await gw.post("/task/remove", data={"uuid": task_id})


# --------------------------------------------------------------------------------------------
# 7. action bodies

ACTION_LIMIT = 64 * 1024  # GatewaySettings.max_action_body_bytes default
BIG_BODY = 400 * 1024**2


async def _stream_chunked(port: int, path: str, ctype: str, total: int) -> tuple[bytes, int]:
    """POST ``total`` bytes with chunked encoding, reading the answer meanwhile; returns the
    answer and how many bytes had been sent when it came (the client then stops)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"a" * (1024 * 1024)
    sent = 0

    async def send() -> None:
        nonlocal sent
        first = b'{"uuid": "'
        writer.write(f"{len(first):x}\r\n".encode() + first + b"\r\n")
        while sent < total:
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
            sent += len(chunk)
            # drain() does not yield while the socket takes everything: let the answer in.
            await asyncio.sleep(0)
        writer.write(b'2\r\n"}\r\n0\r\n\r\n')
        await writer.drain()

    async def receive() -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        assert length is not None, head
        return head + await reader.readexactly(int(length.group(1)))

    sending = asyncio.ensure_future(send())
    try:
        answer_bytes = await asyncio.wait_for(receive(), 120)
    finally:
        sending.cancel()
        try:
            await sending
        except (asyncio.CancelledError, ConnectionError):
            pass
        writer.close()
    return answer_bytes, sent


async def test_huge_action_body_is_refused_with_bounded_memory(
    gateway: Stack, record_property: Any
) -> None:
    pid = gateway.procs["gateway"].pid
    port = gateway.ports["gateway"]
    before = servers.peak_rss_bytes(pid)
    started = time.monotonic()
    raw, sent = await _stream_chunked(port, "/task/cancel", "application/json", BIG_BODY)
    elapsed = time.monotonic() - started
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(body) == {"error": f"Request too large (limit {ACTION_LIMIT} bytes)"}
    peak = servers.peak_rss_bytes(pid)
    record_property("peak_rss_mib_before", round(before / 2**20, 1))
    record_property("peak_rss_mib_after", round(peak / 2**20, 1))
    record_property("sent_mib", round(sent / 2**20, 1))
    record_property("seconds", round(elapsed, 2))
    assert peak < 300 * 2**20, peak
    assert sent < BIG_BODY, "the gateway answered only after the whole body"


@pytest.mark.parametrize("action", ["cancel", "remove", "restart"])
@pytest.mark.parametrize(
    ("ctype", "declared"),
    [
        pytest.param("application/json", True, id="json-content-length"),
        pytest.param("application/x-www-form-urlencoded", True, id="urlencoded-content-length"),
        pytest.param("application/x-www-form-urlencoded", False, id="urlencoded-streamed"),
    ],
)
async def test_oversize_action_bodies_are_refused(
    gw: httpx.AsyncClient, action: str, ctype: str, declared: bool
) -> None:
    payload = b"uuid=" + b"a" * (ACTION_LIMIT + 10)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 8192):
            yield payload[i:i + 8192]

    resp = await gw.post(f"/task/{action}", content=payload if declared else chunks(),
                         headers={"content-type": ctype})
    assert answer(resp) == {"error": f"Request too large (limit {ACTION_LIMIT} bytes)"}


async def test_action_bodies_within_the_limit_keep_their_meaning(gw: httpx.AsyncClient) -> None:
    task_id = (await create(gw, files=text(zipurl=ZIPURL)))["uuid"]
    unknown = str(uuid.uuid4())
    padding = "x" * (ACTION_LIMIT - 200)
    # urlencoded: the last of repeated names wins (as Starlette's form parser did)
    resp = await gw.post("/task/cancel", content=f"uuid={unknown}&pad={padding}&uuid={task_id}",
                         headers={"content-type": "application/x-www-form-urlencoded"})
    assert answer(resp) == {"success": True}
    resp = await gw.post("/task/cancel", content=f"uuid=%ff{task_id}",
                         headers={"content-type": "application/x-www-form-urlencoded"})
    assert answer(resp) == {"success": False, "error": f"\ufffd{task_id} not found"}
    resp = await gw.post("/task/remove", json={"uuid": task_id.upper(), "pad": padding})
    assert answer(resp) == {"success": True}


MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("parts", "error"),
    [
        pytest.param([(f"f{i}", None, b"x") for i in range(65)], "Too many fields (limit 64)",
                     id="too-many-fields"),
        pytest.param([("name", None, b"x" * (MiB + 1))],
                     f"Field name too large (limit {MiB} bytes)", id="field-too-large"),
        pytest.param([(f"f{i}", None, b"x" * (MiB - 10)) for i in range(3)],
                     f"Text fields too large (limit {2 * MiB} bytes in all)",
                     id="text-too-large-in-all"),
    ],
)
async def test_multipart_text_fields_are_capped(
    gw: httpx.AsyncClient, parts: list[tuple[str, str | None, bytes]], error: str
) -> None:
    before = await listed(gw)
    body, ctype = multipart_body([("images", "DJI_0001.JPG", data.JPEG), *parts])
    for route in ("/task/new", "/task/new/init"):
        if route.endswith("init"):
            body, ctype = multipart_body(parts)
        resp = await gw.post(route, content=body, headers={"content-type": ctype})
        assert answer(resp) == {"error": error}
    assert await listed(gw) == before


# --------------------------------------------------------------------------------------------
# 8. console output pages


async def test_console_output_comes_in_bounded_pages(
    gw: httpx.AsyncClient, gateway: Stack
) -> None:
    task_id = (await create(gw, files=text(zipurl=ZIPURL)))["uuid"]
    lines = [f"line {i}" for i in range(180)]
    client, store = await store_of(gateway)
    try:
        for start in range(0, len(lines), 60):  # as the watcher records them, in batches
            await store.apply_event(events.new(
                events.TaskOutput, task_id, 1, line_start=start, lines=lines[start:start + 60]
            ))
    finally:
        await client.close()

    async def info_output(n: object) -> list[str]:
        out: list[str] = answer(await gw.get(f"/task/{task_id}/info",
                                             params={"with_output": str(n)}))["output"]
        return out

    async def output(n: object) -> list[str]:
        out: list[str] = (await gw.get(f"/task/{task_id}/output", params={"line": str(n)})).json()
        return out

    for read in (info_output, output):
        assert await read(0) == lines[:PAGE_LINES]
        assert await read(100) == lines[100:100 + PAGE_LINES]
        assert await read(170) == lines[170:]
        assert await read(180) == []
        assert await read(10**30) == []
        assert await read(-3) == lines[-3:]
        assert await read(-PAGE_LINES) == lines[-PAGE_LINES:]
        # NodeODM's slice for -N ends at the last line (§3.6): a page of it is its tail
        assert await read(-120) == lines[-PAGE_LINES:]
        assert await read(-(10**30)) == lines[-PAGE_LINES:]
    # WebODM polls with_output=<lines it has> and appends: it still gets everything, in order
    seen: list[str] = []
    for _ in range(10):
        page = await info_output(len(seen))
        if not page:
            break
        seen += page
    assert seen == lines
    await gw.post("/task/remove", data={"uuid": task_id})
