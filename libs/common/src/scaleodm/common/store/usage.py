"""Images submitted per tenant and month: what a tenant's ``monthly_image_quota`` is counted on.

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

Only standard operations (no ``$setOnInsert`` upserts, which the stand-in servers disagree about).
"""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from scaleodm.common import clock

Doc = dict[str, Any]
COLLECTION = "usage"
# Update, insert, update again (after a concurrent insert), and one more when the count moved
# down between a refused update and the read that explains it (a give-back).
_ATTEMPTS = 4


class UsageStore:
    def __init__(self, db: AsyncDatabase[Doc]) -> None:
        self.usage = db[COLLECTION]

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
