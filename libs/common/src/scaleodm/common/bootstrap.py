"""``scaleodm-bootstrap``: create the JetStream streams and durable consumers, then exit.

Run once before the services (a Kubernetes Job), so that the durables exist before KEDA's
JetStream scaler looks for them — a missing consumer makes KEDA fall back to the stream's last
sequence and over-scale (stack-notes §5). Idempotent; services also ensure them at start-up.
"""

from __future__ import annotations

import asyncio
import sys

from scaleodm.common import runtime
from scaleodm.common.contracts import streams
from scaleodm.common.logging import configure_logging, get_logger
from scaleodm.common.settings import get_scheduler_settings

log = get_logger(__name__)


async def main() -> None:
    settings = get_scheduler_settings()
    configure_logging("bootstrap", settings.log_level, settings.log_json)
    # The services' connection options and credentials; gives up after startup_timeout_s.
    conn = await runtime.connect_nats(settings.nats)
    try:
        js = conn.jetstream()
        await streams.ensure_streams(js, replicas=settings.nats.stream_replicas)
        await streams.ensure_consumers(
            js, ack_wait_s=settings.ack_wait_s, max_deliver=settings.max_deliver
        )
        log.info("streams and durable consumers ready",
                 streams=[s.name for s in streams.STREAMS],
                 consumers=[d.config.durable_name for d in streams.durables()])
    finally:
        await runtime.close_nats(conn, settings.nats.drain_timeout_s)


def cli() -> None:
    asyncio.run(main())
    sys.exit(0)
