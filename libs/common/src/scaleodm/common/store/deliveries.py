"""Webhook deliveries: one document per (task, attempt, target), every attempt recorded."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

Doc = dict[str, Any]


class DeliveryStore:
    def __init__(self, db: AsyncDatabase[Doc]) -> None:
        self.deliveries = db["webhook_deliveries"]

    async def ensure_indexes(self) -> None:
        await self.deliveries.create_index([("task_id", ASCENDING)], name="task")

    async def get(self, delivery_id: str) -> Doc | None:
        return await self.deliveries.find_one({"_id": delivery_id})

    async def open(self, delivery_id: str, *, task_id: str, attempt: int, url: str) -> Doc:
        try:
            await self.deliveries.insert_one({
                "_id": delivery_id, "task_id": task_id, "attempt": attempt, "url": url,
                "status": "pending", "attempts": [],
                "created_at": dt.datetime.now(dt.UTC),
            })
        except DuplicateKeyError:
            pass
        doc = await self.get(delivery_id)
        assert doc is not None
        return doc

    async def record_attempt(
        self, delivery_id: str, *, status: str, status_code: int | None, latency_ms: int,
        error: str | None,
    ) -> None:
        attempt = {
            "at": dt.datetime.now(dt.UTC), "status_code": status_code,
            "latency_ms": latency_ms, "error": error,
        }
        await self.deliveries.update_one(
            {"_id": delivery_id},
            {"$push": {"attempts": attempt}, "$set": {"status": status}},
        )

    async def for_task(self, task_id: str) -> list[Doc]:
        return await self.deliveries.find({"task_id": task_id}).to_list(None)
