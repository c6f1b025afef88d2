"""Webhook delivery end to end: retries, timeouts, dead letters, signing, the SSRF guard.

Runs on a stack of its own (own nats-server and database, like ``fresh_stack`` but shared by
this module) with fast retry settings: 2 s attempt timeout, backoff 0.2-0.4 s, an 8 s horizon,
a 3 s ack_wait, a node-level webhook, a Standard Webhooks secret and a token. Tasks end by
being canceled while queued (the notifier fires on every terminal event), so no test waits for
a run. Receivers are the loopback HTTP fixture, scripted per path.

Covers: receivers failing with 5xx/3xx/4xx or closing the connection, then succeeding; a hanging
receiver (per-attempt timeout; other targets of the task and other tasks not delayed); dead
letters after the horizon; every attempt signed with a stable ``webhook-id``; the notifier
SIGKILLed mid-retry and restarted; ``GET /task/{uuid}/webhooks`` (attempts, redacted URLs,
token, unknown uuid); SSRF refusals of zipurl at submission. Leaves out the 24 h default
horizon (same code, other numbers), TLS receivers, webhooks refused at submission
(tests/security/test_input_attacks.py) and targets that can never work reaching the notifier,
dead at their first attempt (tests/security/test_webhook_attacks.py).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks

from tests.harness import api, data, servers
from tests.harness.httpfixture import HttpFixture, Received
from tests.harness.stack import Stack, running_stack

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
TOKEN = "hook-test-token"
TIMEOUT_S = 2
HORIZON_S = 8


@pytest.fixture(scope="module")
def node_hook() -> str:
    return f"/node-hooks/{uuid.uuid4()}"


@pytest.fixture(scope="module")
def hook_stack(
    tmp_path_factory: pytest.TempPathFactory, mongo_url: str, s3: servers.S3Endpoint,
    http_fixture: HttpFixture, node_hook: str,
) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("webhooks")
    with servers.nats_server(tmp / "nats") as nats:
        own = Stack(tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                    database=f"t_{uuid.uuid4().hex[:12]}", extra_env={
                        "SCALEODM_TOKEN": TOKEN,
                        "SCALEODM_WEBHOOK": http_fixture.url(node_hook) + "?token=node-secret",
                        "SCALEODM_WEBHOOK_SECRET": SECRET,
                        "SCALEODM_WEBHOOK_TIMEOUT_S": str(TIMEOUT_S),
                        "SCALEODM_WEBHOOK_BACKOFF_BASE_S": "0.2",
                        "SCALEODM_WEBHOOK_BACKOFF_MAX_S": "0.4",
                        "SCALEODM_WEBHOOK_HORIZON_S": str(HORIZON_S),
                        "SCALEODM_WEBHOOK_ACK_WAIT_S": "3",
                    })
        with running_stack(own) as running:
            yield running


@pytest.fixture
async def hc(hook_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=hook_stack.gateway_url, timeout=30,
                                 params={"token": TOKEN}) as c:
        yield c


def _hook() -> str:
    return f"/hooks/{uuid.uuid4()}"


async def _queued_task(hc: httpx.AsyncClient, webhook: str) -> str:
    created = await api.create(hc, files=[("A.JPG", data.JPEG)], webhook=webhook)
    return str(created["uuid"])


async def _cancel(hc: httpx.AsyncClient, task_id: str) -> float:
    """Cancel (a terminal event the notifier acts on); returns when, as ``time.time()``."""
    at = time.time()
    assert (await hc.post("/task/cancel", data={"uuid": task_id})).json() == {"success": True}
    return at


async def _finished_task(hc: httpx.AsyncClient, webhook: str) -> str:
    task_id = await _queued_task(hc, webhook)
    await _cancel(hc, task_id)
    return task_id


async def _wait_posts(http_fixture: HttpFixture, path: str, count: int = 1,
                      timeout_s: float = 30) -> list[Received]:
    return await asyncio.to_thread(http_fixture.wait_posts, path, count, timeout_s)


def _node_posts(http_fixture: HttpFixture, node_hook: str, task_id: str) -> list[Received]:
    return [p for p in http_fixture.posts(node_hook) if p.json()["uuid"] == task_id]


def _verify(post: Received) -> Any:
    return standardwebhooks.Webhook(SECRET).verify(post.body, post.headers)


async def test_retries_until_delivered_signed_and_listed(
    hc: httpx.AsyncClient, http_fixture: HttpFixture, node_hook: str
) -> None:
    hook = _hook()
    http_fixture.fail_times(hook, 2, 503)
    task_id = await _finished_task(hc, http_fixture.url(hook) + "?token=task-secret")
    posts = await _wait_posts(http_fixture, hook, 3)
    assert {_verify(p)["uuid"] for p in posts} == {task_id}, "every attempt is signed"
    assert len({p.headers["webhook-id"] for p in posts}) == 1, "webhook-id is stable"
    body = posts[-1].json()
    assert (body["status"], body["images"]) == ({"code": 50}, [])
    assert posts[-1].headers["Content-Type"] == "application/json"

    deliveries = await api.wait_deliveries(hc, task_id, api.deliveries_settled(2))
    task_hook = api.delivery_to(deliveries, hook)
    assert task_hook["url"] == http_fixture.url(hook), "no query-string secrets shown"
    assert task_hook["id"] == posts[0].headers["webhook-id"]
    assert (task_hook["status"], task_hook["reason"]) == ("delivered", None)
    assert [a["statusCode"] for a in task_hook["attempts"]] == [503, 503, 200]
    assert [a["error"] for a in task_hook["attempts"]] == ["HTTP 503", "HTTP 503", None]
    assert all(a["at"] and a["latencyMs"] >= 0 for a in task_hook["attempts"])
    node = api.delivery_to(deliveries, node_hook)
    assert (node["status"], len(node["attempts"])) == ("delivered", 1)
    assert "node-secret" not in str(deliveries)
    assert len(_node_posts(http_fixture, node_hook, task_id)) == 1


async def test_redirects_client_errors_and_dropped_connections_are_retried(
    hc: httpx.AsyncClient, http_fixture: HttpFixture
) -> None:
    cases = {302: "HTTP 302", 404: "HTTP 404", "close": "RemoteProtocolError"}
    hooks = {first: _hook() for first in cases}
    for first, hook in hooks.items():
        http_fixture.script(hook, first)
    tasks = {first: await _finished_task(hc, http_fixture.url(hook))
             for first, hook in hooks.items()}
    for first, task_id in tasks.items():
        deliveries = await api.wait_deliveries(hc, task_id, api.deliveries_settled(2))
        attempts = api.delivery_to(deliveries, hooks[first])["attempts"]
        assert [a["statusCode"] for a in attempts] == [
            first if isinstance(first, int) else None, 200
        ]
        assert attempts[0]["error"].startswith(cases[first]), attempts
        assert api.delivery_to(deliveries, hooks[first])["status"] == "delivered"


async def test_hanging_receiver_times_out_without_delaying_others_then_dead_letters(
    hc: httpx.AsyncClient, http_fixture: HttpFixture, node_hook: str
) -> None:
    hanging, failing, other = _hook(), _hook(), _hook()
    http_fixture.script(hanging, "hang", forever=True)
    http_fixture.fail_times(failing, 10_000, 500)
    slow_task = await _queued_task(hc, http_fixture.url(hanging))
    failing_task = await _queued_task(hc, http_fixture.url(failing))
    other_task = await _queued_task(hc, http_fixture.url(other))
    await _cancel(hc, slow_task)
    await _cancel(hc, failing_task)
    first_hang = (await _wait_posts(http_fixture, hanging))[0].at

    # While that attempt hangs (TIMEOUT_S), the task's other target and other tasks proceed.
    canceled_at = await _cancel(hc, other_task)
    other_post = (await _wait_posts(http_fixture, other))[0]
    assert other_post.at - canceled_at < TIMEOUT_S / 2, "another task's delivery was held"
    assert other_post.at - first_hang < TIMEOUT_S, "another task's delivery was held"
    [node_post] = _node_posts(http_fixture, node_hook, slow_task)
    assert node_post.at - first_hang < TIMEOUT_S / 2, "the node hook waited for the task hook"

    for task_id, path, last in ((slow_task, hanging, f"timed out after {TIMEOUT_S}s"),
                                (failing_task, failing, "HTTP 500")):
        deliveries = await api.wait_deliveries(
            hc, task_id, api.deliveries_settled(2), timeout_s=HORIZON_S + 20
        )
        dead = api.delivery_to(deliveries, path)
        assert dead["status"] == "dead"
        assert dead["reason"].startswith("gave up after ") and dead["reason"].endswith(
            f"over {HORIZON_S}s; last: {last}"), dead["reason"]
        assert len(dead["attempts"]) >= 2
        assert {a["error"] for a in dead["attempts"]} == {last}
        assert api.delivery_to(deliveries, node_hook)["status"] == "delivered"


async def test_notifier_killed_mid_retry_resumes_with_the_same_webhook_id(
    hc: httpx.AsyncClient, hook_stack: Stack, http_fixture: HttpFixture
) -> None:
    hook = _hook()
    http_fixture.fail_times(hook, 10_000, 503)
    task_id = await _finished_task(hc, http_fixture.url(hook))
    await _wait_posts(http_fixture, hook, 2)
    hook_stack.kill("notifier")
    before = len(http_fixture.posts(hook))
    http_fixture.fail_times(hook, 0)
    hook_stack.start("notifier")

    deliveries = await api.wait_deliveries(hc, task_id, api.deliveries_settled(2))
    delivered = api.delivery_to(deliveries, hook)
    assert delivered["status"] == "delivered"
    posts = http_fixture.posts(hook)
    assert len(posts) > before and posts[-1].at > posts[before - 1].at
    assert len({p.headers["webhook-id"] for p in posts}) == 1
    assert all(_verify(p)["uuid"] == task_id for p in posts)
    codes = [a["statusCode"] for a in delivered["attempts"]]
    # an attempt cut off by the kill may be missing from the record, never one after it
    assert codes[-1] == 200 and set(codes[:-1]) == {503} and len(codes) >= before


async def test_webhooks_route_errors(hook_stack: Stack, hc: httpx.AsyncClient) -> None:
    unknown = str(uuid.uuid4())
    assert (await hc.get(f"/task/{unknown}/webhooks")).json() == {"error": f"{unknown} not found"}
    async with httpx.AsyncClient(base_url=hook_stack.gateway_url, timeout=30) as anonymous:
        resp = await anonymous.get(f"/task/{unknown}/webhooks")
    assert resp.json() == {"error": "Invalid authentication token: token does not match."}


@pytest.mark.parametrize("zipurl", [
    pytest.param("http://169.254.169.254/latest/images.zip", id="metadata"),
    pytest.param("http://[fe80::1]/images.zip", id="link-local-v6"),
    pytest.param("https://[fd00:ec2::254]/images.zip", id="aws-metadata-v6"),
])
async def test_zipurl_to_link_local_is_refused_at_submission(
    client: httpx.AsyncClient, zipurl: str
) -> None:
    before = (await client.get("/task/list")).json()
    resp = await client.post("/task/new", files=api.form(zipurl=zipurl))
    body = resp.json()
    assert resp.status_code == 200
    assert body["error"].startswith("Invalid zipurl: "), body
    assert body["error"].endswith(" refused (link-local/metadata address)"), body
    assert (await client.get("/task/list")).json() == before
