"""Run usage records (``store/usage.py``) as ``TaskStore.apply_event`` writes them, on every wire
server (nx-27017, mongoeco, or a real MongoDB from the env).

Covered: a terminal event writes exactly one record (``<task>:<attempt>``), also when applied
twice or by two writers at once, with wall time, images, outcome and requested × wall
(core-seconds, GiB-seconds from the ``admitted`` event's requests); a cancel of an attempt that
never started has wall 0; each attempt of a restarted task has its own record; a record missing
after a writer died between the task update and the record is written by the next application of
the end (a redelivery, the relay's ``reapply``); an attempt admitted without recorded requests is
charged 0; the month is the end's (UTC); the month's totals per tenant add up, with the quota
counter's images beside them.

Left out: the HTTP route and the services (``tests/integration/test_tenants.py``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import pytest

from scaleodm.common import clock
from scaleodm.common.contracts import events
from scaleodm.common.store.tasks import TaskStore
from scaleodm.common.store.usage import UsageStore

pytestmark = pytest.mark.integration

START = dt.datetime(2031, 5, 31, 23, 59, 55, tzinfo=dt.UTC)


@pytest.fixture
async def store(wire_db: Any) -> TaskStore:
    store = TaskStore(wire_db)
    await store.ensure_indexes()
    return store


@pytest.fixture
def manual() -> Any:
    with clock.use(clock.ManualClock(START)) as c:
        yield c


async def create(store: TaskStore, tenant: str, images: int) -> str:
    task_id = str(uuid.uuid4())
    await store.create_task({
        "_id": task_id, "name": "t", "tenant": tenant, "options": [], "images_count": images,
        "sources": ["s3://b/in/"], "output_prefix": "s3://b/out/", "priority": 0,
        "date_created_ms": clock.now_ms(),
    }, events.new(events.TaskQueued, task_id, 1))
    return task_id


async def admit_and_start(store: TaskStore, task_id: str, attempt: int = 1, *,
                          cpu: float | None = 2.0, gib: float | None = 4.0) -> None:
    await store.apply_event(events.new(events.TaskAdmitted, task_id, attempt, size_class="small",
                                       cpu_cores=cpu, memory_gib=gib))
    await store.apply_event(events.new(events.TaskRunning, task_id, attempt))


async def records(store: TaskStore, task_id: str) -> list[dict[str, Any]]:
    return await store.usage.runs.find({"task_id": task_id}).sort("_id", 1).to_list(None)


async def test_a_completed_run_is_recorded_once(store: TaskStore, manual: Any) -> None:
    task_id = await create(store, "alice", 7)
    await admit_and_start(store, task_id)
    manual.advance(12.5)  # past midnight: the end's month counts
    done = events.new(events.TaskCompleted, task_id, 1)
    await store.apply_event(done)
    await store.apply_event(done)  # a redelivery
    await store.reapply(done)  # the relay
    [rec] = await records(store, task_id)
    assert {k: rec[k] for k in ("_id", "tenant", "attempt", "month", "outcome", "images",
                                "wall_ms", "cpu_cores", "memory_gib", "core_s", "gib_s")} == {
        "_id": f"{task_id}:1", "tenant": "alice", "attempt": 1, "month": "2031-06",
        "outcome": "completed", "images": 7, "wall_ms": 12_500, "cpu_cores": 2.0,
        "memory_gib": 4.0, "core_s": 25.0, "gib_s": 50.0}


async def test_two_writers_of_one_end_write_one_record(store: TaskStore, wire_db: Any,
                                                       manual: Any) -> None:
    task_id = await create(store, "alice", 3)
    await admit_and_start(store, task_id)
    manual.advance(4)
    other = TaskStore(wire_db)  # another service's store on the same database
    ends = [events.new(events.TaskFailed, task_id, 1, error_message="boom") for _ in range(2)]
    await asyncio.gather(store.apply_event(ends[0]), other.apply_event(ends[1]))
    [rec] = await records(store, task_id)
    assert (rec["outcome"], rec["wall_ms"]) == ("failed", 4000)


async def test_cancel_racing_a_failure_keeps_the_first_end(store: TaskStore, manual: Any) -> None:
    """A cancel after the failure turns the task canceled (projection), the record stays."""
    task_id = await create(store, "alice", 3)
    await admit_and_start(store, task_id)
    manual.advance(2)
    await store.apply_event(events.new(events.TaskFailed, task_id, 1, error_message="boom"))
    manual.advance(1)
    await store.apply_event(events.new(events.TaskCanceled, task_id, 1))
    assert (await store.get_task(task_id) or {})["state"] == "canceled"
    [rec] = await records(store, task_id)
    assert (rec["outcome"], rec["wall_ms"]) == ("failed", 2000)


async def test_a_cancel_before_the_start_has_wall_zero(store: TaskStore, manual: Any) -> None:
    task_id = await create(store, "bob", 5)
    await store.apply_event(events.new(events.TaskAdmitted, task_id, 1, size_class="small",
                                       cpu_cores=3.0, memory_gib=8.0))
    manual.advance(30)
    await store.apply_event(events.new(events.TaskCanceled, task_id, 1))
    [rec] = await records(store, task_id)
    assert (rec["outcome"], rec["images"], rec["wall_ms"], rec["core_s"], rec["gib_s"]) == (
        "canceled", 5, 0, 0.0, 0.0)


async def test_each_attempt_has_its_record_and_old_admissions_charge_nothing(
    store: TaskStore, manual: Any
) -> None:
    task_id = await create(store, "carol", 2)
    await admit_and_start(store, task_id, cpu=None, gib=None)  # recorded before requests were
    manual.advance(3)
    await store.apply_event(events.new(events.TaskCompleted, task_id, 1))
    await store.apply_event(events.new(events.TaskQueued, task_id, 2))
    await admit_and_start(store, task_id, 2, cpu=1.5, gib=2.0)
    manual.advance(2)
    await store.apply_event(events.new(events.TaskCompleted, task_id, 2))
    first, second = await records(store, task_id)
    assert (first["attempt"], first["wall_ms"], first["core_s"]) == (1, 3000, 0.0)
    assert (second["attempt"], second["wall_ms"], second["core_s"], second["gib_s"]) == (
        2, 2000, 3.0, 4.0)


async def test_a_record_lost_to_a_crash_is_written_by_the_next_application(
    store: TaskStore, manual: Any
) -> None:
    task_id = await create(store, "dave", 1)
    await admit_and_start(store, task_id)
    manual.advance(1)
    done = events.new(events.TaskCompleted, task_id, 1)
    await store.apply_event(done)
    await store.usage.runs.delete_many({"task_id": task_id})  # died before the record
    assert await store.reapply(done) is False  # the task was changed already
    assert len(await records(store, task_id)) == 1
    await store.usage.runs.delete_many({"task_id": task_id})
    await store.apply_event(done)  # a redelivery
    assert len(await records(store, task_id)) == 1


async def test_the_months_totals_add_up_per_tenant(store: TaskStore, manual: Any) -> None:
    usage = UsageStore(store.db)
    manual.advance(-3600)  # every end in May
    month = clock.month_of(START)
    expected: dict[str, dict[str, float]] = {}
    for tenant, images, wall, outcome in [("erin", 2, 5, "completed"), ("erin", 3, 7, "failed"),
                                          ("erin", 4, 0, "canceled"), ("frank", 6, 1, "completed")]:
        task_id = await create(store, tenant, images)
        if wall:
            await admit_and_start(store, task_id)
        manual.advance(wall)
        end: events.TaskEvent = {
            "completed": events.new(events.TaskCompleted, task_id, 1),
            "failed": events.new(events.TaskFailed, task_id, 1, error_message="x"),
            "canceled": events.new(events.TaskCanceled, task_id, 1),
        }[outcome]
        await store.apply_event(end)
        e = expected.setdefault(tenant, {"runs": 0, "images": 0, "wall": 0, "core": 0, "gib": 0})
        e["runs"] += 1
        e["images"] += images
        e["wall"] += wall
        e["core"] += 2.0 * wall
        e["gib"] += 4.0 * wall
        manual.advance(-wall)  # every end in the same month
    assert await usage.take("erin", month, 9, None) is None
    totals = await usage.month(month)
    assert {"erin", "frank"} <= set(totals)
    for tenant, e in expected.items():
        t = totals[tenant]
        assert (t.runs, t.images, t.wall_s, t.core_s, t.gib_s) == (
            e["runs"], e["images"], e["wall"], e["core"], e["gib"])
    assert dict(totals["erin"].outcomes) == {"completed": 1, "failed": 1, "canceled": 1}
    assert totals["erin"].images_submitted == 9 and totals["frank"].images_submitted == 0
    assert list(await usage.month(month, "frank")) == ["frank"]
    assert (await usage.month(month, "nobody"))["nobody"].runs == 0
    assert await usage.month("2031-04") == {}
