"""Webhook delivery: NodeODM's payload (task info + ``images``), retried, every attempt recorded.

We fire on every terminal transition of an attempt — completed, failed, canceled — a superset
of NodeODM, which skips tasks that never started processing (nodeodm-api §11 #16); receivers
tell outcomes apart by ``status.code``. Each (task, attempt, target) is delivered at most once
successfully; a failing target is retried by NAKing the event with a growing delay, without
repeating targets that already succeeded.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import httpx

from scaleodm.common.contracts import events
from scaleodm.common.domain import taskinfo
from scaleodm.common.domain.status import TERMINAL_STATES, TaskState
from scaleodm.common.logging import bind_task, get_logger
from scaleodm.common.store.deliveries import DeliveryStore
from scaleodm.common.store.s3 import S3, S3Url, parse_s3_url
from scaleodm.common.store.tasks import TaskStore

log = get_logger(__name__)


class RetryLaterError(Exception):
    """At least one target failed and has attempts left."""


def delivery_id(task_id: str, attempt: int, url: str) -> str:
    return f"{task_id}:{attempt}:{hashlib.sha256(url.encode()).hexdigest()[:16]}"


class Notifier:
    def __init__(
        self,
        store: TaskStore,
        deliveries: DeliveryStore,
        s3: S3,
        client: httpx.AsyncClient,
        *,
        node_webhook: str | None,
        max_attempts: int,
    ) -> None:
        self.store = store
        self.deliveries = deliveries
        self.s3 = s3
        self.client = client
        self.node_webhook = node_webhook
        self.max_attempts = max_attempts

    async def on_terminal(self, ev: events.TaskEvent) -> None:
        with bind_task(ev.task_id, attempt=ev.attempt, event=ev.kind):
            doc = await self.store.get_task(ev.task_id)
            if doc is None or doc["attempt"] != ev.attempt:
                return
            if TaskState(doc["state"]) not in TERMINAL_STATES:
                return  # the projection has not caught up; NodeODM receivers want final info
            targets = [u for u in (doc.get("webhook"), self.node_webhook) if u and len(u) > 3]
            if not targets:
                return
            payload = {**taskinfo.task_info(doc, int(time.time() * 1000)),
                       "images": await self._images(doc)}
            pending = False
            for url in dict.fromkeys(targets):
                pending |= not await self._deliver(doc, url, payload)
            if pending:
                raise RetryLaterError(ev.task_id)

    async def _deliver(self, doc: dict[str, Any], url: str, payload: dict[str, Any]) -> bool:
        """True when this target is settled (delivered, or given up)."""
        did = delivery_id(doc["_id"], doc["attempt"], url)
        rec = await self.deliveries.open(did, task_id=doc["_id"], attempt=doc["attempt"], url=url)
        if rec["status"] in ("delivered", "dead"):
            return True
        started = time.monotonic()
        code: int | None = None
        error: str | None = None
        try:
            resp = await self.client.post(
                url, content=json.dumps(payload),
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
            code = resp.status_code
            if not 200 <= code < 300:
                error = f"HTTP {code}"
        except httpx.HTTPError as exc:
            error = repr(exc)
        latency = int((time.monotonic() - started) * 1000)
        ok = error is None
        tries = len(rec["attempts"]) + 1
        status = "delivered" if ok else ("dead" if tries >= self.max_attempts else "pending")
        await self.deliveries.record_attempt(
            did, status=status, status_code=code, latency_ms=latency, error=error
        )
        log.info("webhook attempt", url_hash=did[-16:], status=status, status_code=code,
                 latency_ms=latency, error=error, attempt_no=tries)
        return status != "pending"

    async def _images(self, doc: dict[str, Any]) -> list[Any]:
        if doc["state"] != TaskState.COMPLETED.value:
            return []
        try:
            prefix = parse_s3_url(doc["output_prefix"])
            chunks = [c async for c in self.s3.iter_object(
                S3Url(prefix.bucket, prefix.key + "images.json"))]
            value = json.loads(b"".join(chunks))
        except Exception:
            return []
        return value if isinstance(value, list) else []
