"""Retention queries on the task store: finished tasks that expired, removals that stalled.

NodeODM removes a task ``cleanupTasksAfter`` minutes after it finished (completed, failed or
canceled). Here the expiry only *selects*; the removal itself is a ``removed`` event recorded
with its ``RemoveTask`` command, exactly as a client's ``/task/remove`` (the watcher's sweep
emits it, the scheduler deletes the run, the S3 prefix and the documents). ``finished_at_ms`` is
epoch milliseconds, set by the terminal event and reset by a restart, so a restarted task is not
selected while it runs again.

A removal whose command the scheduler gave up on (``max_deliver`` spent while S3 was away) would
leave the removed task's data for good; ``resume_removal`` marks its recorded event unpublished
again, and the outbox relay then publishes the event and its command once more.

A deleted task's tombstone (``TaskStore.delete_task``) keeps its uuid refused; once no command of
the old task can arrive any more it is forgotten (``forget_tombstones``, and MongoDB's TTL monitor
through ``ensure_tombstone_expiry``), and the uuid may be taken again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import NamedTuple

from pymongo import ASCENDING
from pymongo.errors import OperationFailure, PyMongoError

from scaleodm.common.contracts import events
from scaleodm.common.domain.status import TERMINAL_STATES
from scaleodm.common.logging import get_logger
from scaleodm.common.store.tasks import TaskStore

log = get_logger(__name__)

_TERMINAL = sorted(s.value for s in TERMINAL_STATES)
TOMBSTONE_TTL_INDEX = "tombstone_expiry"
# IndexOptionsConflict, IndexKeySpecsConflict: the index exists with another expireAfterSeconds.
_INDEX_CONFLICTS = (85, 86)


class TaskRef(NamedTuple):
    task_id: str
    attempt: int


async def ensure_indexes(store: TaskStore) -> None:
    await store.tasks.create_index(
        [("removed", ASCENDING), ("state", ASCENDING), ("finished_at_ms", ASCENDING)],
        name="expiry",
    )


def _expired_filter(finished_before_ms: int) -> dict[str, object]:
    return {"removed": False, "state": {"$in": _TERMINAL},
            "finished_at_ms": {"$lt": finished_before_ms}}


async def expired(store: TaskStore, finished_before_ms: int, limit: int) -> list[TaskRef]:
    """Tasks not removed that finished before ``finished_before_ms``, oldest first."""
    cursor = (
        store.tasks.find(_expired_filter(finished_before_ms), {"attempt": 1})
        .sort("finished_at_ms", ASCENDING)
        .limit(limit)
    )
    return [TaskRef(d["_id"], int(d["attempt"])) async for d in cursor]


async def still_expired(store: TaskStore, ref: TaskRef, finished_before_ms: int) -> bool:
    """Re-checked right before the removal: a restart in the meantime keeps the task."""
    found = await store.tasks.find_one(
        {"_id": ref.task_id, "attempt": ref.attempt, **_expired_filter(finished_before_ms)},
        {"_id": 1},
    )
    return found is not None


async def stalled_removals(store: TaskStore, removed_before_ms: int, limit: int) -> list[TaskRef]:
    """Removed tasks whose documents are still there ``removed_at_ms`` < ``removed_before_ms``."""
    cursor = (
        store.tasks.find({"removed": True, "removed_at_ms": {"$lt": removed_before_ms}},
                         {"attempt": 1})
        .sort("removed_at_ms", ASCENDING)
        .limit(limit)
    )
    return [TaskRef(d["_id"], int(d["attempt"])) async for d in cursor]


async def resume_removal(store: TaskStore, ref: TaskRef) -> bool:
    """Resume a stalled removal; True when something was done.

    The ``removed`` event carries its command: it is marked unpublished again, so the outbox
    relay resends both. No event left: the scheduler deleted the log and died before the task
    document (``TaskStore.delete_task``), after the run and the S3 prefix; the document goes now.
    """
    event_id = events.new(events.TaskRemoved, ref.task_id, ref.attempt).event_id
    doc = await store.events.find_one({"_id": event_id}, {"command": 1, "published": 1})
    if doc is None:
        await store.delete_task(ref.task_id)
        return True
    if not doc.get("command") or not doc.get("published"):
        return False  # recorded without a command (older gateways), or not published yet
    res = await store.events.update_one(
        {"_id": event_id, "published": True}, {"$set": {"published": False}}
    )
    return res.modified_count == 1


async def forget_tombstones(store: TaskStore, deleted_before: dt.datetime) -> int:
    """Forget the tombstones of tasks deleted before ``deleted_before``: their uuids may be
    taken again. Returns how many were forgotten."""
    res = await store.tombstones.delete_many({"deleted_at": {"$lt": deleted_before}})
    return res.deleted_count


async def ensure_tombstone_expiry(store: TaskStore, keep_s: float | None) -> None:
    """A TTL index on the tombstones' ``deleted_at``: MongoDB forgets them too, whether a
    watcher sweeps or not; ``keep_s`` None (kept forever) drops it.

    A changed ``keep_s`` replaces the index (``create_index`` refuses other options for an
    existing index; dropping and creating it works on every server, ``collMod`` does not: the
    collection is small, and a moment without the index only delays forgetting). Best effort:
    a server that refuses (no TTL support, no index rights) or
    does not answer leaves the forgetting to the sweep, which never depends on the index.
    """
    try:
        if keep_s is None:
            with contextlib.suppress(OperationFailure):  # absent: nothing to drop
                await store.tombstones.drop_index(TOMBSTONE_TTL_INDEX)
            return
        seconds = int(keep_s)
        try:
            await store.tombstones.create_index(
                [("deleted_at", ASCENDING)], name=TOMBSTONE_TTL_INDEX, expireAfterSeconds=seconds
            )
        except OperationFailure as exc:
            if exc.code not in _INDEX_CONFLICTS:
                raise
            await store.tombstones.drop_index(TOMBSTONE_TTL_INDEX)
            await store.tombstones.create_index(
                [("deleted_at", ASCENDING)], name=TOMBSTONE_TTL_INDEX, expireAfterSeconds=seconds
            )
    except PyMongoError as exc:
        log.warning("tombstone TTL index not set; the retention sweep forgets tombstones",
                    error=repr(exc))
