"""Webhook delivery: NodeODM's payload (task info + ``images``), retried, every attempt recorded.

We fire on every terminal transition of an attempt — completed, failed, canceled — a superset
of NodeODM, which skips tasks that never started processing (nodeodm-api §11 #16); receivers
tell outcomes apart by ``status.code``. Each (task, attempt, target) is one delivery document
(``DeliveryStore``), delivered at most once successfully.

Retries outlive NodeODM's fixed 6-attempt schedule (nodeodm-api §8): ``clock.backoff_s`` with
equal jitter (half the step fixed, half random, so receivers recovering together are not hit in
lockstep) until ``horizon_s`` after the first attempt, then the delivery is dead-lettered with
its reason. The schedule lives in MongoDB (``first_at_ms``, ``next_at_ms``, the attempts), not
in the message: the handler NAKs the event until the earliest pending target is due, and a
redelivery that comes early (restart, ``ack_wait``) attempts nothing. Targets of one event are
delivered concurrently, each attempt bounded by ``timeout_s`` overall (connection, request,
status line, headers and the response body read together), so a hanging or trickling receiver
costs the others nothing.

Only transient failures are retried: timeouts, network errors, a connection dropped mid-answer,
a status outside 2xx. A target that can never work is dead at its first attempt, with the
reason: a URL ``netguard.validate_url`` rejects (malformed, too long, not http(s)) — checked
before any connection, as task webhooks stored before the gateway checked them and the node
webhook still arrive here — an address the outbound guard refuses, and any other error, expected
or not. Every attempt, whatever ends it, is recorded.

The status code decides an attempt; of the body, at most ``max_response_bytes`` are read (raw,
never decompressed), then the response is closed unread, which closes the connection: a
receiver answering gigabytes costs one network read. A small body is read to its end, so the
connection can be reused.

With a Standard Webhooks secret, every attempt is signed: ``webhook-id`` is the delivery id
(stable across retries, so receivers can deduplicate), ``webhook-timestamp`` the attempt's time.

The notifier depends on three narrow ports declared here (``TaskReader``, ``DeliveryLog``,
``ObjectReader``), which ``TaskStore``, ``DeliveryStore`` and ``S3`` implement; wall-clock time
comes from ``scaleodm.common.clock`` (tests move a ``ManualClock``), attempt latency from
``time.monotonic()``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import httpx
import standardwebhooks

from scaleodm.common import clock, metrics, netguard, tracing
from scaleodm.common.contracts import events
from scaleodm.common.domain import taskinfo, webhooks
from scaleodm.common.domain.status import TERMINAL_STATES, TaskState
from scaleodm.common.logging import bind_task, get_logger
from scaleodm.common.store.s3 import S3Url, parse_s3_url

log = get_logger(__name__)
Doc = dict[str, Any]


class TaskReader(Protocol):
    """Reads task documents (``TaskStore``)."""

    async def get_task(self, task_id: str) -> Doc | None: ...


class DeliveryLog(Protocol):
    """One record per (task, attempt, target) with every attempt (``DeliveryStore``)."""

    async def open(self, delivery_id: str, *, task_id: str, attempt: int, url: str) -> Doc:
        """The delivery's record, created ``pending`` if new."""
        ...

    async def record_attempt(
        self, delivery_id: str, *, status: str, status_code: int | None, latency_ms: int,
        error: str | None, next_at_ms: int = 0, reason: str | None = None,
    ) -> None: ...


class ObjectReader(Protocol):
    """Reads an object (``S3``)."""

    def iter_object(self, url: S3Url) -> AsyncIterator[bytes]: ...


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
        """Delay after the ``failures``-th failed attempt: ``clock.backoff_s`` with equal jitter
        (uniform within [step/2, step], step = min(base * 2^(failures-1), max))."""
        return clock.backoff_s(
            failures, base_s=self.backoff_base_s, max_s=self.backoff_max_s, jitter=0.5
        )


class Outcome(NamedTuple):
    """One attempt's result."""

    status_code: int | None  # None: no HTTP answer
    error: str | None  # None: delivered
    permanent: bool = False  # no later attempt can do better: dead at once


# Failures a later attempt may not meet again; everything else is permanent.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    TimeoutError, httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError,
    httpx.ProxyError, OSError,
)
MAX_ERROR_CHARS = 500


def delivery_id(task_id: str, attempt: int, url: str) -> str:
    digest = hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{task_id}:{attempt}:{digest}"


# An attempt's record status as the metric's outcome: delivered, failed (tried again later), or
# gave_up (the delivery is dead).
WEBHOOK_OUTCOMES = {"delivered": "delivered", "pending": "failed", "dead": "gave_up"}


def recorded_url(url: str) -> str:
    """``url`` as its delivery record keeps it: bounded and storable (valid UTF-8).

    Unchanged for any URL ``netguard.validate_url`` accepts; longer or unencodable ones are
    invalid and dead anyway, their record only needs to show which target it was.
    """
    shown = url[: netguard.MAX_URL_LENGTH] + ("…" if len(url) > netguard.MAX_URL_LENGTH else "")
    return storable(shown)


def storable(text: str) -> str:
    """``text`` as valid UTF-8: lone surrogates (undecodable bytes of an environment variable)
    escaped, since MongoDB refuses them and the record would never be written."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


class Notifier:
    def __init__(
        self,
        store: TaskReader,
        deliveries: DeliveryLog,
        s3: ObjectReader,
        client: httpx.AsyncClient,
        *,
        node_webhook: str | None,
        policy: RetryPolicy,
        secret: str | None = None,
        max_response_bytes: int = 4096,
    ) -> None:
        self.store = store
        self.deliveries = deliveries
        self.s3 = s3
        self.client = client
        self.node_webhook = node_webhook
        self.policy = policy
        self.signer = standardwebhooks.Webhook(secret) if secret else None
        self.max_response_bytes = max_response_bytes

    async def on_terminal(self, ev: events.TaskEvent) -> None:
        """Deliver to every target; :class:`RetryLaterError` while some are pending.

        Only terminal events (``events.TerminalEvent``) deliver; any other is ignored.
        """
        if not isinstance(ev, events.TerminalEvent):
            return
        with bind_task(ev.task_id, attempt=ev.attempt, event=ev.kind):
            doc = await self.store.get_task(ev.task_id)
            if doc is None or doc["attempt"] != ev.attempt:
                return
            if TaskState(doc["state"]) not in TERMINAL_STATES:
                return  # the projection has not caught up; NodeODM receivers want final info
            # NodeODM §8: the task's and the node's webhook, each only if longer than 3 chars
            targets = [u for u in map(webhooks.webhook_target, (doc.get("webhook"),
                                                                 self.node_webhook)) if u]
            if not targets:
                return
            payload = {**taskinfo.task_info(doc, clock.now_ms()), "images": await self._images(doc)}
            body = json.dumps(payload).encode()
            # every target's attempt is made and recorded before a failure (MongoDB away) is
            # raised for the whole event to be retried
            due = await asyncio.gather(
                *(self._deliver(doc, url, body) for url in dict.fromkeys(targets)),
                return_exceptions=True,
            )
            for result in due:
                if isinstance(result, BaseException):
                    raise result
            pending = [d for d in due if isinstance(d, int)]
            if pending:
                raise RetryLaterError(ev.task_id, max(min(pending) - clock.now_ms(), 0) / 1000)

    async def _deliver(self, doc: dict[str, Any], url: str, body: bytes) -> int | None:
        """None when this target is settled (delivered or dead), else when it is next due."""
        did = delivery_id(doc["_id"], doc["attempt"], url)
        rec = await self.deliveries.open(
            did, task_id=doc["_id"], attempt=doc["attempt"], url=recorded_url(url)
        )
        if rec["status"] in ("delivered", "dead"):
            return None
        if rec.get("next_at_ms", 0) > clock.now_ms():
            return int(rec["next_at_ms"])  # an early redelivery: not due yet
        started = time.monotonic()
        outcome = await self._attempt(did, url, body)
        latency = int((time.monotonic() - started) * 1000)
        tries = len(rec["attempts"]) + 1
        status, next_at, reason = "delivered", 0, None
        error = None if outcome.error is None else storable(outcome.error)
        if error is not None:
            status, next_at, reason = self._after_failure(rec, tries, error, outcome.permanent)
        await self.deliveries.record_attempt(
            did, status=status, status_code=outcome.status_code, latency_ms=latency,
            error=error, next_at_ms=next_at, reason=reason,
        )
        log.info("webhook attempt", delivery=did, status=status, status_code=outcome.status_code,
                 latency_ms=latency, error=error, attempt_no=tries)
        metrics.WEBHOOK_DELIVERIES.labels(WEBHOOK_OUTCOMES[status]).inc()
        if status != "pending":
            metrics.WEBHOOK_ATTEMPTS.observe(tries)
        return next_at if status == "pending" else None

    def _after_failure(
        self, rec: dict[str, Any], tries: int, error: str, permanent: bool
    ) -> tuple[str, int, str | None]:
        if permanent:
            return "dead", 0, error
        if self.policy.max_attempts and tries >= self.policy.max_attempts:
            return "dead", 0, f"gave up after {tries} attempts; last: {error}"
        now = clock.now_ms()
        first = rec.get("first_at_ms")
        if not first and isinstance(rec.get("created_at"), dt.datetime):  # older records
            first = int(rec["created_at"].timestamp() * 1000)
        deadline = int(first or now) + int(self.policy.horizon_s * 1000)
        if now >= deadline:
            return "dead", 0, (f"gave up after {tries} attempts over "
                               f"{self.policy.horizon_s:g}s; last: {error}")
        # the last attempt lands on the horizon rather than being skipped
        return "pending", min(now + int(self.policy.delay_s(tries) * 1000), deadline), None

    async def _attempt(self, did: str, url: str, body: bytes) -> Outcome:
        """One POST, never raising: whatever ends it becomes the outcome."""
        try:
            netguard.validate_url(url)
        except netguard.InvalidTargetError as exc:
            return Outcome(None, f"invalid URL: {exc}", permanent=True)
        try:
            code = await self._post(url, body, self._headers(did, body))
        except TimeoutError:
            return Outcome(None, f"timed out after {self.policy.timeout_s:g}s")
        except Exception as exc:  # a failed attempt, recorded; never a redelivery loop
            refusal = netguard.refusal_of(exc)
            if refusal is not None:
                return Outcome(None, f"refused: {refusal}", permanent=True)
            return Outcome(None, describe(exc), permanent=not isinstance(exc, TRANSIENT_ERRORS))
        if not 200 <= code < 300:
            return Outcome(code, f"HTTP {code}")
        return Outcome(code, None)

    def _headers(self, did: str, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.signer is not None:
            at = clock.now()
            headers["webhook-id"] = did
            headers["webhook-timestamp"] = str(int(at.timestamp()))
            headers["webhook-signature"] = self.signer.sign(did, at, body.decode())
        traceparent = tracing.current_traceparent()
        if traceparent is not None:  # the receiver may join the task's trace (W3C)
            headers["traceparent"] = traceparent
        return headers

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        """The status code of one POST, all of it (body read included) within ``timeout_s``."""
        code: int | None = None
        try:
            async with (
                asyncio.timeout(self.policy.timeout_s),  # the whole attempt, not per read
                self.client.stream("POST", url, content=body, headers=headers) as resp,
            ):
                code = resp.status_code
                await self._read_capped(resp)
        except (TimeoutError, httpx.TransportError):
            if code is None:
                raise
            # The receiver answered; a body too slow or cut short changes nothing.
            log.info("webhook response body not read to its end", status_code=code)
        return code

    async def _read_capped(self, resp: httpx.Response) -> None:
        """Read at most ``max_response_bytes`` of the body (plus one network read), discarded.

        Leaving the ``stream`` block with the body unread closes the connection: the rest is
        never received into memory. Raw bytes: a compressed body is never inflated.
        """
        limit = self.max_response_bytes
        declared = resp.headers.get("content-length", "")
        if limit == 0 or (declared.isdigit() and int(declared) > limit):
            return
        seen = 0
        async for chunk in resp.aiter_raw():
            seen += len(chunk)
            if seen > limit:
                return

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
