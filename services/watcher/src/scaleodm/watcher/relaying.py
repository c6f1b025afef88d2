"""The outbox relay: publishes the events an emitter recorded but could not publish.

An emitter records an event in MongoDB, then publishes it; when it crashed in between, or NATS was
away, the event stays ``published: false`` and this loop publishes it (``Emitter.republish``), so
consumers such as the notifier still see it. Only events older than ``min_age_s`` are taken: a
younger one is most likely still being published by its emitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt

from scaleodm.common import clock, metrics
from scaleodm.common.emitting import Emitter, Relayed
from scaleodm.common.logging import get_logger
from scaleodm.common.store import is_unavailable
from scaleodm.common.store.leases import Leases
from scaleodm.common.store.tasks import TaskStore

log = get_logger(__name__)
BATCH = 500


LEASE = "outbox-relay"


async def relay_outbox(store: TaskStore, emitter: Emitter, leases: Leases, *, holder: str,
                       interval_s: float, min_age_s: float) -> None:
    """Every ``interval_s`` (at once after a full batch), publish the unpublished events older
    than ``min_age_s``, until cancelled; a failed pass is logged and the next one tries again.

    One watcher replica relays at a time (the ``outbox-relay`` lease, ``lease_s`` long, renewed
    each pass): two would publish every message twice. A replica that dies loses the lease
    when it expires; one restarted under the same ``holder`` (its StatefulSet name) takes it
    back at once. On cancellation the lease is released.
    """
    lease_s = lease_seconds(interval_s)
    try:
        while True:
            sent, full = 0, False
            try:
                if await leases.hold(LEASE, holder, lease_s):
                    sent, full = await relay_once(store, emitter, min_age_s=min_age_s)
            except Exception as exc:
                if not is_unavailable(exc):
                    log.exception("outbox relay failed")
                else:
                    log.warning("outbox relay paused: storage unavailable", error=repr(exc))
            if sent:
                log.info("outbox events published", count=sent)
            if not full:
                await asyncio.sleep(interval_s)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(leases.release(LEASE, holder), 2.0)


def lease_seconds(interval_s: float) -> float:
    """How long the relay's lease lasts: three passes, at least 10 s."""
    return max(10.0, 3 * interval_s)


async def relay_once(store: TaskStore, emitter: Emitter, *, min_age_s: float,
                     batch: int = BATCH) -> tuple[int, bool]:
    """One pass over at most ``batch`` unpublished events, oldest first; it stops at the first
    one NATS does not take (the rest would wait for the same timeout), and at a storage error.
    (sent, more may be waiting: the batch was full and moved)."""
    cutoff = clock.now() - dt.timedelta(seconds=min_age_s)
    pending = await store.unpublished_events(cutoff, limit=batch)
    # What the relay sees (at most a batch; only events older than ``min_age_s``, the others
    # being their emitters' still).
    metrics.OUTBOX_BACKLOG.set(len(pending))
    metrics.OUTBOX_OLDEST.set(
        (clock.now() - pending[0]["recorded_at"]).total_seconds() if pending else 0)
    sent = moved = 0
    for doc in pending:
        try:
            outcome = await emitter.republish(doc)
        except Exception as exc:
            if is_unavailable(exc):
                raise
            log.exception("outbox event not relayed", event_id=doc.get("_id"))
            continue
        if outcome is Relayed.FAILED:
            return sent, False
        sent += outcome is Relayed.SENT
        moved += outcome is not Relayed.WAITING
    return sent, len(pending) == batch and moved > 0
