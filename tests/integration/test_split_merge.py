"""Split-merge on the cluster, end to end: a task with ``split`` whose run's ODM (the test double,
which speaks ODM's sm-cluster client protocol through PyODM) sends its submodels back to the
gateway as child tasks, run by the same stack like any task.

One stack for the module (tenants ``alice`` and ``bob``, an admin node token, capacity 6,
``SCALEODM_SPLIT__*`` set so runs reach the gateway on loopback). Covered:

- PyODM submits 40 images with ``split: 10``: the parent reaches 40 with the merged outputs in
  ``all.zip``; its run created its children through the API (each with ``parent`` set, listed
  in the parent's ``children`` while they exist, sized and run like any task), at least 2 of
  them running at once; the run removed them when done, as ODM does; the parent's SSE stream
  told each child's life (queued, running, completed, removed) as ``child`` events.
- The parent-scoped token: ``/info`` works; it creates children of its parent only, sees and
  acts on those only (the parent itself and the tenant's other tasks answer as unknown); once
  the parent has ended it is refused with NodeODM's token error; a forged or another parent's
  token is refused.
- Canceling a splitting parent mid-run leaves no child queued or running; removing a parent
  removes its children and their stored files; a child created while its parent is being
  canceled (a second gateway held between the token check and the creation by a failpoint)
  is canceled too; ``split`` that is not an integer: NodeODM's option error.
- Capacity for the parent and one child: the other children, queued past the admission wait,
  are removed and sent again by ODM ("Re-queueing"), and the split task completes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from pyodm import Node

from scaleodm.common import splitmerge
from tests.harness import api, data, servers, sse
from tests.harness.data import exif_block, jpeg
from tests.harness.stack import SPLIT_KEY, Stack, running_stack, split_env

pytestmark = pytest.mark.integration

ADMIN = "node-admin-token-0123456"
ALICE = "alice-token-0123456789"
BOB = "bob-token-abcdefghijkl"
SMALL = "small-token-0123456789"
SPLIT_SERVICES = ("gateway", "scheduler", "watcher")
TENANTS = f"""
tenants:
  - name: alice
    tokens: [{ALICE}]
  - name: bob
    tokens: [{BOB}]
  - name: small
    tokens: [{SMALL}]
    max_images: 2
"""
REFUSED = {"error": "Invalid authentication token: token does not match."}


@pytest.fixture(scope="module")
def split_stack(tmp_path_factory: pytest.TempPathFactory, mongo_url: str,
                s3: servers.S3Endpoint) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("split")
    (tmp / "tenants.yaml").write_text(TENANTS)
    port = servers.free_port()
    with servers.nats_server(tmp / "nats") as nats:
        stack = Stack(tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                      database=f"t_{uuid.uuid4().hex[:12]}", extra_env={
                          **split_env(port),
                          "SCALEODM_TOKEN": ADMIN,
                          "SCALEODM_TENANTS_FILE": str(tmp / "tenants.yaml"),
                          "SCALEODM_TEST_ENGINE_SECONDS": "3",
                          "SCALEODM_ADMISSION_INTERVAL_S": "0.5",
                          "SCALEODM_CAPACITY__MAX_ACTIVE": "6",
                          "SCALEODM_CAPACITY__CLASSES":
                              '[{"name": "any", "max_images": null, "slots": 6}]',
                          "ODM_TEST_ENGINE_RETRY_S": "0.5",
                      })
        with running_stack(stack, SPLIT_SERVICES, ports={"gateway": port}) as running:
            yield running


@pytest.fixture
async def alice(split_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=split_stack.gateway_url, params={"token": ALICE},
                                 timeout=30) as c:
        yield c


def scoped(parent: str) -> str:
    return splitmerge.scoped_token(SecretStr(SPLIT_KEY), parent)


def images(directory: Path, n: int) -> list[str]:
    """Geotagged JPEGs (ODM splits only a dataset with GPS), a few metres apart."""
    directory.mkdir(parents=True, exist_ok=True)
    return [str(data.write(directory / name, jpeg(64, 48, exif_block(
        "DJI", "FC6310", 46.8 + i * 1e-4, 7.1 + (i % 7) * 1e-4, 500.0))))
        for i, name in enumerate(data.image_names(n))]


class Family:
    """What polling a parent's info shows of its children: every child seen, and how many
    were running at once (each child's own info, read with the tenant's token)."""

    def __init__(self) -> None:
        self.children: set[str] = set()
        self.parents: dict[str, str] = {}
        self.most_running = 0
        self.statuses: dict[str, set[int]] = {}

    async def poll(self, client: httpx.AsyncClient, parent: str) -> dict[str, Any]:
        info = await api.info(client, parent)
        self.children.update(info.get("children", []))
        running = 0
        for child in list(self.children):
            child_info = await api.info(client, child)
            if "status" not in child_info:
                continue  # removed since
            self.parents[child] = child_info.get("parent", "")
            code = child_info["status"]["code"]
            self.statuses.setdefault(child, set()).add(code)
            running += code == 20
        self.most_running = max(self.most_running, running)
        return info


async def test_a_split_task_runs_its_submodels_as_children(
        split_stack: Stack, alice: httpx.AsyncClient, tmp_path: Path) -> None:
    node = Node("127.0.0.1", httpx.URL(split_stack.gateway_url).port, token=ALICE)
    task = await asyncio.to_thread(node.create_task, images(tmp_path / "in", 40),
                                   {"split": 10, "dsm": True}, name="split 40/10")
    stream = asyncio.create_task(sse.read(alice, f"/task/{task.uuid}/events", timeout_s=120))
    family = Family()
    deadline = time.monotonic() + 120
    while True:
        info = await family.poll(alice, task.uuid)
        if info["status"]["code"] in (30, 40, 50) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert info["status"]["code"] == 40, (info, split_stack.log("scheduler")[-3000:])
    # 40 images in submodels of 10: 4. ODM processes submodels itself one at a time and sends
    # others while it does (how many of each is timing): each one sent is a child.
    output = await asyncio.to_thread(task.output)
    sent = [line for line in output if "LRE: About to process" in line and "remotely" in line]
    local = [line for line in output if "LRE: About to process" in line and "locally" in line]
    assert len(sent) + len(local) == 4, output
    assert len(family.children) == len(sent) >= 2, (family.children, sent)
    assert set(family.parents.values()) == {task.uuid}, family.parents
    assert family.most_running >= 2, family.statuses
    assert all(20 in s for s in family.statuses.values()), family.statuses
    # The parent's own stream told each child's life, in order, as ``child`` events.
    told: dict[str, list[tuple[str, int | None]]] = {}
    for msg in (await stream).events:
        if msg.event == "child":
            body = msg.json()
            assert body["task_id"] == task.uuid
            told.setdefault(body["child"], []).append((body["child_kind"], body["status"]))
    assert set(told) == family.children, (told, family.children)
    for child, kinds in told.items():
        assert kinds == [("queued", 10), ("running", 20), ("completed", 40), ("removed", None)], (
            child, kinds)
    # Done: ODM removed its children (they answer as unknown), the parent lists none.
    assert info.get("children") == []
    for child in family.children:
        assert "error" in await api.info(alice, child)
    archive = tmp_path / "all.zip"
    resp = await alice.get(f"/task/{task.uuid}/download/all.zip")
    archive.write_bytes(resp.content)
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
    assert "odm_orthophoto/odm_orthophoto.tif" in names, sorted(names)
    assert "odm_dem/dsm.tif" in names, sorted(names)


async def test_the_parent_scoped_token(split_stack: Stack, alice: httpx.AsyncClient) -> None:
    parent = (await api.create(alice, files=[(n, data.JPEG) for n in data.image_names(2)],
                               options='[{"name": "split", "value": 10}]'))["uuid"]
    other = (await api.create(alice, files=[(n, data.JPEG) for n in data.image_names(1)]))[
        "uuid"]
    async with httpx.AsyncClient(base_url=split_stack.gateway_url,
                                 params={"token": scoped(parent)}, timeout=30) as sm:
        assert "maxParallelTasks" in (await sm.get("/info")).json()
        child = (await api.create(sm, files=[(n, data.JPEG) for n in data.image_names(2)],
                                  name="submodel_0000"))["uuid"]
        child_info = await api.info(sm, child)
        assert child_info["parent"] == parent
        assert (await sm.get("/task/list")).json() == [{"uuid": child}]
        # The parent itself and the tenant's other tasks: as unknown uuids.
        for task_id in (parent, other):
            assert (await sm.get(f"/task/{task_id}/info")).json() == {
                "error": f"{task_id} not found"}
            unknown = str(uuid.uuid4())
            expected = (await sm.post("/task/cancel", data={"uuid": unknown})).json()
            assert (await sm.post("/task/cancel", data={"uuid": task_id})).json() == {
                k: str(v).replace(unknown, task_id) if k == "error" else v
                for k, v in expected.items()}
        # The tenant sees the child as its own task, with its parent; another tenant does not.
        assert (await api.info(alice, child))["parent"] == parent
        parent_info = await api.info(alice, parent)
        assert child in parent_info["children"]
        async with httpx.AsyncClient(base_url=split_stack.gateway_url,
                                     params={"token": BOB}, timeout=30) as bob:
            assert "error" in (await bob.get(f"/task/{child}/info")).json()
        # Forged, truncated or another parent's tokens.
        for bad in (scoped(parent)[:-1] + ("0" if scoped(parent)[-1] != "0" else "1"),
                    scoped(parent)[:-2], scoped(str(uuid.uuid4())), f"sm.{parent}.{'0' * 64}"):
            assert (await sm.get("/info", params={"token": bad})).json() == REFUSED, bad
        # The parent ends (canceled here): the token is refused, the child is ended with it.
        assert (await alice.post("/task/cancel", data={"uuid": parent})).json() == {
            "success": True}
        assert (await sm.get("/info")).json() == REFUSED
        assert (await sm.get("/task/list")).json() == REFUSED
    ended = await api.poll_until(alice, child, api.status_is(50), timeout_s=20)
    assert ended["status"]["code"] == 50


async def test_canceling_a_splitting_parent_leaves_no_child_running(
        split_stack: Stack, alice: httpx.AsyncClient, tmp_path: Path) -> None:
    node = Node("127.0.0.1", httpx.URL(split_stack.gateway_url).port, token=ALICE)
    task = await asyncio.to_thread(node.create_task, images(tmp_path / "in", 40), {"split": 10})
    family = Family()
    deadline = time.monotonic() + 60
    while not any(20 in s for s in family.statuses.values()):
        await family.poll(alice, task.uuid)
        assert time.monotonic() < deadline, family.statuses
        await asyncio.sleep(0.05)
    await asyncio.to_thread(task.cancel)
    deadline = time.monotonic() + 30
    while True:
        await family.poll(alice, task.uuid)
        alive = []
        for child in family.children:
            info = await api.info(alice, child)
            if "status" in info and info["status"]["code"] in (10, 20):
                alive.append(child)
        if not alive or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert alive == [], alive
    assert (await api.info(alice, task.uuid))["status"]["code"] == 50
    # No runner of a child is left (the run directories of the ones not removed).
    for child in family.children:
        for rd in split_stack.runs_dir.glob(f"{child}*"):
            assert (rd / "result.json").exists() or not (rd / "runner.pid").exists(), rd


async def test_removing_a_parent_removes_its_children_and_their_outputs(
        split_stack: Stack, alice: httpx.AsyncClient) -> None:
    parent = (await api.create(alice, files=[(n, data.JPEG) for n in data.image_names(2)],
                               options='[{"name": "split", "value": 10}]'))["uuid"]
    async with httpx.AsyncClient(base_url=split_stack.gateway_url,
                                 params={"token": scoped(parent)}, timeout=30) as sm:
        child = (await api.create(sm, files=[(n, data.JPEG) for n in data.image_names(2)]))[
            "uuid"]
    # The parent (2 images: nothing to split) may end first, which cancels the child.
    await api.poll_until(alice, child, api.status_is(40, 50), timeout_s=30)
    assert split_stack.s3_keys(f"tasks/{child}/")  # its inputs (and outputs, if it ran) are stored
    assert (await alice.post("/task/remove", data={"uuid": parent})).json() == {"success": True}
    deadline = time.monotonic() + 20
    while "status" in await api.info(alice, child) or split_stack.s3_keys(f"tasks/{child}/"):
        assert time.monotonic() < deadline, "the child outlived its removed parent"
        await asyncio.sleep(0.2)


async def test_a_child_created_while_its_parent_is_canceled_is_canceled_too(
        split_stack: Stack, alice: httpx.AsyncClient) -> None:
    """The token is checked, then (a second gateway, slowed by a failpoint) the child is created
    after the parent was canceled on the first gateway: the family pass ends it."""
    parent = (await api.create(alice, files=[(n, data.JPEG) for n in data.image_names(2)],
                               options='[{"name": "split", "value": 10}]'))["uuid"]
    split_stack.spawn("gateway-2", {"SCALEODM_FAILPOINTS": "gateway.child.before_create=sleep1500"})
    try:
        split_stack.wait_ready("gateway-2")
        slow = f"http://127.0.0.1:{split_stack.ports['gateway-2']}"
        async with httpx.AsyncClient(base_url=slow, params={"token": scoped(parent)},
                                     timeout=30) as sm:
            creating = asyncio.create_task(api.create(
                sm, files=[(n, data.JPEG) for n in data.image_names(2)]))
            await asyncio.sleep(0.5)  # the token was accepted; the creation is held
            assert (await alice.post("/task/cancel", data={"uuid": parent})).json() == {
                "success": True}
            child = (await creating)["uuid"]
        seen: list[dict[str, Any]] = []
        ended = await api.poll_until(alice, child, api.status_is(30, 40, 50), timeout_s=20,
                                     seen=seen)
        assert ended["status"]["code"] == 50, seen
        assert ended["parent"] == parent
    finally:
        split_stack.kill("gateway-2")


async def test_split_must_be_an_integer(alice: httpx.AsyncClient) -> None:
    answer = (await alice.post("/task/new", files=[
        ("images", ("a.jpg", data.JPEG, "image/jpeg")),
        ("options", (None, '[{"name": "split", "value": "many"}]'))])).json()
    # NodeODM's own words for it (parseInt gives NaN), as for any integer option.
    assert answer == {"error": '[{"name":"split","error":"Invalid value NaN (out of range)"}]'}


@pytest.fixture
def tight_stack(tmp_path: Path, mongo_url: str, s3: servers.S3Endpoint) -> Iterator[Stack]:
    """Room for the parent and one child: the other children find the cluster full."""
    port = servers.free_port()
    with servers.nats_server(tmp_path / "nats") as nats:
        stack = Stack(tmp=tmp_path, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                      database=f"t_{uuid.uuid4().hex[:12]}", extra_env={
                          **split_env(port),
                          "SCALEODM_SPLIT__ADMIT_WAIT_S": "1",
                          "SCALEODM_TEST_ENGINE_SECONDS": "2",
                          "SCALEODM_ADMISSION_INTERVAL_S": "0.5",
                          "SCALEODM_CAPACITY__MAX_ACTIVE": "2",
                          "SCALEODM_CAPACITY__CLASSES":
                              '[{"name": "any", "max_images": null, "slots": 2}]',
                          "ODM_TEST_ENGINE_RETRY_S": "0.5",
                          "ODM_TEST_ENGINE_POLL_S": "0.5",
                      })
        with running_stack(stack, SPLIT_SERVICES, ports={"gateway": port}) as running:
            yield running


async def test_children_beyond_capacity_wait_and_are_sent_again(
        tight_stack: Stack, tmp_path: Path) -> None:
    """A child that finds no slot stays queued past the admission wait: ODM takes the full node
    as such (it removes the child and sends it again later, without counting a retry), and the
    split task still completes, never more runs at once than the capacity."""
    node = Node("127.0.0.1", httpx.URL(tight_stack.gateway_url).port)
    task = await asyncio.to_thread(node.create_task, images(tmp_path / "in", 20), {"split": 5})
    async with httpx.AsyncClient(base_url=tight_stack.gateway_url, timeout=30) as c:
        family = Family()
        deadline = time.monotonic() + 150
        while True:
            info = await family.poll(c, task.uuid)
            if info["status"]["code"] in (30, 40, 50) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert info["status"]["code"] == 40, info
        output = (await api.info(c, task.uuid, with_output=0))["output"]
    assert any("Re-queueing" in line for line in output), output
    assert family.most_running <= 1, family.statuses  # the parent holds the other slot


async def test_a_seed_zip_is_no_image(split_stack: Stack) -> None:
    """``maxImages`` counts images: a submodel's ``seed.zip`` is not one (NodeODM extracts it
    before counting), on ``/task/new`` and on a chunked commit."""
    seed = data.zip_bytes({"opensfm/camera_models.json": b"{}"})
    two = [("images", (n, data.JPEG, "image/jpeg")) for n in data.image_names(2)]
    async with httpx.AsyncClient(base_url=split_stack.gateway_url, params={"token": SMALL},
                                 timeout=30) as small:
        answer = (await small.post("/task/new", files=[
            *two, ("images", ("seed.zip", seed, "application/zip"))])).json()
        assert "uuid" in answer, answer
        assert (await api.info(small, answer["uuid"]))["imagesCount"] == 2
        three = [("images", (n, data.JPEG, "image/jpeg")) for n in data.image_names(3)]
        assert (await small.post("/task/new", files=three)).json() == {
            "error": "3 images uploaded, but this node can only process up to 2."}
        upload = (await small.post("/task/new/init", files={"name": (None, "chunked")})).json()
        for name, body in [*[(n, data.JPEG) for n in data.image_names(2)], ("seed.zip", seed)]:
            sent = await small.post(f"/task/new/upload/{upload['uuid']}",
                                    files={"images": (name, body, "application/octet-stream")})
            assert sent.json() == {"success": True}, sent.text
        assert (await small.post(f"/task/new/commit/{upload['uuid']}")).json() == {
            "uuid": upload["uuid"]}
        committed = await api.poll_until(small, upload["uuid"], api.status_is(20, 30, 40))
        assert committed["status"]["code"] != 30, committed
