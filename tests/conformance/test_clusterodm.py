"""ClusterODM 1.5.x, unmodified, in front of the gateway with a tenant's token as its node token.

ClusterODM is not on PyPI, npm or Debian, so it cannot be installed from this repository's files:
this module runs when ``SCALEODM_TEST_CLUSTERODM_DIR`` names an installed copy (how to get one:
``docs/clusterodm.md``) and skips with that reason otherwise. ClusterODM is AGPL-licensed and
stays outside the repository.

The setting is a shared cluster's: ScaleODM is one node of a ClusterODM (as in ClusterODM's
``nodes.json``), and the node token is a **tenant's** token, not the admin one. PyODM talks to
ClusterODM only. Covered:

- ClusterODM holds the node online (it reads ``/info`` and ``/options`` with the tenant's
  token).
- PyODM → ClusterODM → ScaleODM: a task of 4 images is created (chunked upload into ClusterODM,
  then ClusterODM's single multipart ``/task/new`` with ``set-uuid``), runs to COMPLETED, its
  output and ``all.zip`` come back through ClusterODM; on the gateway the task is the tenant's
  (listed with its token, unknown to another tenant's), and ``/usage`` records its images.
- Cancel and remove through ClusterODM reach the tenant's task.
- A tenant's ``maxImages`` (``max_images: 2``) is what ClusterODM reads from ``/info`` with that
  node token: a task of 3 images is refused by ClusterODM itself ("No nodes available", its
  wording), and nothing is created on the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pyodm import Node
from pyodm.exceptions import NodeResponseError
from pyodm.types import TaskStatus

from tests.harness import data, servers
from tests.harness.stack import Stack, running_stack

CLUSTERODM_DIR = os.environ.get("SCALEODM_TEST_CLUSTERODM_DIR", "")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (CLUSTERODM_DIR and (Path(CLUSTERODM_DIR) / "node_modules").is_dir()),
        reason="ClusterODM is not installed here: set SCALEODM_TEST_CLUSTERODM_DIR to an "
        "installed copy (docs/clusterodm.md)",
    ),
]

ADMIN = "node-admin-token-0123456"
ALICE = "alice-token-0123456789"
BOB = "bob-token-abcdefghijkl"
LIMITED = "limited-token-01234567"
TENANTS = f"""
tenants:
  - name: alice
    tokens: [{ALICE}]
  - name: bob
    tokens: [{BOB}]
  - name: limited
    tokens: [{LIMITED}]
    max_images: 2
"""


@dataclass
class Cluster:
    stack: Stack
    url: str
    limited_url: str


def start_clusterodm(workdir: Path, gateway_port: int, token: str) -> tuple[subprocess.Popen[bytes],
                                                                              str]:
    """ClusterODM with one node (the gateway, ``token`` as its node token), working in
    ``workdir`` (ClusterODM keeps ``data/`` and ``tmp/`` in its working directory)."""
    source = Path(CLUSTERODM_DIR)
    (workdir / "data").mkdir(parents=True)
    (workdir / "tmp").mkdir()
    for entry in source.iterdir():  # it also reads ./package.json, ./config-default.json
        if entry.name not in ("data", "tmp"):
            (workdir / entry.name).symlink_to(entry)
    (workdir / "data" / "nodes.json").write_text(json.dumps(
        [{"hostname": "127.0.0.1", "port": str(gateway_port), "token": token}]))
    port = servers.free_port()
    log = (workdir / "clusterodm.log").open("wb")
    proc = subprocess.Popen(
        ["node", "index.js", "--port", str(port), "--admin-cli-port", "0",
         "--admin-web-port", "0", "--log-level", "info"],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    servers.wait_http(f"{url}/info", proc=proc, timeout_s=30)
    return proc, url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, mongo_url: str,
            s3: servers.S3Endpoint) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("clusterodm")
    tenants = tmp / "tenants.yaml"
    tenants.write_text(TENANTS)
    with servers.nats_server(tmp / "nats") as nats:
        stack = Stack(tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                      database=f"t_{uuid.uuid4().hex[:12]}", extra_env={
                          "SCALEODM_TOKEN": ADMIN,
                          "SCALEODM_TENANTS_FILE": str(tenants),
                          "SCALEODM_TEST_ENGINE_SECONDS": "1",
                          "SCALEODM_ADMISSION_INTERVAL_S": "0.5",
                      })
        with running_stack(stack, ("gateway", "scheduler", "watcher")):
            port = httpx.URL(stack.gateway_url).port
            assert port is not None
            procs = []
            try:
                alice_proc, url = start_clusterodm(tmp / "c-alice", port, ALICE)
                procs.append(alice_proc)
                limited_proc, limited_url = start_clusterodm(tmp / "c-limited", port, LIMITED)
                procs.append(limited_proc)
                yield Cluster(stack, url, limited_url)
            finally:
                for proc in procs:
                    servers.stop_process(proc)


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


def images(directory: Path, n: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    return [str(data.write(directory / name, data.JPEG)) for name in data.image_names(n)]


async def node_online(url: str, timeout_s: float = 30) -> dict[str, Any]:
    """ClusterODM's ``/options``: it answers with the node's options once it has read the node's
    ``/info`` (with the node token) and holds the node online, with an error before."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        while True:
            answer = (await c.get("/options")).json()
            if isinstance(answer, list) or time.monotonic() > deadline:
                return {"options": answer}
            await asyncio.sleep(0.2)


async def gateway_get(stack: Stack, path: str, token: str, **params: Any) -> Any:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=10) as c:
        return (await c.get(path, params={"token": token, **params})).json()


async def wait_status(task: Any, *codes: TaskStatus, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        info = await call(task.info)
        if info.status in codes or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.2)


async def test_a_tenant_token_behind_clusterodm_end_to_end(cluster: Cluster,
                                                           tmp_path: Path) -> None:
    online = await node_online(cluster.url)
    assert isinstance(online["options"], list), online
    assert {o["name"] for o in online["options"]} >= {"dsm", "split", "orthophoto-resolution"}

    node = Node("127.0.0.1", httpx.URL(cluster.url).port)
    task = await call(node.create_task, images(tmp_path / "in", 4),
                      {"dsm": True, "orthophoto-resolution": 5}, name="via-clusterodm")
    info = await wait_status(task, TaskStatus.COMPLETED, TaskStatus.FAILED)
    assert info.status == TaskStatus.COMPLETED, info
    assert info.images_count == 4
    assert any("ODM app finished" in line or "OpenDroneMap app finished" in line
               for line in await call(task.output)), await call(task.output)
    target = await call(task.download_zip, str(tmp_path / "out"))
    with zipfile.ZipFile(target) as z:
        assert any(n.endswith("odm_orthophoto.tif") for n in z.namelist()), z.namelist()

    # On the gateway: the task is alice's, by the uuid ClusterODM routes.
    mine = await gateway_get(cluster.stack, "/task/list", ALICE)
    assert {"uuid": task.uuid} in mine
    theirs = await gateway_get(cluster.stack, f"/task/{task.uuid}/info", BOB)
    unknown = str(uuid.uuid4())
    assert theirs == {"error": (await gateway_get(cluster.stack, f"/task/{unknown}/info", BOB))[
        "error"].replace(unknown, task.uuid)}
    assert {"uuid": task.uuid} not in await gateway_get(cluster.stack, "/task/list", BOB)
    own = await gateway_get(cluster.stack, f"/task/{task.uuid}/info", ALICE)
    assert own["uuid"] == task.uuid and own["status"]["code"] == 40
    assert own["options"][:2] == [{"name": "dsm", "value": True},
                                  {"name": "orthophoto-resolution", "value": 5}]
    deadline = time.monotonic() + 20
    while True:
        usage = await gateway_get(cluster.stack, "/usage", ALICE)
        images_used = sum(r["images"] for r in usage["tenants"])
        if images_used >= 4 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert usage["tenants"] == [{
        "tenant": "alice", "runs": 1, "outcomes": {"completed": 1, "failed": 0, "canceled": 0},
        "images": 4, "imagesSubmitted": 4, **{k: usage["tenants"][0][k] for k in (
            "wallSeconds", "coreSeconds", "gibSeconds")}}], usage

    # Cancel and remove go through ClusterODM's routing table to the tenant's task.
    long = await call(node.create_task, images(tmp_path / "in2", 2),
                      {"orthophoto-resolution": 5})
    # ClusterODM answers for a task it is still handing to the node from its own table: cancel
    # once the gateway holds the task.
    deadline = time.monotonic() + 20
    while "error" in await gateway_get(cluster.stack, f"/task/{long.uuid}/info", ALICE):
        assert time.monotonic() < deadline, "ClusterODM never handed the task to the gateway"
        await asyncio.sleep(0.05)
    await call(long.cancel)
    ended = await wait_status(long, TaskStatus.CANCELED, TaskStatus.COMPLETED)
    assert ended.status in (TaskStatus.CANCELED, TaskStatus.COMPLETED)  # a 1 s run may win
    on_gateway = await gateway_get(cluster.stack, f"/task/{long.uuid}/info", ALICE)
    assert on_gateway.get("status") == {"code": ended.status.value}, (on_gateway, ended)
    await call(long.remove)
    gone = await gateway_get(cluster.stack, f"/task/{long.uuid}/info", ALICE)
    assert "error" in gone and long.uuid in gone["error"], gone


async def test_a_tenants_max_images_refusal_reaches_pyodm(cluster: Cluster,
                                                          tmp_path: Path) -> None:
    await node_online(cluster.limited_url)
    before = await gateway_get(cluster.stack, "/task/list", LIMITED)
    node = Node("127.0.0.1", httpx.URL(cluster.limited_url).port)
    with pytest.raises(NodeResponseError) as refused:
        await call(node.create_task, images(tmp_path / "in", 3), {})
    # ClusterODM read the tenant's maxImages (2) from the node's /info and routes no task of 3
    # images there: its own wording.
    assert str(refused.value) == "No nodes available"
    assert await gateway_get(cluster.stack, "/task/list", LIMITED) == before
