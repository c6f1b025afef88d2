"""Task events as Server-Sent Events (``GET /task/{uuid}/events``, ``GET /events``) on the real
stack: uvicorn, NATS, MongoDB, the ODM test double (2 s runs); SSE parsed by ``tests.harness.sse``.

Covered: a client reconnecting with ``Last-Event-ID`` mid-run sees every event exactly once
(ids 1..N) and the same messages as a full replay after the task ended; ``?since=``; a finished
task is replayed and the stream ends, a cursor at its end answers 204; unknown uuids and bad
cursors answer NodeODM-style before streaming; 100 concurrent clients of one task get the
complete, identical sequence (from ten client addresses: at most 16 streams per client);
``/events?status=40`` carries only completions, with JetStream sequence ids that resume;
heartbeat comments at a 1 s interval and the token on a second gateway.

Left out (unit-tested in ``tests/unit/test_eventstream.py``): the seam under out-of-order,
duplicate, seq-less and lost bus events, overflow of a slow client's queue, restarts.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.harness import api, data, servers, sse
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def events_url(stack: Stack) -> Iterator[str]:
    """The stack's gateway once main.py includes the event routes, else one more gateway."""
    if sse.serves_events(stack.gateway_url):
        yield stack.gateway_url
        return
    with sse.events_gateway(stack) as url:
        yield url


@pytest.fixture
async def ec(events_url: str) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=events_url, timeout=30, limits=limits) as c:
        yield c


async def _new_task(client: httpx.AsyncClient) -> str:
    created = await api.create(client, files=[(n, data.JPEG) for n in data.image_names(2)])
    task_id: str = created["uuid"]
    return task_id


def _check_sequence(msgs: list[sse.Message], task_id: str) -> None:
    """ids 1..N once each, the data is the event with that seq, ending with completion."""
    ids = [int(m.id or 0) for m in msgs]
    assert ids == list(range(1, len(ids) + 1)), ids
    for m in msgs:
        body = m.json()
        assert (body["seq"], body["kind"], body["task_id"]) == (int(m.id or 0), m.event, task_id)
    assert msgs[0].event == "queued"
    assert msgs[-1].event == "completed"
    assert {"running", "progress", "output"} <= {m.event for m in msgs}


@pytest.fixture(scope="module")
async def done_task(events_url: str) -> tuple[str, list[sse.Message]]:
    """A completed task and its full replay."""
    async with httpx.AsyncClient(base_url=events_url, timeout=30) as c:
        task_id = await _new_task(c)
        await api.poll_until(c, task_id, api.status_is(40))
        full = await sse.read(c, f"/task/{task_id}/events")
    assert full.ended
    _check_sequence(full.events, task_id)
    return task_id, full.events


async def test_reconnect_mid_run_sees_each_event_once(ec: httpx.AsyncClient) -> None:
    task_id = await _new_task(ec)
    path = f"/task/{task_id}/events"
    first = await sse.read(ec, path, until=lambda m: m.event in ("progress", "output"))
    assert not first.ended and first.all[0].retry and not first.all[0].is_event
    assert (await api.info(ec, task_id))["status"]["code"] in (10, 20), "reconnect mid-run"
    rest = await sse.read(ec, path, headers={"Last-Event-ID": first.events[-1].id or ""})
    assert rest.ended, "the stream ends after the terminal event"
    seen = first.events + rest.events
    _check_sequence(seen, task_id)

    full = await sse.read(ec, path)  # the task is over now: its history, then the end
    assert full.ended
    assert [m.key() for m in full.events] == [m.key() for m in seen]


async def test_since_resumes_and_a_finished_task_ends(
    ec: httpx.AsyncClient, done_task: tuple[str, list[sse.Message]]
) -> None:
    task_id, full = done_task
    path = f"/task/{task_id}/events"
    for k in (0, 1, len(full) // 2, len(full) - 1):
        got = await sse.read(ec, path, params={"since": str(k)})
        assert got.ended
        assert [m.key() for m in got.events] == [m.key() for m in full[k:]], k
    # The header wins over ?since= (EventSource keeps the URL and adds the header).
    got = await sse.read(ec, path, params={"since": "0"}, headers={"Last-Event-ID": "3"})
    assert [m.key() for m in got.events] == [m.key() for m in full[3:]]
    # Nothing after the terminal event: 204, which stops EventSource's reconnects.
    resp = await ec.get(path, headers={"Last-Event-ID": str(len(full))})
    assert resp.status_code == 204


async def test_unknown_task_and_bad_cursor_answer_before_streaming(
    ec: httpx.AsyncClient, done_task: tuple[str, list[sse.Message]]
) -> None:
    for unknown in (str(uuid.uuid4()), "not-a-uuid", "a.>"):
        resp = await ec.get(f"/task/{unknown}/events")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json() == {"error": f"{unknown} not found"}
    task_id, _ = done_task
    for bad in ("x", "-1"):
        resp = await ec.get(f"/task/{task_id}/events", headers={"Last-Event-ID": bad})
        assert resp.json() == {"error": f"Invalid event id: {bad}"}
    assert (await ec.get("/events", params={"status": "60"})).json() == {
        "error": "Invalid status: 60"
    }
    assert "error" in (await ec.get("/events", params={"since": "x"})).json()


async def test_hundred_concurrent_clients_get_the_same_complete_sequence(
    ec: httpx.AsyncClient, events_url: str, nats: servers.Nats
) -> None:
    task_id = await _new_task(ec)
    path = f"/task/{task_id}/events"
    rng = random.Random(7)
    # Ten client addresses (any 127/8 address is loopback), ten streams each: within the
    # gateway's streams-per-client cap (sse_max_streams_per_client, 16 by default).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    hosts = [httpx.AsyncClient(base_url=events_url, timeout=30, limits=limits,
                               transport=httpx.AsyncHTTPTransport(local_address=f"127.0.0.{i}",
                                                                  limits=limits))
             for i in range(10, 20)]

    async def client(n: int, delay: float) -> list[sse.Message]:
        await asyncio.sleep(delay)  # join before, during and after the run
        got = await sse.read(hosts[n % len(hosts)], path, timeout_s=45)
        assert got.ended
        return got.events

    started = time.monotonic()
    subject = f"events.task.{task_id}.>"
    clients = asyncio.gather(*(client(n, rng.uniform(0, 2.5)) for n in range(100)))
    await _until_subscription(nats, subject, present=True)
    results = await clients
    _check_sequence(results[0], task_id)
    keys = [m.key() for m in results[0]]
    assert all([m.key() for m in r] == keys for r in results)
    for host in hosts:
        await host.aclose()
    full = await sse.read(ec, path)
    assert [m.key() for m in full.events] == keys
    assert time.monotonic() - started < 40
    # Every client's listener is gone, and with the last one the NATS subscription.
    await _until_subscription(nats, subject, present=False)


async def _until_subscription(nats: servers.Nats, subject: str, *, present: bool) -> None:
    async with httpx.AsyncClient(timeout=10) as c:
        for _ in range(200):
            connz = (await c.get(f"{nats.monitor_url}/connz", params={"subs": "1"})).json()
            subs = {s for conn in connz.get("connections", [])
                    for s in conn.get("subscriptions_list", [])}
            if (subject in subs) == present:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{subject} {'never' if present else 'still'} subscribed")


async def test_all_tasks_stream_filters_by_status_and_resumes(ec: httpx.AsyncClient) -> None:
    created: list[str] = []

    async def create() -> None:  # once the stream is open (live only, no cursor)
        created.append(await _new_task(ec))

    def mine(m: sse.Message) -> bool:
        return m.is_event and bool(created) and m.json()["task_id"] == created[0]

    got = await sse.read(ec, "/events", params={"status": "40"}, until=mine, on_open=create)
    assert got.events and all(m.event == "completed" for m in got.events), got.events
    ids = [int(m.id or 0) for m in got.events]
    assert ids == sorted(set(ids))
    ours = got.events[-1]
    assert ours.json()["kind"] == "completed" and ours.json()["seq"] is not None

    # Resume just before it, filtered and not: the same message first, by its stream sequence.
    before = str(int(ours.id or 0) - 1)
    for params in ({"status": "40"}, {"status": ["30", "40"]}, {}):
        again = await sse.read(ec, "/events", params=params, headers={"Last-Event-ID": before},
                               until=lambda m: m.is_event)
        assert again.events[0].key() == ours.key(), params
    # The same event on the task's own stream carries the same data.
    own = await sse.read(ec, f"/task/{created[0]}/events")
    assert own.events[-1].data == ours.data


async def test_heartbeats_token_and_shutdown_with_open_streams(
    stack: Stack, done_task: tuple[str, list[sse.Message]]
) -> None:
    task_id, full = done_task
    gateway = sse.events_gateway(stack, {"SCALEODM_SSE_HEARTBEAT_S": "1",
                                         "SCALEODM_TOKEN": "s3cret"})
    url = await asyncio.to_thread(gateway.__enter__)
    stopped = False
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            for path in ("/events", f"/task/{task_id}/events"):
                refused = await c.get(path)
                assert refused.json() == {
                    "error": "Invalid authentication token: token does not match."
                }
            replay = await sse.read(c, f"/task/{task_id}/events", params={"token": "s3cret"})
            assert [m.key() for m in replay.events] == [m.key() for m in full]
            started = time.monotonic()
            got = await sse.read(c, "/events", params={"token": "s3cret"}, timeout_s=10,
                                 until=lambda m: "heartbeat" in m.comments)
            assert not got.ended
            assert 0.5 < time.monotonic() - started < 5

            # SIGTERM with a stream open: the stream ends and the process exits promptly.
            opened = asyncio.Event()
            reading = asyncio.create_task(sse.read(
                c, "/events", params={"token": "s3cret"}, timeout_s=20,
                on_open=opened.set,
            ))
            await asyncio.wait_for(opened.wait(), 10)
            stopping = time.monotonic()
            await asyncio.to_thread(gateway.__exit__, None, None, None)
            stopped = True
            assert (await reading).ended
            assert time.monotonic() - stopping < 10
    finally:
        if not stopped:
            await asyncio.to_thread(gateway.__exit__, None, None, None)
