"""The projection: applies every event on the bus to MongoDB, and relays the outbox.

Most events were applied by their emitter already (read-your-writes); for those the apply is a
cheap no-op recognised by event id. The relay publishes events an emitter recorded but could not
publish (it crashed, or NATS was away), so consumers such as the notifier still see them.
"""

from __future__ import annotations

import asyncio
import datetime as dt

from scaleodm.common.contracts import events
from scaleodm.common.emitting import Emitter
from scaleodm.common.logging import bind_task, get_logger
from scaleodm.common.store.tasks import TaskStore

log = get_logger(__name__)


async def apply(store: TaskStore, ev: events.TaskEvent) -> None:
    with bind_task(ev.task_id, attempt=ev.attempt, event_id=ev.event_id):
        if ev.seq is not None and await store.event_seen(ev.event_id):
            return
        result = await store.apply_event(ev)
        log.debug("event projected", outcome=result.outcome.value, seq=result.seq)


async def relay_outbox(store: TaskStore, emitter: Emitter, *, interval_s: float,
                       min_age_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=min_age_s)
            for doc in await store.unpublished_events(cutoff):
                if await emitter.republish(doc):
                    log.info("outbox event published", event_id=doc["_id"], task_id=doc["task_id"])
        except Exception:
            log.exception("outbox relay failed")
