"""An in-memory stand-in for ``TaskStore`` in the fast tests: the methods the gateway's routes and
actions and the emitter call, with the same transition rules (``projection.plan``, the real
one) and the same outbox fields. The store's own behaviour on MongoDB is checked by
``tests/integration/test_store.py``; this fake only has to agree with it on what it answers."""

from __future__ import annotations

import collections
import datetime as dt
from typing import Any

from scaleodm.common.contracts import commands, events
from scaleodm.common.domain.status import ACTIVE_STATES, TaskState
from scaleodm.common.store import projection
from scaleodm.common.store.tasks import ApplyResult, Outcome, TaskExistsError

Doc = dict[str, Any]


def _matches(doc: Doc, guard: Doc) -> bool:
    for key, want in guard.items():
        have = doc.get(key)
        if isinstance(want, dict) and "$in" in want:
            if have not in want["$in"]:
                return False
        elif isinstance(want, dict) and "$ne" in want:
            if have == want["$ne"]:
                return False
        elif have != want:
            return False
    return True


class FakeCollection:
    """Documents by ``_id``: what the gateway reads of ``AdmissionStore`` (the saved queue)."""

    def __init__(self) -> None:
        self.docs: dict[str, Doc] = {}

    async def find_one(self, query: Doc, projection: Doc | None = None) -> Doc | None:
        doc = self.docs.get(query["_id"])
        return None if doc is None else dict(doc)


class FakeTaskStore:
    def __init__(self) -> None:
        self.tasks: dict[str, Doc] = {}
        self.events: dict[str, Doc] = {}
        self.tombstones: set[str] = set()  # uuids of deleted tasks
        # The other collections (``AdmissionStore(store.db, ...)``), created on first use.
        self.db: collections.defaultdict[str, FakeCollection] = collections.defaultdict(
            FakeCollection)

    async def create_task(self, doc: Doc, queued: events.TaskQueued, *,
                          failed: events.TaskFailed | None = None) -> ApplyResult:
        if doc["_id"] in self.tombstones:
            raise TaskExistsError(doc["_id"])
        seq, first = self._record(queued, None)
        if doc["_id"] in self.tasks:
            raise TaskExistsError(doc["_id"])
        if first is not None:
            self.events[queued.event_id]["published"] = False
        self.tasks[doc["_id"]] = {
            **projection.fresh_attempt(1), "removed": False,
            "created_at": dt.datetime.now(dt.UTC), **doc,
        }
        if failed is not None:
            self._record(failed, None)
            self.tasks[doc["_id"]].update(
                state=TaskState.FAILED.value, error_message=failed.error_message,
                finished_at_ms=int(failed.occurred_at.timestamp() * 1000))
        return ApplyResult(Outcome.APPLIED, seq)

    async def get_task(self, task_id: str, *, include_removed: bool = False) -> Doc | None:
        doc = self.tasks.get(task_id)
        if doc is None or (doc["removed"] and not include_removed):
            return None
        return dict(doc)

    async def tombstoned(self, task_id: str) -> bool:
        return task_id in self.tombstones

    async def list_task_ids(self) -> list[str]:
        return [t["_id"] for t in self.tasks.values() if not t["removed"]]

    async def count_active(self) -> int:
        active = {s.value for s in ACTIVE_STATES}
        return sum(1 for t in self.tasks.values() if not t["removed"] and t["state"] in active)

    async def read_output(self, task_id: str, attempt: int, start: int, total: int) -> list[str]:
        return []

    async def apply_event(self, ev: events.TaskEvent,
                          command: commands.Command | None = None) -> ApplyResult:
        snap = self._snapshot(ev.task_id)
        if snap is None:
            return ApplyResult(Outcome.IGNORED)
        step = projection.plan(snap, ev)
        if step is None:
            if ev.event_id in self.events:
                return ApplyResult(Outcome.DUPLICATE, self.events[ev.event_id]["seq"])
            return ApplyResult(Outcome.IGNORED)
        seq, first = self._record(ev, command)
        if first is not None:  # what applies is the event as first recorded
            ev = events.EVENT_ADAPTER.validate_python({**first, "seq": seq})
            step = projection.plan(snap, ev)
            if step is None:
                return ApplyResult(Outcome.DUPLICATE, seq)
        changed = self._update(ev, step)
        return ApplyResult(Outcome.APPLIED if first is None else Outcome.DUPLICATE, seq, changed)

    async def reapply(self, ev: events.TaskEvent) -> bool:
        snap = self._snapshot(ev.task_id)
        step = None if snap is None else projection.plan(snap, ev)
        if step is None or ev.event_id not in self.events:
            return False
        return self._update(ev, step)

    def _snapshot(self, task_id: str) -> projection.Snapshot | None:
        doc = self.tasks.get(task_id)
        if doc is None:
            return None
        return projection.Snapshot(doc["attempt"], TaskState(doc["state"]), doc["removed"],
                                   bool(doc.get("admitted")))

    def _update(self, ev: events.TaskEvent, step: projection.Plan) -> bool:
        doc = self.tasks[ev.task_id]
        changed = False
        if step.update and _matches(doc, step.guard):
            for key, value in step.update.get("$set", {}).items():
                changed |= doc.get(key) != value
                doc[key] = value
            for key, value in step.update.get("$max", {}).items():
                if value > doc.get(key, 0):
                    doc[key], changed = value, True
        return changed

    def _record(self, ev: events.TaskEvent,
                command: commands.Command | None) -> tuple[int, Doc | None]:
        if ev.event_id in self.events:
            recorded = self.events[ev.event_id]
            return recorded["seq"], recorded["body"]
        seq = 1 + max((e["seq"] for e in self.events.values() if e["task_id"] == ev.task_id),
                      default=0)
        self.events[ev.event_id] = {
            "_id": ev.event_id, "task_id": ev.task_id, "attempt": ev.attempt, "kind": ev.kind,
            "seq": seq, "recorded_at": dt.datetime.now(dt.UTC), "published": False,
            "body": ev.model_dump(mode="json", exclude={"seq"}), "command": _dump(command),
        }
        return seq, None

    async def event_seq(self, event_id: str) -> int | None:
        recorded = self.events.get(event_id)
        return None if recorded is None else int(recorded["seq"])

    async def mark_published(self, event_id: str) -> None:
        if event_id in self.events:
            self.events[event_id]["published"] = True

    async def set_aside(self, event_id: str, reason: str) -> None:
        if event_id in self.events:
            self.events[event_id].update(published=True, set_aside=reason)

    async def count_publish_failure(self, event_id: str) -> int:
        recorded = self.events[event_id]
        recorded["publish_failures"] = recorded.get("publish_failures", 0) + 1
        return int(recorded["publish_failures"])

    async def unpublished_events(self, older_than: dt.datetime, limit: int = 500) -> list[Doc]:
        pending = [e for e in self.events.values()
                   if not e["published"] and e["recorded_at"] < older_than]
        return sorted(pending, key=lambda e: e["recorded_at"])[:limit]

    def unpublished(self) -> list[Doc]:
        return [e for e in self.events.values() if not e["published"]]


def _dump(command: commands.Command | None) -> Doc | None:
    return None if command is None else command.model_dump(mode="json")
