"""A service that dies between two writes leaves nothing lost or stuck (found by ``task chaos``).

Each test crashes a service at the one point where its work is half done — with a failpoint
(``crash``: ``os._exit``, as a SIGKILL) or by performing the first write itself — then lets the
system recover the way it would in production: the client retries the request that was cut
off, the watcher's outbox relay publishes what was left unpublished.

Covers: the gateway dying after recording a task (or a restart's new attempt) and before
queueing its run (the relay queues it from the unpublished ``queued`` event); between the two
writes that create a task (the retry completes it, even if cut off again); after a chunked
commit closed the upload and before the task existed (a retried commit creates it); an event
recorded in the log but not yet applied to the task document when its emitter died (the relay
applies it before publishing, so the task reaches its state and its webhook is sent).
Runs on a stack of its own; the gateway is restarted with and without failpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient

from scaleodm.common.contracts import events
from scaleodm.common.store import uploads
from scaleodm.common.store.tasks import TaskStore
from tests.harness import api, data, servers
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import Stack, running_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def crash_stack(
    tmp_path_factory: pytest.TempPathFactory, mongo_url: str, s3: servers.S3Endpoint
) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("crash-windows")
    with servers.nats_server(tmp / "nats") as nats:
        own = Stack(tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                    database=f"t_{uuid.uuid4().hex[:12]}", extra_env={
                        "SCALEODM_TEST_ENGINE_SECONDS": "1"})
        with running_stack(own) as running:
            yield running


@pytest.fixture
async def gw(crash_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=crash_stack.gateway_url, timeout=30) as c:
        yield c


def _restart_gateway(stack: Stack, failpoints: str = "") -> None:
    stack.kill("gateway")  # already gone after a crash; reaps it
    extra = {"SCALEODM_FAILPOINTS": failpoints} if failpoints else None
    stack.start("gateway", extra, port=stack.ports["gateway"])


async def _cut_off(stack: Stack, request: Any) -> None:
    """``request`` dies with the gateway: no answer, the process gone."""
    with pytest.raises(httpx.TransportError):
        await request
    proc = stack.procs["gateway"]
    await asyncio.to_thread(proc.wait, 10)
    assert proc.returncode == 97, "the gateway crashed at the failpoint"


@contextlib.asynccontextmanager
async def _store(stack: Stack) -> AsyncIterator[TaskStore]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.mongo_url, tz_aware=True)
    try:
        yield TaskStore(client[stack.database])
    finally:
        await client.close()


def _zip(http_fixture: HttpFixture) -> str:
    data.write(http_fixture.root / "crash" / "three.zip", data.images_zip(3))
    return http_fixture.url("crash/three.zip")


async def test_gateway_dies_before_queueing_the_run_the_relay_queues_it(
    crash_stack: Stack, gw: httpx.AsyncClient, http_fixture: HttpFixture
) -> None:
    task_id = str(uuid.uuid4())
    _restart_gateway(crash_stack, "gateway.run.before_publish=crash")
    await _cut_off(crash_stack, gw.post("/task/new", headers={"set-uuid": task_id},
                                        files=api.form(zipurl=_zip(http_fixture))))
    _restart_gateway(crash_stack)
    retry = await gw.post("/task/new", headers={"set-uuid": task_id},
                          files=api.form(zipurl=_zip(http_fixture)))
    assert retry.json() == {"error": f"Invalid set-uuid: {task_id}"}, "the task exists"
    final = await api.poll_until(gw, task_id, api.status_is(30, 40, 50), timeout_s=30)
    assert final["status"] == {"code": 40}

    # The same for a restart's new attempt (admission may run it to 40 before the gateway is
    # back: the new attempt shows in its dateCreated and its run directory).
    first_created = final["dateCreated"]
    _restart_gateway(crash_stack, "gateway.run.before_publish=crash")
    await _cut_off(crash_stack, gw.post("/task/restart", data={"uuid": task_id}))
    _restart_gateway(crash_stack)
    final = await api.poll_until(
        gw, task_id, lambda i: i["dateCreated"] != first_created and i["status"]["code"] in (
            30, 40, 50), timeout_s=30)
    assert final["status"] == {"code": 40}
    assert sorted(p.name for p in crash_stack.runs_dir.glob(f"odm-{task_id}-*")) == [
        f"odm-{task_id}-1", f"odm-{task_id}-2"]


async def test_a_request_cut_off_while_it_held_its_uuid_is_retried_once_its_gateway_is_gone(
    crash_stack: Stack, gw: httpx.AsyncClient, http_fixture: HttpFixture
) -> None:
    """A single-request ``/task/new`` holds its ``set-uuid`` before it stores anything; its
    gateway dies before the task exists: nobody releases the hold. The client's retry takes it
    over once the dead gateway's lease has lapsed (seconds) and creates the task — it used to
    be refused as ``Invalid set-uuid`` (the task lost). While the holder lives, the hold stands."""
    task_id = str(uuid.uuid4())
    _restart_gateway(crash_stack, "gateway.new.after_reserve=crash")
    await _cut_off(crash_stack, gw.post("/task/new", headers={"set-uuid": task_id},
                                        files=api.form(zipurl=_zip(http_fixture))))
    _restart_gateway(crash_stack)
    started = time.monotonic()
    retry = await gw.post("/task/new", headers={"set-uuid": task_id},
                          files=api.form(zipurl=_zip(http_fixture)))
    took = time.monotonic() - started
    assert retry.json() == {"uuid": task_id}, retry.text
    assert took < uploads.HOLDER_TTL_S + uploads.HOLDER_RENEW_S + 2, took
    final = await api.poll_until(gw, task_id, api.status_is(30, 40, 50), timeout_s=30)
    assert final["status"] == {"code": 40}

    # A live holder (its request hangs): a second request for the uuid is refused, as soon as
    # the holder's lease is seen renewed.
    held = str(uuid.uuid4())
    _restart_gateway(crash_stack, "gateway.new.after_reserve=hang")
    hanging = asyncio.ensure_future(gw.post("/task/new", headers={"set-uuid": held},
                                            files=api.form(zipurl=_zip(http_fixture))))
    try:
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=crash_stack.gateway_url, timeout=30) as other:
            started = time.monotonic()
            second = await other.post("/task/new", headers={"set-uuid": held},
                                      files=api.form(zipurl=_zip(http_fixture)))
        assert second.json() == {"error": f"Invalid set-uuid: {held}"}
        assert time.monotonic() - started < uploads.HOLDER_RENEW_S + 2
    finally:
        hanging.cancel()
        _restart_gateway(crash_stack)


async def test_a_creation_cut_off_between_its_two_writes_is_completed_by_the_retry(
    crash_stack: Stack, gw: httpx.AsyncClient, http_fixture: HttpFixture
) -> None:
    """``create_task`` records the ``queued`` event, then inserts the task: cut off in between,
    the uuid has an event and no task. Worst case: the relay already published that orphan, and
    the retry dies too, after inserting the task and before queueing its run."""
    task_id = str(uuid.uuid4())
    async with _store(crash_stack) as store:
        await store._record(events.new(events.TaskQueued, task_id, 1))
        await store.mark_published(f"{task_id}:1:queued")
    _restart_gateway(crash_stack, "gateway.run.before_publish=crash")
    await _cut_off(crash_stack, gw.post("/task/new", headers={"set-uuid": task_id},
                                        files=api.form(zipurl=_zip(http_fixture))))
    _restart_gateway(crash_stack)
    final = await api.poll_until(gw, task_id, api.status_is(30, 40, 50), timeout_s=30)
    assert final["status"] == {"code": 40}
    async with _store(crash_stack) as store:
        seqs = [e["seq"] for e in await store.read_events(task_id)]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_gateway_dies_mid_commit_and_the_retried_commit_creates_the_task(
    crash_stack: Stack, gw: httpx.AsyncClient
) -> None:
    task_id = str(uuid.uuid4())
    _restart_gateway(crash_stack, "gateway.commit.before_submit=crash")
    init = await gw.post("/task/new/init", headers={"set-uuid": task_id},
                         files=api.form(name="mid-commit"))
    assert init.json() == {"uuid": task_id}
    for name in data.image_names(2):
        resp = await gw.post(f"/task/new/upload/{task_id}",
                             files=[("images", (name, data.JPEG, "image/jpeg"))])
        assert resp.json() == {"success": True}
    await _cut_off(crash_stack, gw.post(f"/task/new/commit/{task_id}"))
    _restart_gateway(crash_stack)
    assert (await gw.post(f"/task/new/commit/{task_id}")).json() == {"uuid": task_id}
    assert (await gw.post(f"/task/new/commit/{task_id}")).json() == {
        "error": "Invalid uuid (not found)"}, "committed once"
    final = await api.poll_until(gw, task_id, api.status_is(30, 40, 50), timeout_s=30)
    assert (final["status"], final["name"], final["imagesCount"]) == ({"code": 40},
                                                                      "mid-commit", 2)


async def test_an_event_recorded_but_not_applied_is_applied_before_it_is_published(
    crash_stack: Stack, gw: httpx.AsyncClient, http_fixture: HttpFixture
) -> None:
    """The gateway died inside ``apply_event`` of a cancel: the log has ``canceled``, the task
    document still says queued. No run exists (no command was sent), so only the relay acts."""
    task_id = str(uuid.uuid4())
    hook = f"/crash-hooks/{task_id}"
    async with _store(crash_stack) as store:
        await store.create_task({
            "_id": task_id, "name": "half applied", "date_created_ms": int(time.time() * 1000),
            "options": [], "images_count": 1, "webhook": http_fixture.url(hook),
            "skip_post_processing": False, "outputs": None, "sources": [],
            "output_prefix": f"s3://{crash_stack.bucket}/tasks/{task_id}/outputs/",
        }, events.new(events.TaskQueued, task_id, 1))
        await store.mark_published(f"{task_id}:1:queued")  # its run is not the point here
        await store._record(events.new(events.TaskCanceled, task_id, 1))  # recorded, then the crash
    final = await api.poll_until(gw, task_id, api.status_is(30, 40, 50), timeout_s=20)
    assert final["status"] == {"code": 50}
    [post] = await asyncio.to_thread(http_fixture.wait_posts, hook, 1, 20)
    assert (post.json()["uuid"], post.json()["status"]) == (task_id, {"code": 50})
