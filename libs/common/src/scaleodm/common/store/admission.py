"""What admission reads and writes: the tasks waiting for a run slot, the slots in use, and the
queue's order (``queuePosition`` in task info).

A task waits while it is queued and not ``admitted`` for its current attempt; it holds a slot
while it is admitted and queued, or running (``store.projection``: the ``admitted`` event sets
the flag, a restart clears it; a task running since before admission control counts too).
Both are read from the task documents on every pass, so no counter can drift. The scheduler's
admission (``scheduler/admission.py``) decides; the queue's order it saves is the one document
the gateway reads for positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase

from scaleodm.common import clock
from scaleodm.common.domain.status import ACTIVE_STATES, TERMINAL_STATES, TaskState
from scaleodm.common.settings import CapacitySettings
from scaleodm.common.store.tasks import DEFAULT_TENANT

Doc = dict[str, Any]
QUEUE_ID = "queue"


@dataclass(frozen=True)
class Waiting:
    """A task waiting for a slot, as admission sees it."""

    task_id: str
    attempt: int
    tenant: str
    priority: int
    queued_at_ms: int
    size_class: str


@dataclass(frozen=True)
class Active:
    """The runs holding slots now: by size class and by tenant."""

    by_class: dict[str, int]
    by_tenant: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_class.values())


@dataclass(frozen=True)
class Orphan:
    """A child (``splitmerge``) its parent left behind, and what ends it: ``cancel`` when the
    parent has ended while the child is queued or running, ``remove`` when the parent was
    removed (or is gone)."""

    task_id: str
    attempt: int
    parent: str
    action: Literal["cancel", "remove"]


WAITING: Doc = {"state": TaskState.QUEUED.value, "removed": False, "admitted": {"$ne": True}}
# A running task holds a slot whether admitted or not (one started before admission control).
HOLDING: Doc = {"removed": False, "$or": [
    {"state": TaskState.RUNNING.value},
    {"state": TaskState.QUEUED.value, "admitted": True},
]}


class AdmissionStore:
    def __init__(self, db: AsyncDatabase[Doc], capacity: CapacitySettings) -> None:
        self.tasks = db["tasks"]
        self.events = db["events"]
        self.admission = db["admission"]
        self.capacity = capacity

    async def ensure_indexes(self) -> None:
        await self.tasks.create_index(
            [("state", ASCENDING), ("priority", DESCENDING), ("date_created_ms", ASCENDING)],
            name="admission",
        )

    async def waiting(self, limit: int) -> list[Waiting]:
        """Up to ``limit`` waiting tasks, highest priority and oldest first."""
        cursor = self.tasks.find(
            WAITING,
            {"attempt": 1, "tenant": 1, "priority": 1, "date_created_ms": 1, "images_count": 1},
        ).sort([("priority", DESCENDING), ("date_created_ms", ASCENDING)]).limit(limit)
        return [
            Waiting(
                task_id=d["_id"], attempt=d["attempt"],
                tenant=d.get("tenant") or DEFAULT_TENANT, priority=int(d.get("priority") or 0),
                queued_at_ms=int(d.get("date_created_ms") or 0),
                size_class=self.capacity.class_of(d.get("images_count") or None).name,
            )
            async for d in cursor
        ]

    async def active(self) -> Active:
        """The slots in use, by class and by tenant."""
        by_class: dict[str, int] = {}
        by_tenant: dict[str, int] = {}
        async for d in self.tasks.find(HOLDING, {"size_class": 1, "tenant": 1}):
            size_class = d.get("size_class") or self.capacity.classes[-1].name
            tenant = d.get("tenant") or DEFAULT_TENANT
            by_class[size_class] = by_class.get(size_class, 0) + 1
            by_tenant[tenant] = by_tenant.get(tenant, 0) + 1
        return Active(by_class, by_tenant)

    async def task(self, task_id: str) -> Doc | None:
        """The task document, unless it is removed or no longer waits."""
        return await self.tasks.find_one({"_id": task_id, **WAITING})

    async def ended_in_the_log(self, task_id: str, attempt: int) -> bool:
        """Whether the event log already ends the attempt (completed, failed, canceled) or
        removes the task although the document does not say so yet: its writer died between
        recording and applying the event, which the outbox relay applies soon. Such a task must
        not be admitted meanwhile (a run for a canceled task, a wrong webhook)."""
        found = await self.events.find_one({"task_id": task_id, "$or": [
            {"attempt": attempt, "kind": {"$in": ["completed", "failed", "canceled"]}},
            {"kind": "removed"},
        ]}, {"_id": 1})
        return found is not None

    async def orphans(self, limit: int) -> list[Orphan]:
        """Children whose parent no longer needs them (``Orphan``), at most ``limit``: every
        child not removed is read with its parent's state (a parent's run removes its children
        itself when it ends normally, so few are left to read)."""
        children = await self.tasks.find(
            {"parent": {"$exists": True}, "removed": False},
            {"_id": 1, "attempt": 1, "parent": 1, "state": 1},
        ).sort("created_at", ASCENDING).to_list(limit)
        if not children:
            return []
        parents = {d["_id"]: d async for d in self.tasks.find(
            {"_id": {"$in": sorted({c["parent"] for c in children})}},
            {"_id": 1, "state": 1, "removed": 1})}
        found: list[Orphan] = []
        for child in children:
            parent = parents.get(child["parent"])
            if parent is None or parent.get("removed"):
                found.append(Orphan(child["_id"], child["attempt"], child["parent"], "remove"))
            elif (TaskState(parent["state"]) in TERMINAL_STATES
                  and TaskState(child["state"]) in ACTIVE_STATES):
                found.append(Orphan(child["_id"], child["attempt"], child["parent"], "cancel"))
        return found

    async def save_queue(self, task_ids: list[str]) -> None:
        """The waiting tasks in admission order (position = index + 1)."""
        await self.admission.replace_one(
            {"_id": QUEUE_ID}, {"_id": QUEUE_ID, "ids": task_ids, "at": clock.now()}, upsert=True)

    async def queue_positions(self) -> dict[str, int]:
        """Task id → position in the queue (1 = admitted next), as the last pass saved it."""
        doc = await self.admission.find_one({"_id": QUEUE_ID}, {"ids": 1})
        ids: list[str] = doc.get("ids", []) if doc else []
        return {task_id: i + 1 for i, task_id in enumerate(ids)}
