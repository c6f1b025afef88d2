"""Leases: one holder at a time for work that several replicas could do (the outbox relay,
admission), and a process's sign of life (``keep``: a lease only it holds, renewed while it
runs, so others can tell a dead holder of something from a live one).

A lease is one document: ``_id`` (its name), ``holder``, ``until``. ``hold`` takes it when it is
free or expired, or renews it for its holder; a holder that dies loses it when ``until`` passes.
Only a conditional replacement and an insert (its unique ``_id`` settles a race between two
takers), standard MongoDB. A replacement rather than ``$set``: nx-27017, the tests' lenient wire
server, stores a date set by ``$set`` as a string, on which ``$lt`` never matches again, so a
dead holder's lease was never taken over there (admission stalled in a chaos run).
"""

from __future__ import annotations

import asyncio
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
        taken = await self.leases.replace_one(
            {"_id": name, "$or": [{"holder": holder}, {"until": {"$lt": now}}]},
            {"holder": holder, "until": until},
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

    async def until(self, name: str) -> dt.datetime | None:
        """When lease ``name`` runs out (None: nobody holds it)."""
        doc = await self.leases.find_one({"_id": name}, {"until": 1})
        return None if doc is None else _aware(doc["until"])

    async def keep(self, name: str, ttl_s: float, every_s: float) -> None:
        """Hold lease ``name`` (its own name as holder) for as long as this runs, renewed every
        ``every_s``; released when cancelled. A failed renewal is tried again at the next
        interval (the lease may lapse meanwhile: others then think this process dead)."""
        try:
            while True:
                try:
                    await self.hold(name, name, ttl_s)
                except Exception:  # storage away: the next interval tries again
                    pass
                await asyncio.sleep(every_s)
        finally:
            try:
                await asyncio.shield(self.release(name, name))
            except Exception:
                pass


def _aware(at: dt.datetime) -> dt.datetime:
    """A stored time as an aware UTC datetime (clients without ``tz_aware`` read naive ones)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)
