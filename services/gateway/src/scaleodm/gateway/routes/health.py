"""Liveness and readiness probes (not part of the NodeODM API, no token)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from scaleodm.gateway.deps import ResourcesDep

router = APIRouter(tags=["health"], include_in_schema=False)


@router.get("/healthz")
async def read_health() -> dict[str, str]:
    """The process serves requests."""
    return {"status": "ok"}


@router.get("/readyz")
async def read_readiness(res: ResourcesDep) -> Any:
    """MongoDB, NATS and S3 answer."""
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(res.mongo.ping(), 2)
        checks["mongo"] = "ok"
    except Exception as exc:
        checks["mongo"] = repr(exc)
    conn = res.broker.connection
    checks["nats"] = "ok" if conn and conn.is_connected else "down"
    try:
        await asyncio.wait_for(res.s3.ping(), 2)
        checks["s3"] = "ok"
    except Exception as exc:
        checks["s3"] = repr(exc)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
