"""Admission: a shared pool under one tenant's flood — fair share, run slots, no leak.

The scheduler (admission, local executor, ODM test double of ``--adm-engine-seconds``) and the
watcher run on the bench servers with ``--adm-slots`` run slots (one size class). Tasks are
recorded as the gateway records them (``TaskStore.create_task``: the task document with its
``tenant``, the ``queued`` event, published by the outbox's delivery) with a ``zipurl`` served by
the bench on 127.0.0.1:

- tenant ``bulk`` submits ``--adm-bulk`` tasks at once, at the start;
- tenants ``a`` and ``b`` submit ``--adm-small`` tasks each, one every
  ``--adm-small-interval`` seconds from the start, as people working interactively do — less
  than their fair share of the pool (a third each), so fair share should start each of their
  tasks within about one run, however long the bulk backlog is.

Figures, from the task documents and their events once every task ended:

- ``small_wait_p95_s`` (and p50): the small tenants' wait, task recorded → admitted; with
  ``run_s`` (the median slot hold, admitted → ended: start, fetch, engine, upload) the ratio
  ``small_wait_p95_runs``: fair share works when it is a small multiple of one run, not a share
  of the bulk backlog;
- ``bulk_wait_p50_s``: the bulk tenant's median wait, for scale;
- ``admitted_per_s``: admissions over the busy period (bounded by slots / run length here);
- ``slots_at_once``: the most slots held at once (≤ ``--adm-slots``), and ``slots_leaked``: slots
  still held once every task ended (0), both from the ``admitted`` and ending events and the
  task documents (the same accounting admission uses).

    uv run python -m bench.admission [--quick] [--adm-bulk 200] [--adm-small 50] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

from faststream.nats import NatsBroker

from bench.common import BenchEnv, Figure, images_zip, median, percentile, serve_files, standalone
from scaleodm.common import clock
from scaleodm.common.contracts import events, streams
from scaleodm.common.emitting import Emitter, Outbound
from scaleodm.common.settings import MongoSettings
from scaleodm.common.store import s3 as s3mod
from scaleodm.common.store.admission import HOLDING
from scaleodm.common.store.tasks import TaskStore, open_store

NAME = "admission"
DATABASE = "bench_admission"
SMALL_TENANTS = ("a", "b")
ENDS = ("completed", "failed", "canceled")

QUICK: dict[str, Any] = {"adm_bulk": 24, "adm_small": 5}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("admission")
    group.add_argument("--adm-bulk", type=int, default=200,
                       help="tasks tenant `bulk` submits at once (default 200)")
    group.add_argument("--adm-small", type=int, default=50,
                       help="tasks each of tenants `a` and `b` submits (default 50)")
    group.add_argument("--adm-small-interval", type=float, default=3.0,
                       help="seconds between two submissions of a small tenant (default 3: "
                       "below a third of the pool's throughput, its fair share)")
    group.add_argument("--adm-slots", type=int, default=4, help="run slots (default 4)")
    group.add_argument("--adm-engine-seconds", type=float, default=1.0,
                       help="run length of the ODM test double (default 1)")
    group.add_argument("--adm-timeout", type=float, default=900.0,
                       help="seconds until every task must have ended (default 900)")


async def submit(store: TaskStore, emitter: Emitter, bucket: str, zipurl: str,
                 tenant: str) -> str:
    """One task, recorded and announced as ``TaskActions.create`` does."""
    task_id = str(uuid.uuid4())
    doc = {
        "_id": task_id, "name": f"{tenant} {task_id[:8]}", "date_created_ms": clock.now_ms(),
        "options": [], "images_count": 0, "webhook": None, "skip_post_processing": True,
        "outputs": None, "sources": [zipurl], "priority": 0, "tenant": tenant,
        "output_prefix": str(s3mod.task_outputs(bucket, task_id)),
    }
    queued = events.new(events.TaskQueued, task_id, 1)
    created = await store.create_task(doc, queued)
    await emitter.deliver(Outbound(queued.model_copy(update={"seq": created.seq})))
    return task_id


def slot_spans(evs: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Each attempt's slot, admitted → its end, by the events' recording times (seconds)."""
    admitted: dict[tuple[str, int], float] = {}
    ended: dict[tuple[str, int], float] = {}
    for ev in evs:
        key = (ev["task_id"], ev["attempt"])
        at = ev["recorded_at"].timestamp()
        if ev["kind"] == "admitted":
            admitted[key] = at
        elif ev["kind"] in ENDS:
            ended[key] = min(at, ended.get(key, at))
    return [(start, ended.get(key, float("inf"))) for key, start in admitted.items()]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    now = most = 0
    for _, step in sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans]):
        now += step
        most = max(most, now)
    return most


async def measure(env: BenchEnv, args: argparse.Namespace) -> list[Figure]:
    slots = int(args.adm_slots)
    engine_s = float(args.adm_engine_seconds)
    total = int(args.adm_bulk) + len(SMALL_TENANTS) * int(args.adm_small)
    with serve_files(env.tmp / NAME, {"flight.zip": images_zip(3)}) as files:
        zipurl = files.url("flight.zip")
        stack = env.stack(DATABASE, {
            "SCALEODM_ENGINE": "test", "SCALEODM_TEST_ENGINE_SECONDS": str(engine_s),
            "SCALEODM_CAPACITY__MAX_ACTIVE": str(slots),
            "SCALEODM_CAPACITY__CLASSES": json.dumps(
                [{"name": "any", "max_images": None, "slots": slots}]),
            "SCALEODM_ADMISSION_INTERVAL_S": "1",
        })
        handle = await open_store(MongoSettings(url=env.mongo_url, database=DATABASE), "bench")
        broker = NatsBroker(env.nats.url)
        try:
            await streams.ensure_streams((await broker.connect()).jetstream())
            emitter = Emitter(handle.store, broker, 5.0)
            await asyncio.to_thread(stack.start_all, "scheduler", "watcher")
            started = time.time()
            await asyncio.gather(*(submit(handle.store, emitter, stack.bucket, zipurl, "bulk")
                                   for _ in range(int(args.adm_bulk))))

            async def small(tenant: str) -> None:
                for i in range(int(args.adm_small)):
                    delay = started + i * float(args.adm_small_interval) - time.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await submit(handle.store, emitter, stack.bucket, zipurl, tenant)

            await asyncio.gather(*(small(t) for t in SMALL_TENANTS))
            tasks = handle.store.tasks
            deadline = time.monotonic() + float(args.adm_timeout)
            while await tasks.count_documents({"state": {"$in": list(ENDS)}}) < total:
                if time.monotonic() > deadline:
                    raise RuntimeError("admission bench: tasks did not all end in time")
                await asyncio.sleep(0.5)
            ended_at = time.time()
            docs = [d async for d in tasks.find({})]
            evs = [e async for e in handle.store.events.find(
                {}, {"task_id": 1, "attempt": 1, "kind": 1, "recorded_at": 1})]
            leaked = await tasks.count_documents(HOLDING)
        finally:
            stack.stop()
            await broker.stop()
            await handle.close()

    admitted_ms = {e["task_id"]: e["recorded_at"].timestamp() * 1000
                   for e in evs if e["kind"] == "admitted"}
    wait_s: dict[str, list[float]] = {}
    for d in docs:
        if d["_id"] in admitted_ms:
            wait_s.setdefault(d["tenant"], []).append(
                (admitted_ms[d["_id"]] - d["date_created_ms"]) / 1000)
    spans = slot_spans(evs)
    # One run, as the pool sees it: a slot held from admission to the end (start, fetch,
    # engine, upload).
    run_s = median([end - start for start, end in spans if end != float("inf")])
    small = [w for t in SMALL_TENANTS for w in wait_s.get(t, [])]
    busy = max(e for _, e in spans if e != float("inf")) - min(s for s, _ in spans)
    states: dict[str, int] = {}
    for d in docs:
        states[d["state"]] = states.get(d["state"], 0) + 1
    detail = {
        "slots": slots, "engine_seconds": engine_s, "tasks": total, "bulk": args.adm_bulk,
        "small_per_tenant": args.adm_small, "small_interval_s": args.adm_small_interval,
        "states": states, "seconds_to_all_ended": round(ended_at - started, 1),
        "small_wait_p50_s": round(median(small), 2), "run_s": round(run_s, 2),
        "per_tenant_wait_p95_s": {t: round(percentile(w, 95), 2) for t, w in wait_s.items()},
        "measured": "task recorded (bench, as the gateway) -> admitted event recorded",
    }
    return [
        Figure(NAME, "small_wait_p95_s", percentile(small, 95), "s", None, detail),
        Figure(NAME, "small_wait_p95_runs", percentile(small, 95) / run_s, "× one run", None,
               {"run_s": round(run_s, 2)}),
        Figure(NAME, "bulk_wait_p50_s", median(wait_s.get("bulk", [])), "s", None, {}),
        Figure(NAME, "admitted_per_s", len(spans) / busy if busy > 0 else float("nan"),
               "admissions/s", None, {"admitted": len(spans), "busy_s": round(busy, 1)}),
        Figure(NAME, "slots_at_once", most_at_once(spans), "slots", None, {"slots": slots}),
        Figure(NAME, "slots_leaked", leaked, "slots", None,
               {"measured": "tasks holding a slot once every task ended"}),
    ]


if __name__ == "__main__":
    sys.exit(standalone(NAME, measure, add_arguments, QUICK))
