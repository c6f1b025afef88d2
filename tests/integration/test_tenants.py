"""Tenants end to end: gateway, scheduler and watcher with a tenants file, ``SCALEODM_TOKEN`` and
OIDC bearer tokens from a local issuer (``tests.harness.oidc``), on one stack for the module.

The file has two users (``alice``, ``bob``), an admin (``ops``), and tenants with limits; the node
token is the ``admin`` tenant. Covered:

- **Isolation, route by route, from the OpenAPI document**: every operation of ``/openapi.json``
  that takes a task id (a path parameter, a body field, the ``set-uuid`` header) must be in
  ``CASES``, every other one in ``NO_TASK_ID``, and a parameter that may be an id but is neither
  fails the test: a new route is covered or the test fails. For each covered route, ``bob`` on
  ``alice``'s task (or open upload) gets exactly the answer of an unknown uuid (status, content
  type, body with the uuid masked) and changes nothing; ``alice`` gets the real answer, an admin
  too (an open upload is its uploader's only: an admin gets the unknown answer there); a
  ``set-uuid`` of another tenant's task answers as any taken uuid.
- ``/task/list`` per tenant, for admins, and a task from before tenants (no ``tenant``: the
  ``default`` tenant's, so only admins see it here).
- ``/events`` per tenant (live and replayed): a user gets its own tasks' events only.
- ``/usage``: a tenant's runs (one completed, one canceled while running) add up to what its task
  documents say (runs, outcomes, images, wall, requested × wall); a user sees its own tenant only
  and is refused another's (``?tenant=``); an admin sees every tenant, or one; a malformed month.
- Bearer JWTs through the gateway: the provider's outage as a NodeODM error, a tenant by JWT is the
  same tenant as by token, refusals, a refused bearer beside a good ``?token=``.
- Limits: ``maxImages`` per tenant in ``/info``, refused by ``/task/new`` and failing a task after
  its commit; a denied option (``/task/new``, init, restart); a priority above the tenant's ceiling;
  the monthly quota, with two concurrent submissions at its boundary and a commit beyond it, and
  no zipurl for a tenant with a quota; the
  scheduler holding a tenant's runs to its ``max_active_runs`` while others run.
- PyODM with a tenant token (one happy path), and isolation as PyODM sees it.
- Hot reload (last, they rewrite the file): a tenant removed from the file is refused on the next
  request; a malformed rewrite keeps the last good file.

Left out: timing measurements (isolation is checked on answers; the code reads a task the same way
whoever owns it), per-tenant SSE stream caps, zipurl images against the quota (not counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import morecantile
import pytest
from pymongo import MongoClient
from pyodm import Node
from pyodm.exceptions import NodeResponseError
from pyodm.types import TaskStatus

from tests.harness import api, data, oidc, servers, sse
from tests.harness.runs import most_at_once, run_intervals
from tests.harness.stack import Stack, running_stack

pytestmark = pytest.mark.integration

NODE = "node-admin-token-0123456"  # SCALEODM_TOKEN: the `admin` tenant
ALICE = "alice-token-0123456789"
BOB = "bob-token-abcdefghijkl"
OPS = "ops-token-zyxwvutsrqpo"
LIMITED = "limited-token-01234567"
METERED = "metered-token-0123456"
SOLO = "solo-token-0123456789a"
DOOMED = "doomed-token-012345678"
PAYER = "payer-token-0123456789"
OTHER_PAYER = "other-payer-token-0123"
ZIPPER = "zipper-token-0123456789"
TOKENS = {"admin": NODE, "alice": ALICE, "bob": BOB, "ops": OPS, "limited": LIMITED,
          "metered": METERED, "solo": SOLO, "doomed": DOOMED, "payer": PAYER,
          "other-payer": OTHER_PAYER, "zipper": ZIPPER}

TENANTS = f"""
tenants:
  - name: alice
    tokens: [{ALICE}]
  - name: bob
    tokens: [{BOB}]
  - name: ops
    role: admin
    tokens: [{OPS}]
  - name: limited
    tokens: [{LIMITED}]
    max_images: 2
    denied_options: [dsm]
    max_priority: 10
  - name: metered
    tokens: [{METERED}]
    monthly_image_quota: 5
  - name: solo
    tokens: [{SOLO}]
    max_active_runs: 1
  - name: doomed
    tokens: [{DOOMED}]
  - name: payer
    tokens: [{PAYER}]
  - name: other-payer
    tokens: [{OTHER_PAYER}]
  - name: zipper
    tokens: [{ZIPPER}]
"""
REFUSED = {"error": "Invalid authentication token: token does not match."}

# Every task created here, by tenant (what each may see in an event stream).
CREATED: dict[str, set[str]] = {}


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------


@dataclass
class Tenancy:
    stack: Stack
    tenants_file: Path
    issuer: oidc.Issuer
    clients: dict[str, httpx.AsyncClient] = field(default_factory=dict)

    def __getitem__(self, tenant: str) -> httpx.AsyncClient:
        return self.clients[tenant]

    @property
    def anonymous(self) -> httpx.AsyncClient:
        return self.clients["-"]


def rewrite(path: Path, text: str) -> None:
    """Replace the file as Kubernetes updates a mounted Secret: a new file moved in place."""
    new = path.with_suffix(".new")
    new.write_text(text)
    os.replace(new, path)


@pytest.fixture(scope="module")
def issuer() -> Iterator[oidc.Issuer]:
    server = oidc.Issuer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tenant_stack(
    tmp_path_factory: pytest.TempPathFactory, mongo_url: str, s3: servers.S3Endpoint,
    issuer: oidc.Issuer,
) -> Iterator[tuple[Stack, Path]]:
    tmp = tmp_path_factory.mktemp("tenants-stack")
    path = tmp / "tenants.yaml"
    path.write_text(TENANTS)
    with servers.nats_server(tmp / "nats") as nats:
        own = Stack(tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                    database=f"t_{uuid.uuid4().hex[:12]}", extra_env={
                        "SCALEODM_TOKEN": NODE,
                        "SCALEODM_TENANTS_FILE": str(path),
                        "SCALEODM_OIDC__ISSUER": issuer.url,
                        "SCALEODM_OIDC__AUDIENCE": oidc.AUDIENCE,
                        "SCALEODM_OIDC__JWKS_REFETCH_INTERVAL_S": "0.5",
                        "SCALEODM_OIDC__FETCH_TIMEOUT_S": "2",
                        "SCALEODM_TEST_ENGINE_SECONDS": "1",
                        "SCALEODM_ADMISSION_INTERVAL_S": "0.5",
                    })
        with running_stack(own, ("gateway", "scheduler", "watcher")):
            yield own, path


@pytest.fixture(scope="module")
async def t(tenant_stack: tuple[Stack, Path], issuer: oidc.Issuer) -> AsyncIterator[Tenancy]:
    stack, path = tenant_stack
    tenancy = Tenancy(stack, path, issuer)
    for name, token in {**TOKENS, "-": None}.items():
        params = {"token": token} if token else None
        tenancy.clients[name] = httpx.AsyncClient(base_url=stack.gateway_url, params=params,
                                                  timeout=30)
    yield tenancy
    for client in tenancy.clients.values():
        await client.aclose()


def images(n: int) -> list[tuple[str, Any]]:
    return [("images", (name, data.JPEG, "image/jpeg")) for name in data.image_names(n)]


def body_of(resp: httpx.Response) -> Any:
    assert resp.status_code == 200, (resp.status_code, resp.text)
    return resp.json()


async def submit(t: Tenancy, tenant: str, n: int = 1, **fields: str) -> dict[str, Any]:
    """``/task/new`` as ``tenant`` with ``n`` images; the answer (a created task is noted)."""
    files = images(n) + [(k, (None, v)) for k, v in fields.items()]
    body: dict[str, Any] = body_of(await t[tenant].post("/task/new", files=files))
    if "uuid" in body:
        CREATED.setdefault(tenant, set()).add(body["uuid"])
    return body


async def chunked(t: Tenancy, tenant: str, n: int, commit: bool = True,
                  **fields: str) -> str:
    """An init -> upload (``n`` images) [-> commit] as ``tenant``; the uuid."""
    init = body_of(await t[tenant].post(
        "/task/new/init", files=[("name", (None, "chunked"))]
        + [(k, (None, v)) for k, v in fields.items()]))
    upload_id: str = init["uuid"]
    if n:
        assert body_of(await t[tenant].post(f"/task/new/upload/{upload_id}",
                                            files=images(n))) == {"success": True}
    if commit:
        assert body_of(await t[tenant].post(f"/task/new/commit/{upload_id}")) == {
            "uuid": upload_id}
        CREATED.setdefault(tenant, set()).add(upload_id)
    return upload_id


async def done(t: Tenancy, tenant: str, task_id: str, *codes: int) -> dict[str, Any]:
    return await api.poll_until(t[tenant], task_id, api.status_is(*(codes or (30, 40, 50))))


@pytest.fixture(scope="module")
async def alice_task(t: Tenancy) -> str:
    task_id: str = (await submit(t, "alice", 1, name="alice's"))["uuid"]
    assert (await done(t, "alice", task_id))["status"] == {"code": 40}
    return task_id


@pytest.fixture(scope="module")
async def bob_task(t: Tenancy) -> str:
    task_id: str = (await submit(t, "bob", 1, name="bob's"))["uuid"]
    assert (await done(t, "bob", task_id))["status"] == {"code": 40}
    return task_id


@contextlib.contextmanager
def mongo(stack: Stack) -> Iterator[Any]:
    """The stack's database, for what the API does not show (stored fields, usage)."""
    with MongoClient(stack.mongo_url, tz_aware=True) as client:
        yield client[stack.database]


def is_error(answer: Answer) -> bool:
    """A NodeODM error answer (HTTP 200 ``{"error": ...}``)."""
    if not answer.ctype.startswith("application/json"):
        return False
    body = json.loads(answer.text)
    return isinstance(body, dict) and "error" in body


# --------------------------------------------------------------------------------------------
# Isolation, route by route, from the OpenAPI document
# --------------------------------------------------------------------------------------------

Resource = Literal["task", "action", "restart", "upload", "taken"]


@dataclass(frozen=True)
class Case:
    """How to call a route that takes a task id: ``resource`` is what ``alice`` holds under the
    id (``task``: her completed task; ``action``/``restart``: a task of hers the call changes,
    running or canceled; ``upload``: her open upload holding one image; ``taken``: a uuid she
    holds, which is taken for everyone), with ``images``/``form`` as multipart fields and the
    values of other path parameters."""

    resource: Resource
    images: int = 0  # multipart files in ``images``
    form: dict[str, str] = field(default_factory=dict)
    path: dict[str, str] = field(default_factory=dict)


CASES: dict[tuple[str, str], Case] = {
    ("GET", "/task/{uuid}/info"): Case("task"),
    ("GET", "/task/{uuid}/output"): Case("task"),
    ("GET", "/task/{uuid}/download/{asset}"): Case("task", path={"asset": "all.zip"}),
    ("GET", "/task/{uuid}/webhooks"): Case("task"),
    ("GET", "/task/{uuid}/events"): Case("task"),
    ("GET", "/task/{uuid}/stac"): Case("task"),
    ("GET", "/task/{uuid}/tilejson.json"): Case("task"),
    ("GET", "/task/{uuid}/tiles/{z}/{x}/{y}.png"): Case("task"),  # z/x/y: tile_in_view
    ("POST", "/task/cancel"): Case("action"),
    ("POST", "/task/remove"): Case("action"),
    ("POST", "/task/restart"): Case("restart"),
    ("POST", "/task/new/upload/{uuid}"): Case("upload", images=1),
    ("POST", "/task/new/commit/{uuid}"): Case("upload"),
    ("POST", "/task/new"): Case("taken", images=1),
    ("POST", "/task/new/init"): Case("taken", form={"name": "x"}),
}
# Routes that take no task id, and what covers them for tenants.
NO_TASK_ID: dict[tuple[str, str], str] = {
    ("GET", "/info"): "test_max_images_per_tenant (maxImages is the caller's)",
    ("GET", "/options"): "the same catalog for every tenant",
    ("GET", "/task/list"): "test_task_list_per_tenant",
    ("GET", "/events"): "test_all_tasks_stream_per_tenant",
    ("GET", "/auth/info"): "no token (nodeodm-api §1.3)",
    ("POST", "/auth/login"): "no token (nodeodm-api §1.3)",
    ("POST", "/auth/register"): "no token (nodeodm-api §1.3)",
    ("GET", "/usage"): "test_usage_per_tenant",
    ("GET", "/stac/search"): "test_stac_search_per_tenant (tests/integration/test_stac.py)",
}
# Parameters that look like ids and are none: an event cursor, an asset name, tile coordinates.
NOT_TASK_IDS = {("header", "Last-Event-ID"), ("path", "asset"), ("path", "z"), ("path", "x"),
                ("path", "y")}
ID_LIKE = re.compile(r"(?i)uuid|(^|[-_])id$|_id\b|task")
METHODS = ("get", "post", "put", "patch", "delete")

Carrier = tuple[str, str]  # (where: path | query | header | body, name)


def carriers(op: dict[str, Any]) -> set[Carrier]:
    """Where an operation may take a task id: every path parameter, and every parameter or
    body field whose name looks like an id; less ``NOT_TASK_IDS``."""
    found: set[Carrier] = set()
    for param in op.get("parameters", []):
        where, name = param["in"], param["name"]
        if where == "path" or ID_LIKE.search(name):
            found.add((where, name))
    for content in (op.get("requestBody") or {}).get("content", {}).values():
        for name in ((content.get("schema") or {}).get("properties") or {}):
            if ID_LIKE.search(name):
                found.add(("body", name))
    return found - NOT_TASK_IDS


@pytest.fixture(scope="module")
async def spec(t: Tenancy) -> dict[str, Any]:
    document: dict[str, Any] = body_of(await t.anonymous.get("/openapi.json"))
    return document


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method.upper(), path): op for path, item in spec["paths"].items()
            for method, op in item.items() if method in METHODS}


async def test_every_route_is_classified(spec: dict[str, Any]) -> None:
    """A route that takes a task id is in ``CASES``, every other one in ``NO_TASK_ID``: a new
    route fails here until the isolation test covers it."""
    ops = operations(spec)
    problems = []
    for key, op in ops.items():
        ids = carriers(op)
        if ids and key not in CASES:
            problems.append(f"{key} takes {sorted(ids)}: add it to CASES")
        elif not ids and key not in NO_TASK_ID:
            problems.append(f"{key} is not classified: add it to NO_TASK_ID or CASES")
        elif key in CASES and not ids:
            problems.append(f"{key} is in CASES but takes no task id")
    problems += [f"{key} is not in the OpenAPI document" for key in {*CASES, *NO_TASK_ID}
                 if key not in ops]
    assert not problems, "\n".join(problems)
    assert {c for op in ops.values() for c in carriers(op)} == {
        ("path", "uuid"), ("body", "uuid"), ("header", "set-uuid")}


@dataclass
class Answer:
    status: int
    ctype: str
    text: str

    def masked(self, *ids: str) -> tuple[int, str, str]:
        text = self.text
        for task_id in ids:
            text = text.replace(task_id, "<uuid>")
        return self.status, self.ctype.split(";")[0], text


async def tile_in_view(client: httpx.AsyncClient, task_id: str) -> dict[str, int]:
    """z/x/y of a tile showing the task's orthophoto, as a map client finds it (TileJSON: the
    center at the highest zoom); 0/0/0 when the caller may not see the task (the tile route
    then answers as for an unknown uuid, before it looks at z/x/y)."""
    tilejson = (await client.get(f"/task/{task_id}/tilejson.json")).json()
    if "tiles" not in tilejson:
        return {"z": 0, "x": 0, "y": 0}
    lon, lat, _ = tilejson["center"]
    tile = morecantile.tms.get("WebMercatorQuad").tile(lon, lat, tilejson["maxzoom"])
    return {"z": tile.z, "x": tile.x, "y": tile.y}


async def call(client: httpx.AsyncClient, key: tuple[str, str], op: dict[str, Any], case: Case,
               task_id: str) -> Answer:
    """The route ``key`` with ``task_id`` wherever the OpenAPI document says it takes one."""
    method, path = key
    headers: dict[str, str] = {}
    fields: dict[str, str] = dict(case.form)
    for where, name in carriers(op):
        if where == "path":
            path = path.replace(f"{{{name}}}", task_id)
        elif where == "header":
            headers[name] = task_id
        elif where == "body":
            fields[name] = task_id
        else:
            raise AssertionError(f"{key}: a task id in {where} {name}: teach call() about it")
    for name, value in case.path.items():
        path = path.replace(f"{{{name}}}", value)
    if "{z}" in path:
        path = path.format(**await tile_in_view(client, task_id))
    kwargs: dict[str, Any] = {}
    if case.images:
        kwargs["files"] = images(case.images) + [(k, (None, v)) for k, v in fields.items()]
    elif case.form:
        kwargs["files"] = [(k, (None, v)) for k, v in fields.items()]
    elif fields:
        kwargs["data"] = fields  # the first content type of the action routes: urlencoded
    request = client.build_request(method, path, headers=headers, **kwargs)
    resp = await client.send(request, stream=True)
    try:
        body = await asyncio.wait_for(resp.aread(), 30)  # a finished task's stream ends
    finally:
        await resp.aclose()
    return Answer(resp.status_code, resp.headers.get("content-type", ""),
                  body.decode("utf-8", "replace"))


async def provision(t: Tenancy, case: Case, alice_task: str) -> str:
    """A resource of alice's for ``case`` (module docstring of ``Case``)."""
    if case.resource in ("task", "taken"):
        return alice_task
    if case.resource == "upload":
        return await chunked(t, "alice", 1, commit=False)
    # Canceled: it stays as it is (a snapshot compares it), and a finished task restarts.
    task_id: str = (await submit(t, "alice", 1))["uuid"]
    assert body_of(await t["alice"].post("/task/cancel", data={"uuid": task_id})) == {
        "success": True}
    return task_id


async def snapshot(t: Tenancy, task_id: str) -> Any:
    """What another tenant's call must not change about alice's task."""
    info = await api.info(t["alice"], task_id)
    return info.get("status"), info.get("options"), info.get("dateCreated"), info.get("error")


@pytest.mark.parametrize("key", [pytest.param(k, id=f"{k[0]} {k[1]}") for k in CASES])
async def test_another_tenants_id_answers_as_an_unknown_one(
    t: Tenancy, spec: dict[str, Any], alice_task: str, bob_task: str, key: tuple[str, str],
) -> None:
    op = operations(spec)[key]
    case = CASES[key]
    unknown = str(uuid.uuid4())

    if case.resource == "taken":
        # set-uuid: alice's uuid is taken for bob as his own is, and for everyone else.
        reference = (await call(t["bob"], key, op, case, bob_task)).masked(bob_task)
        for who in ("bob", "alice", "ops", "admin"):
            answer = await call(t[who], key, op, case, alice_task)
            assert answer.masked(alice_task) == reference, who
        assert "Invalid set-uuid: <uuid>" in reference[2]
        fresh = await call(t["bob"], key, op, case, unknown)  # not taken: accepted
        assert json.loads(fresh.text) == {"uuid": unknown}
        CREATED.setdefault("bob", set()).add(unknown)
        return

    target = await provision(t, case, alice_task)
    before = await snapshot(t, target) if case.resource != "upload" else None
    foreign = await call(t["bob"], key, op, case, target)
    as_unknown = await call(t["bob"], key, op, case, unknown)
    assert foreign.masked(target) == as_unknown.masked(unknown), (foreign, as_unknown)
    assert foreign.status == 200 and is_error(foreign), foreign
    if before is not None:
        assert await snapshot(t, target) == before  # bob changed nothing

    # An admin: the real answer (another task when the call changes it); an upload is its
    # uploader's only.
    admin_target = target if case.resource in ("task", "upload") else await provision(
        t, case, alice_task)
    admin = await call(t["ops"], key, op, case, admin_target)
    admin_unknown = await call(t["ops"], key, op, case, unknown)
    if case.resource == "upload":
        assert admin.masked(admin_target) == admin_unknown.masked(unknown), admin
    else:
        assert admin.masked(admin_target) != admin_unknown.masked(unknown), admin
        assert admin.status == 200 and not is_error(admin), admin

    # The owner: the real answer.
    owner_target = target if case.resource in ("task", "upload") else await provision(
        t, case, alice_task)
    owner = await call(t["alice"], key, op, case, owner_target)
    owner_unknown = await call(t["alice"], key, op, case, unknown)
    assert owner.masked(owner_target) != owner_unknown.masked(unknown), owner
    assert owner.status == 200 and not is_error(owner), owner
    if key == ("POST", "/task/new/commit/{uuid}"):
        CREATED["alice"].add(owner_target)
        info = await done(t, "alice", owner_target)
        assert info["imagesCount"] == 1  # neither bob's nor the admin's call added a file
    if key == ("POST", "/task/new/upload/{uuid}"):
        assert body_of(await t["alice"].post(f"/task/new/commit/{target}")) == {"uuid": target}
        CREATED["alice"].add(target)
        assert (await api.info(t["alice"], target))["imagesCount"] == 2  # hers only


# --------------------------------------------------------------------------------------------
# Listing and the all-tasks stream
# --------------------------------------------------------------------------------------------


async def test_task_list_per_tenant(t: Tenancy, alice_task: str, bob_task: str) -> None:
    # A task from before tenants (no `tenant`): the `default` tenant's, not in this file.
    with mongo(t.stack) as db:
        old = {**db["tasks"].find_one({"_id": alice_task}), "_id": str(uuid.uuid4())}
        old.pop("tenant")
        db["tasks"].insert_one(old)

    listed = {who: {i["uuid"] for i in body_of(await t[who].get("/task/list"))}
              for who in ("alice", "bob", "ops", "admin")}

    assert alice_task in listed["alice"] and not listed["alice"] & CREATED["bob"]
    assert bob_task in listed["bob"] and not listed["bob"] & CREATED["alice"]
    assert listed["alice"] <= CREATED["alice"] and listed["bob"] <= CREATED["bob"]
    for admin in ("ops", "admin"):
        assert listed["alice"] | listed["bob"] | {old["_id"]} <= listed[admin]
    assert old["_id"] not in listed["alice"] | listed["bob"]
    assert body_of(await t["alice"].get(f"/task/{old['_id']}/info")) == {
        "error": f"{old['_id']} not found"}
    assert body_of(await t["ops"].get(f"/task/{old['_id']}/info"))["uuid"] == old["_id"]


async def test_all_tasks_stream_per_tenant(t: Tenancy, alice_task: str) -> None:
    opened = {who: asyncio.Event() for who in ("alice", "bob", "ops")}
    ids: dict[str, str] = {}

    async def read(who: str, until_who: tuple[str, ...]) -> list[sse.Message]:
        seen: set[str] = set()

        def until(msg: sse.Message) -> bool:
            if msg.event == "completed":
                seen.add(msg.json()["task_id"])
            return all(ids.get(w) in seen for w in until_who)

        got = await sse.read(t[who], "/events", until=until, on_open=opened[who].set,
                             timeout_s=60)
        return got.events

    readers = {
        "alice": asyncio.create_task(read("alice", ("alice",))),
        "bob": asyncio.create_task(read("bob", ("bob",))),
        "ops": asyncio.create_task(read("ops", ("alice", "bob"))),
    }
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened.values())), 30)
    ids["alice"] = (await submit(t, "alice", 1))["uuid"]
    ids["bob"] = (await submit(t, "bob", 1))["uuid"]
    got = {who: await asyncio.wait_for(reader, 60) for who, reader in readers.items()}

    tasks = {who: {m.json()["task_id"] for m in events} for who, events in got.items()}
    assert ids["alice"] in tasks["alice"] and tasks["alice"] <= CREATED["alice"], tasks
    assert ids["bob"] in tasks["bob"] and tasks["bob"] <= CREATED["bob"], tasks
    assert {ids["alice"], ids["bob"]} <= tasks["ops"]

    # Replayed from the stream's start: alice's own events only, old tasks' included.
    replay = await sse.read(t["alice"], "/events", params={"since": "0"}, timeout_s=60,
                            until=lambda m: m.event == "completed"
                            and m.json()["task_id"] == ids["alice"])
    replayed = {m.json()["task_id"] for m in replay.events}
    assert alice_task in replayed and replayed <= CREATED["alice"], replayed


# --------------------------------------------------------------------------------------------
# Bearer tokens
# --------------------------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_bearer_tokens_end_to_end(t: Tenancy) -> None:
    issuer = t.issuer
    alice_jwt = oidc.signed(oidc.claims(issuer, tenant="alice"))
    client = t.anonymous

    # The provider down before any key was fetched: NodeODM's error shape, retry later.
    issuer.jwks_status = 503
    assert body_of(await client.get("/task/list", headers=bearer(alice_jwt))) == {
        "error": "Identity provider unavailable, please retry later."}
    issuer.jwks_status = 200
    await asyncio.sleep(0.6)  # SCALEODM_OIDC__JWKS_REFETCH_INTERVAL_S

    # A tenant by JWT is the tenant of the file: the same tasks, the same limits.
    assert body_of(await client.get("/task/list", headers=bearer(alice_jwt))) == body_of(
        await t["alice"].get("/task/list"))
    limited_jwt = oidc.signed(oidc.claims(issuer, tenant="limited"), oidc.EC_KEY, "ES256",
                              "ec-1")
    assert body_of(await client.get("/info", headers=bearer(limited_jwt)))["maxImages"] == 2
    created = body_of(await client.post("/task/new", headers=bearer(alice_jwt),
                                        files=images(1)))
    CREATED["alice"].add(created["uuid"])
    assert (await api.info(t["alice"], created["uuid"]))["uuid"] == created["uuid"]
    assert body_of(await t["bob"].get(f"/task/{created['uuid']}/info")) == {
        "error": f"{created['uuid']} not found"}

    # Refused: with the reason, never with the token; a bad bearer beside a good ?token= too.
    now = int(time.time())
    expired = oidc.signed(oidc.claims(issuer, exp=now - 120, iat=now - 600))
    unknown = oidc.signed(oidc.claims(issuer, tenant="mallory"))
    for token, reason in ((expired, "token expired"), (unknown, "unknown tenant"),
                          ("not-a-jwt", "malformed token")):
        for c in (client, t["alice"]):
            assert body_of(await c.get("/task/list", headers=bearer(token))) == {
                "error": f"Invalid authentication token: {reason}."}
    # Another scheme is not ours (an ingress's Basic auth): the query token decides.
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    assert body_of(await t["alice"].get("/task/list", headers=basic)) == body_of(
        await t["alice"].get("/task/list"))
    assert body_of(await client.get("/task/list", headers=basic)) == REFUSED
    assert ALICE not in t.stack.log("gateway") and alice_jwt not in t.stack.log("gateway")


# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------


async def test_max_images_per_tenant(t: Tenancy) -> None:
    assert body_of(await t["limited"].get("/info"))["maxImages"] == 2
    assert body_of(await t["alice"].get("/info"))["maxImages"] is None
    too_many = "3 images uploaded, but this node can only process up to 2."

    assert await submit(t, "limited", 3) == {"error": too_many}
    # After a commit the count is known only then: the task fails (NodeODM §3.5).
    task_id = await chunked(t, "limited", 3)
    info = await done(t, "limited", task_id, 30)
    assert info["status"] == {"code": 30, "errorMessage": too_many}
    assert (await submit(t, "limited", 2))["uuid"]


async def test_a_denied_option_is_refused(t: Tenancy, alice_task: str) -> None:
    dsm = json.dumps([{"name": "dsm", "value": True}])
    refused = {"error": "Option 'dsm' is not allowed for tenant limited"}

    assert await submit(t, "limited", 1, options=dsm) == refused
    assert body_of(await t["limited"].post(
        "/task/new/init", files=[("options", (None, dsm))])) == refused
    # restart checks options before it looks the task up (§3.11): any uuid answers so
    assert body_of(await t["limited"].post(
        "/task/restart", data={"uuid": alice_task, "options": dsm})) == refused
    allowed = await submit(t, "alice", 1, options=dsm)
    assert {"name": "dsm", "value": True} in (await api.info(t["alice"], allowed["uuid"]))[
        "options"]


async def test_a_priority_above_the_tenants_ceiling_is_refused(t: Tenancy) -> None:
    assert await submit(t, "limited", 1, priority="50") == {
        "error": "Invalid priority: 50 (tenant limited may ask for at most 10)"}
    assert await submit(t, "alice", 1, priority="1") == {
        "error": "Invalid priority: 1 (tenant alice may ask for at most 0)"}
    assert body_of(await t["alice"].post(
        "/task/new/init", files=[("priority", (None, "1"))]))["error"].startswith(
        "Invalid priority: 1")
    ok = {who: (await submit(t, who, 1, priority=p))["uuid"]
          for who, p in (("limited", "10"), ("alice", "-5"), ("ops", "100"))}
    with mongo(t.stack) as db:
        stored = {who: db["tasks"].find_one({"_id": i}, {"priority": 1, "tenant": 1})
                  for who, i in ok.items()}
    assert {who: (d["tenant"], d["priority"]) for who, d in stored.items()} == {
        "limited": ("limited", 10), "alice": ("alice", -5), "ops": ("ops", 100)}


async def test_the_monthly_quota_holds_at_its_boundary(t: Tenancy) -> None:
    assert (await submit(t, "metered", 2))["uuid"]
    # Two submissions at once, each fitting alone, together beyond the quota: one passes.
    first, second = await asyncio.gather(submit(t, "metered", 3), submit(t, "metered", 3))
    answers = sorted([first, second], key=lambda b: "error" in b)
    assert "uuid" in answers[0], answers
    assert answers[1] == {
        "error": "3 images uploaded, but tenant metered has 0 of its 5 monthly images left."}
    # After a commit: the task fails (the count is known only then, as maxImages).
    task_id = await chunked(t, "metered", 1)
    info = await done(t, "metered", task_id, 30)
    assert info["status"]["errorMessage"] == (
        "1 images uploaded, but tenant metered has 0 of its 5 monthly images left.")
    with mongo(t.stack) as db:
        [usage] = list(db["usage"].find({"tenant": "metered"}))
    assert usage["images"] == 5  # refusals counted nothing


async def test_a_zipurl_cannot_pass_a_quota_uncounted(t: Tenancy) -> None:
    """A zip's images are known only in the run: a tenant with a quota may not send one (and
    one without a quota may: zipper's becomes a task, whose run then fails to fetch it)."""
    before = (await t["metered"].get("/task/list")).json()
    answer = (await t["metered"].post("/task/new", files={
        "zipurl": (None, "http://127.0.0.1:9/images.zip")})).json()
    assert answer == {"error": "zipurl is not available to tenant metered: its monthly image "
                               "quota counts uploaded images only; upload the images instead."}
    answer = (await t["metered"].post("/task/new", data={"zipurl": "http://127.0.0.1:9/x.zip"},
                                      files=images(1))).json()
    assert answer["error"].startswith("zipurl is not available to tenant metered")
    assert (await t["metered"].get("/task/list")).json() == before
    other = (await t["zipper"].post("/task/new", files={
        "zipurl": (None, "http://127.0.0.1:9/images.zip")})).json()
    assert "uuid" in other, other


async def test_the_scheduler_holds_a_tenant_to_its_active_runs(t: Tenancy) -> None:
    solo = [(await submit(t, "solo", 1, name=f"solo-{n}"))["uuid"] for n in range(3)]
    other = (await submit(t, "bob", 1, name="not held up"))["uuid"]
    for task_id in solo:
        assert (await done(t, "solo", task_id))["status"] == {"code": 40}
    assert (await done(t, "bob", other))["status"] == {"code": 40}
    runs = await asyncio.to_thread(run_intervals, t.stack, [*solo, other])
    assert most_at_once({k: v for k, v in runs.items() if k.split(":")[0] in solo}) == 1
    # bob's run did not wait behind solo's queue: it started before solo's last one.
    started = {k.split(":")[0]: v[0] for k, v in runs.items()}
    assert started[other] < max(started[i] for i in solo), runs


# --------------------------------------------------------------------------------------------
# Usage
# --------------------------------------------------------------------------------------------


def expected_usage(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per month (of the end, UTC): what ``GET /usage`` must say of these ended task documents
    (one attempt each)."""
    months: dict[str, dict[str, Any]] = {}
    for doc in docs:
        month = time.strftime("%Y-%m", time.gmtime(doc["finished_at_ms"] / 1000))
        wall = ((doc["finished_at_ms"] - doc["started_at_ms"]) / 1000
                if doc.get("started_at_ms") is not None else 0.0)
        m = months.setdefault(month, {
            "runs": 0, "outcomes": {"completed": 0, "failed": 0, "canceled": 0}, "images": 0,
            "wallSeconds": 0.0, "coreSeconds": 0.0, "gibSeconds": 0.0})
        m["runs"] += 1
        m["outcomes"][doc["state"]] += 1
        m["images"] += doc["images_count"]
        m["wallSeconds"] += wall
        m["coreSeconds"] += doc["requested_cpu_cores"] * wall
        m["gibSeconds"] += doc["requested_memory_gib"] * wall
    return months


async def usage_of(t: Tenancy, who: str, **params: str) -> Any:
    return body_of(await t[who].get("/usage", params=params))


async def test_usage_per_tenant(t: Tenancy) -> None:
    completed = (await submit(t, "payer", 2, name="completed"))["uuid"]
    assert (await done(t, "payer", completed))["status"] == {"code": 40}
    canceled = (await submit(t, "payer", 1, name="canceled while running"))["uuid"]
    await api.poll_until(t["payer"], canceled, api.status_is(20), interval_s=0.02)
    assert body_of(await t["payer"].post("/task/cancel", data={"uuid": canceled})) == {
        "success": True}
    other = (await submit(t, "other-payer", 3))["uuid"]
    assert (await done(t, "other-payer", other))["status"] == {"code": 40}
    await done(t, "payer", canceled, 50)

    with mongo(t.stack) as db:
        docs = {who: list(db["tasks"].find({"tenant": who}))
                for who in ("payer", "other-payer")}
    assert {d["_id"]: d["state"] for d in docs["payer"]} == {
        completed: "completed", canceled: "canceled"}
    assert all(d["requested_cpu_cores"] > 0 and d["requested_memory_gib"] > 0
               for ds in docs.values() for d in ds)
    expected = {who: expected_usage(ds) for who, ds in docs.items()}

    def summed(answer: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in answer.items() if k not in ("tenant", "imagesSubmitted")}

    for who, months in expected.items():
        for month, want in months.items():
            # The record of an end is written just after the task shows it: wait for it.
            deadline = time.monotonic() + 10
            while True:
                [mine] = (await usage_of(t, who, month=month))["tenants"]
                if mine["runs"] >= want["runs"] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert mine["tenant"] == who
            got = summed(mine)
            assert {k: got[k] for k in ("runs", "outcomes", "images")} == {
                k: want[k] for k in ("runs", "outcomes", "images")}
            for k in ("wallSeconds", "coreSeconds", "gibSeconds"):
                assert got[k] == pytest.approx(want[k], abs=0.01), k
            # An admin: every tenant of the month, or one; the same numbers.
            everyone = await usage_of(t, "ops", month=month)
            assert {u["tenant"]: u for u in everyone["tenants"]}[who] == mine
            assert (await usage_of(t, "admin", month=month, tenant=who))["tenants"] == [mine]
    this_month = time.strftime("%Y-%m", time.gmtime())
    if this_month in expected["payer"]:  # the default month is the current one
        assert (await usage_of(t, "payer")) == await usage_of(t, "payer", month=this_month)
        [mine] = (await usage_of(t, "payer"))["tenants"]
        assert mine["imagesSubmitted"] == 3

    # A user never sees another tenant's usage, nor may ask for it.
    for who, stranger in (("payer", "other-payer"), ("other-payer", "payer")):
        assert [u["tenant"] for u in (await usage_of(t, who))["tenants"]] == [who]
        assert await usage_of(t, who, tenant=stranger) == {
            "error": "Only an admin may read another tenant's usage."}
        assert (await usage_of(t, who, tenant=who))["tenants"][0]["tenant"] == who
    assert await usage_of(t, "payer", month="2031-13") == {
        "error": "Invalid month: 2031-13 (expected YYYY-MM)."}
    assert await usage_of(t, "payer", month="May") == {
        "error": "Invalid month: May (expected YYYY-MM)."}
    assert body_of(await t.anonymous.get("/usage")) == REFUSED


# --------------------------------------------------------------------------------------------
# PyODM
# --------------------------------------------------------------------------------------------


async def test_pyodm_with_a_tenant_token(t: Tenancy, tmp_path: Path) -> None:
    port = t.stack.ports["gateway"]
    node = Node("127.0.0.1", port, token=ALICE)
    files = [str(data.write(tmp_path / name, data.JPEG)) for name in data.image_names(3)]
    info = await asyncio.to_thread(node.info)
    assert info.max_images is None
    task = await asyncio.to_thread(node.create_task, files, name="pyodm-tenant")
    CREATED["alice"].add(task.uuid)
    await asyncio.to_thread(task.wait_for_completion, interval=0.3)
    assert (await asyncio.to_thread(task.info)).status == TaskStatus.COMPLETED

    other = Node("127.0.0.1", port, token=BOB).get_task(task.uuid)
    with pytest.raises(NodeResponseError, match="not found"):
        await asyncio.to_thread(other.info)
    with pytest.raises(NodeResponseError, match="token does not match"):
        await asyncio.to_thread(Node("127.0.0.1", port, token="wrong-token-0123456").info)


# --------------------------------------------------------------------------------------------
# Hot reload (last: these rewrite the file)
# --------------------------------------------------------------------------------------------


async def poll(check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def test_a_tenant_removed_by_a_reload_is_refused_on_the_next_request(t: Tenancy) -> None:
    assert "version" in body_of(await t["doomed"].get("/info"))
    rewrite(t.tenants_file, TENANTS.replace(f"  - name: doomed\n    tokens: [{DOOMED}]\n", ""))

    async def refused() -> bool:
        return body_of(await t["doomed"].get("/info")) == REFUSED

    await poll(refused)
    assert "version" in body_of(await t["alice"].get("/info"))
    assert body_of(await t["doomed"].get("/task/list")) == REFUSED


async def test_a_malformed_rewrite_keeps_the_last_good_file(t: Tenancy) -> None:
    good = t.tenants_file.read_text()
    rewrite(t.tenants_file, good + f"  - name: eve\n    tokens: [{ALICE}]\n    bogus: [\n")

    async def warned() -> bool:
        assert "version" in body_of(await t["alice"].get("/info"))
        return "tenants file refused; keeping the last good one" in t.stack.log("gateway")

    await poll(warned)
    assert "version" in body_of(await t["alice"].get("/info"))
    assert "version" in body_of(await t["ops"].get("/info"))
    assert body_of(await t["doomed"].get("/info")) == REFUSED
    assert ALICE not in t.stack.log("gateway")
    rewrite(t.tenants_file, good)
