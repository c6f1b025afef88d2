"""The outbox relay: publishes the events an emitter recorded but could not publish.

An emitter records an event in MongoDB, then publishes it; when it crashed in between, or NATS was
away, the event stays ``published: false`` and this loop publishes it (``Emitter.republish``), so
consumers such as the notifier still see it. Only events older than ``min_age_s`` are taken: a
younger one is most likely still being published by its emitter.
"""

from __future__ import annotations

import asyncio
import datetime as dt

from scaleodm.common.emitting import Emitter
from scaleodm.common.logging import get_logger
from scaleodm.common.store.tasks import TaskStore

log = get_logger(__name__)


async def relay_outbox(store: TaskStore, emitter: Emitter, *, interval_s: float,
                       min_age_s: float) -> None:
    """Every ``interval_s``, publish the unpublished events older than ``min_age_s``, until
    cancelled; a failed pass is logged and the next one tries again."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=min_age_s)
            for doc in await store.unpublished_events(cutoff):
                if await emitter.republish(doc):
                    log.info("outbox event published", event_id=doc["_id"], task_id=doc["task_id"])
        except Exception:
            log.exception("outbox relay failed")
