"""One task id, two writers: a request never touches files that are not its own.

Attacks (or a client's careless retry): a ``/task/new`` with ``set-uuid: X`` while another
``/task/new`` with X is still streaming, or while a chunked upload X is open; a
``/task/new/commit/X`` aimed at a ``/task/new`` in flight. Before, the second request failed and
its clean-up deleted the whole ``tasks/X/inputs/`` prefix, the first writer's files included.
Now ``/task/new`` holds its id (``UploadStore.reserve``) before storing a byte, so the second
writer is refused and nothing of the first is lost. Also: the files of one request are capped
(``SCALEODM_MAX_FILES_PER_REQUEST``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import data, servers
from tests.harness.stack import Stack
from tests.security.gateway_only import gateway_only, multipart_body, s3_keys

pytestmark = pytest.mark.integration

MAX_FILES = 5


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, mongo_url: str,
            s3: servers.S3Endpoint) -> Iterator[Stack]:
    env = {"SCALEODM_MAX_FILES_PER_REQUEST": str(MAX_FILES)}
    with gateway_only(Path(tmp_path_factory.mktemp("ids")), mongo_url, s3, env) as stack:
        yield stack


@pytest.fixture
async def client(gateway: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.gateway_url, timeout=30) as c:
        yield c


def _inputs(stack: Stack, task_id: str) -> list[str]:
    return sorted(k.rsplit("/", 1)[1] for k in s3_keys(stack, f"tasks/{task_id}/inputs/"))


class _SlowCreate:
    """A ``/task/new`` whose body stops half-way until ``release()``: the id is in flight."""

    def __init__(self, client: httpx.AsyncClient, task_id: str, names: list[str]) -> None:
        body, self.ctype = multipart_body([("images", n, data.JPEG) for n in names])
        self.head, self.tail = body[: len(body) // 2], body[len(body) // 2:]
        self.gate = asyncio.Event()
        self.sent_head = asyncio.Event()
        self.task = asyncio.create_task(client.post(
            "/task/new", content=self._chunks(),
            headers={"content-type": self.ctype, "set-uuid": task_id},
        ))

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield self.head
        self.sent_head.set()
        await self.gate.wait()
        yield self.tail

    async def finish(self) -> httpx.Response:
        self.gate.set()
        return await self.task


async def _in_flight(client: httpx.AsyncClient, task_id: str, names: list[str]) -> _SlowCreate:
    slow = _SlowCreate(client, task_id, names)
    await asyncio.wait_for(slow.sent_head.wait(), 10)
    await asyncio.sleep(0.3)  # the gateway has read the head (and reserved the id)
    return slow


async def test_second_create_with_the_same_id_is_refused_and_deletes_nothing(
    gateway: Stack, client: httpx.AsyncClient
) -> None:
    task_id = str(uuid.uuid4())
    first = await _in_flight(client, task_id, ["A1.JPG", "A2.JPG"])
    body, ctype = multipart_body([("images", "B1.JPG", data.JPEG),
                                  ("options", None, b'[{"name":"primary-band","value":"{{x"}]')])
    second = await client.post("/task/new", content=body,
                               headers={"content-type": ctype, "set-uuid": task_id})
    assert second.json() == {"error": f"Invalid set-uuid: {task_id}"}
    assert (await first.finish()).json() == {"uuid": task_id}
    assert _inputs(gateway, task_id) == ["A1.JPG", "A2.JPG"]
    info = (await client.get(f"/task/{task_id}/info")).json()
    assert info["imagesCount"] == 2, info


async def test_create_cannot_take_an_open_chunked_upload(
    gateway: Stack, client: httpx.AsyncClient
) -> None:
    task_id = str(uuid.uuid4())
    init = await client.post("/task/new/init", headers={"set-uuid": task_id})
    assert init.json() == {"uuid": task_id}
    for name in ("a.jpg", "b.jpg"):
        up = await client.post(f"/task/new/upload/{task_id}",
                               files=[("images", (name, data.JPEG, "image/jpeg"))])
        assert up.json() == {"success": True}
    body, ctype = multipart_body([("images", "x.jpg", data.JPEG),
                                  ("options", None, b'[{"name":"primary-band","value":"{{x"}]')])
    taken = await client.post("/task/new", content=body,
                              headers={"content-type": ctype, "set-uuid": task_id})
    assert taken.json() == {"error": f"Invalid set-uuid: {task_id}"}
    assert _inputs(gateway, task_id) == ["a.jpg", "b.jpg"]
    assert (await client.post(f"/task/new/commit/{task_id}")).json() == {"uuid": task_id}
    assert (await client.get(f"/task/{task_id}/info")).json()["imagesCount"] == 2


async def test_commit_aimed_at_a_create_in_flight_is_refused(
    gateway: Stack, client: httpx.AsyncClient
) -> None:
    task_id = str(uuid.uuid4())
    first = await _in_flight(client, task_id, ["C1.JPG"])
    commit = await client.post(f"/task/new/commit/{task_id}")
    assert commit.json() == {"error": "Invalid uuid (not found)"}
    upload = await client.post(f"/task/new/upload/{task_id}",
                               files=[("images", ("evil.jpg", data.JPEG, "image/jpeg"))])
    assert upload.json()["error"] == "Invalid uuid (not found)"
    assert (await first.finish()).json() == {"uuid": task_id}
    assert _inputs(gateway, task_id) == ["C1.JPG"]


async def test_a_refused_create_frees_its_id(gateway: Stack, client: httpx.AsyncClient) -> None:
    task_id = str(uuid.uuid4())
    body, ctype = multipart_body([("images", "a.jpg", data.JPEG),
                                  ("options", None, b'[{"name":"primary-band","value":"{{x"}]')])
    refused = await client.post("/task/new", content=body,
                                headers={"content-type": ctype, "set-uuid": task_id})
    assert "error" in refused.json()
    assert _inputs(gateway, task_id) == []
    body, ctype = multipart_body([("images", "a.jpg", data.JPEG)])
    again = await client.post("/task/new", content=body,
                              headers={"content-type": ctype, "set-uuid": task_id})
    assert again.json() == {"uuid": task_id}


async def test_files_per_request_are_capped(gateway: Stack, client: httpx.AsyncClient) -> None:
    task_id = str(uuid.uuid4())
    body, ctype = multipart_body([("images", f"f{i}.jpg", data.JPEG)
                                  for i in range(MAX_FILES + 1)])
    refused = await client.post("/task/new", content=body,
                                headers={"content-type": ctype, "set-uuid": task_id})
    assert refused.json() == {"error": f"Too many files in one request (limit {MAX_FILES})"}
    assert _inputs(gateway, task_id) == []
