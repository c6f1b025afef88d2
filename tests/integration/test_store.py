"""The MongoDB task store (``TaskStore``, ``DeliveryStore``) against real wire servers.

Every test runs on both stand-ins — nx-27017 (fast, lenient) and mongoeco (strict like MongoDB) —
or twice on a real MongoDB when ``SCALEODM_TEST_MONGODB_URL`` is set; each test gets a fresh
database.

Covered: task creation and duplicate uuids; idempotent ``apply_event`` (same seq, one log entry);
gap-free ``seq`` allocation under concurrent writers; the lifecycle projection (monotonic
progress, terminal states stick, ``canceled`` wins); restarts (attempt + 1 only from a terminal
state, old-attempt events ignored afterwards); console output slices per attempt; removal and
physical deletion (only of removed tasks) and the tombstone it leaves (the uuid refused
afterwards, also to a creation racing the deletion); the outbox
(``unpublished_events``/``mark_published``, commands recorded in the same document as the event
that causes them, never for an ignored event, given again to a retried creation;
``run_command``); ``count_active``; leases (one holder until expiry or release); webhook
delivery records; BSON types surviving updates (booleans set by ``$set``, subdocuments appended
by ``$push``) — two known nx-27017 bugs, expected to fail there (strict
xfail, so a fixed nx shows up); the event-log reads of the SSE routes (``read_events`` pages
and ranges, ``event_seq``, ``terminal_seq``).

Left out: the pure transition table (``tests/unit/test_projection.py``), ``open_store`` settings
handling, and anything about NATS or the services.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from scaleodm.common import clock
from scaleodm.common.contracts import commands, events
from scaleodm.common.contracts.ids import TaskId
from scaleodm.common.store.deliveries import DeliveryStore
from scaleodm.common.store.leases import Leases
from scaleodm.common.store.tasks import Outcome, TaskExistsError, TaskStore, run_command
from tests.harness import servers

pytestmark = pytest.mark.integration

Doc = dict[str, Any]


@dataclass(frozen=True)
class Server:
    kind: str  # "nx", "mongoeco", or "mongodb" (SCALEODM_TEST_MONGODB_URL)
    url: str


@pytest.fixture(scope="module", params=list(servers.MONGO_KINDS))
def store_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Server]:
    """A MongoDB wire server of the kind named by the param (or the real one from the env)."""
    kind: str = request.param
    if os.environ.get("SCALEODM_TEST_MONGODB_URL"):
        kind = "mongodb"
    elif kind == "mongoeco":
        reason = servers.mongoeco_available()
        if reason is not None:
            pytest.skip(reason)
    with servers.mongo_server(kind, tmp_path_factory.mktemp(f"store-{kind}")) as url:
        yield Server(kind, url)


def _known_nx_bug(request: pytest.FixtureRequest, server: Server, reason: str) -> None:
    """Expect this test to fail on nx-27017 only (strict: it must start passing once fixed)."""
    if server.kind == "nx":
        request.applymarker(pytest.mark.xfail(reason=f"nx-27017 bug: {reason}", strict=True))


@pytest.fixture
async def client(store_server: Server) -> AsyncIterator[AsyncMongoClient[Doc]]:
    c: AsyncMongoClient[Doc] = AsyncMongoClient(store_server.url, tz_aware=True,
                                                serverSelectionTimeoutMS=5000)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def db_name(client: AsyncMongoClient[Doc]) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    await client.drop_database(name)  # keeps the in-memory servers small (mongoeco slows down)


@pytest.fixture
async def store(client: AsyncMongoClient[Doc], db_name: str) -> TaskStore:
    s = TaskStore(client[db_name])
    await s.ensure_indexes()
    return s


@pytest.fixture
async def deliveries(client: AsyncMongoClient[Doc], db_name: str) -> DeliveryStore:
    d = DeliveryStore(client[db_name])
    await d.ensure_indexes()
    return d


def _tid() -> str:
    return str(uuid.uuid4())


async def _create(store: TaskStore, task_id: str | None = None, **extra: Any) -> str:
    task_id = task_id or _tid()
    doc = {"_id": task_id, "name": "t", "date_created_ms": 1_000, "options": [], **extra}
    res = await store.create_task(doc, events.new(events.TaskQueued, task_id, 1))
    assert res.outcome is Outcome.APPLIED
    assert res.seq == 1
    return task_id


async def _task(store: TaskStore, task_id: str) -> Doc:
    doc = await store.get_task(task_id, include_removed=True)
    assert doc is not None
    return doc


async def _n_events(store: TaskStore, task_id: str) -> int:
    return await store.events.count_documents({"task_id": task_id})


# -- tasks -----------------------------------------------------------------------------------


async def test_create_then_get_and_duplicate_create_fails(store: TaskStore) -> None:
    task_id = await _create(store, name="first")
    doc = await store.get_task(task_id)
    assert doc is not None
    assert doc["_id"] == task_id
    assert doc["name"] == "first"
    assert (doc["attempt"], doc["state"], doc["progress"], doc["output_lines"]) == (
        1, "queued", 0.0, 0
    )
    assert doc["removed"] is False
    assert doc["created_at"].tzinfo is not None

    with pytest.raises(TaskExistsError):
        await store.create_task(
            {"_id": task_id, "name": "second"}, events.new(events.TaskQueued, task_id, 1)
        )
    assert (await _task(store, task_id))["name"] == "first"
    assert await store.tasks.count_documents({"_id": task_id}) == 1
    assert await _n_events(store, task_id) == 1
    assert await store.get_task(_tid()) is None


async def test_a_task_refused_at_creation_is_failed_at_progress_0(store: TaskStore) -> None:
    """Too many images at commit (NodeODM §3.5): a failure while initializing, before any run,
    keeps progress 0 as NodeODM's does (``Task.initialize`` sets the status only); the task
    document carries the seq of its last event (the gateway's read model starts from it)."""
    task_id = _tid()
    await store.create_task(
        {"_id": task_id, "name": "t", "date_created_ms": 1, "options": []},
        events.new(events.TaskQueued, task_id, 1),
        failed=events.new(events.TaskFailed, task_id, 1, error_message="Too many images"))
    doc = await store.get_task(task_id)
    assert doc is not None
    assert (doc["state"], doc["progress"], doc["error_message"], doc["seq"]) == (
        "failed", 0.0, "Too many images", 2)


async def test_apply_event_twice_is_a_duplicate_with_the_same_seq(store: TaskStore) -> None:
    task_id = await _create(store)
    ev = events.new(events.TaskRunning, task_id, 1)
    first = await store.apply_event(ev)
    second = await store.apply_event(ev)
    assert first.outcome is Outcome.APPLIED
    assert first.seq == 2
    assert first.changed is True
    assert second.outcome is Outcome.DUPLICATE
    assert second.seq == first.seq
    assert second.changed is False
    assert await store.events.count_documents({"_id": ev.event_id}) == 1
    assert await _n_events(store, task_id) == 2

    # The same after the state moved on (the plan is None by then): still recognised.
    done = await store.apply_event(events.new(events.TaskCompleted, task_id, 1))
    assert done.outcome is Outcome.APPLIED
    again = await store.apply_event(ev)
    assert (again.outcome, again.seq) == (Outcome.DUPLICATE, 2)
    assert await _n_events(store, task_id) == 3


async def test_unknown_task_is_ignored(store: TaskStore) -> None:
    task_id = _tid()
    res = await store.apply_event(events.new(events.TaskRunning, task_id, 1))
    assert res.outcome is Outcome.IGNORED
    assert res.recorded is False
    assert await _n_events(store, task_id) == 0


async def test_concurrent_writers_get_gap_free_unique_seqs(store: TaskStore) -> None:
    task_id = await _create(store)
    n = 30
    evs = [events.new(
        events.TaskOutput, task_id, 1, line_start=i, lines=[f"line {i}"]
    ) for i in range(n)]
    results = await asyncio.gather(*(store.apply_event(ev) for ev in evs))
    assert all(r.outcome is Outcome.APPLIED for r in results), results
    assert sorted(r.seq for r in results if r.seq is not None) == list(range(2, n + 2))
    seqs = [d["seq"] async for d in store.events.find({"task_id": task_id}, {"seq": 1})]
    assert sorted(seqs) == list(range(1, n + 2))
    assert (await _task(store, task_id))["output_lines"] == n
    assert await store.read_output(task_id, 1, 0, n) == [f"line {i}" for i in range(n)]


# -- lifecycle -------------------------------------------------------------------------------


async def test_lifecycle_progress_rises_terminal_sticks_cancel_wins(store: TaskStore) -> None:
    task_id = await _create(store)
    assert (await store.apply_event(events.new(events.TaskRunning, task_id, 1))).changed
    doc = await _task(store, task_id)
    assert doc["state"] == "running"
    assert isinstance(doc["started_at_ms"], int)

    await store.apply_event(events.new(events.TaskProgressed, task_id, 1, key="a", progress=50))
    lower = await store.apply_event(events.new(
        events.TaskProgressed, task_id, 1, key="b", progress=30
    ))
    assert lower.outcome is Outcome.APPLIED  # recorded in the log, but cannot lower progress
    assert (await _task(store, task_id))["progress"] == 50

    done = await store.apply_event(events.new(events.TaskCompleted, task_id, 1))
    assert (done.outcome, done.changed) == (Outcome.APPLIED, True)
    doc = await _task(store, task_id)
    assert doc["state"] == "completed"
    assert doc["progress"] == 100
    assert isinstance(doc["finished_at_ms"], int)
    finished = doc["finished_at_ms"]

    late_fail = await store.apply_event(events.new(
        events.TaskFailed, task_id, 1, error_message="boom"
    ))
    assert late_fail.outcome is Outcome.IGNORED
    late_progress = await store.apply_event(events.new(
        events.TaskProgressed, task_id, 1, key="c", progress=10
    ))
    assert late_progress.outcome is Outcome.IGNORED
    doc = await _task(store, task_id)
    assert (doc["state"], doc["error_message"], doc["progress"]) == ("completed", None, 100)
    assert await store.event_seen(events.new(
        events.TaskFailed, task_id, 1, error_message="boom"
    ).event_id) is False

    cancel = await store.apply_event(events.new(events.TaskCanceled, task_id, 1))
    assert (cancel.outcome, cancel.changed) == (Outcome.APPLIED, True)
    doc = await _task(store, task_id)
    assert doc["state"] == "canceled"
    assert doc["finished_at_ms"] >= finished
    kinds = [d["body"]["kind"] for d in await store.read_events(task_id)]
    assert kinds == ["queued", "running", "progress", "progress", "completed", "canceled"]


async def test_canceled_then_failed_stays_canceled(store: TaskStore) -> None:
    task_id = await _create(store)
    await store.apply_event(events.new(events.TaskRunning, task_id, 1))
    assert (await store.apply_event(events.new(events.TaskCanceled, task_id, 1))).changed
    res = await store.apply_event(events.new(events.TaskFailed, task_id, 1, error_message="killed"))
    assert res.outcome is Outcome.IGNORED
    doc = await _task(store, task_id)
    assert doc["state"] == "canceled"
    assert doc["error_message"] is None
    assert doc["progress"] == 100  # a canceled run ends at 100 (NodeODM §4.4)


async def test_restart_opens_next_attempt_and_ignores_the_old_one(store: TaskStore) -> None:
    task_id = await _create(store)
    for ev in (
        events.new(events.TaskRunning, task_id, 1),
        events.new(events.TaskProgressed, task_id, 1, key="a", progress=70),
        events.new(events.TaskOutput, task_id, 1, line_start=0, lines=["x", "y"]),
        events.new(events.TaskCompleted, task_id, 1),
    ):
        await store.apply_event(ev)

    opts = [{"name": "dsm", "value": True}]
    res = await store.apply_event(
        events.new(events.TaskQueued, task_id, 2, options=opts, date_created_ms=2_000)
    )
    assert (res.outcome, res.changed) == (Outcome.APPLIED, True)
    doc = await _task(store, task_id)
    assert (doc["attempt"], doc["state"], doc["progress"], doc["output_lines"]) == (
        2, "queued", 0, 0
    )
    assert doc["options"] == opts
    assert doc["date_created_ms"] == 2_000
    assert doc["started_at_ms"] is None
    assert doc["finished_at_ms"] is None
    n_events = await _n_events(store, task_id)

    for stale in (
        events.new(events.TaskRunning, task_id, 1),  # a redelivery: recorded before, so a duplicate
        events.new(events.TaskProgressed, task_id, 1, key="late", progress=90),
        events.new(events.TaskOutput, task_id, 1, line_start=2, lines=["z"]),
        events.new(events.TaskFailed, task_id, 1, error_message="late"),
        events.new(events.TaskCanceled, task_id, 1),
    ):
        out = await store.apply_event(stale)
        assert out.outcome in (Outcome.IGNORED, Outcome.DUPLICATE), stale.kind
        assert out.changed is False, stale.kind
    assert await store.event_seen(events.new(events.TaskCanceled, task_id, 1).event_id) is False
    assert await _n_events(store, task_id) == n_events
    assert await _task(store, task_id) == doc

    # Attempt 2 runs normally.
    await store.apply_event(events.new(events.TaskRunning, task_id, 2))
    assert (await _task(store, task_id))["state"] == "running"


async def test_restart_while_running_is_ignored(store: TaskStore) -> None:
    task_id = await _create(store)
    await store.apply_event(events.new(events.TaskRunning, task_id, 1))
    res = await store.apply_event(events.new(
        events.TaskQueued, task_id, 2, options=[{"name": "x", "value": 1}]
    ))
    assert res.outcome is Outcome.IGNORED
    doc = await _task(store, task_id)
    assert (doc["attempt"], doc["state"], doc["options"]) == (1, "running", [])
    assert await store.event_seen(events.new(events.TaskQueued, task_id, 2).event_id) is False


async def test_event_log_reads_for_streams(store: TaskStore) -> None:
    """What the SSE routes read: pages, a range, a seq by event id, an attempt's terminal seq."""
    task_id = await _create(store)
    for ev in (
        events.new(events.TaskRunning, task_id, 1),
        events.new(events.TaskProgressed, task_id, 1, key="a", progress=50),
        events.new(events.TaskCompleted, task_id, 1),
        # cancel turns 40 into 50: recorded after the first terminal
        events.new(events.TaskCanceled, task_id, 1),
        events.new(events.TaskQueued, task_id, 2),
        events.new(events.TaskRunning, task_id, 2),
    ):
        assert (await store.apply_event(ev)).outcome is Outcome.APPLIED, ev.kind

    async def seqs(after: int = 0, **kw: Any) -> list[int]:
        return [d["seq"] for d in await store.read_events(task_id, after, **kw)]

    assert await seqs() == [1, 2, 3, 4, 5, 6, 7]
    assert await seqs(2, limit=2) == [3, 4]
    assert await seqs(2, through_seq=4) == [3, 4]
    assert await seqs(2, through_seq=6, limit=3) == [3, 4, 5]
    assert await seqs(6, through_seq=4) == []
    assert await store.event_seq(events.new(events.TaskCompleted, task_id, 1).event_id) == 4
    assert await store.event_seq(events.new(
        events.TaskFailed, task_id, 1, error_message="x"
    ).event_id) is None
    assert await store.terminal_seq(task_id, 1) == 4
    assert await store.terminal_seq(task_id, 2) is None


# -- output ----------------------------------------------------------------------------------


async def test_output_slices_per_attempt(store: TaskStore) -> None:
    task_id = await _create(store)
    await store.apply_event(events.new(events.TaskRunning, task_id, 1))
    # Recorded out of order on purpose: slices are ordered by line_start, not by seq.
    await store.apply_event(events.new(
        events.TaskOutput, task_id, 1, line_start=3, lines=["l3", "l4"]
    ))
    await store.apply_event(events.new(
        events.TaskOutput, task_id, 1, line_start=0, lines=["l0", "l1", "l2"]
    ))
    assert await store.output_end(task_id, 1) == 5
    assert (await _task(store, task_id))["output_lines"] == 5
    assert await store.read_output(task_id, 1, 0, 5) == ["l0", "l1", "l2", "l3", "l4"]
    assert await store.read_output(task_id, 1, 2, 5) == ["l2", "l3", "l4"]
    assert await store.read_output(task_id, 1, 4, 5) == ["l4"]
    assert await store.read_output(task_id, 1, 1, 4) == ["l1", "l2", "l3"]
    assert await store.read_output(task_id, 1, 5, 5) == []

    await store.apply_event(events.new(events.TaskCompleted, task_id, 1))
    await store.apply_event(events.new(events.TaskQueued, task_id, 2))
    assert await store.output_end(task_id, 2) == 0
    assert await store.read_output(task_id, 2, 0, 5) == []
    await store.apply_event(events.new(events.TaskOutput, task_id, 2, line_start=0, lines=["n0"]))
    assert await store.read_output(task_id, 2, 0, 1) == ["n0"]
    assert await store.output_end(task_id, 2) == 1
    assert await store.read_output(task_id, 1, 0, 5) == ["l0", "l1", "l2", "l3", "l4"]


# -- removal, outbox, counts -----------------------------------------------------------------


async def test_removed_hides_the_task_and_delete_removes_everything(store: TaskStore) -> None:
    kept = await _create(store)
    gone = await _create(store)
    await store.apply_event(events.new(events.TaskOutput, gone, 1, line_start=0, lines=["a"]))
    assert await store.count_active() == 2
    assert await store.list_task_ids() == [kept, gone]

    res = await store.apply_event(events.new(events.TaskRemoved, gone, 1))
    assert (res.outcome, res.changed) == (Outcome.APPLIED, True)
    assert await store.get_task(gone) is None
    hidden = await store.get_task(gone, include_removed=True)
    assert hidden is not None
    assert hidden["removed"]  # exactly True: test_updated_flags_stay_booleans
    assert isinstance(hidden["removed_at_ms"], int)
    assert await store.list_task_ids() == [kept]
    assert await store.count_active() == 1
    late = await store.apply_event(events.new(events.TaskRunning, gone, 1))
    assert late.outcome is Outcome.IGNORED

    await store.delete_task(gone)
    assert await store.get_task(gone, include_removed=True) is None
    assert await _n_events(store, gone) == 0
    assert await store.get_task(kept) is not None
    assert await _n_events(store, kept) == 1


async def test_delete_task_leaves_a_task_that_is_not_removed_alone(store: TaskStore) -> None:
    task_id = await _create(store)
    await store.apply_event(events.new(events.TaskRunning, task_id, 1))
    await store.delete_task(task_id)
    assert (await _task(store, task_id))["state"] == "running"
    assert [d["seq"] for d in await store.read_events(task_id)] == [1, 2]
    await store.delete_task(_tid())  # unknown task: nothing to do, no error
    assert not await store.tombstoned(task_id)


async def test_a_deleted_task_leaves_a_tombstone_that_refuses_its_uuid(store: TaskStore) -> None:
    """A uuid re-used after the deletion would meet the old task's command ids (JetStream's
    duplicate window) and its late commands: ``create_task`` refuses it, recording nothing."""
    task_id = await _create(store)
    await store.apply_event(events.new(events.TaskRemoved, task_id, 1))
    await store.delete_task(task_id)
    assert await store.tombstoned(task_id)
    [stone] = await store.tombstones.find({"_id": task_id}).to_list(None)
    assert stone["deleted_at"].tzinfo is not None

    with pytest.raises(TaskExistsError):
        await store.create_task({"_id": task_id, "name": "again"},
                                events.new(events.TaskQueued, task_id, 1))
    assert await store.get_task(task_id, include_removed=True) is None
    assert await _n_events(store, task_id) == 0  # no event left for the outbox either

    await store.delete_task(task_id)  # a redelivered remove: the first tombstone stays
    assert await store.tombstones.find({"_id": task_id}).to_list(None) == [stone]
    assert not await store.tombstoned(_tid())


class _LateTombstoneStore(TaskStore):
    """A deletion of the uuid's old task that buries it right after the creation's first check."""

    checks = 0

    async def tombstoned(self, task_id: str) -> bool:
        self.checks += 1
        return self.checks > 1 and await super().tombstoned(task_id)


async def test_a_creation_racing_the_deletion_of_its_uuid_is_undone(store: TaskStore) -> None:
    task_id = _tid()
    await store.tombstones.insert_one({"_id": task_id, "deleted_at": dt.datetime.now(dt.UTC)})
    racing = _LateTombstoneStore(store.db)
    with pytest.raises(TaskExistsError):
        await racing.create_task({"_id": task_id, "name": "t"},
                                 events.new(events.TaskQueued, task_id, 1))
    assert racing.checks == 2
    assert await store.get_task(task_id, include_removed=True) is None
    assert await _n_events(store, task_id) == 0


async def test_updated_flags_stay_booleans(
    request: pytest.FixtureRequest, store_server: Server, store: TaskStore
) -> None:
    _known_nx_bug(request, store_server, "a top-level $set of True stores the integer 1")
    task_id = await _create(store)
    await store.mark_published(f"{task_id}:1:queued")
    await store.apply_event(events.new(events.TaskRemoved, task_id, 1))
    event = await store.events.find_one({"_id": f"{task_id}:1:queued"})
    assert event is not None
    assert event["published"] is True
    doc = await _task(store, task_id)
    assert doc["removed"] is True


async def test_outbox_lists_events_until_published(store: TaskStore) -> None:
    task_id = await _create(store)
    await store.apply_event(events.new(events.TaskRunning, task_id, 1))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)

    pending = await store.unpublished_events(later)
    assert [d["_id"] for d in pending] == [f"{task_id}:1:queued", f"{task_id}:1:running"]
    assert pending[0]["seq"] == 1
    assert pending[0]["recorded_at"].tzinfo is not None
    assert await store.unpublished_events(earlier) == []
    assert len(await store.unpublished_events(later, limit=1)) == 1

    await store.mark_published(f"{task_id}:1:queued")
    assert [d["_id"] for d in await store.unpublished_events(later)] == [f"{task_id}:1:running"]
    await store.mark_published(f"{task_id}:1:running")
    assert await store.unpublished_events(later) == []
    assert await store.event_seen(f"{task_id}:1:running") is True


async def test_count_active_counts_queued_and_running_only(store: TaskStore) -> None:
    assert await store.count_active() == 0
    ids = [await _create(store) for _ in range(5)]
    await store.apply_event(events.new(events.TaskRunning, ids[1], 1))
    await store.apply_event(events.new(events.TaskCompleted, ids[2], 1))
    await store.apply_event(events.new(events.TaskFailed, ids[3], 1, error_message="x"))
    await store.apply_event(events.new(events.TaskCanceled, ids[4], 1))
    assert await store.count_active() == 2
    await store.apply_event(events.new(events.TaskCompleted, ids[1], 1))
    assert await store.count_active() == 1
    assert await store.list_task_ids() == ids


# -- webhook deliveries ----------------------------------------------------------------------


async def test_delivery_open_twice_and_record_attempts(deliveries: DeliveryStore) -> None:
    task_id = _tid()
    did = f"{task_id}:1:https://hook.example/x"
    first = await deliveries.open(did, task_id=task_id, attempt=1, url="https://hook.example/x")
    second = await deliveries.open(did, task_id=task_id, attempt=1, url="https://other/")
    assert first == second
    assert (first["status"], first["attempts"], first["url"]) == (
        "pending", [], "https://hook.example/x"
    )
    assert await deliveries.deliveries.count_documents({"_id": did}) == 1

    await deliveries.record_attempt(did, status="retrying", status_code=503, latency_ms=12,
                                    error="HTTP 503")
    await deliveries.record_attempt(did, status="delivered", status_code=200, latency_ms=7,
                                    error=None)
    doc = await deliveries.get(did)
    assert doc is not None
    assert doc["status"] == "delivered"
    assert len(doc["attempts"]) == 2  # their content: test_delivery_attempts_are_subdocuments
    assert [d["_id"] for d in await deliveries.for_task(task_id)] == [did]
    assert await deliveries.for_task(_tid()) == []


async def test_delivery_attempts_are_subdocuments(
    request: pytest.FixtureRequest, store_server: Server, deliveries: DeliveryStore
) -> None:
    _known_nx_bug(request, store_server, "$push of a subdocument stores it as a JSON string")
    task_id = _tid()
    did = f"{task_id}:1:https://hook.example/x"
    await deliveries.open(did, task_id=task_id, attempt=1, url="https://hook.example/x")
    await deliveries.record_attempt(did, status="pending", status_code=503, latency_ms=12,
                                    error="HTTP 503")
    await deliveries.record_attempt(did, status="delivered", status_code=200, latency_ms=7,
                                    error=None)
    doc = await deliveries.get(did)
    assert doc is not None
    assert [(a["status_code"], a["latency_ms"], a["error"]) for a in doc["attempts"]] == [
        (503, 12, "HTTP 503"), (200, 7, None)
    ]
    assert all(isinstance(a["at"], dt.datetime) and a["at"].tzinfo for a in doc["attempts"])


async def test_a_command_is_recorded_with_the_event_that_causes_it(store: TaskStore) -> None:
    task_id = await _create(store, sources=["s3://b/tasks/x/inputs/"], images_count=3,
                            output_prefix="s3://b/tasks/x/outputs/")
    cancel = commands.CancelTask(task_id=TaskId(task_id), attempt=1)
    result = await store.apply_event(events.new(events.TaskCanceled, task_id, 1), cancel)
    assert result.outcome is Outcome.APPLIED
    [pending] = [d for d in await store.unpublished_events(
        dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)) if d["kind"] == "canceled"]
    assert commands.COMMAND_ADAPTER.validate_python(pending["command"]) == cancel
    queued = await store.events.find_one({"_id": f"{task_id}:1:queued"})
    assert queued is not None and queued["command"] is None  # _create gave none

    # An event the task ignores is not recorded, and neither is its command.
    again = await store.apply_event(events.new(events.TaskCanceled, task_id, 1), cancel)
    assert again.outcome is Outcome.DUPLICATE
    stale = await store.apply_event(events.new(events.TaskCanceled, task_id, 7),
                                    commands.CancelTask(task_id=TaskId(task_id), attempt=7))
    assert stale.outcome is Outcome.IGNORED
    assert await store.events.find_one({"_id": f"{task_id}:7:canceled"}) is None


async def test_a_retried_creation_is_completed_and_its_event_goes_back_to_the_outbox(
    store: TaskStore,
) -> None:
    """A creation cut off after its event: the retry inserts the task and hands the event to
    the outbox again; the task then waits for admission like any new one."""
    task_id = _tid()
    await store._record(events.new(events.TaskQueued, task_id, 1))
    await store.mark_published(f"{task_id}:1:queued")
    doc = {"_id": task_id, "name": "t", "date_created_ms": 1, "options": [], "images_count": 2,
           "sources": ["s3://b/in/"], "output_prefix": "s3://b/tasks/x/outputs/"}
    result = await store.create_task(doc, events.new(events.TaskQueued, task_id, 1))
    assert result.seq == 1
    [recorded] = await store.unpublished_events(
        dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5))
    assert recorded["_id"] == f"{task_id}:1:queued"
    assert recorded.get("command") is None  # admission carries the run command
    task = await store.get_task(task_id)
    assert task is not None and task["state"] == "queued" and task["admitted"] is False


def test_run_command_is_built_from_the_task_document() -> None:
    doc: Doc = {"_id": "0f0e0d0c-0000-4000-8000-000000000001", "attempt": 2, "name": "n",
                "options": [{"name": "dsm", "value": True}], "sources": ["s3://b/in/"],
                "output_prefix": "s3://b/tasks/t/outputs/", "skip_post_processing": True,
                "outputs": ["odm_orthophoto/odm_orthophoto.tif"], "images_count": 0}
    cmd = run_command(doc)
    assert isinstance(cmd, commands.RestartTask)
    assert (cmd.attempt, cmd.options, cmd.skip_post_processing, cmd.images_count) == (
        2, [{"name": "dsm", "value": True}], True, None)
    assert (cmd.priority, cmd.size_class) == (0, None)  # not admitted yet
    admitted = run_command({**doc, "priority": -3, "size_class": "large"})
    assert (admitted.priority, admitted.size_class) == (-3, "large")
    assert isinstance(run_command({**doc, "attempt": 1}), commands.CreateTask)


async def test_a_lease_has_one_holder_until_it_expires_or_is_released(store: TaskStore) -> None:
    leases = Leases(store.db)
    with clock.use(clock.ManualClock()) as manual:
        assert await leases.hold("relay", "watcher-0", ttl_s=10)
        assert not await leases.hold("relay", "watcher-1", ttl_s=10), "held by watcher-0"
        manual.advance(5)
        assert await leases.hold("relay", "watcher-0", ttl_s=10), "renewed by its holder"
        # A renewal keeps a date (nx-27017 turned a $set date into a string, which no later
        # $lt matched: a dead holder's lease was never taken over).
        renewed = await store.db["leases"].find_one({"_id": "relay"})
        assert isinstance(renewed["until"], dt.datetime), renewed
        manual.advance(9)
        assert not await leases.hold("relay", "watcher-1", ttl_s=10), "renewed: not expired"
        manual.advance(2)
        assert await leases.hold("relay", "watcher-1", ttl_s=10), "expired: taken over"
        assert not await leases.hold("relay", "watcher-0", ttl_s=10)
        await leases.release("relay", "watcher-0")  # not its holder: changes nothing
        assert not await leases.hold("relay", "watcher-0", ttl_s=10)
        await leases.release("relay", "watcher-1")
        assert await leases.hold("relay", "watcher-0", ttl_s=10), "released: free at once"
