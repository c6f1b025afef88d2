"""``scaleodm-bootstrap``: create the JetStream streams and durable consumers, then exit.

Run once before the services (a Kubernetes Job), so that the durables exist before KEDA's
JetStream scaler looks for them — a missing consumer makes KEDA fall back to the stream's last
sequence and over-scale (stack-notes §5). Idempotent; services also ensure them at start-up.
"""

from __future__ import annotations

import asyncio
import sys

import nats

from scaleodm.common.contracts import streams
from scaleodm.common.logging import configure_logging, get_logger
from scaleodm.common.settings import get_scheduler_settings

log = get_logger(__name__)


async def main() -> None:
    settings = get_scheduler_settings()
    configure_logging("bootstrap", settings.log_level, settings.log_json)
    conn = await nats.connect(
        servers=settings.nats.servers(), connect_timeout=int(settings.nats.connect_timeout_s),
        **settings.nats.credentials(),  # the same credentials as the services (runtime.py)
    )
    try:
        js = conn.jetstream()
        await streams.ensure_streams(js)
        await streams.ensure_consumers(
            js, ack_wait_s=settings.ack_wait_s, max_deliver=settings.max_deliver
        )
        log.info("streams and durable consumers ready",
                 streams=[s.name for s in streams.STREAMS],
                 consumers=[d.config.durable_name for d in streams.durables()])
    finally:
        await conn.drain()


def cli() -> None:
    asyncio.run(main())
    sys.exit(0)
