"""Attacks on the notifier through webhook receivers and webhook URLs, on real processes.

A stack of its own (own nats-server and database; gateway, scheduler and watcher shared by the
module) with a 2 s attempt timeout and fast retries; each test starts the notifier with the
node-level webhook (``SCALEODM_WEBHOOK``) it attacks with, and stops it after. Tasks end by being
canceled while queued, so no test waits for a run. Receivers are raw sockets on 127.0.0.1 in a
thread of this process, so they can misbehave below HTTP.

Covers: (a) a receiver answering 200 with a 1 GiB body (declared length, and chunked) on every
delivery: delivered, the notifier's peak RSS (``VmHWM``) stays under 200 MiB and the notifier
hangs up long before the body is sent; (b) node webhooks that can never work (malformed IPv6
literal, a 70 KB URL, ``file://``, ``gopher://``, an address the outbound guard refuses, a byte
that is not UTF-8): dead after exactly one recorded attempt with the reason, no further
attempt, nothing left unacknowledged on the notifier's consumer (the gateway refuses such task
webhooks at submission, tests/security/test_input_attacks.py; the node webhook and tasks stored
before still get here); (c) receivers trickling their headers or their body one byte a second:
the attempt ends at the timeout and is recorded (a status line received decides; no status line
is a timed-out attempt, retried). Leaves out the SSRF address policy (tests/security/test_ssrf.py)
and retry schedules (tests/integration/test_webhooks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import api, data, servers
from tests.harness.stack import Stack, running_stack

pytestmark = pytest.mark.integration

TIMEOUT_S = 2
GIB = 1 << 30
MIB = 1 << 20
RSS_LIMIT = 200 * MIB


@dataclass
class Hit:
    """One request a receiver got, and how its answer ended."""

    path: str
    task_id: str
    arrived: float
    closed: float | None = None  # when the notifier hung up (or the answer was complete)
    sent: int = 0  # body (or header) bytes written before that


@dataclass
class Receiver:
    """Webhook receivers on 127.0.0.1 misbehaving per path; one request per connection.

    ``/big-length`` and ``/big-chunked`` answer 200 with 1 GiB of zeros (Content-Length, or
    chunked), written as fast as the socket takes them; ``/trickle-headers`` sends a status line
    then one header byte a second, ``/trickle-body`` complete headers then one body byte a
    second (both only to the first request of each task; later ones get a plain 200); anything
    else gets a plain 200.
    """

    hits: list[Hit] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    sock: socket.socket = field(default_factory=socket.socket)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}{path}"

    def of(self, path: str, task_id: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path and h.task_id == task_id]

    def serve(self) -> None:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            head, body = self._read_request(conn)
            path = head.split(b" ", 2)[1].decode()
            hit = Hit(path, json.loads(body)["uuid"], time.monotonic())
            with self.lock:
                first = not any(h.path == path and h.task_id == hit.task_id for h in self.hits)
                self.hits.append(hit)
            try:
                if path.startswith("/big-"):
                    self._big(conn, hit, chunked=path == "/big-chunked")
                elif path == "/trickle-headers" and first:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    self._trickle(conn, hit)
                elif path == "/trickle-body" and first:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                    self._trickle(conn, hit)
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\nok")
            except OSError:  # the notifier hung up
                pass
            hit.closed = time.monotonic()

    @staticmethod
    def _read_request(conn: socket.socket) -> tuple[bytes, bytes]:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += conn.recv(65536)
        head, _, body = buf.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += conn.recv(65536)
        return head, body

    def _big(self, conn: socket.socket, hit: Hit, *, chunked: bool) -> None:
        chunk = bytes(MIB)
        if chunked:
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = f"{MIB:x}\r\n".encode() + chunk + b"\r\n"
        else:
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {GIB}\r\n\r\n".encode())
        while hit.sent < GIB and not self.stop.is_set():
            conn.sendall(chunk)
            hit.sent += MIB
        if chunked:
            conn.sendall(b"0\r\n\r\n")

    def _trickle(self, conn: socket.socket, hit: Hit) -> None:
        """One byte a second until the peer hangs up (seen at once: recv returns b"")."""
        conn.settimeout(1.0)
        while not self.stop.is_set():
            conn.sendall(b"a")
            hit.sent += 1
            try:
                if conn.recv(1) == b"":
                    return
            except TimeoutError:
                continue


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.serve()
    yield r
    r.stop.set()
    r.sock.close()


@pytest.fixture(scope="module")
def attack_stack(
    tmp_path_factory: pytest.TempPathFactory, mongo_url: str, s3: servers.S3Endpoint
) -> Iterator[tuple[Stack, servers.Nats]]:
    tmp: Path = tmp_path_factory.mktemp("webhook-attacks")
    with servers.nats_server(tmp / "nats") as nats:
        own = Stack(tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                    database=f"t_{uuid.uuid4().hex[:12]}", extra_env={
                        "SCALEODM_WEBHOOK_TIMEOUT_S": str(TIMEOUT_S),
                        "SCALEODM_WEBHOOK_BACKOFF_BASE_S": "0.2",
                        "SCALEODM_WEBHOOK_BACKOFF_MAX_S": "0.4",
                        "SCALEODM_WEBHOOK_HORIZON_S": "30",
                        "SCALEODM_WEBHOOK_ACK_WAIT_S": "4",
                    })
        with running_stack(own, services=("gateway", "scheduler", "watcher")) as running:
            yield running, nats


@contextlib.contextmanager
def notifier(stack: Stack, node_webhook: str) -> Iterator[int]:
    """The notifier, started with ``node_webhook``, stopped (SIGTERM) after; yields its pid."""
    stack.start("notifier", extra={"SCALEODM_WEBHOOK": node_webhook})
    try:
        yield stack.procs["notifier"].pid
    finally:
        servers.stop_process(stack.procs.pop("notifier"), 25)


@pytest.fixture
async def gw(attack_stack: tuple[Stack, servers.Nats]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=attack_stack[0].gateway_url, timeout=30) as c:
        yield c


async def _finished_task(gw: httpx.AsyncClient, webhook: str | None = None) -> str:
    fields = {"webhook": webhook} if webhook else {}
    task_id = str((await api.create(gw, files=[("A.JPG", data.JPEG)], **fields))["uuid"])
    assert (await gw.post("/task/cancel", data={"uuid": task_id})).json() == {"success": True}
    return task_id


def _notifier_consumer(nats: servers.Nats) -> dict[str, Any]:
    url = f"{nats.monitor_url}/jsz?consumers=true"
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback only
        jsz = json.load(resp)
    for account in jsz.get("account_details", []):
        for stream in account.get("stream_detail", []):
            for consumer in stream.get("consumer_detail", []) or []:
                if consumer["name"] == "notifier":
                    return dict(consumer)
    raise AssertionError("notifier consumer not found")


async def test_gigabyte_response_is_not_read(
    attack_stack: tuple[Stack, servers.Nats], gw: httpx.AsyncClient, receiver: Receiver,
    record_property: Callable[[str, object], None],
) -> None:
    stack, _ = attack_stack
    with notifier(stack, receiver.url("/big-length")) as pid:
        started_rss = servers.peak_rss_bytes(pid)
        task_id = await _finished_task(gw, receiver.url("/big-chunked"))
        deliveries = await api.wait_deliveries(gw, task_id, api.deliveries_settled(2))
        peak = servers.peak_rss_bytes(pid)
    record_property("notifier_rss_after_start_mib", round(started_rss / MIB, 1))
    record_property("notifier_peak_rss_mib", round(peak / MIB, 1))

    for path in ("/big-length", "/big-chunked"):
        delivery = api.delivery_to(deliveries, path)
        assert delivery["status"] == "delivered", delivery
        assert [(a["statusCode"], a["error"]) for a in delivery["attempts"]] == [(200, None)]
        [hit] = receiver.of(path, task_id)
        assert hit.closed is not None and hit.sent < 64 * MIB, (
            f"{path}: the notifier read {hit.sent} bytes of the body before hanging up")
        record_property(f"receiver_sent_mib{path.replace('/', '_')}", hit.sent // MIB)
    assert peak < RSS_LIMIT, f"notifier peak RSS {peak / MIB:.0f} MiB"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        pytest.param("http://[::1", "invalid URL: malformed URL (Invalid IPv6 URL)",
                     id="unclosed-ipv6-literal"),
        pytest.param("http://receiver.test/" + "a" * 70_000,
                     "invalid URL: URL longer than 2048 characters", id="70kb-url"),
        pytest.param("file:///etc/passwd", "invalid URL: unsupported URL scheme 'file' "
                     "(expected http://, https://)", id="file"),
        pytest.param("gopher://127.0.0.1:70/", "invalid URL: unsupported URL scheme 'gopher' "
                     "(expected http://, https://)", id="gopher"),
        pytest.param("http://169.254.169.254/latest/meta-data/",
                     "refused: 169.254.169.254 refused (link-local/metadata address)",
                     id="metadata"),
        pytest.param("http://[::1]:9/hook", "refused: ::1 refused (private/loopback address)",
                     id="v6-loopback-not-allowed"),
        # byte 0xff in the environment: a lone surrogate in Python, which MongoDB refuses
        pytest.param("http://receiver.test/\udcff", "invalid URL: malformed URL ('utf-8' codec "
                     "can't encode character '\\udcff'", id="undecodable-byte"),
    ],
)
async def test_webhook_that_can_never_work_is_dead_after_one_attempt(
    attack_stack: tuple[Stack, servers.Nats], gw: httpx.AsyncClient, url: str, reason: str
) -> None:
    stack, nats = attack_stack
    with notifier(stack, url):
        task_id = await _finished_task(gw)
        [dead] = await api.wait_deliveries(gw, task_id, api.deliveries_settled(1))
        assert dead["status"] == "dead" and dead["reason"].startswith(reason), dead
        assert [(a["statusCode"], a["error"]) for a in dead["attempts"]] == [
            (None, dead["reason"])]
        assert len(dead["url"]) <= 2100, "the record keeps a bounded URL"
        # Longer than several retry delays (0.2-0.4 s): nothing more is tried or redelivered.
        await asyncio.sleep(1.0)
        assert await api.wait_deliveries(gw, task_id, lambda _: True) == [dead]
        consumer = _notifier_consumer(nats)
        assert (consumer["num_ack_pending"], consumer["num_pending"]) == (0, 0), consumer
    assert "terminal event not handled" not in stack.log("notifier")


async def test_trickling_receiver_is_cut_at_the_attempt_timeout(
    attack_stack: tuple[Stack, servers.Nats], gw: httpx.AsyncClient, receiver: Receiver,
) -> None:
    stack, _ = attack_stack
    slack_s = 1.5  # process scheduling on a loaded machine
    # asyncio runs a timer up to its clock's resolution early, and latencyMs is truncated: a
    # 2 s timeout may be recorded as 1999 ms.
    early_ms = 5
    with notifier(stack, receiver.url("/trickle-headers")):
        task_id = await _finished_task(gw, receiver.url("/trickle-body"))
        deliveries = await api.wait_deliveries(gw, task_id, api.deliveries_settled(2))

    # Headers never complete: a timed-out attempt, then a retry (which this receiver answers).
    headers = api.delivery_to(deliveries, "/trickle-headers")
    assert headers["status"] == "delivered"
    first, retry = headers["attempts"]
    assert (first["statusCode"], first["error"]) == (None, f"timed out after {TIMEOUT_S}s")
    assert TIMEOUT_S * 1000 - early_ms <= first["latencyMs"] < (TIMEOUT_S + slack_s) * 1000, first
    assert (retry["statusCode"], retry["error"]) == (200, None)
    # The body never completes: the status line, received in time, decides.
    body = api.delivery_to(deliveries, "/trickle-body")
    [only] = body["attempts"]
    assert (body["status"], only["statusCode"], only["error"]) == ("delivered", 200, None)
    assert TIMEOUT_S * 1000 - early_ms <= only["latencyMs"] < (TIMEOUT_S + slack_s) * 1000, only

    for path in ("/trickle-headers", "/trickle-body"):
        hit = receiver.of(path, task_id)[0]
        assert hit.closed is not None, f"{path}: the notifier never hung up"
        assert hit.closed - hit.arrived < TIMEOUT_S + slack_s, path
        assert 1 <= hit.sent <= TIMEOUT_S + 2, path
