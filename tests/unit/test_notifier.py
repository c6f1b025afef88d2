"""The notifier's ``Notifier`` against in-memory fakes and an ``httpx.MockTransport``, in virtual
time (``clock.ManualClock``): no servers, no sleeps.

Covered:
- a terminal event POSTs NodeODM's payload (task info + ``images``) to the task's and the node's
  webhook, signed per Standard Webhooks (``webhook-id`` = the delivery id, stable across retries);
- a 5xx answer is retried on the policy's schedule (``clock.backoff_s`` with equal jitter: within
  [step/2, step]); a redelivery before the delivery is due attempts nothing; the next due one
  delivers; each attempt is recorded with its status code;
- past the horizon the delivery is dead, with the reason;
- non-terminal events deliver nothing, whatever the task's state;
- the app's subscriber (``notifier.app.create_app`` on FastStream's ``TestNatsBroker``, its
  resources replaced by the fakes): a pending delivery NACKs the event until it is due; a failure
  of the handling itself (MongoDB away) NACKs with ``clock.backoff_s(delivered)`` from the
  webhook settings, and is given up once the event is older than the horizon plus one step.

Left out: the HTTP client's timeouts and body caps, the outbound guard (``test_netguard.py``,
``tests/security/test_webhook_attacks.py``), delivery records in MongoDB
(``tests/integration/test_webhooks.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import standardwebhooks
from faststream import TestApp
from faststream.nats import TestNatsBroker
from faststream.nats.testing import PatchedMessage

from scaleodm.common import clock
from scaleodm.common.contracts import events, streams
from scaleodm.common.settings import NotifierSettings
from scaleodm.common.store.s3 import S3Url
from scaleodm.notifier import app as notifier_app
from scaleodm.notifier import delivery
from scaleodm.notifier.delivery import Notifier, RetryLaterError, RetryPolicy

TID = "0d2c1c6e-8a0b-4f7e-9c58-3b1f2a4d5e6f"
HOOK = "http://receiver.example/hook"
NODE_HOOK = "http://node.example/all"
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # base64 of 24 bytes
POLICY = RetryPolicy(timeout_s=5, backoff_base_s=2, backoff_max_s=8, horizon_s=60)


# -- fakes: only what the notifier calls ------------------------------------------------------


class FakeTasks:
    """``delivery.TaskReader``."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        return self.docs.get(task_id)


class FakeDeliveries:
    """``delivery.DeliveryLog``, with ``DeliveryStore``'s record shape."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    async def open(self, delivery_id: str, *, task_id: str, attempt: int, url: str) -> Any:
        if delivery_id not in self.records:
            self.records[delivery_id] = {
                "_id": delivery_id,
                "task_id": task_id,
                "attempt": attempt,
                "url": url,
                "status": "pending",
                "attempts": [],
                "first_at_ms": clock.now_ms(),
                "next_at_ms": 0,
                "reason": None,
            }
        return json.loads(json.dumps(self.records[delivery_id]))  # a copy, as read from MongoDB

    async def record_attempt(
        self,
        delivery_id: str,
        *,
        status: str,
        status_code: int | None,
        latency_ms: int,
        error: str | None,
        next_at_ms: int = 0,
        reason: str | None = None,
    ) -> None:
        rec = self.records[delivery_id]
        rec["attempts"].append(
            {
                "at_ms": clock.now_ms(),
                "status_code": status_code,
                "latency_ms": latency_ms,
                "error": error,
            }
        )
        rec.update(status=status, next_at_ms=next_at_ms, reason=reason)


class FakeObjects:
    """``delivery.ObjectReader``: the run's ``images.json``."""

    def __init__(self, images: list[str]) -> None:
        self.images = images
        self.read: list[S3Url] = []

    async def iter_object(self, url: S3Url) -> AsyncIterator[bytes]:
        self.read.append(url)
        yield json.dumps(self.images).encode()


class Receiver:
    """The webhook receivers: answers ``codes`` in order (then 200), records every request."""

    def __init__(self, codes: list[int] | None = None) -> None:
        self.codes = list(codes or [])
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        code = self.codes.pop(0) if self.codes else 200
        return httpx.Response(code, stream=httpx.ByteStream(b"ok"))  # read as a real one is


class Rig:
    def __init__(self, receiver: Receiver, *, node_webhook: str | None = None) -> None:
        self.tasks, self.deliveries = FakeTasks(), FakeDeliveries()
        self.objects = FakeObjects(["a.jpg", "b.jpg"])
        self.receiver = receiver
        self.notifier = Notifier(
            self.tasks,
            self.deliveries,
            self.objects,
            httpx.AsyncClient(transport=httpx.MockTransport(receiver)),
            node_webhook=node_webhook,
            policy=POLICY,
            secret=SECRET,
        )

    def task(self, state: str, **more: Any) -> dict[str, Any]:
        doc = {
            "_id": TID,
            "name": "survey",
            "attempt": 1,
            "state": state,
            "webhook": HOOK,
            "date_created_ms": 1_700_000_000_000,
            "progress": 100.0,
            "options": [],
            "images_count": 2,
            "started_at_ms": 1_700_000_001_000,
            "finished_at_ms": 1_700_000_031_000,
            "output_prefix": f"s3://scaleodm/tasks/{TID}/outputs/",
            **more,
        }
        self.tasks.docs[TID] = doc
        return doc

    def record(self, url: str = HOOK) -> dict[str, Any]:
        return self.deliveries.records[delivery.delivery_id(TID, 1, url)]


@pytest.fixture
def now() -> Iterator[clock.ManualClock]:
    # Standard Webhooks receivers check the timestamp against their own clock (5 min).
    with clock.use(clock.ManualClock(dt.datetime.now(dt.UTC))) as manual:
        assert isinstance(manual, clock.ManualClock)
        yield manual


def _completed() -> events.TaskEvent:
    return events.new(events.TaskCompleted, TID, 1)


# -- delivery ---------------------------------------------------------------------------------


async def test_terminal_event_posts_the_signed_payload(now: clock.ManualClock) -> None:
    rig = Rig(Receiver(), node_webhook=NODE_HOOK)
    rig.task("completed")
    await rig.notifier.on_terminal(_completed())

    assert sorted(str(r.url) for r in rig.receiver.requests) == sorted([HOOK, NODE_HOOK])
    for request in rig.receiver.requests:
        body = request.content.decode()
        payload = json.loads(body)
        assert payload["uuid"] == TID
        assert payload["status"] == {"code": 40}
        assert payload["processingTime"] == 30_000
        assert payload["images"] == ["a.jpg", "b.jpg"]
        headers = dict(request.headers)
        assert headers["webhook-id"] == delivery.delivery_id(TID, 1, str(request.url))
        assert headers["webhook-timestamp"] == str(int(now.now().timestamp()))
        assert standardwebhooks.Webhook(SECRET).verify(body, headers) == payload
    assert rig.record()["status"] == rig.record(NODE_HOOK)["status"] == "delivered"
    assert [a["status_code"] for a in rig.record()["attempts"]] == [200]


def _due_in_s(rig: Rig, now: clock.ManualClock) -> float:
    return (rig.record()["next_at_ms"] - clock.to_ms(now.now())) / 1000


async def test_5xx_is_retried_on_the_policy_schedule(now: clock.ManualClock) -> None:
    rig = Rig(Receiver([503, 502, 500]))
    rig.task("failed", error_message="Cannot process dataset")
    ev = events.new(events.TaskFailed, TID, 1, error_message="Cannot process dataset")

    for failures in (1, 2, 3):
        with pytest.raises(RetryLaterError) as retry:
            await rig.notifier.on_terminal(ev)
        step = min(POLICY.backoff_base_s * 2 ** (failures - 1), POLICY.backoff_max_s)
        due = _due_in_s(rig, now)
        assert step / 2 <= due <= step  # equal jitter
        assert retry.value.delay_s == pytest.approx(due, abs=0.001)
        assert len(rig.receiver.requests) == failures

        # Redelivered early (a restart, ack_wait): nothing is attempted.
        now.advance(due / 2)
        with pytest.raises(RetryLaterError):
            await rig.notifier.on_terminal(ev)
        assert len(rig.receiver.requests) == failures
        now.advance(due / 2)

    await rig.notifier.on_terminal(ev)  # due now: the receiver is back
    assert len(rig.receiver.requests) == 4
    assert {r.headers["webhook-id"] for r in rig.receiver.requests} == {rig.record()["_id"]}
    rec = rig.record()
    assert rec["status"] == "delivered"
    assert [a["status_code"] for a in rec["attempts"]] == [503, 502, 500, 200]
    assert [a["error"] for a in rec["attempts"]] == ["HTTP 503", "HTTP 502", "HTTP 500", None]


async def test_gives_up_at_the_horizon(now: clock.ManualClock) -> None:
    rig = Rig(Receiver([503] * 100))
    rig.task("canceled")
    ev = events.new(events.TaskCanceled, TID, 1)
    for _ in range(100):  # each redelivery when due, until the event is settled
        try:
            await rig.notifier.on_terminal(ev)
            break
        except RetryLaterError as retry:
            now.advance(retry.delay_s)
    rec = rig.record()
    assert rec["status"] == "dead"
    assert rec["reason"].startswith(f"gave up after {len(rec['attempts'])} attempts over 60s")
    span_ms = rec["attempts"][-1]["at_ms"] - rec["first_at_ms"]
    assert span_ms == POLICY.horizon_s * 1000  # the last attempt lands on the horizon


NON_TERMINAL: list[Callable[[], events.TaskEvent]] = [
    lambda: events.new(events.TaskQueued, TID, 1),
    lambda: events.new(events.TaskAdmitted, TID, 1, size_class="small"),
    lambda: events.new(events.TaskRunning, TID, 1),
    lambda: events.new(events.TaskInputsReady, TID, 1, images_count=2),
    lambda: events.new(events.TaskProgressed, TID, 1, key="k", progress=99),
    lambda: events.new(events.TaskOutput, TID, 1, line_start=0, lines=["x"]),
    lambda: events.new(events.TaskRemoved, TID, 1),
    lambda: events.new(events.TaskChildChanged, TID, 1, key="c", child=TID,
                       child_kind="completed", status=40),
]


def test_non_terminal_table_is_complete() -> None:
    kinds = {make().kind for make in NON_TERMINAL}
    assert kinds == set(events.KINDS) - events.TERMINAL_KINDS


@pytest.mark.parametrize("make", NON_TERMINAL, ids=lambda make: make().kind)
async def test_non_terminal_events_deliver_nothing(
    now: clock.ManualClock, make: Callable[[], events.TaskEvent]
) -> None:
    del now
    rig = Rig(Receiver(), node_webhook=NODE_HOOK)
    rig.task("completed")  # the task is over: only the event's kind keeps it quiet
    await rig.notifier.on_terminal(make())
    assert rig.receiver.requests == []
    assert rig.deliveries.records == {}


# -- the app's subscriber on TestNatsBroker ----------------------------------------------------

SETTINGS = NotifierSettings(
    webhook_backoff_base_s=2,
    webhook_backoff_max_s=8,
    webhook_horizon_s=60,
)


class BrokenTasks(FakeTasks):
    """MongoDB away."""

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        raise ConnectionError("mongo:27017 unreachable")


def _js_reply(delivered: int, published: dt.datetime) -> str:
    """The reply subject of a pulled JetStream message: its delivery count and timestamp."""
    stamp = clock.to_ms(published) * 1_000_000
    return f"$JS.ACK.{streams.EVENTS_STREAM}.{streams.NOTIFIER_DURABLE}.{delivered}.1.1.{stamp}.0"


@pytest.fixture
async def subscriber(
    monkeypatch: pytest.MonkeyPatch, now: clock.ManualClock
) -> AsyncIterator[tuple[Rig, Any, list[float | None]]]:
    """The notifier app with the rig's notifier as its resources; the NAK delays it sends."""
    del now  # installed: the app reads the manual clock
    rig = Rig(Receiver([503]))

    @contextlib.asynccontextmanager
    async def fake_resources(*_: Any) -> AsyncIterator[notifier_app.Resources]:
        # Only the notifier is used by the subscriber; the rest (connections) stays unset.
        unset = {f.name: None for f in dataclasses.fields(notifier_app.Resources)}
        yield notifier_app.Resources(**{**unset, "notifier": rig.notifier})

    naks: list[float | None] = []

    async def nak(_msg: PatchedMessage, delay: float | None = None) -> None:
        naks.append(delay)

    monkeypatch.setattr(notifier_app, "open_resources", fake_resources)
    monkeypatch.setattr(PatchedMessage, "nak", nak)
    app = notifier_app.create_app(SETTINGS)
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        yield rig, broker, naks


async def _publish(broker: Any, ev: events.TaskEvent, reply: str) -> None:
    await broker.publish(
        ev, streams.event_subject(ev.task_id, ev.kind), stream=streams.EVENTS_STREAM, reply_to=reply
    )


async def test_subscriber_nacks_until_the_delivery_is_due(
    subscriber: tuple[Rig, Any, list[float | None]], now: clock.ManualClock
) -> None:
    rig, broker, naks = subscriber
    rig.task("completed")
    await _publish(broker, events.new(events.TaskRunning, TID, 1), _js_reply(1, now.now()))
    assert naks == [] and rig.receiver.requests == []  # not terminal: acked, nothing sent
    await _publish(broker, _completed(), _js_reply(1, now.now()))
    assert len(rig.receiver.requests) == 1  # 503
    assert naks == [pytest.approx(_due_in_s(rig, now), abs=0.001)]


@pytest.mark.parametrize("delivered", [1, 2, 3, 9])
async def test_subscriber_nacks_a_failed_handling_with_backoff(
    subscriber: tuple[Rig, Any, list[float | None]], now: clock.ManualClock, delivered: int
) -> None:
    rig, broker, naks = subscriber
    rig.notifier.store = BrokenTasks()
    await _publish(broker, _completed(), _js_reply(delivered, now.now()))
    assert naks == [clock.backoff_s(delivered, base_s=2, max_s=8)]


async def test_subscriber_gives_up_after_the_horizon(
    subscriber: tuple[Rig, Any, list[float | None]], now: clock.ManualClock
) -> None:
    rig, broker, naks = subscriber
    rig.notifier.store = BrokenTasks()
    published = now.now()
    now.advance(SETTINGS.webhook_horizon_s + SETTINGS.webhook_backoff_max_s + 1)
    await _publish(broker, _completed(), _js_reply(5, published))
    assert naks == []  # acked: no delivery of it could be retried any more
