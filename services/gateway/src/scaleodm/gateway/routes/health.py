"""Liveness and readiness probes (not part of the NodeODM API, no token).

``/readyz`` answers each check as ``ok``, ``down`` or ``timeout`` only: it is unauthenticated, and
an exception's text names hosts, ports and bucket URLs. The exception goes to the log instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from scaleodm.common.logging import get_logger
from scaleodm.gateway.deps import ResourcesDep

log = get_logger(__name__)
router = APIRouter(tags=["health"], include_in_schema=False)

READY_CHECK_TIMEOUT_S = 2.0


@router.get("/healthz")
async def read_health() -> dict[str, str]:
    """The process serves requests."""
    return {"status": "ok"}


async def _check(name: str, probe: Callable[[], Awaitable[Any]]) -> str:
    try:
        await asyncio.wait_for(probe(), READY_CHECK_TIMEOUT_S)
    except TimeoutError:
        log.warning("readiness check timed out", check=name, timeout_s=READY_CHECK_TIMEOUT_S)
        return "timeout"
    except Exception as exc:
        log.warning("readiness check failed", check=name, error=repr(exc))
        return "down"
    return "ok"


@router.get("/readyz")
async def read_readiness(res: ResourcesDep) -> Any:
    """MongoDB, NATS and S3 answer."""
    conn = res.broker.connection
    checks = {
        "mongo": await _check("mongo", res.mongo.ping),
        "nats": "ok" if conn and conn.is_connected else "down",
        "s3": await _check("s3", res.s3.ping),
    }
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
