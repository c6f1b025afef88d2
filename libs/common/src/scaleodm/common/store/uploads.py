"""Chunked uploads (NodeODM init -> upload x N -> commit), shared by every gateway replica.

State lives here and in S3, never in a gateway's memory, so any replica can serve any request of
an upload. ``upload_sessions`` holds the init fields; ``upload_names`` holds one document per
stored file name (``_id`` = ``<uuid>/<name>``), so claiming a name is one insert that the unique
``_id`` makes atomic: two replicas storing ``a.jpg`` at once end with ``a.jpg`` and ``a_.jpg``, as
NodeODM renames duplicates. Commit flips ``committed`` with a guarded update, so exactly one commit
wins; the session stays until the task exists, so a commit cut off in between can be retried.
A single-request ``/task/new`` holds its id here too (``reserve``), so that two requests, or a
request and a chunked upload, never share one id's files. The hold names the gateway process
that took it (``holder``, a process lease renewed while the process runs: ``Leases.keep``): a
request cut off by its gateway's death leaves a hold nobody releases, and the client's retry of
that request takes it over once the holder's lease has run out (at most ``HOLDER_TTL_S``
later; a holder that renews meanwhile is alive, and its hold stands).

An upload belongs to the tenant that opened it (``tenant``; sessions opened before tenants
existed: ``default``'s). Re-init, upload and commit match the session *and* its tenant in one
query, so another tenant's upload is, to them, no upload at all.

The session also counts, as files are written, what commit needs, so that commit reads one
document and never lists names or objects: ``stored_count``/``stored_bytes`` (files stored
while the upload was open, less those given back) and ``in_flight`` (names claimed while it was
open and neither stored nor given back yet). Each is changed by a guarded ``$inc`` on the open
session in the same request that records the name, and commit flips ``committed`` with
``find_one_and_update``, so the counts it returns are exactly those of the files recorded before
the flip; a file recorded after it is counted nowhere, as before (its object lies under the
task's prefix all the same). With ``in_flight`` at 0 no name can still be arriving, and
``delete`` skips marking them as orphans. A session opened without counters (``counted`` absent:
an older gateway opened it) is committed by reading its names, as before.

Retention (NodeODM ``cleanupUploadsAfter``; the watcher's sweep does it): ``active_at_ms`` is the
last activity of an upload (init, reserve, each file, commit). An upload idle for longer than the
retention is first *closed* with a guarded update (it becomes committed and reserved, so no
upload, commit or init takes it any more, and a concurrent file's activity makes the guard miss),
then its S3 objects go unless a task now holds the id, then its records. A file that starts
after its upload closed (a chunk racing a commit or a close) still reaches S3: its name record is
kept, marked ``orphan_at_ms``, so the sweep can later delete that object once no task or upload
holds the id (a task that holds it removes it with its whole prefix). Times the sweep compares are
epoch milliseconds, which every wire server stores faithfully. No TTL index here: a record must
never vanish before the S3 object it stands for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from scaleodm.common import clock
from scaleodm.common.store.leases import Leases
from scaleodm.common.store.tasks import owned_by

Doc = dict[str, Any]
_MAX_RENAMES = 1000


class UploadNotFoundError(Exception):
    """No open (uncommitted) upload with this uuid."""


class NamesExhaustedError(Exception):
    """Every renaming of a file name is taken already (``_MAX_RENAMES``)."""


COUNTED = 1  # the session's counters' version (``counted``), set when it is opened


# A gateway process's lease (``Leases.keep``): renewed every HOLDER_RENEW_S, it lapses
# HOLDER_TTL_S after the process died.
HOLDER_TTL_S = 6.0
HOLDER_RENEW_S = 2.0


class UploadStore:
    def __init__(self, db: AsyncDatabase[Doc], holder: str | None = None) -> None:
        self.sessions = db["upload_sessions"]
        # Not "*_files": nx-27017 treats such names as GridFS and silently drops updates.
        self.files = db["upload_names"]
        self.leases = Leases(db)
        # This process's lease name, which its holds carry (None: holds nobody can take over).
        self.holder = holder

    async def ensure_indexes(self) -> None:
        await self.files.create_index([("upload_id", ASCENDING)], name="upload")
        await self.files.create_index([("orphan_at_ms", ASCENDING)], name="orphan")
        await self.sessions.create_index([("created_at", ASCENDING)], name="created")
        await self.sessions.create_index([("active_at_ms", ASCENDING)], name="idle")

    async def init(self, upload_id: str, fields: dict[str, Any], tenant: str) -> None:
        """Open an upload of ``tenant``, or overwrite the fields of its open one (ClusterODM
        retries init); ``UploadNotFoundError`` when the id is taken otherwise."""
        now = clock.now()
        try:
            await self.sessions.insert_one({
                "_id": upload_id, "fields": fields, "committed": False, "created_at": now,
                "active_at_ms": clock.now_ms(), "counted": COUNTED, "stored_count": 0,
                "stored_bytes": 0, "in_flight": 0, "tenant": tenant,
            })
        except DuplicateKeyError:
            res = await self.sessions.update_one(
                {"_id": upload_id, "committed": False, **owned_by(tenant)},
                {"$set": {"fields": fields, "active_at_ms": clock.now_ms()}},
            )
            if res.matched_count == 0:
                raise UploadNotFoundError(upload_id) from None

    async def reserve(self, upload_id: str) -> bool:
        """Hold ``upload_id`` for one single-request ``/task/new`` until its task exists (then
        ``delete``). The held id is no open upload, so no chunked route takes it; False when the
        id is already held (an open or committed upload, another request)."""
        try:
            await self.sessions.insert_one({
                "_id": upload_id, "fields": {}, "committed": True, "reserved": True,
                "created_at": clock.now(), "active_at_ms": clock.now_ms(),
                "holder": self.holder,
            })
        except DuplicateKeyError:
            return await self._take_over(upload_id)
        return True

    async def _take_over(self, upload_id: str) -> bool:
        """Take a hold whose holder died (module docstring); False while it lives, and for
        anything that is not such a hold."""
        held = await self.sessions.find_one({"_id": upload_id, "reserved": True}, {"holder": 1})
        holder = None if held is None else held.get("holder")
        if self.holder is None or holder is None or holder == self.holder:
            return False
        first = await self.leases.until(holder)
        deadline = time.monotonic() + HOLDER_TTL_S + HOLDER_RENEW_S
        while True:
            until = await self.leases.until(holder)
            if until is None or until < clock.now():  # dead: its hold is ours
                taken = await self.sessions.update_one(
                    {"_id": upload_id, "reserved": True, "holder": holder},
                    {"$set": {"holder": self.holder, "created_at": clock.now(),
                              "active_at_ms": clock.now_ms()}})
                return taken.modified_count == 1
            if first is not None and until > first:  # renewed: alive, the hold stands
                return False
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.25)

    async def unreserve(self, upload_id: str) -> None:
        """Free an id ``reserve`` held (its task exists, or its request failed). No name is ever
        claimed under a held id (no chunked route takes it), so the session is all there is."""
        await self.sessions.delete_one({"_id": upload_id, "reserved": True})

    async def get(self, upload_id: str) -> Doc | None:
        """The upload, open or committed (a committed one whose task is missing was cut off)."""
        return await self.sessions.find_one({"_id": upload_id})

    async def get_open(self, upload_id: str, tenant: str) -> Doc:
        """``tenant``'s open upload ``upload_id``; ``UploadNotFoundError`` when there is none."""
        doc = await self.sessions.find_one(
            {"_id": upload_id, "committed": False, **owned_by(tenant)})
        if doc is None:
            raise UploadNotFoundError(upload_id)
        return doc

    async def claim_name(
        self, upload_id: str, name: str, next_name: Callable[[str], str]
    ) -> str:
        """Reserve a file name in the upload, renaming on clashes; returns the stored name.

        Counts as activity of the upload; a name claimed after the upload closed (the request
        checked it open just before) is recorded as an orphan (module docstring)."""
        candidate = name
        for _ in range(_MAX_RENAMES):
            try:
                await self.files.insert_one({
                    "_id": f"{upload_id}/{candidate}", "upload_id": upload_id,
                    "name": candidate, "size": None, "stored": False, "orphan_at_ms": None,
                })
                break
            except DuplicateKeyError:
                candidate = next_name(candidate)
        else:
            raise NamesExhaustedError(name)
        # After the insert: a close or commit in between either sees the name (and marks it in
        # ``delete``) or makes this guarded update miss.
        res = await self.sessions.update_one(
            {"_id": upload_id, "committed": False},
            {"$set": {"active_at_ms": clock.now_ms()}, "$inc": {"in_flight": 1}},
        )
        if res.matched_count == 0:
            await self.files.update_one(
                {"_id": f"{upload_id}/{candidate}"}, {"$set": {"orphan_at_ms": clock.now_ms()}}
            )
        return candidate

    async def mark_stored(self, upload_id: str, name: str, size: int) -> None:
        """The file ``name`` is in S3 (``size`` bytes): recorded on its name, then counted by
        the session while it is open (module docstring). Counts as activity."""
        await self.files.update_one(
            {"_id": f"{upload_id}/{name}"}, {"$set": {"size": size, "stored": True}}
        )
        await self.sessions.update_one(
            {"_id": upload_id, "committed": False},
            {"$set": {"active_at_ms": clock.now_ms()},
             "$inc": {"stored_count": 1, "stored_bytes": size, "in_flight": -1}},
        )

    async def release_name(self, upload_id: str, name: str, *, stored_size: int | None = None
                           ) -> None:
        """Give a claimed name back: its file was never stored, or (``stored_size``: it was, with
        that size) its object has been deleted. The session's counts follow while it is open."""
        await self.files.delete_one({"_id": f"{upload_id}/{name}"})
        change = ({"in_flight": -1} if stored_size is None
                  else {"stored_count": -1, "stored_bytes": -stored_size})
        await self.sessions.update_one({"_id": upload_id, "committed": False}, {"$inc": change})

    async def stored_names(self, upload_id: str) -> list[str]:
        cursor = self.files.find(
            {"upload_id": upload_id, "stored": True, "orphan_at_ms": None}, {"name": 1}
        )
        return [d["name"] async for d in cursor]

    async def holds(self, upload_id: str, name: str) -> bool:
        """Whether the upload stored a file named exactly ``name``."""
        return await self.files.find_one(
            {"upload_id": upload_id, "name": name, "stored": True, "orphan_at_ms": None},
            {"_id": 1}) is not None

    async def commit(self, upload_id: str, tenant: str) -> Doc | None:
        """Close ``tenant``'s open upload ``upload_id`` for good; its session as committed (with
        the counts of every file recorded before), or None when it has no such open upload."""
        doc: Doc | None = await self.sessions.find_one_and_update(
            {"_id": upload_id, "committed": False, **owned_by(tenant)},
            {"$set": {"committed": True, "committed_at": clock.now(),
                      "active_at_ms": clock.now_ms()}},
            return_document=ReturnDocument.AFTER,
        )
        return doc

    async def stored_count(self, session: Doc) -> int:
        """How many files the upload ``session`` holds: its count, or for a session opened
        without counters, its stored names."""
        if session.get("counted") == COUNTED:
            return max(0, int(session.get("stored_count") or 0))
        return len(await self.stored_names(session["_id"]))

    async def delete(self, upload_id: str, session: Doc | None = None) -> None:
        """Forget the upload (its task exists, or it failed). Names of files still arriving
        stay, as orphans: their objects land after this (module docstring). ``session``: its
        committed document, if at hand; when it counts no name in flight, there is none to
        mark."""
        if (session is None or session.get("counted") != COUNTED
                or int(session.get("in_flight") or 0) != 0):
            await self.files.update_many(
                {"upload_id": upload_id, "stored": False, "orphan_at_ms": None},
                {"$set": {"orphan_at_ms": clock.now_ms()}},
            )
        await self.files.delete_many({"upload_id": upload_id, "orphan_at_ms": None})
        await self.sessions.delete_one({"_id": upload_id})

    # -- retention (the watcher's sweep) ---------------------------------------------------

    async def idle(self, before_ms: int, limit: int) -> list[str]:
        """Ids of uploads (open, committed or reserved) with no activity since ``before_ms``,
        longest idle first."""
        cursor = (
            self.sessions.find({"active_at_ms": {"$lt": before_ms}}, {"_id": 1})
            .sort("active_at_ms", ASCENDING)
            .limit(limit)
        )
        return [d["_id"] async for d in cursor]

    async def close_idle(self, upload_id: str, before_ms: int) -> bool:
        """Close an upload still idle since ``before_ms``: no upload, commit or init takes it
        any more. False when it is gone or saw activity meanwhile. Closing twice is harmless."""
        res = await self.sessions.update_one(
            {"_id": upload_id, "active_at_ms": {"$lt": before_ms}},
            {"$set": {"committed": True, "reserved": True, "closed": True}},
        )
        return res.matched_count == 1

    async def drop(self, upload_id: str) -> None:
        """Delete a closed upload's records; orphaned names stay for their own expiry."""
        await self.files.delete_many({"upload_id": upload_id, "orphan_at_ms": None})
        await self.sessions.delete_one({"_id": upload_id})

    async def orphans(self, before_ms: int, limit: int) -> list[Doc]:
        """Name records of files that arrived after their upload closed, orphaned before
        ``before_ms`` (``upload_id``, ``name``), oldest first."""
        cursor = (
            self.files.find({"orphan_at_ms": {"$lt": before_ms}}, {"upload_id": 1, "name": 1})
            .sort("orphan_at_ms", ASCENDING)
            .limit(limit)
        )
        return await cursor.to_list(None)

    async def drop_orphan(self, record_id: str) -> None:
        await self.files.delete_one({"_id": record_id})
