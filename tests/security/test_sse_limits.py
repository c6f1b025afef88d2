"""Event-stream (SSE) limits against a real gateway process, plus the bounds' own logic in memory.

One gateway of its own (own NATS, no other service), at most 5 open streams per process and 3
per client, 1 MiB of pending event data per client, a 2 s send timeout. Events are published
straight onto the gateway's NATS (``events.task.<id>.output``, valid ``TaskOutput`` events of
20 KiB), the way the watcher publishes them.

Covered: a client's 4th stream, and the node's 6th (from another address), are refused with a
NodeODM-style ``{"error": "Too many event streams ..."}`` before streaming, and a closed stream
gives its slot back; three clients that open ``/events?since=0`` and never read while 30 MiB of
events flow are disconnected and their connections closed, and the gateway's peak RSS grows by
far less than what they were sent; a reading client that falls behind is disconnected too and,
resuming with ``Last-Event-ID`` as EventSource does, sees every event exactly once, in order. In
memory: the per-task listener's byte bound, the stream slots.

Left out: the per-task stream on the real stack (``tests/integration/test_event_streams.py``)
and the seam's ordering rules (``tests/unit/test_eventstream.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import nats
import pytest

from scaleodm.common.contracts import events, streams
from scaleodm.gateway import eventstream
from tests.harness import servers, sse
from tests.harness.stack import Stack
from tests.security.gateway_only import gateway_only

MiB = 1024 * 1024
MAX_STREAMS = 5
PER_CLIENT = 3
SEND_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 1.0
EVENTS = 1500
LINE = "x" * (20 * 1024)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, mongo_url: str,
            s3: servers.S3Endpoint) -> Iterator[Stack]:
    env = {
        "SCALEODM_SSE_MAX_STREAMS": str(MAX_STREAMS),
        "SCALEODM_SSE_MAX_STREAMS_PER_CLIENT": str(PER_CLIENT),
        "SCALEODM_SSE_MAX_PENDING_BYTES": str(MiB),
        "SCALEODM_SSE_SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
        "SCALEODM_KEEP_ALIVE_TIMEOUT_S": str(KEEP_ALIVE_S),
    }
    with gateway_only(Path(tmp_path_factory.mktemp("sse-limits")), mongo_url, s3, env) as stack:
        yield stack


@contextlib.asynccontextmanager
async def _client(stack: Stack, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose connections come from ``address`` (any 127/8 address is loopback)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with httpx.AsyncClient(base_url=stack.gateway_url, transport=transport,
                                 timeout=10) as client:
        yield client


async def _open(streams_: contextlib.AsyncExitStack, client: httpx.AsyncClient) -> None:
    """An open ``/events`` stream (its first line read), kept open by ``streams_``."""
    resp = await streams_.enter_async_context(client.stream("GET", "/events"))
    assert resp.headers["content-type"].startswith("text/event-stream")
    lines = resp.aiter_lines()
    await anext(lines)
    # Kept until the stream is left: a line iterator collected early closes the connection.
    streams_.push_async_callback(lines.aclose)


async def _refusal(client: httpx.AsyncClient) -> str:
    resp = await client.get("/events")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    error: str = resp.json()["error"]
    return error


@pytest.mark.integration
async def test_streams_beyond_the_caps_are_refused_before_streaming(gateway: Stack) -> None:
    async with contextlib.AsyncExitStack() as held, _client(gateway, "127.0.0.1") as a, \
            _client(gateway, "127.0.0.2") as b, _client(gateway, "127.0.0.3") as c:
        first = contextlib.AsyncExitStack()
        await _open(first, a)
        for _ in range(PER_CLIENT - 1):
            await _open(held, a)
        assert await _refusal(a) == f"Too many event streams: at most {PER_CLIENT} per client"
        for _ in range(MAX_STREAMS - PER_CLIENT):
            await _open(held, b)
        assert await _refusal(c) == (
            f"Too many event streams: at most {MAX_STREAMS} on this node, please retry later"
        )
        await first.aclose()  # the client leaves: its slot comes back
        for _ in range(50):
            resp = await a.get("/events", params={"status": "60"})  # answered, never counted
            assert resp.json() == {"error": "Invalid status: 60"}
            async with a.stream("GET", "/events") as again:
                if again.headers["content-type"].startswith("text/event-stream"):
                    break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the closed stream's slot never came back")


def _silent_reader(stack: Stack) -> socket.socket:
    """A client that asks for every event and never reads a byte (small receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", stack.ports["gateway"]))
    sock.sendall(b"GET /events?since=0 HTTP/1.1\r\nHost: gateway\r\n\r\n")
    return sock


def _drain(sock: socket.socket, timeout_s: float) -> tuple[bytes, str]:
    """What the server sent, and how the connection ended within ``timeout_s``: ``reset``
    (aborted), ``eof`` (closed once everything was read) or ``open``."""
    sock.settimeout(timeout_s)
    got = bytearray()
    try:
        while chunk := sock.recv(1 << 20):
            got += chunk
    except ConnectionResetError:
        return bytes(got), "reset"
    except TimeoutError:
        return bytes(got), "open"
    return bytes(got), "eof"


def _ids(raw: bytes) -> list[int]:
    return [int(line[3:]) for line in raw.split(b"\r\n") if line.startswith(b"id: ")]


async def _publish(stack: Stack, count: int) -> None:
    nc = await nats.connect(stack.nats_url)
    try:
        js = nc.jetstream()
        task = str(uuid.uuid4())
        for start in range(0, count, 100):
            await asyncio.gather(*(
                js.publish(
                    streams.event_subject(task, "output"),
                    events.new(
                        events.TaskOutput, task, 1, line_start=i, lines=[LINE]
                    ).model_dump_json().encode(),
                    headers={"Nats-Msg-Id": f"{task}:1:output:{i}"}, timeout=10,
                )
                for i in range(start, min(start + 100, count))
            ))
    finally:
        await nc.close()


async def _follow_with_resume(stack: Stack, count: int) -> tuple[list[int], int]:
    """Read ``/events?since=0`` as EventSource would, reconnecting with the last id seen, until
    ``count`` events arrived; (ids in order, connections used)."""
    ids: list[int] = []
    connections = 0
    async with _client(stack, "127.0.0.2") as client:
        while len(ids) < count and connections < 200:
            connections += 1
            headers = {"Last-Event-ID": str(ids[-1])} if ids else {}
            got = await sse.read(client, "/events", params={"since": "0"}, headers=headers,
                                 until=lambda m: m.is_event and int(m.id or 0) >= count,
                                 timeout_s=60)
            ids += [int(m.id or 0) for m in got.events]
    return ids, connections


@pytest.mark.integration
async def test_clients_that_do_not_keep_up_are_disconnected_and_memory_stays_bounded(
    gateway: Stack, record_property: Callable[[str, object], None],
) -> None:
    pid = gateway.procs["gateway"].pid
    silent = [_silent_reader(gateway) for _ in range(PER_CLIENT)]
    try:
        await asyncio.sleep(0.5)  # their streams are open (empty so far)
        before = servers.peak_rss_bytes(pid)
        started = time.monotonic()
        follower = asyncio.create_task(_follow_with_resume(gateway, EVENTS))
        await _publish(gateway, EVENTS)  # 30 MiB of event data
        ids, connections = await asyncio.wait_for(follower, 90)
        assert ids == list(range(1, EVENTS + 1))  # every event once, in order, across resumes

        # The silent clients were cut off: the server has ended their streams and closed their
        # connections (what it had sent sits in the socket buffers: they read it, then the end).
        await asyncio.sleep(max(0.0, SEND_TIMEOUT_S + KEEP_ALIVE_S + 1 - (time.monotonic()
                                                                          - started)))
        for sock in silent:
            raw, ended = await asyncio.to_thread(_drain, sock, 5)
            assert ended in ("eof", "reset"), f"still open after {len(raw)} bytes"
            assert len(_ids(raw)) < EVENTS
        grown = servers.peak_rss_bytes(pid) - before
        record_property("gateway_peak_rss_mib", round(servers.peak_rss_bytes(pid) / MiB, 1))
        record_property("gateway_peak_rss_growth_mib", round(grown / MiB, 1))
        record_property("follower_connections", connections)
        # Without the bound each silent client would hold up to what JetStream pushed to it.
        assert grown < 20 * MiB, grown / MiB
        assert servers.peak_rss_bytes(pid) < 300 * MiB
    finally:
        for sock in silent:
            sock.close()


# -- the bounds in memory ---------------------------------------------------------------------


TASK = "5b0e4c3e-8d9a-4f6b-9c1d-2e3f4a5b6c7d"


def _live(i: int) -> eventstream.LiveEvent:
    return eventstream.LiveEvent(events.new(events.TaskProgressed, TASK, 1, key=i, progress=1))


async def test_listener_is_bounded_in_bytes_as_well_as_count() -> None:
    listener = eventstream.Listener(max_items=100, max_bytes=1000)
    for i in range(3):
        assert listener.offer(_live(i), 300)
    assert not listener.overflowed and listener.pending_bytes == 900
    got = await listener.get(1)
    assert got is not None and listener.pending_bytes == 600
    assert listener.offer(_live(3), 300)
    assert not listener.overflowed
    # 1200 bytes behind: disconnected, nothing more queued (even what would fit)
    assert not listener.offer(_live(4), 300)
    assert listener.overflowed and listener.queue.qsize() == 3
    assert not listener.offer(_live(5), 1)
    assert listener.queue.qsize() == 3
    by_count = eventstream.Listener(max_items=2, max_bytes=10**9)
    for i in range(3):
        by_count.offer(_live(i), 1)
    assert by_count.overflowed


def test_stream_slots_count_per_client_and_per_process() -> None:
    slots = eventstream.StreamSlots(max_streams=3, max_per_client=2)
    a1, a2 = slots.take("a"), slots.take("a")
    with pytest.raises(eventstream.TooManyStreamsError, match="at most 2 per client"):
        slots.take("a")
    slots.take("b")
    with pytest.raises(eventstream.TooManyStreamsError, match="at most 3 on this node"):
        slots.take("c")
    a1()
    a1()  # idempotent: one stream, one slot
    assert slots.open == 2
    slots.take("c")
    a2()
    slots.take("a")
    assert slots.open == 3
