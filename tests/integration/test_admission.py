"""Admission against MongoDB wire servers (nx-27017, mongoeco; a real one from the env).

The admitter's passes (scheduler/admission.py) on the store's real queries and writes: slots
counted from the task documents, the admission recorded as an event carrying the run command,
every way an attempt ends freeing its slot, the queue's order saved for ``queuePosition``, and
two admitters at once never exceeding the capacity.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from scaleodm.common import clock
from scaleodm.common.contracts import commands, events
from scaleodm.common.settings import CapacitySettings, SizeClass
from scaleodm.common.store.admission import AdmissionStore
from scaleodm.common.store.leases import Leases
from scaleodm.common.store.tasks import ApplyResult, TaskStore
from scaleodm.scheduler.admission import LEASE, Admitter

pytestmark = pytest.mark.integration

CAPACITY = CapacitySettings(max_active=3, classes=[
    SizeClass(name="small", max_images=100, slots=2),
    SizeClass(name="large", max_images=None, slots=1),
])


class Recorder:
    """The emitter's recording half (``TaskStore.apply_event``), keeping the commands."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self.commands: list[commands.Command] = []

    async def emit(self, ev: events.TaskEvent, *,
                   command: commands.Command | None = None) -> ApplyResult:
        result = await self.store.apply_event(ev, command)
        if result.changed and command is not None:
            self.commands.append(command)
        return result


@pytest.fixture
async def store(wire_db: Any) -> TaskStore:
    store = TaskStore(wire_db)
    await store.ensure_indexes()
    await AdmissionStore(wire_db, CAPACITY).ensure_indexes()
    return store


def admitter(store: TaskStore, recorder: Recorder, holder: str | None = None,
             capacity: CapacitySettings = CAPACITY) -> Admitter:
    a = Admitter(AdmissionStore(store.db, capacity), Leases(store.db), recorder, capacity,
                 interval_s=60)
    if holder is not None:
        a.holder = holder
    return a


async def create(store: TaskStore, *, images: int = 10, priority: int = 0, at: int = 0,
                 tenant: str | None = None) -> str:
    task_id = str(uuid.uuid4())
    doc: dict[str, Any] = {
        "_id": task_id, "name": "t", "date_created_ms": at or clock.now_ms(), "options": [],
        "images_count": images, "sources": ["s3://b/in/"], "output_prefix": "s3://b/out/",
        "priority": priority}
    if tenant is not None:
        doc["tenant"] = tenant
    await store.create_task(doc, events.new(events.TaskQueued, task_id, 1))
    return task_id


async def states(store: TaskStore, ids: list[str]) -> dict[str, tuple[str, bool]]:
    docs = {d["_id"]: d async for d in store.tasks.find({"_id": {"$in": ids}})}
    return {i: (docs[i]["state"], bool(docs[i].get("admitted"))) for i in ids}


async def test_admits_up_to_capacity_in_order_and_saves_the_queue(store: TaskStore) -> None:
    rec = Recorder(store)
    a = admitter(store, rec)
    small = [await create(store, at=1000 + n) for n in range(4)]
    large = [await create(store, images=500, at=2000 + n) for n in range(2)]
    urgent = await create(store, priority=10, at=3000)
    admitted = await a.run_pass()
    # Priority first, then the oldest: urgent + small[0] fill "small" (2 slots); large[0]
    # takes "large"; the cap (3) is reached.
    assert [t.task_id for t in admitted] == [urgent, small[0], large[0]]
    docs = {d["_id"]: d async for d in store.tasks.find({})}
    assert all(docs[t]["admitted"] for t in (urgent, small[0], large[0]))
    assert docs[large[0]]["size_class"] == "large" and docs[urgent]["size_class"] == "small"
    # Each admission is an event carrying its run command, with priority and class.
    assert {c.task_id for c in rec.commands} == {urgent, small[0], large[0]}
    cmd = next(c for c in rec.commands if c.task_id == large[0])
    assert isinstance(cmd, commands.CreateTask) and cmd.size_class == "large"
    assert next(c for c in rec.commands if c.task_id == urgent).priority == 10
    logged = await store.events.find_one({"task_id": large[0], "kind": "admitted"})
    assert logged is not None and logged["command"]["verb"] == "create"
    # The rest wait, in order; positions as the gateway reads them.
    positions = await AdmissionStore(store.db, CAPACITY).queue_positions()
    assert positions == {small[1]: 1, small[2]: 2, small[3]: 3, large[1]: 4}
    # A second pass admits nothing more: every slot of the cap is held.
    assert await a.run_pass() == []


async def test_every_end_of_an_attempt_frees_its_slot(store: TaskStore) -> None:
    capacity = CapacitySettings(max_active=1, classes=[SizeClass(name="any", slots=1)])
    rec = Recorder(store)
    a = admitter(store, rec, capacity=capacity)
    ids = [await create(store, at=1000 + n) for n in range(7)]

    async def admitted_now() -> list[str]:
        return [t.task_id for t in await a.run_pass()]

    assert await admitted_now() == [ids[0]]
    # Completed (after running).
    await store.apply_event(events.new(events.TaskRunning, ids[0], 1))
    assert await admitted_now() == []
    await store.apply_event(events.new(events.TaskCompleted, ids[0], 1))
    assert await admitted_now() == [ids[1]]
    # Failed without running (its run could not start).
    await store.apply_event(events.new(events.TaskFailed, ids[1], 1, error_message="x"))
    assert await admitted_now() == [ids[2]]
    # Canceled while admitted and queued.
    await store.apply_event(events.new(events.TaskCanceled, ids[2], 1))
    assert await admitted_now() == [ids[3]]
    # Removed while running.
    await store.apply_event(events.new(events.TaskRunning, ids[3], 1))
    await store.apply_event(events.new(events.TaskRemoved, ids[3], 1))
    assert await admitted_now() == [ids[4]]
    # Deleted outright (the scheduler's removal after the data is gone).
    await store.apply_event(events.new(events.TaskRemoved, ids[4], 1))
    await store.delete_task(ids[4])
    assert await admitted_now() == [ids[5]]
    # A restarted task waits again, at the back, for a slot of its new attempt.
    await store.apply_event(events.new(events.TaskCanceled, ids[5], 1))
    await store.apply_event(events.new(events.TaskQueued, ids[5], 2, date_created_ms=9_999_999))
    assert await admitted_now() == [ids[6]]
    await store.apply_event(events.new(events.TaskCompleted, ids[6], 1))
    assert await admitted_now() == [ids[5]]
    doc = await store.get_task(ids[5])
    assert doc is not None and doc["attempt"] == 2 and doc["admitted"]
    assert isinstance(rec.commands[-1], commands.RestartTask) and rec.commands[-1].attempt == 2


async def test_a_canceled_waiting_task_is_never_admitted(store: TaskStore) -> None:
    rec = Recorder(store)
    task_id = await create(store)
    await store.apply_event(events.new(events.TaskCanceled, task_id, 1))
    assert await admitter(store, rec).run_pass() == []
    assert rec.commands == []
    # And an admission event for it now (a stale pass) changes nothing and carries no run.
    result = await store.apply_event(
        events.new(events.TaskAdmitted, task_id, 1, size_class="small"))
    assert not result.changed
    assert (await states(store, [task_id]))[task_id] == ("canceled", False)


async def test_only_the_lease_holder_admits_and_two_admitters_never_exceed_capacity(
    store: TaskStore,
) -> None:
    rec = Recorder(store)
    one, two = admitter(store, rec, "one"), admitter(store, rec, "two")
    ids = [await create(store, at=1000 + n) for n in range(10)]
    first = await asyncio.gather(one.run_pass(), two.run_pass())
    assert sorted(len(x) for x in first) == [0, 2]  # the holder filled "small"; the other, none
    assert await two.run_pass() == []  # "one" holds the lease
    holding = [d async for d in store.tasks.find({"admitted": True})]
    assert len(holding) == 2
    # The holder gone (its lease released), the other takes over.
    await Leases(store.db).release(LEASE, "one")
    for t in holding:
        await store.apply_event(events.new(events.TaskCompleted, t["_id"], 1))
    assert len(await two.run_pass()) == 2
    assert len([d async for d in store.tasks.find({"admitted": True, "state": "queued"})]) == 2
    assert len({c.task_id for c in rec.commands}) == 4 == len(rec.commands)
    assert {c.task_id for c in rec.commands} <= set(ids)


async def test_a_task_whose_end_is_recorded_but_not_applied_is_not_admitted(
    store: TaskStore,
) -> None:
    """A writer died between recording a cancel (or a removal) and applying it: the document
    still says queued. Admission must not start a run for it; the relay applies the event."""
    rec = Recorder(store)
    canceled, removed, waiting = [await create(store, at=1000 + n) for n in range(3)]
    await store._record(events.new(events.TaskCanceled, canceled, 1))
    await store._record(events.new(events.TaskRemoved, removed, 1))
    room = CapacitySettings(max_active=3, classes=[SizeClass(name="any", slots=3)])
    assert [t.task_id for t in await admitter(store, rec, capacity=room).run_pass()] == [waiting]
    assert [c.task_id for c in rec.commands] == [waiting]
    assert (await states(store, [canceled, removed]))[canceled] == ("queued", False)
