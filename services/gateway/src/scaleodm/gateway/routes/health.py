"""Liveness and readiness probes, and ``/metrics`` (not part of the NodeODM API, no token).

``/healthz`` (``runtime.liveness``) fails only when the NATS connection is closed for good:
a dependency that is away (NATS reconnecting, MongoDB or S3 down) is not cured by a restart.
``/readyz`` fails while any dependency is away, so traffic goes to other replicas meanwhile. It
answers each check as ``ok``, ``down`` or ``timeout`` only: it is unauthenticated, and an
exception's text names hosts, ports and bucket URLs. The exception goes to the log instead. Both
are bounded: liveness does no I/O, each readiness check has ``runtime.READY_CHECK_TIMEOUT_S``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from scaleodm.common import metrics, runtime
from scaleodm.gateway.deps import ResourcesDep
from scaleodm.gateway.responses import JsonResponse

router = APIRouter(tags=["health"], include_in_schema=False)


@router.get("/healthz")
async def read_health(res: ResourcesDep) -> Any:
    """The process serves requests and its NATS connection is not closed for good."""
    status, body = runtime.liveness(res.broker)
    return JsonResponse(body, status_code=status)


@router.get("/readyz")
async def read_readiness(res: ResourcesDep) -> Any:
    """MongoDB, NATS and S3 answer (``runtime.check_readiness``: ok/down/timeout, no details)."""
    ready, checks = await runtime.check_readiness(
        [("mongo", res.mongo.ping), runtime.nats_check(res.broker), ("s3", res.s3.ping)]
    )
    return JsonResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics")
async def read_metrics() -> Response:
    """Prometheus' text format (``scaleodm.common.metrics``): no task ids, no tenants in it,
    nothing that waits on a dependency (the task counts are refreshed in the background)."""
    return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE_LATEST)
