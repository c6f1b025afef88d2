"""The MongoDB task store: ``tasks`` (one document per task) and ``events`` (the event log).

``events`` is append-only: ``_id`` is the event id (a redelivered event is recognised) and
``(task_id, seq)`` is unique, which is also how ``seq`` is allocated: a writer inserts at
``last + 1`` and retries on conflict, so concurrent writers never share or skip a number.
``tasks`` is a projection of the log, changed only by ``apply_event`` (see ``projection``), called
by whoever records the event (the gateway for clients' actions, the scheduler and the watcher for
runs), never a second time by a consumer of the bus. Console lines live in ``output`` events, never
in the task document.

The log is also the outbox (``emitting``): an event stays ``published: false`` until it is on
JetStream, and an event that causes a command carries it (``command``), written in the same insert,
so a recorded cancel can never lose its ``CancelTask``.

A deleted task leaves a tombstone (``tombstones``: ``_id`` = the uuid, ``deleted_at``), and
``create_task`` refuses a uuid that has one: commands and events are deduplicated by ids made of
uuid + attempt (JetStream keeps a ``Nats-Msg-Id`` for its duplicate window even after the ack) and
a late remove or create of the old task may still be delivered, so a uuid re-used right after the
deletion would have its first run dropped as a duplicate, or its run and files deleted. The
watcher's retention forgets tombstones after ``tombstone_keep_min`` (``store.retention``).

Only standard MongoDB 6+ operations; no upserts with ``$setOnInsert`` (the stand-in servers
disagree about it) and no ``$slice`` projections.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
from dataclasses import dataclass
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from scaleodm.common import clock, metrics
from scaleodm.common.contracts import commands, events
from scaleodm.common.contracts.ids import TaskId
from scaleodm.common.domain.status import ACTIVE_STATES, NodeOdmStatus, TaskState
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import MongoSettings
from scaleodm.common.store import deliveries, projection, usage

log = get_logger(__name__)

Doc = dict[str, Any]
_SEQ_RETRIES = 50
TOMBSTONES = "tombstones"


class TaskExistsError(Exception):
    """A task with this uuid already exists."""


# The child events a parent's stream tells (splitmerge), with the child's status after each.
CHILD_STATUS: dict[str, int | None] = {
    "queued": NodeOdmStatus.QUEUED, "running": NodeOdmStatus.RUNNING,
    "completed": NodeOdmStatus.COMPLETED, "failed": NodeOdmStatus.FAILED,
    "canceled": NodeOdmStatus.CANCELED, "removed": None,
}


class Outcome(enum.Enum):
    APPLIED = "applied"  # recorded now
    DUPLICATE = "duplicate"  # recorded before (redelivery, or a second writer)
    IGNORED = "ignored"  # not for this task's current attempt/state, or unknown task


@dataclass(frozen=True)
class ApplyResult:
    outcome: Outcome
    seq: int | None = None
    changed: bool = False
    # The ``child`` event recorded on the task's parent because of this one (splitmerge), with
    # its seq: its emitter publishes it too.
    told: events.TaskChildChanged | None = None

    @property
    def recorded(self) -> bool:
        return self.outcome is not Outcome.IGNORED


class TaskStore:
    """Task documents and the event log on one MongoDB database."""

    def __init__(self, db: AsyncDatabase[Doc]) -> None:
        self.db = db
        self.tasks = db["tasks"]
        self.events = db["events"]
        self.tombstones = db[TOMBSTONES]
        # Run records: written here, after a terminal event applied (``_charge``).
        self.usage = usage.UsageStore(db)

    async def ensure_indexes(self) -> None:
        await self.usage.ensure_indexes()
        await self.events.create_index(
            [("task_id", ASCENDING), ("seq", ASCENDING)], unique=True, name="task_seq"
        )
        await self.events.create_index(
            [("task_id", ASCENDING), ("attempt", ASCENDING), ("kind", ASCENDING),
             ("line_end", ASCENDING)],
            name="task_output",
        )
        await self.events.create_index(
            [("published", ASCENDING), ("recorded_at", ASCENDING)], name="outbox"
        )
        await self.tasks.create_index(
            [("removed", ASCENDING), ("state", ASCENDING)], name="state"
        )
        await self.tasks.create_index([("created_at", ASCENDING)], name="created")
        await self.tasks.create_index([("tenant", ASCENDING), ("created_at", ASCENDING)],
                                      name="tenant")
        await self.tasks.create_index([("parent", ASCENDING), ("created_at", ASCENDING)],
                                      name="parent")

    # -- tasks -------------------------------------------------------------------------------

    async def create_task(
        self, doc: Doc, queued: events.TaskQueued, *, failed: events.TaskFailed | None = None,
    ) -> ApplyResult:
        """Record a new task's ``queued`` event, then insert the task (attempt 1, queued). With
        ``failed`` (a task refused after its upload, NodeODM §3.5), that event is recorded too
        and the task is inserted failed already: no state in between that a crash could leave
        behind.

        In this order, a creation cut off in between leaves an event without a task, which a
        retry with the same uuid completes (the event is found and marked unpublished again, so
        the outbox relay still announces the task); the other way round would leave a task that
        nothing announces (admission still finds it: it reads the task documents).
        """
        if await self.tombstoned(doc["_id"]):
            raise TaskExistsError(doc["_id"])
        now = clock.now()
        full = {
            **projection.fresh_attempt(1),
            "removed": False,
            "created_at": now,
            **doc,
        }
        seq, first = await self._record(queued)
        if first is not None:  # a retry of a cut-off creation, or a uuid taken by a task
            if await self.tasks.find_one({"_id": doc["_id"]}, {"_id": 1}) is not None:
                raise TaskExistsError(doc["_id"])
            await self.events.update_one({"_id": queued.event_id},
                                         {"$set": {"published": False}})
        full["seq"] = seq
        if failed is not None:
            full["seq"], _ = await self._record(failed)
            full.update(state=TaskState.FAILED.value,
                        finished_at_ms=clock.to_ms(failed.occurred_at),
                        error_message=failed.error_message)
        try:
            await self.tasks.insert_one(full)
        except DuplicateKeyError as exc:
            raise TaskExistsError(doc["_id"]) from exc
        if await self.tombstoned(doc["_id"]):
            # A task under this uuid was deleted meanwhile (its deletion buries the uuid
            # before it deletes anything): this creation lost, undo it (the task inserted
            # above is ours: the insert succeeded, so the old one was gone).
            await self.tasks.delete_one({"_id": doc["_id"]})
            await self.events.delete_one({"_id": queued.event_id})
            raise TaskExistsError(doc["_id"])
        told = None
        if doc.get("parent"):
            told = await self._tell_parent(doc["parent"], failed or queued)
        return ApplyResult(Outcome.APPLIED, seq, told=told)

    async def tombstoned(self, task_id: str) -> bool:
        """True when a task with this uuid was deleted and its tombstone is not forgotten yet."""
        return await self.tombstones.find_one({"_id": task_id}, {"_id": 1}) is not None

    async def get_task(self, task_id: str, *, include_removed: bool = False) -> Doc | None:
        doc = await self.tasks.find_one({"_id": task_id})
        if doc is None or (doc.get("removed") and not include_removed):
            return None
        return doc

    async def list_task_ids(self, tenant: str | None = None, parent: str | None = None
                            ) -> list[str]:
        """Ids of the tasks not removed, oldest first: every tenant's, or ``tenant``'s only;
        with ``parent``, that task's children only (``splitmerge``)."""
        query: Doc = {"removed": False}
        if tenant is not None:
            query.update(owned_by(tenant))
        if parent is not None:
            query["parent"] = parent
        cursor = self.tasks.find(query, {"_id": 1}).sort("created_at", ASCENDING)
        return [d["_id"] async for d in cursor]

    async def completed_tasks(self, tenant: str | None = None, parent: str | None = None
                              ) -> list[Doc]:
        """The completed tasks not removed, newest first (every tenant's, or ``tenant``'s; with
        ``parent``, its children): what a STAC search looks at (id, name, attempt, outputs)."""
        query: Doc = {"removed": False, "state": TaskState.COMPLETED.value}
        if tenant is not None:
            query.update(owned_by(tenant))
        if parent is not None:
            query["parent"] = parent
        fields = {"_id": 1, "name": 1, "attempt": 1, "output_prefix": 1, "date_created_ms": 1,
                  "state": 1}
        cursor = self.tasks.find(query, fields).sort("created_at", DESCENDING)
        return [d async for d in cursor]

    async def set_traceparent(self, task_id: str, attempt: int, traceparent: str) -> None:
        """The trace an attempt's admission continues (tracing.py): its restart's request."""
        await self.tasks.update_one({"_id": task_id, "attempt": attempt},
                                    {"$set": {"traceparent": traceparent}})

    async def children_of(self, task_id: str) -> list[str]:
        """The children of ``task_id`` not removed (``splitmerge``), oldest first."""
        cursor = self.tasks.find({"parent": task_id, "removed": False},
                                 {"_id": 1}).sort("created_at", ASCENDING)
        return [d["_id"] async for d in cursor]

    async def count_by_state(self) -> dict[str, int]:
        """Tasks not removed, by state (one count per state, on the ``state`` index)."""
        return {state.value: await self.tasks.count_documents(
                    {"removed": False, "state": state.value}) for state in TaskState}

    async def count_active(self) -> int:
        return await self.tasks.count_documents(
            {"removed": False, "state": {"$in": [s.value for s in ACTIVE_STATES]}}
        )

    async def delete_task(self, task_id: str) -> None:
        """Physically delete a removed task's documents — events, webhook delivery records,
        the task (a task not removed is left alone) — after leaving its tombstone."""
        doc = await self.tasks.find_one({"_id": task_id}, {"removed": 1})
        if doc is not None and not doc.get("removed"):
            return  # its ``removed`` event is not projected yet: keep the log and the task
        # The tombstone first: from now on the uuid cannot be taken again.
        with contextlib.suppress(DuplicateKeyError):  # a retry: the first deletion's stays
            await self.tombstones.insert_one({"_id": task_id, "deleted_at": clock.now()})
        # Events and delivery records first: a retry after a crash in between still finds the
        # (removed) task, or none.
        await self.events.delete_many({"task_id": task_id})
        await self.db[deliveries.COLLECTION].delete_many({"task_id": task_id})
        await self.tasks.delete_one({"_id": task_id, "removed": True})

    # -- events ------------------------------------------------------------------------------

    async def apply_event(
        self, ev: events.TaskEvent, command: commands.Command | None = None
    ) -> ApplyResult:
        """Record ``ev`` in the log (once, with the ``command`` it causes) and project it onto the
        task document (idempotent). An event the task ignores is not recorded, nor its command.

        When the event was recorded before (a redelivery, a second writer, a retried request),
        what applies is the event as first recorded, with the command recorded with it: two
        restarts racing with different options end with one set of options, the one of the
        command that will run.
        """
        result, parent = await self._apply(ev, command)
        if result.recorded and ev.kind in events.TERMINAL_KINDS:
            await self._charge(ev)
        if result.recorded and parent is not None:
            told = await self._tell_parent(parent, ev)
            if told is not None:
                result = dataclasses.replace(result, told=told)
        return result

    async def _tell_parent(self, parent: str, ev: events.TaskEvent
                           ) -> events.TaskChildChanged | None:
        """Record on ``parent``'s stream that its child changed status with ``ev`` (a status
        kind only); the recorded event with its seq, None when there is nothing to tell or the
        parent ignores it (removed, gone). Keyed by ``ev``: recorded once however often ``ev``
        is applied (a redelivery, ``reapply`` after a writer died between the two)."""
        if ev.kind not in CHILD_STATUS:
            return None
        snap = await self._snapshot(parent)
        if snap is None:
            return None
        told = events.new(events.TaskChildChanged, parent, snap.attempt, key=ev.event_id,
                          child=ev.task_id, child_kind=ev.kind, status=CHILD_STATUS[ev.kind])
        result, _ = await self._apply(told, None)
        if not result.recorded or result.seq is None:
            return None
        return told.model_copy(update={"seq": result.seq})

    async def _apply(
        self, ev: events.TaskEvent, command: commands.Command | None
    ) -> tuple[ApplyResult, str | None]:
        """The result, and the task's parent (splitmerge) if it has one."""
        snap = await self._snapshot(ev.task_id)
        if snap is None:
            return ApplyResult(Outcome.IGNORED), None
        step = projection.plan(snap, ev)
        if step is None:
            existing = await self.events.find_one({"_id": ev.event_id}, {"seq": 1})
            if existing is not None:  # a redelivery after the state moved on
                return ApplyResult(Outcome.DUPLICATE, existing["seq"]), snap.parent
            return ApplyResult(Outcome.IGNORED), snap.parent
        seq, first = await self._record(ev, command)
        if first is not None:
            ev = events.EVENT_ADAPTER.validate_python({**first, "seq": seq})
            step = projection.plan(snap, ev)
            if step is None:
                return ApplyResult(Outcome.DUPLICATE, seq), snap.parent
        changed = await self._update(ev, step, seq)
        outcome = Outcome.APPLIED if first is None else Outcome.DUPLICATE
        return ApplyResult(outcome, seq, changed), snap.parent

    async def _charge(self, ev: events.TaskEvent) -> None:
        """Write the usage record of the attempt ``ev`` ended, from the task document as the end
        left it (``store/usage.py``). Every recorded terminal event comes here, also a
        duplicate: its writer may be the one completing a record a crashed writer left out.
        Nothing when the document's attempt is another or has not ended (a restart since)."""
        doc = await self.tasks.find_one({"_id": ev.task_id})
        if doc is not None and doc.get("attempt") == ev.attempt:
            await self.usage.record_run(doc)

    async def reapply(self, ev: events.TaskEvent) -> bool:
        """Apply a recorded event to its task again, never recording it: its recorder may have
        died between the two writes. An event no longer in the log (its task deleted since)
        changes nothing. True when the task document changed."""
        snap = await self._snapshot(ev.task_id)
        step = None if snap is None else projection.plan(snap, ev)
        if not await self.event_seen(ev.event_id):
            return False
        changed = step is not None and bool(step.update) and await self._update(ev, step, ev.seq)
        if snap is not None and ev.kind in events.TERMINAL_KINDS:
            await self._charge(ev)
        if snap is not None and snap.parent is not None:
            await self._tell_parent(snap.parent, ev)  # recorded unpublished: the relay's
        return changed

    async def _snapshot(self, task_id: str) -> projection.Snapshot | None:
        doc = await self.tasks.find_one(
            {"_id": task_id},
            {"attempt": 1, "state": 1, "removed": 1, "admitted": 1, "parent": 1})
        if doc is None:
            return None
        return projection.Snapshot(
            attempt=doc["attempt"], state=TaskState(doc["state"]),
            removed=doc.get("removed", False), admitted=bool(doc.get("admitted")),
            parent=doc.get("parent"),
        )

    async def _update(self, ev: events.TaskEvent, step: projection.Plan, seq: int | None
                      ) -> bool:
        """Apply the plan; the document's ``seq`` becomes the highest ``seq`` of the events
        applied to it (the gateways' read models start from it: ``readmodel.py``)."""
        if not step.update:
            return False
        update = {**step.update}
        update["$set"] = {**update.get("$set", {}), "updated_at": clock.now()}
        if seq is not None:
            update["$max"] = {**update.get("$max", {}), "seq": seq}
        res = await self.tasks.update_one({"_id": ev.task_id, **step.guard}, update)
        return res.modified_count > 0

    async def _record(
        self, ev: events.TaskEvent, command: commands.Command | None = None
    ) -> tuple[int, Doc | None]:
        """Insert ``ev`` at the next ``seq``: (seq, None), or, when it was recorded before,
        (its seq, the body recorded then)."""
        body = ev.model_dump(mode="json", exclude={"seq"})
        extra: Doc = {"command": _command_doc(command)}
        if isinstance(ev, events.TaskOutput):
            extra.update(line_start=ev.line_start, line_end=ev.line_start + len(ev.lines))
        for _ in range(_SEQ_RETRIES):
            last = await self.events.find_one(
                {"task_id": ev.task_id}, {"seq": 1}, sort=[("seq", DESCENDING)]
            )
            seq = (last["seq"] if last else 0) + 1
            try:
                await self.events.insert_one(
                    {
                        "_id": ev.event_id,
                        "task_id": ev.task_id,
                        "attempt": ev.attempt,
                        "kind": ev.kind,
                        "seq": seq,
                        "recorded_at": clock.now(),
                        "published": False,
                        "body": body,
                        **extra,
                    }
                )
                metrics.EVENTS_RECORDED.labels(ev.kind).inc()
                return seq, None
            except DuplicateKeyError:
                existing = await self.events.find_one({"_id": ev.event_id}, {"seq": 1, "body": 1})
                if existing is not None:
                    return int(existing["seq"]), existing["body"]
                # another writer took this seq: read the new last one and try again
        raise RuntimeError(f"could not allocate a seq for {ev.event_id}")

    async def mark_published(self, event_id: str) -> None:
        await self.events.update_one({"_id": event_id}, {"$set": {"published": True}})

    async def set_aside(self, event_id: str, reason: str) -> None:
        """Take an event that can never be published out of the outbox (kept in the log, with
        the reason)."""
        metrics.EVENTS_SET_ASIDE.inc()
        await self.events.update_one(
            {"_id": event_id}, {"$set": {"published": True, "set_aside": reason}})

    async def count_publish_failure(self, event_id: str) -> int:
        """One more unexplained failure to publish this event: how many so far."""
        await self.events.update_one({"_id": event_id}, {"$inc": {"publish_failures": 1}})
        doc = await self.events.find_one({"_id": event_id}, {"publish_failures": 1})
        return int(doc.get("publish_failures", 0)) if doc is not None else 0

    async def unpublished_events(self, older_than: dt.datetime, limit: int = 500) -> list[Doc]:
        cursor = (
            self.events.find({"published": False, "recorded_at": {"$lt": older_than}})
            .sort("recorded_at", ASCENDING)
            .limit(limit)
        )
        return await cursor.to_list(None)

    async def event_seen(self, event_id: str) -> bool:
        return await self.events.find_one({"_id": event_id}, {"_id": 1}) is not None

    async def output_end(self, task_id: str, attempt: int) -> int:
        """Number of console lines recorded for an attempt (where a follower resumes)."""
        last = await self.events.find_one(
            {"task_id": task_id, "attempt": attempt, "kind": "output"},
            {"line_end": 1},
            sort=[("line_end", DESCENDING)],
        )
        return int(last["line_end"]) if last else 0

    async def read_output(self, task_id: str, attempt: int, start: int, total: int) -> list[str]:
        """Console lines ``[start, total)`` of an attempt (callers resolve NodeODM slices)."""
        if start >= total:
            return []
        cursor = self.events.find(
            {"task_id": task_id, "attempt": attempt, "kind": "output",
             "line_end": {"$gt": start}, "line_start": {"$lt": total}},  # only chunks in range
            {"line_start": 1, "body": 1},
        ).sort("line_start", ASCENDING)
        lines: list[str] = []
        async for chunk in cursor:
            first = chunk["line_start"]
            body_lines = chunk["body"]["lines"]
            lines.extend(body_lines[max(0, start - first):])
        return lines[: total - start]

    async def read_events(
        self, task_id: str, after_seq: int = 0, *, through_seq: int | None = None,
        limit: int | None = None,
    ) -> list[Doc]:
        """Events ``after_seq < seq [<= through_seq]`` in ``seq`` order, at most ``limit``."""
        seq: Doc = {"$gt": after_seq}
        if through_seq is not None:
            seq["$lte"] = through_seq
        cursor = self.events.find({"task_id": task_id, "seq": seq}).sort("seq", ASCENDING)
        if limit is not None:
            cursor = cursor.limit(limit)
        return await cursor.to_list(None)

    async def event_seq(self, event_id: str) -> int | None:
        """The ``seq`` of a recorded event, None when it is not (yet) in the log."""
        doc = await self.events.find_one({"_id": event_id}, {"seq": 1})
        return int(doc["seq"]) if doc is not None else None

    async def terminal_seq(self, task_id: str, attempt: int) -> int | None:
        """``seq`` of the first terminal event (completed/failed/canceled) of an attempt."""
        terminal = {"$in": sorted(events.TERMINAL_KINDS)}
        doc = await self.events.find_one(
            {"task_id": task_id, "attempt": attempt, "kind": terminal},
            {"seq": 1},
            sort=[("seq", ASCENDING)],
        )
        return int(doc["seq"]) if doc is not None else None


# The tenant of documents (tasks, uploads) written before tenants existed (no ``tenant``): the
# open node's (tenants.OPEN_TENANT; admission counts them under it too).
DEFAULT_TENANT = "default"


def owned_by(tenant: str) -> Doc:
    """The query part matching documents of ``tenant`` (those without a tenant: ``default``'s)."""
    if tenant == DEFAULT_TENANT:
        return {"tenant": {"$in": [tenant, None]}}
    return {"tenant": tenant}


def _command_doc(command: commands.Command | None) -> Doc | None:
    return None if command is None else command.model_dump(mode="json")


def run_command(task: Doc) -> commands.CreateTask | commands.RestartTask:
    """The run command of the task's current attempt (the one builder of it), which its
    admission carries: ``CreateTask`` for the first attempt, ``RestartTask`` after."""
    kind = commands.CreateTask if task["attempt"] == 1 else commands.RestartTask
    return kind(
        task_id=TaskId(task["_id"]), attempt=task["attempt"], name=task["name"],
        options=task.get("options") or [], sources=task["sources"],
        output_prefix=task["output_prefix"],
        skip_post_processing=bool(task.get("skip_post_processing")),
        outputs=task.get("outputs"), images_count=task.get("images_count") or None,
        priority=int(task.get("priority") or 0), size_class=task.get("size_class"),
    )


CLOSE_TIMEOUT_S = 2.0


@dataclass
class MongoHandle:
    client: AsyncMongoClient[Doc]
    store: TaskStore

    async def ping(self) -> None:
        await self.client.admin.command("ping")  # bounded by timeoutMS

    async def close(self) -> None:
        """Close the client; a MongoDB that does not answer cannot hold a shutdown longer than
        ``CLOSE_TIMEOUT_S`` (the sockets then go with the process)."""
        try:
            await asyncio.wait_for(self.client.close(), CLOSE_TIMEOUT_S)
        except Exception as exc:
            log.warning("MongoDB client did not close cleanly", error=repr(exc))


async def open_store(settings: MongoSettings, appname: str) -> MongoHandle:
    """Connect (credentials from ``username``/``password`` when set, else those in the URL, if
    any; the user authenticates against ``admin`` unless the URL names ``authSource``).

    Every operation has a deadline (``timeoutMS``, client-side operation timeout): server
    selection, retries and socket reads included, so a frozen MongoDB fails it after
    ``timeout_ms`` (``store.is_unavailable`` recognises the error) instead of holding it for as
    long as the TCP connection lives.
    """
    credentials: dict[str, Any] = {}
    if settings.username is not None:
        credentials["username"] = settings.username
        if settings.password is not None:
            credentials["password"] = settings.password.get_secret_value()
    client: AsyncMongoClient[Doc] = AsyncMongoClient(
        settings.url,
        tz_aware=True,
        serverSelectionTimeoutMS=settings.server_selection_timeout_ms,
        timeoutMS=settings.timeout_ms,
        connectTimeoutMS=settings.connect_timeout_ms,
        appname=appname,
        event_listeners=[metrics.mongo_listener()],
        **credentials,
    )
    store = TaskStore(client[settings.database])
    await store.ensure_indexes()
    return MongoHandle(client, store)
