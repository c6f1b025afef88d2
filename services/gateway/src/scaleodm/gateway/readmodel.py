"""The gateway's read model: task documents served from memory, kept current by the task events.

Every NodeODM client polls ``/task/{uuid}/info`` all day; this is what answers it without a
MongoDB round trip. Each gateway process keeps the documents it was asked for (an LRU of
``read_model_size`` entries) and the ids it was asked for and did not find (a separate LRU of
``read_model_negative_size``: a flood of random uuids evicts only other unknown uuids, never the
working set). One core NATS subscription on every task event (``events.task.>``) keeps them
current: an event is applied to the document in memory by the rules MongoDB applies it with
(``store.projection.plan``, the same plan, evaluated by :func:`apply_plan`).

**Versions.** Every event has its task's ``seq`` (1, 2, 3, ... per task, allocated by the event
log), and the task document carries the highest ``seq`` applied to it (``TaskStore._update``).
An entry filled from MongoDB starts at the document's ``seq``. Then, for each event of the task:

- ``seq == entry + 1``: applied; the entry is at ``seq``;
- ``seq <= entry``: applied again — harmless, as applying an event twice, or an older one after a
  newer one, changes nothing (the projection's rules: states only move forward, progress and
  line counts only rise, terminal states stick) — and needed: a document read while another
  writer had recorded an event but not applied it yet has a ``seq`` above that event's;
- ``seq > entry + 1`` (a gap: an event missed, or two writers' events crossing on the wire) or
  no ``seq``: the entry is dropped, and the next read fills it again from MongoDB.

The bus only ever carries events already applied to MongoDB (emitters publish after the write;
the outbox relay re-applies before it publishes), so an entry is never ahead of MongoDB, and a
refill never takes a reader backwards. An entry older than ``read_model_max_age_s`` is filled
again whatever happened: a bound on the damage of anything this reasoning missed.

**The consistency promise** (``tests/integration/test_read_model.py``):

1. *Never backwards*: the document a process serves for a task never goes back to an earlier
   state (entries only move forward; refills come from MongoDB, which is ahead of every entry).
2. *Read your writes, on the same process*: a write (create, restart, cancel, remove) drops the
   task's entry before it answers; the next read fills it from MongoDB.
3. *Read your writes, on any other process*: a write answers only once its event came back on
   this process's subscription (bounded by ``read_model_echo_timeout_s``), i.e. once the NATS
   server has routed it to every subscriber; and a read of a task held here (a document, or
   an id known as unknown) first waits for a *sync point*: a PING/PONG with the server
   (``flush``) that started after the read arrived, and until every message received before
   the PONG was applied. NATS delivers one connection's messages in order, so the reader has
   applied the write's event. Concurrent reads share one sync point. A task not held is read
   from MongoDB, which has every answered write.
   With a NATS cluster the promise holds between processes connected to the same server;
   across servers, up to the route's delay (sub-millisecond on a LAN).
4. *Disconnected, not stale*: while this process's NATS connection is down, and after it comes
   back (events may have been missed meanwhile: everything is dropped), or when a sync point
   fails, reads go to MongoDB.

What the promise does not cover: a write whose event could not be published within the echo
timeout (NATS away from the writer, its publisher backlogged) is seen by other processes when the
event arrives (the outbox relay publishes it) or at the latest after ``read_model_max_age_s``.
Task documents only: console lines (``with_output``, ``/output``) are read from MongoDB's
indexed log.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from scaleodm.common.contracts import events, streams
from scaleodm.common.domain.status import TaskState
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import GatewaySettings
from scaleodm.common.store import projection
from scaleodm.common.store.tasks import Doc, TaskStore

log = get_logger(__name__)

# The subscription's buffer between the NATS client and the model: a burst of console lines of
# many running tasks fits; beyond it nats-py drops messages (a gap, found at the task's next
# event, or the entry's age bound).
PENDING_MSGS = 200_000
PENDING_BYTES = 256 * 1024 * 1024


class PlanNotApplicable(Exception):
    """A plan uses an operator :func:`apply_plan` does not evaluate (a bug: tests cover every
    plan the projection makes)."""


def _matches(value: Any, cond: Any) -> bool:
    if isinstance(cond, dict):
        for op, arg in cond.items():
            if op == "$in":
                ok = value in arg
            elif op == "$ne":
                ok = value != arg
            else:
                raise PlanNotApplicable(op)
            if not ok:
                return False
        return True
    return bool(value == cond)


def apply_plan(doc: Doc, plan: projection.Plan) -> Doc | None:
    """``plan`` evaluated on ``doc`` as MongoDB evaluates the guarded ``update_one``: a new
    document (``doc`` is not changed: readers may hold it), or None when the guard fails."""
    if not all(_matches(doc.get(k), cond) for k, cond in plan.guard.items()):
        return None
    new = dict(doc)
    for op, fields in plan.update.items():
        if op == "$set":
            new.update(fields)
        elif op == "$max":
            for k, v in fields.items():
                if k not in new or new[k] is None or v > new[k]:
                    new[k] = v
        else:
            raise PlanNotApplicable(op)
    return new


def apply_event(doc: Doc, ev: events.TaskEvent) -> Doc:
    """``ev`` applied to a task document in memory (what ``TaskStore.apply_event`` does to it in
    MongoDB, the ``updated_at`` stamp aside)."""
    snap = projection.Snapshot(attempt=doc["attempt"], state=TaskState(doc["state"]),
                               removed=bool(doc.get("removed", False)),
                               admitted=bool(doc.get("admitted")))
    step = projection.plan(snap, ev)
    if step is None or not step.update:
        return doc
    new = apply_plan(doc, step)
    if new is None:
        return doc
    if ev.seq is not None and ev.seq > int(new.get("seq") or 0):
        new["seq"] = ev.seq
    return new


@dataclass
class _Entry:
    doc: Doc
    seq: int
    filled_at: float  # monotonic


@dataclass
class _Fill:
    """A read of one task from MongoDB in flight: concurrent readers share it, and the events
    that arrive meanwhile are applied to its result."""

    done: asyncio.Future[Doc | None]
    pending: list[events.TaskEvent]


class _SyncPoint:
    """Readers wait for a PING/PONG with the NATS server that started after they arrived, then
    for the subscription's buffer to be applied; concurrent readers share one round trip."""

    def __init__(self, nc: NatsClient, sub: Subscription, timeout_s: float) -> None:
        self.nc = nc
        self.sub = sub
        self.timeout_s = timeout_s
        self._running: asyncio.Task[None] | None = None
        self._next: asyncio.Task[None] | None = None

    async def wait(self) -> None:
        if self._next is None:
            self._next = asyncio.create_task(self._round(self._running))
        await asyncio.shield(self._next)

    async def _round(self, before: asyncio.Task[None] | None) -> None:
        if before is not None:
            await asyncio.wait([before])
        me, self._next = self._next, None
        self._running = me
        try:
            # nats-py's flush timeout is whole seconds only in its signature; it takes a float.
            await self.nc.flush(self.timeout_s)  # type: ignore[arg-type]
            while self.sub.pending_msgs:  # received before the PONG, not applied yet
                await asyncio.sleep(0)
        finally:
            if self._running is me:
                self._running = None


class ReadModel:
    """Task documents from memory when known current, else from MongoDB (module docstring)."""

    def __init__(self, store: TaskStore, nc: NatsClient, *, size: int, negative_size: int,
                 max_age_s: float, echo_timeout_s: float, sync_timeout_s: float = 1.0) -> None:
        self.store = store
        self.nc = nc
        self.size = size
        self.negative_size = negative_size
        self.max_age_s = max_age_s
        self.echo_timeout_s = echo_timeout_s
        self.sync_timeout_s = sync_timeout_s
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._absent: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._fills: dict[str, _Fill] = {}
        self._echoes: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}
        self._sub: Subscription | None = None
        self._sync: _SyncPoint | None = None
        self._reconnects = 0
        self.stats: collections.Counter[str] = collections.Counter()

    @classmethod
    def for_settings(cls, store: TaskStore, nc: NatsClient, settings: GatewaySettings
                     ) -> ReadModel:
        return cls(store, nc, size=settings.read_model_size,
                   negative_size=settings.read_model_negative_size,
                   max_age_s=settings.read_model_max_age_s,
                   echo_timeout_s=settings.read_model_echo_timeout_s)

    async def start(self) -> None:
        self._reconnects = self._reconnect_count()
        self._sub = await self.nc.subscribe(
            streams.EVENT_SUBJECTS, cb=self._on_message,
            pending_msgs_limit=PENDING_MSGS, pending_bytes_limit=PENDING_BYTES,
        )
        self._sync = _SyncPoint(self.nc, self._sub, self.sync_timeout_s)
        await self.nc.flush(self.sync_timeout_s)  # type: ignore[arg-type]

    async def close(self) -> None:
        sub, self._sub, self._sync = self._sub, None, None
        self.clear()
        if sub is not None and not self.nc.is_closed:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection is going anyway
                log.debug("read model unsubscribe failed", error=repr(exc))

    def __len__(self) -> int:
        return len(self._entries)

    # -- reads -------------------------------------------------------------------------------

    async def get_task(self, task_id: str, *, include_removed: bool = False) -> Doc | None:
        """``TaskStore.get_task``, from memory when the model is current (module docstring)."""
        doc = await self._get(task_id)
        if doc is None or (doc.get("removed") and not include_removed):
            return None
        return doc

    async def _get(self, task_id: str) -> Doc | None:
        if self.size == 0 or not self._connected():
            self.stats["bypass"] += 1
            return await self.store.tasks.find_one({"_id": task_id})
        # Only what is held needs the sync point: a task not held is read from MongoDB anyway.
        held = task_id in self._entries or task_id in self._absent
        if held and not await self._synced():
            self.stats["bypass"] += 1
            return await self.store.tasks.find_one({"_id": task_id})
        now = time.monotonic()
        entry = self._entries.get(task_id)
        if entry is not None:
            if now - entry.filled_at <= self.max_age_s:
                self._entries.move_to_end(task_id)
                self.stats["hit"] += 1
                return entry.doc
            del self._entries[task_id]
        absent_since = self._absent.get(task_id)
        if absent_since is not None:
            if now - absent_since <= self.max_age_s:
                self.stats["absent_hit"] += 1
                return None
            del self._absent[task_id]
        return await self._fill(task_id)

    def _connected(self) -> bool:
        """False (everything dropped) while the subscription cannot be trusted: not started,
        disconnected; after a reconnection (events may have been missed) everything held is
        dropped too."""
        if self._sync is None or not self.nc.is_connected:
            self.clear()
            return False
        if self._reconnect_count() != self._reconnects:
            self._reconnects = self._reconnect_count()
            self.clear()
        return True

    async def _synced(self) -> bool:
        """True once this process has applied every event the server sent it before now."""
        assert self._sync is not None  # _connected() said so
        try:
            await self._sync.wait()
        except Exception as exc:
            log.warning("read model sync point failed; reading MongoDB", error=repr(exc))
            self.clear()
            return False
        return True

    async def _fill(self, task_id: str) -> Doc | None:
        fill = self._fills.get(task_id)
        if fill is not None:
            self.stats["fill_shared"] += 1
            return await asyncio.shield(fill.done)
        self.stats["miss"] += 1
        fill = _Fill(asyncio.get_running_loop().create_future(), [])
        self._fills[task_id] = fill
        reconnects = self._reconnect_count()
        try:
            doc = await self.store.tasks.find_one({"_id": task_id})
        except BaseException as exc:
            del self._fills[task_id]
            fill.done.set_exception(exc)
            fill.done.exception()  # retrieved: sharing readers re-raise it, nobody else must
            raise
        del self._fills[task_id]
        if doc is not None:
            seq = int(doc.get("seq") or 0)
            gap = False
            for ev in sorted(fill.pending, key=lambda e: e.seq or 0):
                if ev.seq is None or ev.seq > seq + 1:
                    gap = True
                    break
                doc = apply_event(doc, ev)
                seq = max(seq, ev.seq)
            if (not gap and self._sub is not None and self.nc.is_connected
                    and reconnects == self._reconnect_count()):
                self._remember(task_id, _Entry(doc, seq, time.monotonic()))
        elif (not fill.pending and self.nc.is_connected
              and reconnects == self._reconnect_count()):
            self._absent[task_id] = time.monotonic()
            while len(self._absent) > self.negative_size:
                self._absent.popitem(last=False)
        fill.done.set_result(doc)
        return doc

    def _remember(self, task_id: str, entry: _Entry) -> None:
        self._absent.pop(task_id, None)
        self._entries[task_id] = entry
        self._entries.move_to_end(task_id)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
            self.stats["evicted"] += 1

    # -- writes of this process ----------------------------------------------------------------

    def forget(self, task_id: str) -> None:
        """Drop what this process holds for a task (it was just written here)."""
        self._entries.pop(task_id, None)
        self._absent.pop(task_id, None)

    async def written(self, task_id: str, seq: int | None) -> None:
        """After a write of this process (event ``seq`` of ``task_id``): drop the entry, and
        wait until the event came back on the subscription — every other process subscribed on
        this NATS server has it then (promise 3) — at most ``read_model_echo_timeout_s``."""
        self.forget(task_id)
        if seq is None or self._sub is None or not self.nc.is_connected:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._echoes.setdefault(task_id, [])
        waiters.append((seq, fut))
        try:
            await asyncio.wait_for(fut, self.echo_timeout_s)
        except TimeoutError:
            self.stats["echo_timeout"] += 1
            log.info("event not back from NATS in time; other gateways may see the task's "
                     "previous state until it is", task_id=task_id, seq=seq,
                     timeout_s=self.echo_timeout_s)
        finally:
            if (seq, fut) in waiters:
                waiters.remove((seq, fut))
            if not waiters:
                self._echoes.pop(task_id, None)
        self.forget(task_id)  # what was filled meanwhile may predate the write

    # -- events ------------------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        # No await in here: the sync point counts on a message being applied as soon as the
        # subscription's task takes it from the buffer.
        parts = msg.subject.split(".")  # events.task.<task_id>.<kind>
        task_id = parts[2] if len(parts) == 4 else ""
        if (task_id not in self._entries and task_id not in self._fills
                and task_id not in self._echoes):
            # Not held: nothing to parse (most events, on a busy cluster, are console lines
            # of tasks nobody polls here); an id remembered as unknown is unknown no more.
            self._absent.pop(task_id, None)
            self.stats["events_skipped"] += 1
            return
        try:
            ev = events.EVENT_ADAPTER.validate_json(msg.data)
        except ValidationError:
            self.stats["unreadable"] += 1
            return
        self.on_event(ev)

    def on_event(self, ev: events.TaskEvent) -> None:
        task_id = ev.task_id
        self.stats["events"] += 1
        self._absent.pop(task_id, None)
        fill = self._fills.get(task_id)
        if fill is not None:
            fill.pending.append(ev)
        entry = self._entries.get(task_id)
        if entry is not None:
            if ev.seq is None or ev.seq > entry.seq + 1:
                del self._entries[task_id]
                self.stats["gap"] += 1
            else:
                entry.doc = apply_event(entry.doc, ev)
                entry.seq = max(entry.seq, ev.seq)
        for seq, fut in self._echoes.get(task_id, ()):
            if ev.seq is not None and ev.seq >= seq and not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        self._entries.clear()
        self._absent.clear()

    def _reconnect_count(self) -> int:
        return int(self.nc.stats.get("reconnects", 0))
