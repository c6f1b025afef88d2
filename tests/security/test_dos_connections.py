"""Connection-level attacks on a real gateway process (``scaleodm.gateway.serving``).

One gateway of its own (no other service) with a 1.5 s header deadline and a 0.5 s keep-alive
timeout, attacked with raw sockets on loopback. Covered: a connection that sends nothing, half a
request line, or half its headers — at once or one byte at a time, never idle — is closed within
the header deadline (a ``408`` when part of a request came). A second gateway with a 10 s header
deadline (so that a loaded machine cannot blur "served at once" with "served once the attackers
were gone"): 200 half-open connections do not keep an honest request from being served while
they are all still connected, and each is closed at its deadline afterwards; an idle keep-alive
connection is closed after the keep-alive timeout, long before the header deadline. A request
head (request line and headers) over 16 KiB is refused with a ``431`` — one long header, many
headers, a long URL, at once or in pieces, and one split right in its blank line — while one just
under it is served, and pipelined requests are all answered. In-process, the same protocol class
under uvicorn with an app that gives up on a client that stopped reading (as an event stream
does after its send timeout): the connection, closed with bytes still unsent, is aborted after
the keep-alive timeout instead of waiting for the client to read; on asyncio's event loop and on
uvloop's (the gateway's: its transports take no attributes, the bound must hold there too).

Time bounds are generous (this runs on loaded CI machines): an upper bound only has to tell
"closed by this timer" from "closed by a later one, or never".

Left out: the concurrency limit (``max_connections``: uvicorn's 503, not ours), and a client
that stops reading a response the app never gives up on (no write timeout outside SSE yet).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
import uvloop

from scaleodm.common.settings import GatewaySettings
from scaleodm.gateway import serving
from tests.harness import servers
from tests.harness.stack import Stack
from tests.security.gateway_only import gateway_only

pytestmark = pytest.mark.integration

HEADER_TIMEOUT_S = 1.5
KEEP_ALIVE_S = 0.5
MARGIN_S = 3.0  # late, under load, but long before a connection left open would be noticed
PATIENT_HEADER_TIMEOUT_S = 10.0  # the second gateway's: far from anything the tests measure
SERVED_WITHIN_S = 5.0  # an honest request under attack (~0.05 s unloaded), half that deadline
STARTUP_S = 30.0


def _gateway(tmp_path_factory: pytest.TempPathFactory, mongo_url: str,
             s3: servers.S3Endpoint, header_timeout_s: float) -> Iterator[Stack]:
    env = {"SCALEODM_HEADER_TIMEOUT_S": str(header_timeout_s),
           "SCALEODM_KEEP_ALIVE_TIMEOUT_S": str(KEEP_ALIVE_S)}
    with gateway_only(Path(tmp_path_factory.mktemp("dos-connections")), mongo_url, s3,
                      env) as stack:
        yield stack


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, mongo_url: str,
            s3: servers.S3Endpoint) -> Iterator[Stack]:
    yield from _gateway(tmp_path_factory, mongo_url, s3, HEADER_TIMEOUT_S)


@pytest.fixture(scope="module")
def patient_gateway(tmp_path_factory: pytest.TempPathFactory, mongo_url: str,
                    s3: servers.S3Endpoint) -> Iterator[Stack]:
    yield from _gateway(tmp_path_factory, mongo_url, s3, PATIENT_HEADER_TIMEOUT_S)


def _connect(stack: Stack) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.ports["gateway"]), timeout=10)


def _until_closed(sock: socket.socket, timeout_s: float) -> tuple[float, bytes]:
    """Seconds until the server closed ``sock`` (EOF or reset), and what it sent before."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    got = bytearray()
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError as exc:
        raise AssertionError(f"still open after {timeout_s} s; got {bytes(got)[:200]!r}") from exc
    return time.monotonic() - started, bytes(got)


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"GET /info HT", id="half-request-line"),
        pytest.param(b"GET /info HTTP/1.1\r\nHost: gateway\r\nX-Slow: ", id="half-headers"),
    ],
)
def test_half_sent_request_is_closed_at_the_header_deadline(gateway: Stack, sent: bytes) -> None:
    with _connect(gateway) as sock:
        sock.sendall(sent)
        waited, answer = _until_closed(sock, HEADER_TIMEOUT_S + MARGIN_S)
    assert HEADER_TIMEOUT_S - 0.3 < waited < HEADER_TIMEOUT_S + MARGIN_S
    if sent:
        assert answer.startswith(b"HTTP/1.1 408 "), answer
    else:
        assert answer == b""


def test_headers_dripped_byte_by_byte_are_closed_too(gateway: Stack) -> None:
    """Never idle (a byte every 0.2 s), so only the deadline on the whole headers can end it."""
    request = b"GET /info HTTP/1.1\r\nHost: gateway\r\nX-Padding: " + b"a" * 100
    with _connect(gateway) as sock:
        started = time.monotonic()
        closed = False
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.2)
            if time.monotonic() - started > HEADER_TIMEOUT_S + MARGIN_S:
                break
        if not closed:
            _until_closed(sock, MARGIN_S)
    # Closed long before the dripping would have ended (~27 s): the deadline, not the client.
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 2 * MARGIN_S + 0.5


def _still_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed ``sock`` nor sent anything on it (no wait)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except ConnectionError:
        return False
    finally:
        sock.settimeout(timeout)
    return False  # EOF, or an answer (a 408): the server is done with it


def test_two_hundred_half_open_connections_do_not_stop_an_honest_request(
    patient_gateway: Stack,
) -> None:
    attackers = [_connect(patient_gateway) for _ in range(200)]
    try:
        for i, sock in enumerate(attackers):
            sock.sendall(b"GET /info HTTP/1.1\r\nHost: gateway\r\n" if i % 2 else b"POST /ta")
        started = time.monotonic()
        resp = httpx.get(f"{patient_gateway.gateway_url}/info", timeout=SERVED_WITHIN_S)
        served_in = time.monotonic() - started
        assert resp.status_code == 200 and "version" in resp.json()
        # Served while every attacker is still connected, not once their deadline freed the
        # server: they are all still open, and that deadline is twice the bound away.
        assert served_in < SERVED_WITHIN_S, served_in
        assert all(_still_open(sock) for sock in attackers)
        for sock in attackers:  # and each of them is closed at its deadline
            _until_closed(sock, PATIENT_HEADER_TIMEOUT_S + MARGIN_S)
    finally:
        for sock in attackers:
            sock.close()


def test_idle_keep_alive_connection_is_closed(patient_gateway: Stack) -> None:
    with _connect(patient_gateway) as sock:
        sock.sendall(b"GET /info HTTP/1.1\r\nHost: gateway\r\n\r\n")
        sock.settimeout(5)
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 "), head
        while b"\r\n\r\n" not in head:  # the whole response is small: headers then JSON
            head += sock.recv(65536)
        waited, rest = _until_closed(sock, PATIENT_HEADER_TIMEOUT_S + MARGIN_S)
    # The keep-alive timer (0.5 s), not the header deadline (10 s), closed it.
    assert KEEP_ALIVE_S - 0.2 < waited < PATIENT_HEADER_TIMEOUT_S / 2, waited
    assert b"HTTP/1.1" not in rest


def _head(size: int, shape: str) -> bytes:
    """A GET /info head of exactly ``size`` bytes, its padding in one header, many or the URL."""
    start, end = b"GET /info", b" HTTP/1.1\r\nHost: gateway\r\n"
    if shape == "url":
        pad = size - len(start + end) - len(b"?p=") - 2
        return start + b"?p=" + b"a" * pad + end + b"\r\n"
    base = len(start + end) + 2
    if shape == "many":
        line = b"X-Many: aaaaaaaaaaaaaaaaaaaaaaa\r\n"
        count, rest = divmod(size - base, len(line))
        return start + end + line * count + b"X-Rest: " + b"a" * (rest - 10) + b"\r\n" + b"\r\n"
    return start + end + b"X-Big: " + b"a" * (size - base - 9) + b"\r\n" + b"\r\n"


@pytest.mark.parametrize("shape", ["one", "many", "url"])
@pytest.mark.parametrize("pieces", [1, 20], ids=["at-once", "in-pieces"])
def test_a_request_head_over_16_kib_is_refused(gateway: Stack, shape: str,
                                               pieces: int) -> None:
    head = _head(serving.MAX_HEAD_BYTES + 1, shape)
    assert len(head) == serving.MAX_HEAD_BYTES + 1
    with _connect(gateway) as sock:
        step = -(-len(head) // pieces)
        try:
            for i in range(0, len(head), step):
                sock.sendall(head[i:i + step])
                time.sleep(0.02 if pieces > 1 else 0)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the rest was sent
        _, answer = _until_closed(sock, MARGIN_S)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


@pytest.mark.parametrize("shape", ["one", "many", "url"])
def test_a_request_head_of_16_kib_is_served(gateway: Stack, shape: str) -> None:
    head = _head(serving.MAX_HEAD_BYTES, shape)
    assert len(head) == serving.MAX_HEAD_BYTES
    with _connect(gateway) as sock:
        sock.sendall(head[:-3])  # the blank line split between two reads
        time.sleep(0.1)
        sock.sendall(head[-3:])
        sock.settimeout(5)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]


def test_pipelined_requests_are_all_answered(gateway: Stack) -> None:
    with _connect(gateway) as sock:
        sock.sendall(b"GET /info HTTP/1.1\r\nHost: gateway\r\n\r\n" * 3)
        sock.settimeout(5)
        got = b""
        while got.count(b"HTTP/1.1 200 ") < 3:
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
        # then idle: the keep-alive timer closes it, as after any response
        waited, _ = _until_closed(sock, HEADER_TIMEOUT_S + MARGIN_S)
    assert waited < HEADER_TIMEOUT_S


async def test_a_closed_connection_whose_peer_does_not_read_is_aborted() -> None:
    await _unread_connection_is_aborted()


def test_a_closed_connection_whose_peer_does_not_read_is_aborted_on_uvloop() -> None:
    uvloop.run(_unread_connection_is_aborted())


async def _unread_connection_is_aborted() -> None:
    gave_up = asyncio.Event()
    sent = 0

    async def app(scope: dict[str, Any], _receive: Any, send: Any) -> None:
        nonlocal sent
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:  # until a send waits too long: the client stopped reading
            with anyio.move_on_after(0.3) as waited:
                await send({"type": "http.response.body", "body": b"x" * 65536,
                            "more_body": True})
            if waited.cancel_called:
                gave_up.set()
                return  # uvicorn closes the connection, bytes still unsent
            sent += 65536

    settings = GatewaySettings(keep_alive_timeout_s=KEEP_ALIVE_S, header_timeout_s=5)
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=servers.free_port(), lifespan="off", log_config=None,
        http=serving.protocol_class(settings),
    ))
    serving_task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(STARTUP_S):
            while not server.started:
                if serving_task.done():  # it gave up (e.g. the port was taken meanwhile)
                    serving_task.result()
                    raise AssertionError("uvicorn exited before it started")
                await asyncio.sleep(0.01)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.config.port))
        with sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(gave_up.wait(), 20)
            closed_at = time.monotonic()
            while server.server_state.connections:  # asyncio would wait for the client to read
                assert time.monotonic() - closed_at < KEEP_ALIVE_S + MARGIN_S, "not aborted"
                await asyncio.sleep(0.05)
            assert time.monotonic() - closed_at > KEEP_ALIVE_S - 0.2
            sock.settimeout(5)
            received = 0
            while chunk := await asyncio.to_thread(sock.recv, 1 << 20):
                received += chunk.count(b"x")
        assert received < sent  # what was still buffered in the server was dropped
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving_task, 10)
