"""The gateway's read model (``services/gateway/.../readmodel.py``) and its consistency promise.

Against real servers: the model on a real NATS connection and a MongoDB wire server, events
written by the store's own API and published as the emitters publish them; and two real gateway
processes, written on one and read on the other over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.aio.client import Client as NatsClient
from pymongo import AsyncMongoClient

from scaleodm.common.contracts import events, streams
from scaleodm.common.store.tasks import Doc, Outcome, TaskStore
from scaleodm.gateway.readmodel import ReadModel, apply_event
from tests.harness import api, servers
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration

IGNORED = {"updated_at"}  # stamped by MongoDB's write only


@pytest.fixture
async def store(mongo_url: str) -> AsyncIterator[TaskStore]:
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url, tz_aware=True)
    name = f"t_{uuid.uuid4().hex[:12]}"
    s = TaskStore(client[name])
    await s.ensure_indexes()
    try:
        yield s
    finally:
        await client.drop_database(name)
        await client.close()


@pytest.fixture
async def nc(nats: servers.Nats) -> AsyncIterator[NatsClient]:
    conn = await nats_connect(nats.url)
    try:
        yield conn
    finally:
        await conn.close()


async def nats_connect(url: str) -> NatsClient:
    conn: NatsClient = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    return conn


def make_model(store: TaskStore, conn: NatsClient, **kw: Any) -> ReadModel:
    args: dict[str, Any] = {"size": 1000, "negative_size": 1000, "max_age_s": 300.0,
                            "echo_timeout_s": 1.0}
    return ReadModel(store, conn, **{**args, **kw})


def same(a: Doc | None, b: Doc | None) -> bool:
    if a is None or b is None:
        return a is b
    return {k: v for k, v in a.items() if k not in IGNORED} == {
        k: v for k, v in b.items() if k not in IGNORED}


def diff(a: Doc, b: Doc | None) -> dict[str, Any]:
    b = b or {}
    return {k: (a.get(k), b.get(k)) for k in {*a, *b} - IGNORED if a.get(k) != b.get(k)}


async def create(store: TaskStore) -> str:
    task_id = str(uuid.uuid4())
    await store.create_task({"_id": task_id, "name": "t", "date_created_ms": 1, "options": []},
                            events.new(events.TaskQueued, task_id, 1))
    return task_id


async def record(store: TaskStore, ev: events.TaskEvent) -> events.TaskEvent | None:
    """Record and apply ``ev`` as an emitter does; the event as published (with its seq), or
    None when it is not published (ignored by the task, or recorded before: ``Emitter.emit``)."""
    result = await store.apply_event(ev)
    if result.outcome is not Outcome.APPLIED:
        return None
    return ev.model_copy(update={"seq": result.seq})


async def publish(conn: NatsClient, ev: events.TaskEvent) -> None:
    await conn.publish(streams.event_subject(ev.task_id, ev.kind),
                       ev.model_dump_json().encode())


def random_event(rng: random.Random, task_id: str, attempt: int, n: int) -> events.TaskEvent:
    """One plausible event of a task's life (the rules must take any order of them)."""
    kind = rng.choice(["running", "progress", "progress", "output", "output", "inputs",
                       "completed", "failed", "canceled", "restart", "removed"])
    if kind == "running":
        return events.new(events.TaskRunning, task_id, attempt)
    if kind == "progress":
        return events.new(events.TaskProgressed, task_id, attempt, key=n,
                          progress=float(rng.randint(0, 100)))
    if kind == "output":
        return events.new(events.TaskOutput, task_id, attempt, line_start=rng.randint(0, 40),
                          lines=[f"line {n}"] * rng.randint(1, 5))
    if kind == "inputs":
        return events.new(events.TaskInputsReady, task_id, attempt,
                          images_count=rng.randint(1, 9))
    if kind == "completed":
        return events.new(events.TaskCompleted, task_id, attempt)
    if kind == "failed":
        return events.new(events.TaskFailed, task_id, attempt, error_message=f"failed {n}")
    if kind == "canceled":
        return events.new(events.TaskCanceled, task_id, attempt)
    if kind == "restart":
        return events.new(events.TaskQueued, task_id, attempt + 1,
                          options=[{"name": "dsm", "value": n}], date_created_ms=n)
    return events.new(events.TaskRemoved, task_id, attempt)


async def test_events_applied_in_memory_give_mongodbs_document(store: TaskStore) -> None:
    """The same plan, evaluated in memory, gives the document MongoDB has — after every event,
    with events of other attempts, duplicates and old events applied again in any order."""
    rng = random.Random(20261204)
    for _ in range(12):
        task_id = await create(store)
        mem = await store.tasks.find_one({"_id": task_id})
        assert mem is not None and mem["seq"] == 1
        published: list[events.TaskEvent] = []
        for n in range(30):
            doc = await store.tasks.find_one({"_id": task_id})
            assert doc is not None
            ev = await record(store, random_event(rng, task_id, doc["attempt"], n))
            if ev is not None:
                published.append(ev)
                mem = apply_event(mem, ev)
            if published and rng.random() < 0.3:  # a duplicate, or an old event late
                mem = apply_event(mem, rng.choice(published))
            db = await store.tasks.find_one({"_id": task_id})
            assert same(mem, db), (n, ev, diff(mem, db))


async def wait_for(pred: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not pred():
            await asyncio.sleep(0.005)


async def test_follows_events_from_memory_and_recovers_from_gaps_and_duplicates(
    store: TaskStore, nc: NatsClient
) -> None:
    model = make_model(store, nc)
    await model.start()
    try:
        task_id = await create(store)
        assert same(await model.get_task(task_id), await store.get_task(task_id))
        assert model.stats["miss"] == 1

        async def step(ev: events.TaskEvent, *, send: bool = True) -> events.TaskEvent:
            recorded = await record(store, ev)
            assert recorded is not None
            if send:
                await publish(nc, recorded)
            return recorded

        running = await step(events.new(events.TaskRunning, task_id, 1))
        await step(events.new(events.TaskProgressed, task_id, 1, key="a", progress=30.0))
        got = await model.get_task(task_id)  # the sync point: both events applied
        assert got is not None and got["state"] == "running" and got["progress"] == 30.0
        assert same(got, await store.get_task(task_id))
        assert model.stats["miss"] == 1 and model.stats["hit"] == 1  # from memory

        # A duplicate (a re-publish) and an old event late change nothing.
        await publish(nc, running)
        await step(events.new(events.TaskProgressed, task_id, 1, key="b", progress=50.0))
        await publish(nc, running)
        got = await model.get_task(task_id)
        assert got is not None and got["progress"] == 50.0
        assert same(got, await store.get_task(task_id)) and model.stats["miss"] == 1

        # A missed event (recorded, never published here): the next one shows the gap, the
        # entry is dropped and read again from MongoDB.
        await step(events.new(events.TaskOutput, task_id, 1, line_start=0, lines=["a", "b"]),
                   send=False)
        await step(events.new(events.TaskProgressed, task_id, 1, key="c", progress=70.0))
        got = await model.get_task(task_id)
        assert got is not None and got["output_lines"] == 2 and got["progress"] == 70.0
        assert model.stats["gap"] == 1 and model.stats["miss"] == 2
        assert same(got, await store.get_task(task_id))

        # An event without seq cannot be placed: dropped too.
        await publish(nc, events.new(events.TaskProgressed, task_id, 1, key="d", progress=80.0))
        assert same(await model.get_task(task_id), await store.get_task(task_id))
        assert model.stats["gap"] == 2 and model.stats["miss"] == 3

        # Removal: not found from memory, as from MongoDB.
        await step(events.new(events.TaskRemoved, task_id, 1))
        assert await model.get_task(task_id) is None
        assert (await model.get_task(task_id, include_removed=True) or {}).get("removed")
        assert model.stats["miss"] == 3
    finally:
        await model.close()


async def test_events_arriving_during_a_fill_are_applied_to_it(
    store: TaskStore, nc: NatsClient
) -> None:
    """An event whose write lands after the fill read MongoDB, published before the fill
    returned: applied to the filled document, not lost."""
    model = make_model(store, nc)
    await model.start()
    try:
        task_id = await create(store)
        original = store.tasks.find_one
        late: list[events.TaskEvent] = []

        async def find_one_then_write(*args: Any, **kwargs: Any) -> Any:
            doc = await original(*args, **kwargs)
            store.tasks.find_one = original  # type: ignore[method-assign]
            ev = await record(store, events.new(events.TaskRunning, task_id, 1))
            assert ev is not None
            late.append(ev)
            await publish(nc, ev)
            await nc.flush()
            await wait_for(lambda: model.stats["events"] >= 1)
            return doc

        store.tasks.find_one = find_one_then_write  # type: ignore[method-assign]
        try:
            first = await model.get_task(task_id)
        finally:
            store.tasks.find_one = original  # type: ignore[method-assign]
        assert late and first is not None and first["state"] == "running"
        again = await model.get_task(task_id)
        assert again is not None and again["state"] == "running" and model.stats["hit"] == 1
    finally:
        await model.close()


async def test_unknown_ids_are_remembered_apart_and_a_creation_is_seen(
    store: TaskStore, nc: NatsClient
) -> None:
    model = make_model(store, nc, size=50, negative_size=100)
    await model.start()
    try:
        working = [await create(store) for _ in range(50)]
        for task_id in working:
            assert await model.get_task(task_id) is not None
        misses = model.stats["miss"]
        for _ in range(1000):  # a flood of random ids
            assert await model.get_task(str(uuid.uuid4())) is None
        for task_id in working:  # the working set is still served from memory
            assert await model.get_task(task_id) is not None
        assert model.stats["miss"] == misses + 1000 and model.stats["evicted"] == 0
        assert len(model) == 50

        unknown = str(uuid.uuid4())
        assert await model.get_task(unknown) is None
        assert await model.get_task(unknown) is None
        assert model.stats["absent_hit"] >= 1
        # Created elsewhere: its queued event makes it known.
        await store.create_task({"_id": unknown, "name": "t", "date_created_ms": 1,
                                 "options": []}, events.new(events.TaskQueued, unknown, 1))
        await publish(nc, events.new(events.TaskQueued, unknown, 1, seq=1))
        assert await model.get_task(unknown) is not None
    finally:
        await model.close()


async def test_a_reconnection_forgets_everything(tmp_path: Path, store: TaskStore) -> None:
    """Events published while this process was disconnected were never delivered to it: after a
    reconnection nothing held before is served."""
    port = servers.free_port()
    with contextlib.ExitStack() as first:
        server = first.enter_context(servers.nats_server(tmp_path / "n1", port))
        conn = await nats_connect(server.url)
        model = make_model(store, conn)
        await model.start()
        task_id = await create(store)
        assert await model.get_task(task_id) is not None and len(model) == 1
    try:  # NATS gone: read from MongoDB
        await record(store, events.new(events.TaskRunning, task_id, 1))  # never published
        got = await model.get_task(task_id)
        assert got is not None and got["state"] == "running" and model.stats["bypass"] >= 1
        with servers.nats_server(tmp_path / "n2", port):
            await wait_for(lambda: conn.is_connected and conn.stats["reconnects"] >= 1, 15)
            await record(store, events.new(events.TaskProgressed, task_id, 1, key="x",
                                           progress=40.0))  # never published
            got = await model.get_task(task_id)
            assert got is not None and got["progress"] == 40.0
    finally:
        await model.close()
        await conn.close()


# -- two gateway processes -----------------------------------------------------------------------


async def alternate_writes(stack: Stack, writes: int) -> list[tuple[int, int, int]]:
    """``writes`` writes (cancel, restart, alternately), each on one gateway, each followed at
    once by a read on the other, which held the task in memory before the write; the stale
    reads (write number, status written, status read). No read may show an earlier state
    than one before it (asserted here)."""
    urls = [f"http://127.0.0.1:{stack.ports[g]}" for g in ("gateway", "gateway-2")]
    async with httpx.AsyncClient(timeout=30) as http:
        # No scheduler: the task stays queued, its commands wait on the bus.
        http.base_url = httpx.URL(urls[0])
        task_id = (await api.create(http, name="rm", zipurl="http://127.0.0.1:9/none.zip"))[
            "uuid"]

        async def info(url: str) -> dict[str, Any]:
            body: dict[str, Any] = (await http.get(f"{url}/task/{task_id}/info")).json()
            assert "status" in body, body
            return body

        last = (0, 0)  # (dateCreated, status rank): never decreases
        rank = {10: 0, 20: 1, 30: 2, 40: 2, 50: 3}
        stale = []
        for i in range(writes):
            writer, reader = urls[i % 2], urls[1 - i % 2]
            await info(reader)  # it holds the task now (the writer read it last round)
            if i % 2 == 0:
                r = await http.post(f"{writer}/task/cancel", data={"uuid": task_id})
                want = 50
            else:
                r = await http.post(f"{writer}/task/restart", data={"uuid": task_id})
                want = 10
            assert r.json() == {"success": True}, (i, r.text)
            seen = await info(reader)
            if seen["status"]["code"] != want:
                stale.append((i, want, seen["status"]["code"]))
            now = (seen["dateCreated"], rank[seen["status"]["code"]])
            assert now >= last, (i, last, now)
            last = now
    return stale


async def test_two_gateways_write_on_one_read_on_the_other_never_stale_never_backwards(
    fresh_stack: tuple[Stack, servers.Nats],
) -> None:
    """1,000 writes on alternate gateways, each read at once on the other: never stale, never
    backwards. (Without the sync point and the echo wait, ~12% of these reads were stale;
    without the echo wait alone, ~0.1-0.2%: the writer's publisher now and then slower than
    the client.)"""
    stack, _ = fresh_stack
    stack.start("gateway")
    stack.start("gateway-2")
    stale = await alternate_writes(stack, 1000)
    assert not stale, f"{len(stale)} stale reads, e.g. {stale[:5]}"


async def test_a_write_answers_once_other_gateways_can_see_it_even_when_publishing_is_slow(
    fresh_stack: tuple[Stack, servers.Nats],
) -> None:
    """Both gateways' publishers wait 150 ms before each publish: a write's answer, which
    MongoDB alone would allow at once, waits for its event to come back from NATS (the echo),
    so the other gateway's next read has it. Without the echo wait every read here is
    stale."""
    stack, _ = fresh_stack
    slow = {"SCALEODM_FAILPOINTS": "emitter.before_publish=sleep150"}
    stack.start("gateway", slow)
    stack.start("gateway-2", slow)
    stale = await alternate_writes(stack, 12)
    assert not stale, f"{len(stale)} stale reads, e.g. {stale[:5]}"
