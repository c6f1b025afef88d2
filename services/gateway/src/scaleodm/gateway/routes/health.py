"""Liveness and readiness probes (not part of the NodeODM API, no token).

``/readyz`` answers each check as ``ok``, ``down`` or ``timeout`` only: it is unauthenticated, and
an exception's text names hosts, ports and bucket URLs. The exception goes to the log instead.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from scaleodm.common import runtime
from scaleodm.gateway.deps import ResourcesDep

router = APIRouter(tags=["health"], include_in_schema=False)

@router.get("/healthz")
async def read_health() -> dict[str, str]:
    """The process serves requests."""
    return {"status": "ok"}


@router.get("/readyz")
async def read_readiness(res: ResourcesDep) -> Any:
    """MongoDB, NATS and S3 answer (``runtime.check_readiness``: ok/down/timeout, no details)."""

    async def nats() -> None:
        conn = res.broker.connection
        if not (conn and conn.is_connected):
            raise ConnectionError("NATS connection is down")

    ready, checks = await runtime.check_readiness(
        [("mongo", res.mongo.ping), ("nats", nats), ("s3", res.s3.ping)]
    )
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
