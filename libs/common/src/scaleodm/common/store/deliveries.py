"""Webhook deliveries: one document per (task, attempt, target), every attempt recorded.

A delivery is ``pending`` until ``delivered`` or ``dead`` (``reason`` says why). Times the retry
schedule depends on (``first_at_ms``, ``next_at_ms``, each attempt's ``at_ms``) are epoch
milliseconds, which every wire server we test on stores faithfully; ``at`` stays for humans.

Records are diagnostics of a task and do not outlive it: removing a task (``TaskStore.delete_task``,
after ``/task/remove`` or its retention) deletes them with its events.
"""

from __future__ import annotations

import json
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from scaleodm.common import clock

Doc = dict[str, Any]


COLLECTION = "webhook_deliveries"


class DeliveryStore:
    def __init__(self, db: AsyncDatabase[Doc]) -> None:
        self.deliveries = db[COLLECTION]

    async def ensure_indexes(self) -> None:
        await self.deliveries.create_index([("task_id", ASCENDING)], name="task")

    async def get(self, delivery_id: str) -> Doc | None:
        return await self.deliveries.find_one({"_id": delivery_id})

    async def open(self, delivery_id: str, *, task_id: str, attempt: int, url: str) -> Doc:
        now = clock.now()
        try:
            await self.deliveries.insert_one({
                "_id": delivery_id, "task_id": task_id, "attempt": attempt, "url": url,
                "status": "pending", "attempts": [],
                "created_at": now, "first_at_ms": clock.to_ms(now),
                "next_at_ms": 0, "reason": None,
            })
        except DuplicateKeyError:
            pass
        doc = await self.get(delivery_id)
        assert doc is not None
        return doc

    async def record_attempt(
        self, delivery_id: str, *, status: str, status_code: int | None, latency_ms: int,
        error: str | None, next_at_ms: int = 0, reason: str | None = None,
    ) -> None:
        now = clock.now()
        attempt = {
            "at": now, "at_ms": clock.to_ms(now), "status_code": status_code,
            "latency_ms": latency_ms, "error": error,
        }
        await self.deliveries.update_one(
            {"_id": delivery_id},
            {"$push": {"attempts": attempt},
             "$set": {"status": status, "next_at_ms": next_at_ms, "reason": reason}},
        )

    async def for_task(self, task_id: str) -> list[Doc]:
        docs = await self.deliveries.find({"task_id": task_id}).sort("created_at").to_list(None)
        for doc in docs:  # nx-27017 stores $push-ed subdocuments as JSON strings
            doc["attempts"] = [json.loads(a) if isinstance(a, str) else a
                               for a in doc.get("attempts", [])]
        return docs
