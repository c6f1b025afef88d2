"""Admission control: which waiting tasks get a run slot, in which order.

A task is queued (status 10) until it is *admitted*: its ``admitted`` event, recorded with the
run command it causes, gives it a slot of its size class and starts its run. A slot is held
while the attempt is queued or running and freed by its end (completed, failed, canceled), its
removal or a restart, whatever ends it: the slots in use are counted from the task documents
(``AdmissionStore.active``) on every pass, never kept as a counter that a lost message or a
killed process could leave wrong.

**The order** (:func:`order`): highest priority first; within a priority, fair share — the
tenant with the fewest runs (active, plus those admitted ahead of it in this order) goes next,
ties to the tenant whose oldest waiting task is oldest; within a tenant, oldest first.

**Admission** (:func:`admit`) walks that order and admits each task that fits: a free slot of
its class, a free slot under the global cap (``max_active``), and its tenant under its own
limit of active runs. A task that does not fit waits, and:

- when its class or its tenant is full, the tasks behind it may go (other classes and tenants
  are not held up by one full class or one busy tenant);
- when the global cap is full, nothing behind it goes: a small task never overtakes a large one
  the cap would otherwise hold back forever.

**What a run requests** is decided here too: the ``admitted`` event carries the CPU cores and
memory of the run's ODM container (``sizing.size`` of the task's images and options, with the
scheduler's ``ArgoSettings``), computed from the task document the admission reads anyway. Local
runs get the same numbers: they are what a run is charged for in its usage record
(``store/usage.py``), whichever executor runs it.

The pure functions here decide; ``Admitter`` runs the passes (one replica at a time, under the
``admission`` lease) when a task is queued, when a run ends, and every
``admission_interval_s``.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription

from scaleodm.common import clock, metrics, tracing
from scaleodm.common.contracts import commands, events
from scaleodm.common.logging import bind_task, get_logger
from scaleodm.common.settings import ArgoSettings, CapacitySettings
from scaleodm.common.store.admission import Active, AdmissionStore, Waiting
from scaleodm.common.store.leases import Leases
from scaleodm.common.store.tasks import ApplyResult, run_command
from scaleodm.scheduler import sizing

log = get_logger(__name__)

LEASE = "admission"
# The lease lasts this many intervals: the holder renews it on every pass (at least once an
# interval), and a holder killed mid-way holds admission up for at most this long.
LEASE_INTERVALS = 3
# Waiting tasks one pass reads (in priority, then submission order): the queue positions of
# tasks beyond it are not known, and they are admitted by later passes.
WINDOW = 10_000
# Admissions written at once (each a few MongoDB round trips); the lease is renewed between.
BATCH = 16
# Children (splitmerge) one pass reads to end those their parents left behind.
FAMILY_WINDOW = 1_000
# The events after which a pass may admit something: a task queued, a slot freed.
WAKE_KINDS = ("queued", "completed", "failed", "canceled", "removed")


class EventSink(Protocol):
    """Records and publishes an event with the command it causes (``Emitter``)."""

    async def emit(self, ev: events.TaskEvent, *,
                   command: commands.Command | None = None) -> ApplyResult: ...

    async def cancel(self, task_id: str, attempt: int) -> ApplyResult: ...

    async def remove(self, task_id: str, attempt: int) -> ApplyResult: ...


def order(waiting: Iterable[Waiting], active_by_tenant: Mapping[str, int]) -> list[Waiting]:
    """The admission order of ``waiting`` (module docstring)."""
    by_priority: dict[int, dict[str, collections.deque[Waiting]]] = {}
    for task in sorted(waiting, key=lambda w: (w.queued_at_ms, w.task_id)):
        by_priority.setdefault(task.priority, {}).setdefault(
            task.tenant, collections.deque()).append(task)
    ordered: list[Waiting] = []
    runs = dict(active_by_tenant)
    for priority in sorted(by_priority, reverse=True):
        queues = by_priority[priority]
        heap = [(runs.get(t, 0), q[0].queued_at_ms, t) for t, q in queues.items()]
        heapq.heapify(heap)
        while heap:
            count, _, tenant = heapq.heappop(heap)
            queue = queues[tenant]
            ordered.append(queue.popleft())
            runs[tenant] = count + 1
            if queue:
                heapq.heappush(heap, (count + 1, queue[0].queued_at_ms, tenant))
    return ordered


def admit(
    ordered: Sequence[Waiting],
    active: Active,
    capacity: CapacitySettings,
    tenant_limit: Callable[[str], int | None] = lambda _tenant: None,
) -> list[Waiting]:
    """The tasks of ``ordered`` to admit now, in order (module docstring)."""
    slots = {c.name: c.slots for c in capacity.classes}
    by_class = collections.Counter(active.by_class)
    by_tenant = collections.Counter(active.by_tenant)
    total = active.total
    chosen: list[Waiting] = []
    for task in ordered:
        if total >= capacity.max_active:
            break  # the global cap: nothing behind this task goes before it
        if by_class[task.size_class] >= slots.get(task.size_class, 0):
            continue
        limit = tenant_limit(task.tenant)
        if limit is not None and by_tenant[task.tenant] >= limit:
            continue
        chosen.append(task)
        by_class[task.size_class] += 1
        by_tenant[task.tenant] += 1
        total += 1
    return chosen


class Admitter:
    """Runs admission passes: on a wake-up (a ``queued`` or ending event on NATS), and at least
    every ``interval_s``; only the replica holding the ``admission`` lease admits."""

    def __init__(self, store: AdmissionStore, leases: Leases, emitter: EventSink,
                 capacity: CapacitySettings, *, interval_s: float,
                 tenant_limit: Callable[[str], int | None] = lambda _tenant: None,
                 argo: ArgoSettings | None = None) -> None:
        self.store = store
        self.argo = argo if argo is not None else ArgoSettings()
        self.leases = leases
        self.emitter = emitter
        self.capacity = capacity
        self.interval_s = interval_s
        self.lease_ttl_s = LEASE_INTERVALS * interval_s
        self.tenant_limit = tenant_limit
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self._wake = asyncio.Event()
        self._subs: list[Subscription] = []
        self._queue_ids: list[str] | None = None  # the queue as last saved
        self._queue_saved_at = -float("inf")  # monotonic time the queue was last read
        self._stage = "idle"  # where the current pass is (logged when one fails or hangs)

    async def subscribe(self, nc: NatsClient) -> None:
        """Wake-ups: core NATS subscriptions on the events after which a slot may be given."""
        async def wake(_msg: object) -> None:
            self._wake.set()
        for kind in WAKE_KINDS:
            self._subs.append(await nc.subscribe(f"events.task.*.{kind}", cb=wake))

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Passes until cancelled; a failed pass is logged and retried at the next interval."""
        try:
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.interval_s)
                except TimeoutError:
                    pass
                self._wake.clear()
                try:
                    # A pass never outlives its lease: one stuck on a call that never answers
                    # is abandoned (and said where), and the next one starts afresh.
                    async with asyncio.timeout(self.lease_ttl_s):
                        await self.run_pass()
                except TimeoutError:
                    log.warning("admission pass timed out; retried", stage=self._stage,
                                timeout_s=self.lease_ttl_s)
                except Exception as exc:
                    log.warning("admission pass failed; retried", error=repr(exc),
                                stage=self._stage)
        finally:
            for sub in self._subs:
                try:
                    await sub.unsubscribe()
                except Exception as exc:  # the connection is going anyway
                    log.debug("unsubscribe failed", error=repr(exc))
            try:
                await self.leases.release(LEASE, self.holder)
            except Exception as exc:
                log.debug("lease release failed", error=repr(exc))

    async def run_pass(self) -> list[Waiting]:
        """One pass: end the children their parents left behind, admit what fits, save the
        order of what waits; the admitted tasks."""
        self._stage = "lease"
        if not await self.leases.hold(LEASE, self.holder, self.lease_ttl_s):
            return []
        self._stage = "orphans"
        await self.end_orphans()
        self._stage = "active"
        active = await self.store.active()
        if self._full(active) and time.monotonic() - self._queue_saved_at < self.interval_s:
            # No slot to give: the waiting tasks are read only to refresh their positions, at
            # most once an interval (a backlog would otherwise be read on every wake-up).
            return []
        self._stage = "waiting"
        waiting = await self.store.waiting(WINDOW)
        ordered = order(waiting, active.by_tenant)
        chosen = admit(ordered, active, self.capacity, self.tenant_limit)
        admitted = []
        for start in range(0, len(chosen), BATCH):
            # Another replica may have taken the lease if this one stalled: checked per batch,
            # so a stalled pass admits at most one batch the new holder also counted.
            if start and not await self.leases.hold(LEASE, self.holder, self.lease_ttl_s):
                break
            batch = chosen[start:start + BATCH]
            self._stage = "admitting"
            done = await asyncio.gather(*(self._admit(task) for task in batch))
            admitted += [task for task, ok in zip(batch, done, strict=True) if ok]
        taken = {t.task_id for t in admitted}
        queue = [t.task_id for t in ordered if t.task_id not in taken]
        self._stage = "queue"
        if queue != self._queue_ids:
            await self.store.save_queue(queue)
            self._queue_ids = queue
        self._queue_saved_at = time.monotonic()
        if admitted:
            log.info("tasks admitted", admitted=len(admitted), waiting=len(queue),
                     active=active.total + len(admitted))
        return admitted

    async def end_orphans(self) -> int:
        """Cancel the children (``splitmerge``) of a parent that has ended, remove those of a
        parent removed: ODM ends its children itself when it can, this covers a run killed
        before it could, a scheduler killed half-way, a child created while its parent was
        being canceled. Done before admitting, so no slot goes to an orphan."""
        orphans = await self.store.orphans(FAMILY_WINDOW)
        for orphan in orphans:
            with bind_task(orphan.task_id, attempt=orphan.attempt, parent=orphan.parent):
                if orphan.action == "remove":
                    await self.emitter.remove(orphan.task_id, orphan.attempt)
                else:
                    await self.emitter.cancel(orphan.task_id, orphan.attempt)
                log.info("child ended with its parent", action=orphan.action)
        return len(orphans)

    def _full(self, active: Active) -> bool:
        """No slot free: the global cap reached, or every class's slots."""
        return active.total >= self.capacity.max_active or all(
            active.by_class.get(c.name, 0) >= c.slots for c in self.capacity.classes)

    async def _admit(self, task: Waiting) -> bool:
        doc = await self.store.task(task.task_id)
        if doc is None or doc["attempt"] != task.attempt:
            return False  # removed or restarted since it was read
        if await self.store.ended_in_the_log(task.task_id, task.attempt):
            log.info("task ended in the event log, not applied yet; not admitted",
                     task_id=task.task_id, attempt=task.attempt)
            return False
        with bind_task(task.task_id, attempt=task.attempt), tracing.span(
                "admission.admit", doc.get("traceparent"), size_class=task.size_class):
            requested = sizing.size(doc.get("images_count") or None,
                                    doc.get("options") or [], self.argo)
            ev = events.new(events.TaskAdmitted, task.task_id, task.attempt,
                            size_class=task.size_class, cpu_cores=requested.cpu_cores,
                            memory_gib=requested.memory_gib)
            wait_ms = clock.now_ms() - task.queued_at_ms
            command = run_command({**doc, "size_class": task.size_class})
            result = await self.emitter.emit(ev, command=command)
            if result.changed:
                metrics.RUNS_ADMITTED.labels(task.size_class).inc()
                log.info("task admitted", size_class=task.size_class, tenant=task.tenant,
                         priority=task.priority, waited_ms=wait_ms)
            return result.changed
