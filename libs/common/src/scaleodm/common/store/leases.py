"""Leases: one holder at a time for work that several replicas could do (the outbox relay).

A lease is one document: ``_id`` (its name), ``holder``, ``until``. ``hold`` takes it when it is
free or expired, or renews it for its holder; a holder that dies loses it when ``until`` passes.
Only a conditional update and an insert (its unique ``_id`` settles a race between two
takers), standard MongoDB.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from scaleodm.common import clock

Doc = dict[str, Any]


class Leases:
    def __init__(self, db: AsyncDatabase[Doc]) -> None:
        self.leases = db["leases"]

    async def hold(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew lease ``name`` for ``ttl_s`` from now; False while another holds it."""
        now = clock.now()
        until = now + dt.timedelta(seconds=ttl_s)
        taken = await self.leases.update_one(
            {"_id": name, "$or": [{"holder": holder}, {"until": {"$lt": now}}]},
            {"$set": {"holder": holder, "until": until}},
        )
        if taken.matched_count:
            return True
        try:
            await self.leases.insert_one({"_id": name, "holder": holder, "until": until})
        except DuplicateKeyError:
            return False  # held by another, and not expired
        return True

    async def release(self, name: str, holder: str) -> None:
        """Give the lease up (at shutdown), so another replica takes it at once."""
        await self.leases.delete_one({"_id": name, "holder": holder})
