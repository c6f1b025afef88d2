"""Retention: finished tasks and abandoned uploads do not stay forever (NodeODM's cleanup).

Every ``cleanup_interval_s`` each watcher replica makes one bounded pass (``BATCH`` of each kind):

- **expired tasks** — finished (completed/failed/canceled) more than ``cleanup_tasks_after_min``
  ago — are removed the way a client's ``/task/remove`` removes them: the ``removed`` event is
  recorded together with its ``RemoveTask`` command and published through the outbox; the
  scheduler then deletes the run (local run directory or Workflow), the task's S3 prefix
  (inputs and outputs) and its documents. One path for every removal; the event id is
  deterministic, so replicas sweeping at once, or a client removing at the same moment, record
  one removal.
- **stalled removals** — tasks removed more than ``REMOVAL_RETRY_S`` ago whose documents are
  still there — are resumed (``store.retention.resume_removal``).
- **tombstones** of tasks deleted more than ``tombstone_keep_min`` ago are forgotten, so their
  uuids may be taken again (``store.retention.forget_tombstones``); a TTL index does the same
  inside MongoDB (``ensure_tombstone_expiry``, set at start-up, also when retention is off).
- **abandoned uploads** — chunked uploads (or a ``/task/new``'s held id) with no activity for
  ``cleanup_uploads_after_min`` — are closed, then their S3 objects (unless a task holds the
  id) and records are deleted; then the objects of files that arrived after their upload had
  closed (see ``store.uploads``).

A full batch is followed by the next pass a second later; a failed pass is logged and retried at
the next interval. Time comes from ``clock``, so tests move it instead of waiting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from scaleodm.common import clock as common_clock
from scaleodm.common.emitting import Emitter
from scaleodm.common.logging import bind_task, get_logger
from scaleodm.common.settings import WatcherSettings
from scaleodm.common.store import retention
from scaleodm.common.store.s3 import S3, S3Url, task_inputs
from scaleodm.common.store.tasks import TaskStore
from scaleodm.common.store.uploads import UploadStore

log = get_logger(__name__)

BATCH = 100
REMOVAL_RETRY_S = 3600.0
FULL_BATCH_PAUSE_S = 1.0
Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    """The wall clock: ``scaleodm.common.clock`` (tests may pass their own ``clock``)."""
    return common_clock.now()


@dataclass(frozen=True)
class Policy:
    """What is kept how long; ``None`` keeps it forever (a setting of 0)."""

    tasks_after_s: float | None
    uploads_after_s: float | None
    interval_s: float
    batch: int = BATCH
    removal_retry_s: float = REMOVAL_RETRY_S
    tombstones_after_s: float | None = None

    @classmethod
    def from_settings(cls, settings: WatcherSettings) -> Policy:
        def seconds(minutes: float) -> float | None:
            return minutes * 60.0 if minutes > 0 else None

        return cls(tasks_after_s=seconds(settings.cleanup_tasks_after_min),
                   uploads_after_s=seconds(settings.cleanup_uploads_after_min),
                   interval_s=settings.cleanup_interval_s,
                   tombstones_after_s=seconds(settings.tombstone_keep_min))

    @property
    def off(self) -> bool:
        return (self.tasks_after_s is None and self.uploads_after_s is None
                and self.tombstones_after_s is None)


@dataclass
class Pass:
    """What one pass did."""

    removed: int = 0
    resumed: int = 0
    uploads: int = 0
    orphans: int = 0
    tombstones: int = 0
    full: bool = False

    @property
    def anything(self) -> bool:
        return bool(self.removed or self.resumed or self.uploads or self.orphans
                    or self.tombstones)


@dataclass(frozen=True)
class Sweeper:
    store: TaskStore
    uploads: UploadStore
    emitter: Emitter
    s3: S3
    bucket: str
    policy: Policy

    async def sweep_once(self, now: dt.datetime) -> Pass:
        done = Pass()
        now_ms = int(now.timestamp() * 1000)
        if self.policy.tasks_after_s is not None:
            await self._expire_tasks(now_ms - int(self.policy.tasks_after_s * 1000), done)
            await self._resume_removals(now_ms - int(self.policy.removal_retry_s * 1000), done)
        if self.policy.uploads_after_s is not None:
            before_ms = now_ms - int(self.policy.uploads_after_s * 1000)
            await self._reap_uploads(before_ms, done)
            await self._reap_orphans(before_ms, done)
        if self.policy.tombstones_after_s is not None:
            done.tombstones = await retention.forget_tombstones(
                self.store, now - dt.timedelta(seconds=self.policy.tombstones_after_s)
            )
        return done

    async def _expire_tasks(self, finished_before_ms: int, done: Pass) -> None:
        found = await retention.expired(self.store, finished_before_ms, self.policy.batch)
        done.full |= len(found) == self.policy.batch
        for ref in found:
            if not await retention.still_expired(self.store, ref, finished_before_ms):
                continue  # restarted (or removed) since it was selected
            with bind_task(ref.task_id, attempt=ref.attempt):
                # As /task/remove: the event and its command in one write, then published.
                await self.emitter.remove(ref.task_id, ref.attempt)
                log.info("expired task removed")
            done.removed += 1

    async def _resume_removals(self, removed_before_ms: int, done: Pass) -> None:
        for ref in await retention.stalled_removals(
            self.store, removed_before_ms, self.policy.batch
        ):
            if await retention.resume_removal(self.store, ref):
                log.warning("stalled removal resumed", task_id=ref.task_id)
                done.resumed += 1

    async def _reap_uploads(self, idle_before_ms: int, done: Pass) -> None:
        found = await self.uploads.idle(idle_before_ms, self.policy.batch)
        done.full |= len(found) == self.policy.batch
        for upload_id in found:
            if not await self.uploads.close_idle(upload_id, idle_before_ms):
                continue  # active again, or reaped by another replica
            # A task holding the id owns the files (a commit cut off after creating it).
            if await self.store.get_task(upload_id) is None:
                await self.s3.delete_prefix(task_inputs(self.bucket, upload_id))
            await self.uploads.drop(upload_id)
            log.info("abandoned upload deleted", task_id=upload_id)
            done.uploads += 1

    async def _reap_orphans(self, orphaned_before_ms: int, done: Pass) -> None:
        found = await self.uploads.orphans(orphaned_before_ms, self.policy.batch)
        done.full |= len(found) == self.policy.batch
        for record in found:
            upload_id = record["upload_id"]
            held = (await self.store.get_task(upload_id) is not None
                    or await self.uploads.get(upload_id) is not None)
            if not held:  # else the task's (or the new upload's) prefix covers the object
                inputs = task_inputs(self.bucket, upload_id)
                await self.s3.delete(S3Url(inputs.bucket, inputs.key + record["name"]))
            await self.uploads.drop_orphan(record["_id"])
            done.orphans += 1


async def sweep_forever(
    store: TaskStore, emitter: Emitter, s3: S3, settings: WatcherSettings, *,
    clock: Clock = utcnow,
) -> None:
    """The watcher's retention loop (runs until cancelled); returns at once when retention is
    off."""
    policy = Policy.from_settings(settings)
    await retention.ensure_tombstone_expiry(store, policy.tombstones_after_s)
    if policy.off:
        log.info("retention off: finished tasks, uploads and tombstones are kept")
        return
    uploads = UploadStore(store.db)
    await retention.ensure_indexes(store)
    await uploads.ensure_indexes()
    sweeper = Sweeper(store, uploads, emitter, s3, settings.s3.bucket, policy)
    log.info("retention on", tasks_after_s=policy.tasks_after_s,
             uploads_after_s=policy.uploads_after_s,
             tombstones_after_s=policy.tombstones_after_s, interval_s=policy.interval_s)
    while True:
        pause = policy.interval_s
        try:
            done = await sweeper.sweep_once(clock())
        except Exception:
            log.exception("retention pass failed")
        else:
            if done.anything:
                log.info("retention pass", removed=done.removed, resumed=done.resumed,
                         uploads=done.uploads, orphans=done.orphans,
                         tombstones=done.tombstones)
            if done.full:
                pause = min(pause, FULL_BATCH_PAUSE_S)
        await asyncio.sleep(pause)
