"""Retention (NodeODM ``cleanupTasksAfter`` / ``cleanupUploadsAfter``), end to end.

A stack of its own with retention of one minute and a sweep every 0.2 s. Instead of waiting a
minute, a test moves a record's clock back (``finished_at_ms``, ``active_at_ms``,
``orphan_at_ms``): the watcher's sweep compares those with its own clock.

Covers: a completed, a failed and a canceled task past retention are removed as /task/remove
removes them — task document, events, S3 prefix (inputs and outputs) and run directory gone,
/task/list without them, /task/{uuid}/info "not found" — while a task still running (however
old) and a task finished just now keep everything; a finished run's directory is emptied down to
the watcher's small files; an abandoned chunked upload is deleted (S3 objects and records, its
uuid no longer takes files) while an active one is kept and still commits; a file that reached
S3 after its task had been removed (a chunk racing a commit and a remove) is deleted once its
orphaned name record expires; removing a task deletes its webhook delivery records and no one
else's (store level); stalled-removal resumption (store level); tombstones forgotten after
their keep, the uuid free again, and their TTL index following the setting (store level).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import inspect
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from pymongo import AsyncMongoClient

from scaleodm.common import localruns
from scaleodm.common.contracts import commands, events
from scaleodm.common.contracts.ids import TaskId, run_name
from scaleodm.common.store import retention
from scaleodm.common.store.deliveries import DeliveryStore
from scaleodm.common.store.tasks import TaskStore
from scaleodm.common.store.uploads import UploadNotFoundError, UploadStore
from scaleodm.watcher import retention as sweeping
from tests.harness import api, data, servers
from tests.harness.stack import Stack, running_stack

pytestmark = pytest.mark.integration

AGED_MS = 5 * 60 * 1000  # well past the one-minute retention


@pytest.fixture(scope="module")
def retention_stack(
    tmp_path_factory: pytest.TempPathFactory, mongo_url: str, s3: servers.S3Endpoint
) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("retention")
    with servers.nats_server(tmp / "nats") as nats:
        own = Stack(tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                    database=f"t_{uuid.uuid4().hex[:12]}", extra_env={
                        "SCALEODM_TEST_ENGINE_SECONDS": "1",
                        "SCALEODM_CLEANUP_TASKS_AFTER_MIN": "1",
                        "SCALEODM_CLEANUP_UPLOADS_AFTER_MIN": "1",
                        "SCALEODM_CLEANUP_INTERVAL_S": "0.2",
                    })
        with running_stack(own, services=("gateway", "scheduler", "watcher")) as running:
            yield running


@pytest.fixture
async def gw(retention_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=retention_stack.gateway_url, timeout=30) as c:
        yield c


@pytest.fixture
async def db(retention_stack: Stack) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        retention_stack.mongo_url, tz_aware=True)
    try:
        yield client[retention_stack.database]
    finally:
        await client.close()


@pytest.fixture
def silent_zipurl() -> Iterator[str]:
    """A zipurl whose server accepts the connection and never answers: a run fetching it stays
    running (until the stack kills its runner)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/images.zip"
    server.close()
    for conn in held:
        conn.close()


async def _wait(check: Callable[[], Any], what: str, timeout_s: float = 20.0) -> None:
    """Until ``check()`` (a value or an awaitable of one) is true."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.1)


def _ago_ms(ms: int) -> int:
    return int(time.time() * 1000) - ms


async def _footprint(stack: Stack, db: Any, task_id: str) -> dict[str, Any]:
    return {
        "task": await db["tasks"].count_documents({"_id": task_id}),
        "events": await db["events"].count_documents({"task_id": task_id}),
        "objects": stack.s3_keys(f"tasks/{task_id}/"),
        "run_dir": (stack.runs_dir / run_name(task_id, 1)).exists(),
    }


async def test_expired_tasks_are_removed_and_nothing_else(
    retention_stack: Stack, gw: httpx.AsyncClient, db: Any, silent_zipurl: str
) -> None:
    images = [(n, data.JPEG) for n in data.image_names(2)]
    completed = (await api.create(gw, files=images))["uuid"]
    failed = (await api.create(gw, files=[*images, ("odm-test-engine-fail-1.jpg", data.JPEG)]))
    failed = failed["uuid"]
    running = (await api.create(gw, zipurl=silent_zipurl))["uuid"]
    canceled = (await api.create(gw, zipurl=silent_zipurl))["uuid"]
    await api.poll_until(gw, canceled, api.status_is(20))
    assert (await gw.post("/task/cancel", data={"uuid": canceled})).json() == {"success": True}
    fresh = (await api.create(gw, files=images))["uuid"]
    for task_id, code in ((completed, 40), (failed, 30), (running, 20), (canceled, 50),
                          (fresh, 40)):
        await api.poll_until(gw, task_id, api.status_is(code), timeout_s=30)

    # A finished run keeps only the watcher's files; the project and all.zip are in S3.
    run_dir = retention_stack.runs_dir / run_name(completed, 1)
    await _wait(lambda: not (run_dir / localruns.WORK_DIR).exists(), "work dir emptied")
    assert {p.name for p in run_dir.iterdir()} <= localruns.KEPT_FILES
    assert (run_dir / localruns.CONSOLE_FILE).exists()
    assert f"tasks/{completed}/outputs/all.zip" in retention_stack.s3_keys(f"tasks/{completed}/")

    kept = {t: await _footprint(retention_stack, db, t) for t in (running, fresh)}
    assert all(k["task"] and k["events"] and k["run_dir"] for k in kept.values())
    assert kept[fresh]["objects"]  # inputs and outputs (the running one fetches a zipurl)
    expired = (completed, failed, canceled)
    await db["tasks"].update_many({"_id": {"$in": list(expired)}},
                                  {"$set": {"finished_at_ms": _ago_ms(AGED_MS)}})
    # However old, a running task is not finished: it stays.
    await db["tasks"].update_one({"_id": running}, {"$set": {
        "started_at_ms": _ago_ms(AGED_MS), "date_created_ms": _ago_ms(AGED_MS)}})

    async def gone() -> bool:
        prints = [await _footprint(retention_stack, db, t) for t in expired]
        return all(p == {"task": 0, "events": 0, "objects": [], "run_dir": False}
                   for p in prints)

    await _wait(gone, "expired tasks removed with their data")
    for task_id in expired:
        assert (await gw.get(f"/task/{task_id}/info")).json() == {
            "error": f"{task_id} not found"}
    listed = {t["uuid"] for t in (await gw.get("/task/list")).json()}
    assert listed >= {running, fresh} and not listed & set(expired)
    for task_id, before in kept.items():
        after = await _footprint(retention_stack, db, task_id)
        assert after["task"] == 1 and after["run_dir"]
        assert after["events"] >= before["events"]
        assert set(after["objects"]) >= set(before["objects"])
    assert (await api.info(gw, running))["status"]["code"] == 20
    assert (await api.info(gw, fresh))["status"]["code"] == 40


async def _init(gw: httpx.AsyncClient) -> str:
    resp = await gw.post("/task/new/init", files=api.form(name="upload"))
    upload_id: str = resp.json()["uuid"]
    return upload_id


async def _upload(gw: httpx.AsyncClient, upload_id: str, *names: str) -> dict[str, Any]:
    resp = await gw.post(f"/task/new/upload/{upload_id}",
                         files=[("images", (n, data.JPEG, "image/jpeg")) for n in names])
    body: dict[str, Any] = resp.json()
    return body


async def test_abandoned_uploads_are_deleted_active_ones_kept(
    retention_stack: Stack, gw: httpx.AsyncClient, db: Any
) -> None:
    abandoned, active = await _init(gw), await _init(gw)
    for upload_id in (abandoned, active):
        assert await _upload(gw, upload_id, *data.image_names(2)) == {"success": True}
    assert len(retention_stack.s3_keys(f"tasks/{abandoned}/inputs/")) == 2
    await db["upload_sessions"].update_one({"_id": abandoned},
                                           {"$set": {"active_at_ms": _ago_ms(AGED_MS)}})

    async def reaped() -> bool:
        return (not retention_stack.s3_keys(f"tasks/{abandoned}/")
                and await db["upload_sessions"].count_documents({"_id": abandoned}) == 0
                and await db["upload_names"].count_documents({"upload_id": abandoned}) == 0)

    await _wait(reaped, "abandoned upload deleted")
    assert await _upload(gw, abandoned, "late.jpg") == {"error": "Invalid uuid (not found)"}
    assert not retention_stack.s3_keys(f"tasks/{abandoned}/")
    assert (await gw.post(f"/task/new/commit/{abandoned}")).json() == {
        "error": "Invalid uuid (not found)"}

    assert len(retention_stack.s3_keys(f"tasks/{active}/inputs/")) == 2
    assert (await gw.post(f"/task/new/commit/{active}")).json() == {"uuid": active}
    await api.poll_until(gw, active, api.status_is(40), timeout_s=30)


async def test_a_file_arriving_after_its_task_was_removed_is_deleted(
    retention_stack: Stack, gw: httpx.AsyncClient, db: Any
) -> None:
    task_id = await _init(gw)
    await _upload(gw, task_id, "a.jpg")
    assert (await gw.post(f"/task/new/commit/{task_id}")).json() == {"uuid": task_id}
    await api.poll_until(gw, task_id, api.status_is(40), timeout_s=30)
    assert (await gw.post("/task/remove", data={"uuid": task_id})).json() == {"success": True}
    await _wait(lambda: _gone(retention_stack, db, task_id), "task removed")

    # The chunk request that checked the upload open before the commit, only now storing its
    # file: its name claim finds the upload closed (the gateway's own order of calls).
    uploads = UploadStore(db)
    name = await uploads.claim_name(task_id, "late.jpg", lambda n: f"_{n}")
    key = f"tasks/{task_id}/inputs/{name}"
    s3 = boto3.client("s3", endpoint_url=retention_stack.s3.url,
                      aws_access_key_id=retention_stack.s3.access_key,
                      aws_secret_access_key=retention_stack.s3.secret_key,
                      region_name=retention_stack.s3.region)
    s3.put_object(Bucket=retention_stack.bucket, Key=key, Body=data.JPEG)
    await uploads.mark_stored(task_id, name, len(data.JPEG))
    record = await db["upload_names"].find_one({"_id": f"{task_id}/{name}"})
    assert record is not None and record["orphan_at_ms"] is not None

    await asyncio.sleep(0.6)  # several sweeps: a fresh orphan is left alone
    assert retention_stack.s3_keys(f"tasks/{task_id}/") == [key]
    await db["upload_names"].update_one({"_id": record["_id"]},
                                        {"$set": {"orphan_at_ms": _ago_ms(AGED_MS)}})

    async def deleted() -> bool:
        return (not retention_stack.s3_keys(f"tasks/{task_id}/")
                and await db["upload_names"].count_documents({"upload_id": task_id}) == 0)

    await _wait(deleted, "late file deleted")


async def _gone(stack: Stack, db: Any, task_id: str) -> bool:
    return await _footprint(stack, db, task_id) == {
        "task": 0, "events": 0, "objects": [], "run_dir": False}


# -- the store's retention queries, on every wire server ------------------------------------


async def _task(store: TaskStore, *evs: Callable[[str], events.TaskEvent],
                finished_at_ms: int | None = None) -> str:
    task_id = str(uuid.uuid4())
    await store.create_task({"_id": task_id, "name": "t", "date_created_ms": 1, "options": []},
                            events.new(events.TaskQueued, task_id, 1))
    for make in evs:
        await store.apply_event(make(task_id))
    if finished_at_ms is not None:
        await store.tasks.update_one({"_id": task_id}, {"$set": {"finished_at_ms": finished_at_ms}})
    return task_id


async def test_expired_selects_finished_tasks_past_retention_only(wire_db: Any) -> None:
    store = TaskStore(wire_db)
    await store.ensure_indexes()
    await retention.ensure_indexes(store)
    run = functools.partial(events.new, events.TaskRunning, attempt=1)
    done = functools.partial(events.new, events.TaskCompleted, attempt=1)
    now_ms = _ago_ms(0)
    old_done = await _task(store, run, done, finished_at_ms=1_000)
    fail = functools.partial(events.new, events.TaskFailed, attempt=1, error_message="x")
    cancel = functools.partial(events.new, events.TaskCanceled, attempt=1)
    old_failed = await _task(store, fail, finished_at_ms=2_000)
    old_canceled = await _task(store, cancel, finished_at_ms=3_000)
    await _task(store, run, done)  # finished just now
    await _task(store, run)  # running, however old
    await _task(store, run, done, functools.partial(events.new, events.TaskRemoved, attempt=1),
                finished_at_ms=500)  # removed already

    before = now_ms - 60_000
    found = await retention.expired(store, before, 10)
    assert found == [retention.TaskRef(t, 1) for t in (old_done, old_failed, old_canceled)]
    assert await retention.expired(store, before, 2) == found[:2]
    assert await retention.still_expired(store, found[0], before)

    # a restart: the task runs again
    await store.apply_event(events.new(events.TaskQueued, old_done, 2))
    assert not await retention.still_expired(store, found[0], before)
    assert [r.task_id for r in await retention.expired(store, before, 10)] == [
        old_failed, old_canceled]


async def test_a_stalled_removal_is_resumed(wire_db: Any) -> None:
    store = TaskStore(wire_db)
    await store.ensure_indexes()
    task_id = await _task(store)
    removed = events.new(events.TaskRemoved, task_id, 1)
    await store.apply_event(removed, commands.RemoveTask(task_id=TaskId(task_id), attempt=1))
    ref = retention.TaskRef(task_id, 1)
    assert await retention.stalled_removals(store, _ago_ms(0) + 1_000, 10) == [ref]
    assert await retention.stalled_removals(store, _ago_ms(60_000), 10) == []

    assert not await retention.resume_removal(store, ref)  # not published yet: the relay's
    await store.mark_published(removed.event_id)
    assert await retention.resume_removal(store, ref)
    doc = await store.events.find_one({"_id": removed.event_id})
    assert doc is not None and not doc["published"] and doc["command"]["verb"] == "remove"

    # The scheduler deleted the log, then died before the task document: it goes now.
    await store.events.delete_many({"task_id": task_id})
    assert await retention.resume_removal(store, ref)
    assert await store.tasks.count_documents({"_id": task_id}) == 0


async def test_tombstones_are_forgotten_after_their_keep(wire_db: Any) -> None:
    store = TaskStore(wire_db)
    await store.ensure_indexes()
    old, recent = await _task(store), await _task(store)
    for task_id in (old, recent):
        await store.apply_event(events.new(events.TaskRemoved, task_id, 1))
        await store.delete_task(task_id)
    now = dt.datetime.now(dt.UTC)
    await store.tombstones.update_one(
        {"_id": old}, {"$set": {"deleted_at": now - dt.timedelta(days=2)}})

    # The watcher's sweep (tasks and uploads kept: only tombstones have a keep).
    policy = sweeping.Policy(tasks_after_s=None, uploads_after_s=None, interval_s=1.0,
                             tombstones_after_s=86_400.0)
    sweeper = sweeping.Sweeper(store, UploadStore(wire_db), emitter=None, s3=None,
                               bucket="b", policy=policy)  # neither is used by this pass
    assert (await sweeper.sweep_once(now)).tombstones == 1
    assert not await store.tombstoned(old) and await store.tombstoned(recent)
    await store.create_task({"_id": old, "name": "again", "date_created_ms": 1, "options": []},
                            events.new(events.TaskQueued, old, 1))  # its uuid is free again
    assert (await store.get_task(old) or {}).get("name") == "again"


async def test_the_tombstone_ttl_index_follows_the_setting(wire_db: Any) -> None:
    """Created, changed (replaced: ``create_index`` refuses new options), dropped for
    "forever"; the sweep does not depend on it."""
    store = TaskStore(wire_db)
    await store.ensure_indexes()

    async def ttl() -> Any:
        info = await store.tombstones.index_information()
        found = [i.get("expireAfterSeconds") for i in info.values()
                 if [k for k, _ in i["key"]] == ["deleted_at"]]
        return found[0] if found else None

    await retention.ensure_tombstone_expiry(store, 86_400.0)
    assert await ttl() == 86_400
    await retention.ensure_tombstone_expiry(store, 7_200.0)
    assert await ttl() == 7_200
    await retention.ensure_tombstone_expiry(store, None)
    assert retention.TOMBSTONE_TTL_INDEX not in await store.tombstones.index_information()
    await retention.ensure_tombstone_expiry(store, None)  # nothing to drop: no error


async def test_upload_records_idle_close_and_orphans(wire_db: Any) -> None:
    uploads = UploadStore(wire_db)
    await uploads.ensure_indexes()
    upload_id = str(uuid.uuid4())
    await uploads.init(upload_id, {"name": "u"}, "default")
    assert await uploads.claim_name(upload_id, "a.jpg", lambda n: f"_{n}") == "a.jpg"
    await uploads.mark_stored(upload_id, "a.jpg", 10)
    now_ms = _ago_ms(0)
    assert await uploads.idle(now_ms - 60_000, 10) == []
    assert await uploads.idle(now_ms + 60_000, 10) == [upload_id]
    assert not await uploads.close_idle(upload_id, now_ms - 60_000)  # active: kept open
    assert await uploads.close_idle(upload_id, now_ms + 60_000)
    with pytest.raises(UploadNotFoundError):
        await uploads.get_open(upload_id, "default")

    # A chunk that checked the upload open before it closed claims its name afterwards.
    assert await uploads.claim_name(upload_id, "late.jpg", lambda n: f"_{n}") == "late.jpg"
    assert await uploads.stored_names(upload_id) == ["a.jpg"]
    await uploads.drop(upload_id)
    assert await uploads.get(upload_id) is None
    [orphan] = await uploads.orphans(now_ms + 60_000, 10)
    assert (orphan["upload_id"], orphan["name"]) == (upload_id, "late.jpg")
    assert await uploads.orphans(now_ms - 60_000, 10) == []
    await uploads.drop_orphan(orphan["_id"])
    assert await uploads.orphans(now_ms + 60_000, 10) == []


async def test_commit_keeps_the_names_of_files_still_arriving(wire_db: Any) -> None:
    uploads = UploadStore(wire_db)
    await uploads.ensure_indexes()
    upload_id = str(uuid.uuid4())
    await uploads.init(upload_id, {}, "default")
    for name in ("stored.jpg", "arriving.jpg"):
        await uploads.claim_name(upload_id, name, lambda n: f"_{n}")
    await uploads.mark_stored(upload_id, "stored.jpg", 10)
    assert await uploads.commit(upload_id, "default")
    await uploads.delete(upload_id)  # the task exists now
    assert [o["name"] for o in await uploads.orphans(_ago_ms(0) + 60_000, 10)] == [
        "arriving.jpg"]
    await uploads.mark_stored(upload_id, "arriving.jpg", 10)  # it lands after the commit
    assert await uploads.stored_names(upload_id) == []


async def test_removing_a_task_deletes_its_delivery_records_only(wire_db: Any) -> None:
    store = TaskStore(wire_db)
    deliveries = DeliveryStore(wire_db)
    gone, kept = str(uuid.uuid4()), str(uuid.uuid4())
    for task_id in (gone, kept):
        await store.create_task({"_id": task_id, "name": "t", "date_created_ms": 1,
                                 "options": []}, events.new(events.TaskQueued, task_id, 1))
        await deliveries.open(f"{task_id}:1:hook", task_id=task_id, attempt=1, url="http://h")
    await store.apply_event(events.new(events.TaskRemoved, gone, 1))
    await store.delete_task(gone)
    assert await deliveries.get(f"{gone}:1:hook") is None
    assert await deliveries.get(f"{kept}:1:hook") is not None
