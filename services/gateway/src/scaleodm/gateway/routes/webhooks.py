"""Webhook deliveries of a task, as the notifier recorded them: ``GET /task/{uuid}/webhooks``.

Protected by the token like the NodeODM routes, with NodeODM's error convention for an unknown
uuid (HTTP 200 + ``{"error": "<uuid> not found"}``, nodeodm-api §1.1); another tenant's task is
an unknown uuid. URLs are shown without
user info, query string or fragment: ClusterODM-style hooks carry their token there.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter

from scaleodm.common.contracts.ids import canonical_task_id
from scaleodm.common.store.deliveries import DeliveryStore
from scaleodm.gateway import deps, models, openapi
from scaleodm.gateway.deps import CallerDep, CallerRequired, ResourcesDep
from scaleodm.gateway.errors import not_found

router = APIRouter(tags=["webhooks"], dependencies=[CallerRequired])


def redact_url(url: str) -> str:
    """``scheme://host[:port]/path`` — no credentials, query or fragment."""
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return "<invalid url>"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _iso_ms(ms: int | None) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


# GET /task/{uuid}/webhooks: one entry per (attempt of the task, target)
def _delivery_public(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": doc["_id"],
        "url": redact_url(doc.get("url", "")),
        "taskAttempt": doc.get("attempt"),
        "status": doc.get("status"),
        "reason": doc.get("reason"),
        "firstAttemptAt": _iso_ms(doc.get("first_at_ms")),
        "nextAttemptAt": _iso_ms(doc.get("next_at_ms")) if doc.get("status") == "pending" else None,
        "attempts": [
            {
                "at": _iso_ms(a.get("at_ms")),
                "statusCode": a.get("status_code"),
                "latencyMs": a.get("latency_ms"),
                "error": a.get("error"),
            }
            for a in doc.get("attempts", [])
            if isinstance(a, dict)
        ],
    }


@router.get("/task/{uuid}/webhooks", operation_id="webhooks-read_task_webhooks",
            response_model=None, responses=openapi.ok(
                list[models.WebhookDelivery], "The deliveries, oldest first.", path_params=True))
async def read_task_webhooks(uuid: str, res: ResourcesDep, caller: CallerDep
                             ) -> list[dict[str, Any]]:
    """The task's webhook deliveries: target, status (pending/delivered/dead), every attempt."""
    task_id = canonical_task_id(uuid)  # one spelling per task (contracts/ids.py)
    doc = await res.store.get_task(task_id) if task_id is not None else None
    if task_id is None or deps.visible(doc, caller) is None:
        raise not_found(uuid)
    deliveries = DeliveryStore(res.store.db)
    return [_delivery_public(d) for d in await deliveries.for_task(task_id)]
