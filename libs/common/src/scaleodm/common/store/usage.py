"""Usage per tenant and month: images submitted (the quota counter) and what each run used.

**The quota counter** (collection ``usage``): images submitted per tenant and month, what a
tenant's ``monthly_image_quota`` is counted on.

One document per tenant and quota month (``_id`` = ``<tenant>/<YYYY-MM>``, the month of
``tenants.quota_month``) holding ``images``, the images of the tasks the tenant submitted that
month. A submission takes its images with **one conditional update** (``$inc`` guarded by
``images <= quota - count``): MongoDB applies an update to one document atomically, so two
submissions at the boundary cannot both pass, as they could by reading the count and then
writing it. The month's first submission inserts the document instead (the unique ``_id`` makes
a concurrent first insert fail, and that submission then takes the update path).

A submission refused after it took its images (an invalid zipurl, a taken uuid, a storage error
while creating the task) gives them back (``give_back``), so a refusal costs no quota. Usage is
counted for tenants without a quota too: a quota set in the middle of a month counts that month.

**Run records** (collection ``usage_runs``): one document per ended attempt (``_id`` =
``<task>:<attempt>``) with its tenant, month (``clock.month_of`` its end, UTC), outcome
(completed, failed, canceled), images, wall time (started → finished; 0 for an attempt that never
started) and what it requested (``requested_cpu_cores``/``requested_memory_gib``, recorded by its
admission) times its wall time: core-seconds and GiB-seconds. An attempt admitted before the
admission recorded requests is charged 0 of them.

``TaskStore.apply_event`` writes the record (:meth:`UsageStore.record_run`) after it applied a
terminal event, from the task document as it is then: every end passes through there, whoever
records it (the gateway's cancel, the watcher's completed/failed, the scheduler's failure to
start), and the document is then the end's result (start, finish, images of that attempt). A
task refused at its creation (``create_task`` with ``failed``) never had a run and has no record.
The record is written once: an insert under the unique ``_id`` (a second writer, a redelivery or a
re-application of the same end finds it and changes nothing), so the first end recorded is the
one charged — a cancel replacing a failure afterwards (``projection``: ``canceled`` wins) does not
rewrite it. A writer that died between the task update and the record leaves the record to the
next application of that end (the other writer, a redelivery, the outbox relay's ``reapply``).
Records outlive their tasks: removing or deleting a task (also by retention) leaves them.

Only standard operations (no ``$setOnInsert`` upserts, which the stand-in servers disagree about:
an insert under a unique ``_id`` is the same write-once), and no aggregation pipelines (totals are
summed here from the month's records).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from scaleodm.common import clock, metrics
from scaleodm.common.domain.status import TERMINAL_STATES, TaskState

Doc = dict[str, Any]
COLLECTION = "usage"
RUNS = "usage_runs"
# The tenant of task documents without one (store.tasks.DEFAULT_TENANT, tenants.OPEN_TENANT).
_DEFAULT_TENANT = "default"
# Update, insert, update again (after a concurrent insert), and one more when the count moved
# down between a refused update and the read that explains it (a give-back).
_ATTEMPTS = 4


@dataclass
class TenantUsage:
    """One tenant's month: its runs' totals and the images its submissions counted."""

    tenant: str
    runs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    images: int = 0
    wall_s: float = 0.0
    core_s: float = 0.0
    gib_s: float = 0.0
    images_submitted: int = 0


def run_record(task: Doc) -> Doc | None:
    """The usage record of the attempt ``task`` (a task document) ended, None when its current
    attempt has not ended."""
    finished = task.get("finished_at_ms")
    state = task.get("state")
    if finished is None or state not in {s.value for s in TERMINAL_STATES}:
        return None
    started = task.get("started_at_ms")
    wall_ms = max(0, int(finished) - int(started)) if started is not None else 0
    cpu = float(task.get("requested_cpu_cores") or 0.0)
    gib = float(task.get("requested_memory_gib") or 0.0)
    at = clock.from_ms(int(finished))
    return {
        "_id": f"{task['_id']}:{task['attempt']}",
        "tenant": str(task.get("tenant") or _DEFAULT_TENANT),
        "task_id": task["_id"],
        "attempt": int(task["attempt"]),
        "month": clock.month_of(at),
        "outcome": TaskState(state).value,
        "images": int(task.get("images_count") or 0),
        "started_at_ms": started,
        "finished_at_ms": int(finished),
        "wall_ms": wall_ms,
        "cpu_cores": cpu,
        "memory_gib": gib,
        "core_s": cpu * wall_ms / 1000,
        "gib_s": gib * wall_ms / 1000,
        "recorded_at": clock.now(),
    }


def _queued_at_ms(task: Doc) -> int | None:
    """When the attempt was queued, by the server's clock: the task's creation for the first
    (``dateCreated`` may be the client's), the restart's ``date_created_ms`` for later ones."""
    if int(task.get("attempt") or 1) > 1:
        value = task.get("date_created_ms")
        return int(value) if value is not None else None
    created = task.get("created_at")
    return clock.to_ms(created) if created is not None else None


class UsageStore:
    def __init__(self, db: AsyncDatabase[Doc]) -> None:
        self.usage = db[COLLECTION]
        self.runs = db[RUNS]

    async def ensure_indexes(self) -> None:
        await self.runs.create_index(
            [("month", ASCENDING), ("tenant", ASCENDING)], name="month_tenant")

    async def record_run(self, task: Doc) -> bool:
        """Record the usage of the attempt ``task`` ended (module docstring), once: True when
        written now, False when recorded before or not ended."""
        record = run_record(task)
        if record is None:
            return False
        with contextlib.suppress(DuplicateKeyError):
            await self.runs.insert_one(record)
            metrics.run_ended(record, task.get("size_class"), _queued_at_ms(task))
            return True
        return False

    async def run_records(self, month: str, tenant: str | None = None) -> list[Doc]:
        """The run records of ``month``: every tenant's, or ``tenant``'s."""
        query: Doc = {"month": month}
        if tenant is not None:
            query["tenant"] = tenant
        return await self.runs.find(query).sort("_id", ASCENDING).to_list(None)

    async def month(self, month: str, tenant: str | None = None) -> dict[str, TenantUsage]:
        """Totals of ``month`` per tenant (every tenant with a run or a submission that month,
        or only ``tenant``, present even with nothing)."""
        totals: dict[str, TenantUsage] = {}
        if tenant is not None:
            totals[tenant] = TenantUsage(tenant)
        for rec in await self.run_records(month, tenant):
            t = totals.setdefault(rec["tenant"], TenantUsage(rec["tenant"]))
            t.runs += 1
            t.outcomes[rec["outcome"]] += 1
            t.images += int(rec.get("images") or 0)
            t.wall_s += int(rec.get("wall_ms") or 0) / 1000
            t.core_s += float(rec.get("core_s") or 0.0)
            t.gib_s += float(rec.get("gib_s") or 0.0)
        query: Doc = {"month": month}
        if tenant is not None:
            query["tenant"] = tenant
        async for doc in self.usage.find(query, {"tenant": 1, "images": 1}):
            name = str(doc["tenant"])
            totals.setdefault(name, TenantUsage(name)).images_submitted = int(
                doc.get("images") or 0)
        return dict(sorted(totals.items()))

    @staticmethod
    def key(tenant: str, month: str) -> str:
        return f"{tenant}/{month}"

    async def take(self, tenant: str, month: str, count: int, quota: int | None) -> int | None:
        """Count ``count`` images in ``tenant``'s ``month`` if the month stays within ``quota``
        (None: no quota). None when counted; else (refused) the images counted already."""
        key = self.key(tenant, month)
        guard: Doc = {} if quota is None else {"images": {"$lte": quota - count}}
        used = 0
        for _ in range(_ATTEMPTS):
            res = await self.usage.update_one(
                {"_id": key, **guard},
                {"$inc": {"images": count}, "$set": {"updated_at": clock.now()}},
            )
            if res.matched_count:
                return None
            doc = await self.usage.find_one({"_id": key}, {"images": 1})
            if doc is not None:
                used = int(doc.get("images") or 0)
                if quota is not None and used + count > quota:
                    return used  # the guard refused: the quota is used up
                continue  # given back meanwhile: take it now
            if quota is not None and count > quota:
                return 0
            try:
                await self.usage.insert_one({
                    "_id": key, "tenant": tenant, "month": month, "images": count,
                    "updated_at": clock.now(),
                })
            except DuplicateKeyError:
                continue  # another submission's first insert won: update it
            return None
        return used

    async def give_back(self, tenant: str, month: str, count: int) -> None:
        """Uncount ``count`` images a refused submission took in ``month``."""
        await self.usage.update_one(
            {"_id": self.key(tenant, month)},
            {"$inc": {"images": -count}, "$set": {"updated_at": clock.now()}},
        )

    async def used(self, tenant: str, month: str) -> int:
        """The images counted in ``tenant``'s ``month``."""
        doc = await self.usage.find_one({"_id": self.key(tenant, month)}, {"images": 1})
        return int(doc.get("images") or 0) if doc is not None else 0
