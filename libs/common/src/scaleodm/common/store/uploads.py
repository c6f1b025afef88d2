"""Chunked uploads (NodeODM init -> upload x N -> commit), shared by every gateway replica.

State lives here and in S3, never in a gateway's memory, so any replica can serve any request of
an upload. ``upload_sessions`` holds the init fields; ``upload_names`` holds one document per
stored file name (``_id`` = ``<uuid>/<name>``), so claiming a name is one insert that the unique
``_id`` makes atomic: two replicas storing ``a.jpg`` at once end with ``a.jpg`` and ``a_.jpg``, as
NodeODM renames duplicates. Commit flips ``committed`` with a guarded update, so exactly one commit
wins; the session stays until the task exists, so a commit cut off in between can be retried.
A single-request ``/task/new`` holds its id here too (``reserve``), so that two requests, or a
request and a chunked upload, never share one id's files.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

Doc = dict[str, Any]
_MAX_RENAMES = 1000


class UploadNotFoundError(Exception):
    """No open (uncommitted) upload with this uuid."""


class NamesExhaustedError(Exception):
    """Every renaming of a file name is taken already (``_MAX_RENAMES``)."""


class UploadStore:
    def __init__(self, db: AsyncDatabase[Doc]) -> None:
        self.sessions = db["upload_sessions"]
        # Not "*_files": nx-27017 treats such names as GridFS and silently drops updates.
        self.files = db["upload_names"]

    async def ensure_indexes(self) -> None:
        await self.files.create_index([("upload_id", ASCENDING)], name="upload")
        await self.sessions.create_index([("created_at", ASCENDING)], name="created")

    async def init(self, upload_id: str, fields: dict[str, Any]) -> None:
        """Open an upload, or overwrite the fields of an open one (ClusterODM retries init)."""
        now = dt.datetime.now(dt.UTC)
        try:
            await self.sessions.insert_one(
                {"_id": upload_id, "fields": fields, "committed": False, "created_at": now}
            )
        except DuplicateKeyError:
            res = await self.sessions.update_one(
                {"_id": upload_id, "committed": False}, {"$set": {"fields": fields}}
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
                "created_at": dt.datetime.now(dt.UTC),
            })
        except DuplicateKeyError:
            return False
        return True

    async def get(self, upload_id: str) -> Doc | None:
        """The upload, open or committed (a committed one whose task is missing was cut off)."""
        return await self.sessions.find_one({"_id": upload_id})

    async def get_open(self, upload_id: str) -> Doc:
        doc = await self.sessions.find_one({"_id": upload_id, "committed": False})
        if doc is None:
            raise UploadNotFoundError(upload_id)
        return doc

    async def claim_name(
        self, upload_id: str, name: str, next_name: Callable[[str], str]
    ) -> str:
        """Reserve a file name in the upload, renaming on clashes; returns the stored name."""
        candidate = name
        for _ in range(_MAX_RENAMES):
            try:
                await self.files.insert_one({
                    "_id": f"{upload_id}/{candidate}", "upload_id": upload_id,
                    "name": candidate, "size": None, "stored": False,
                })
                return candidate
            except DuplicateKeyError:
                candidate = next_name(candidate)
        raise NamesExhaustedError(name)

    async def mark_stored(self, upload_id: str, name: str, size: int) -> None:
        await self.files.update_one(
            {"_id": f"{upload_id}/{name}"}, {"$set": {"size": size, "stored": True}}
        )

    async def release_name(self, upload_id: str, name: str) -> None:
        await self.files.delete_one({"_id": f"{upload_id}/{name}"})

    async def stored_names(self, upload_id: str) -> list[str]:
        cursor = self.files.find({"upload_id": upload_id, "stored": True}, {"name": 1})
        return [d["name"] async for d in cursor]

    async def commit(self, upload_id: str) -> bool:
        res = await self.sessions.update_one(
            {"_id": upload_id, "committed": False},
            {"$set": {"committed": True, "committed_at": dt.datetime.now(dt.UTC)}},
        )
        return res.modified_count == 1

    async def delete(self, upload_id: str) -> None:
        await self.files.delete_many({"upload_id": upload_id})
        await self.sessions.delete_one({"_id": upload_id})
