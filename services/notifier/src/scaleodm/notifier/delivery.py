"""Webhook delivery: NodeODM's payload (task info + ``images``), retried, every attempt recorded.

We fire on every terminal transition of an attempt — completed, failed, canceled — a superset
of NodeODM, which skips tasks that never started processing (nodeodm-api §11 #16); receivers
tell outcomes apart by ``status.code``. Each (task, attempt, target) is one delivery document
(``DeliveryStore``), delivered at most once successfully.

Retries outlive NodeODM's fixed 6-attempt schedule (nodeodm-api §8): exponential backoff with
equal jitter (half the step fixed, half random, so receivers recovering together are not hit in
lockstep) until ``horizon_s`` after the first attempt, then the delivery is dead-lettered with
its reason. The schedule lives in MongoDB (``first_at_ms``, ``next_at_ms``, the attempts), not
in the message: the handler NAKs the event until the earliest pending target is due, and a
redelivery that comes early (restart, ``ack_wait``) attempts nothing. Targets of one event are
delivered concurrently, each attempt bounded by ``timeout_s`` overall, so a hanging receiver
costs the others nothing. A target the outbound guard refuses (``netguard``) is dead at once.

With a Standard Webhooks secret, every attempt is signed: ``webhook-id`` is the delivery id
(stable across retries, so receivers can deduplicate), ``webhook-timestamp`` the attempt's time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
import standardwebhooks

from scaleodm.common import netguard
from scaleodm.common.contracts import events
from scaleodm.common.domain import taskinfo
from scaleodm.common.domain.status import TERMINAL_STATES, TaskState
from scaleodm.common.logging import bind_task, get_logger
from scaleodm.common.store.deliveries import DeliveryStore
from scaleodm.common.store.s3 import S3, S3Url, parse_s3_url
from scaleodm.common.store.tasks import TaskStore

log = get_logger(__name__)


class RetryLaterError(Exception):
    """At least one target is pending; retry the event after ``delay_s``."""

    def __init__(self, task_id: str, delay_s: float) -> None:
        super().__init__(f"{task_id}: retry in {delay_s:.1f}s")
        self.delay_s = delay_s


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed delivery is tried again, and when it is given up."""

    timeout_s: float = 10.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    horizon_s: float = 86400.0
    max_attempts: int = 0  # 0: no cap, the horizon decides

    def delay_s(self, failures: int) -> float:
        """Delay after the ``failures``-th failed attempt: exponential, equal jitter."""
        step = min(self.backoff_base_s * 2.0 ** min(max(failures - 1, 0), 60), self.backoff_max_s)
        return step / 2 + random.uniform(0, step / 2)


def delivery_id(task_id: str, attempt: int, url: str) -> str:
    return f"{task_id}:{attempt}:{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def now_ms() -> int:
    return int(time.time() * 1000)


class Notifier:
    def __init__(
        self,
        store: TaskStore,
        deliveries: DeliveryStore,
        s3: S3,
        client: httpx.AsyncClient,
        *,
        node_webhook: str | None,
        policy: RetryPolicy,
        secret: str | None = None,
    ) -> None:
        self.store = store
        self.deliveries = deliveries
        self.s3 = s3
        self.client = client
        self.node_webhook = node_webhook
        self.policy = policy
        self.signer = standardwebhooks.Webhook(secret) if secret else None

    async def on_terminal(self, ev: events.TaskEvent) -> None:
        """Deliver to every target; :class:`RetryLaterError` while some are pending."""
        with bind_task(ev.task_id, attempt=ev.attempt, event=ev.kind):
            doc = await self.store.get_task(ev.task_id)
            if doc is None or doc["attempt"] != ev.attempt:
                return
            if TaskState(doc["state"]) not in TERMINAL_STATES:
                return  # the projection has not caught up; NodeODM receivers want final info
            # NodeODM §8: the task's and the node's webhook, each only if longer than 3 chars
            targets = [u for u in (doc.get("webhook"), self.node_webhook) if u and len(u) > 3]
            if not targets:
                return
            payload = {**taskinfo.task_info(doc, now_ms()), "images": await self._images(doc)}
            body = json.dumps(payload).encode()
            due = await asyncio.gather(
                *(self._deliver(doc, url, body) for url in dict.fromkeys(targets))
            )
            pending = [d for d in due if d is not None]
            if pending:
                raise RetryLaterError(ev.task_id, max(min(pending) - now_ms(), 0) / 1000)

    async def _deliver(self, doc: dict[str, Any], url: str, body: bytes) -> int | None:
        """None when this target is settled (delivered or dead), else when it is next due."""
        did = delivery_id(doc["_id"], doc["attempt"], url)
        rec = await self.deliveries.open(did, task_id=doc["_id"], attempt=doc["attempt"], url=url)
        if rec["status"] in ("delivered", "dead"):
            return None
        if rec.get("next_at_ms", 0) > now_ms():
            return int(rec["next_at_ms"])  # an early redelivery: not due yet
        started = time.monotonic()
        code, error, refused = await self._attempt(did, url, body)
        latency = int((time.monotonic() - started) * 1000)
        tries = len(rec["attempts"]) + 1
        status, next_at, reason = "delivered", 0, None
        if error is not None:
            status, next_at, reason = self._after_failure(rec, tries, error, refused)
        await self.deliveries.record_attempt(
            did, status=status, status_code=code, latency_ms=latency, error=error,
            next_at_ms=next_at, reason=reason,
        )
        log.info("webhook attempt", delivery=did, status=status, status_code=code,
                 latency_ms=latency, error=error, attempt_no=tries)
        return next_at if status == "pending" else None

    def _after_failure(
        self, rec: dict[str, Any], tries: int, error: str, refused: bool
    ) -> tuple[str, int, str | None]:
        if refused:
            return "dead", 0, error
        if self.policy.max_attempts and tries >= self.policy.max_attempts:
            return "dead", 0, f"gave up after {tries} attempts; last: {error}"
        now = now_ms()
        first = rec.get("first_at_ms")
        if not first and isinstance(rec.get("created_at"), dt.datetime):  # older records
            first = int(rec["created_at"].timestamp() * 1000)
        deadline = int(first or now) + int(self.policy.horizon_s * 1000)
        if now >= deadline:
            return "dead", 0, (f"gave up after {tries} attempts over "
                               f"{self.policy.horizon_s:g}s; last: {error}")
        # the last attempt lands on the horizon rather than being skipped
        return "pending", min(now + int(self.policy.delay_s(tries) * 1000), deadline), None

    async def _attempt(
        self, did: str, url: str, body: bytes
    ) -> tuple[int | None, str | None, bool]:
        """One POST: (status code, error or None, refused by the outbound guard)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.signer is not None:
            at = dt.datetime.now(dt.UTC)
            headers["webhook-id"] = did
            headers["webhook-timestamp"] = str(int(at.timestamp()))
            headers["webhook-signature"] = self.signer.sign(did, at, body.decode())
        try:
            async with asyncio.timeout(self.policy.timeout_s):  # the whole attempt, not per read
                resp = await self.client.post(url, content=body, headers=headers)
        except TimeoutError:
            return None, f"timed out after {self.policy.timeout_s:g}s", False
        except httpx.HTTPError as exc:
            refusal = netguard.refusal_of(exc)
            if refusal is not None:
                return None, f"refused: {refusal}", True
            return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, False
        if not 200 <= resp.status_code < 300:
            return resp.status_code, f"HTTP {resp.status_code}", False
        return resp.status_code, None, False

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
