"""What the gateway tells a client when its own dependencies fail: nothing about them.

A gateway of its own reaches MongoDB through a TCP relay the tests cut, and S3 at a port where
nothing listens. Covered: ``/readyz`` (no token) answers ``ok``/``down``/``timeout`` per check and
never an exception's text, while the gateway log has it; MongoDB gone under a request answers
``Storage unavailable, please retry later`` and the log names the cause; an unexpected exception
(a failpoint raising one) answers ``Internal error (ref <id>)`` and the same ref leads to the full
exception in the log; the bus services' ``/readyz`` (``scaleodm.common.runtime``) answers the
same words, run in-process against failing and hanging checks.

Left out: the causes of internal errors (each is a bug of its own; the fuzz test looks for them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scaleodm.common import runtime
from tests.harness import servers
from tests.harness.data import JPEG
from tests.harness.stack import Stack
from tests.security.gateway_only import gateway_only

pytestmark = pytest.mark.integration

CHECK_WORDS = {"ok", "down", "timeout"}
# What an exception's text would carry: class names, addresses, URLs.
LEAK = re.compile(r"Error|Exception|Timeout\(|127\.0\.0\.1|localhost|https?://|\[Errno|mongodb")


class TcpRelay:
    """``127.0.0.1:<port>`` relayed to ``target``; ``cut()`` closes it and every connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@pytest.fixture(scope="module")
def failing(
    tmp_path_factory: pytest.TempPathFactory, mongo_url: str, s3: servers.S3Endpoint
) -> Iterator[tuple[Stack, TcpRelay]]:
    """A gateway whose MongoDB is relayed (cut by the tests) and whose S3 endpoint is dead."""
    host_port = re.search(r"mongodb://([^/?]+)", mongo_url)
    if host_port is None or "," in host_port.group(1):
        pytest.skip("needs a single-host MongoDB URL to relay")
    host, _, port = host_port.group(1).rpartition(":")
    relay = TcpRelay((host, int(port)))
    tmp = tmp_path_factory.mktemp("leaks")
    dead_port = servers.free_port()  # nothing listens there
    with servers.nats_server(tmp / "nats") as nats:
        own = Stack(
            tmp=tmp, nats_url=nats.url,
            mongo_url=mongo_url.replace(host_port.group(1), f"127.0.0.1:{relay.port}"),
            s3=s3, database="leaks",
            extra_env={
                "SCALEODM_S3__ENDPOINT_URL": f"http://127.0.0.1:{dead_port}",
                "SCALEODM_S3__CREATE_BUCKET": "false",
                "SCALEODM_MONGO__SERVER_SELECTION_TIMEOUT_MS": "500",
                "SCALEODM_MONGO__TIMEOUT_MS": "1000",
            },
        )
        try:
            own.spawn("gateway")  # never ready (S3 is down): wait for liveness instead
            servers.wait_http(f"{own.gateway_url}/healthz", timeout_s=60,
                              proc=own.procs["gateway"])
            yield own, relay
        finally:
            own.stop()
            relay.cut()


def _log_lines(stack: Stack) -> list[dict[str, Any]]:
    lines = []
    for line in stack.log("gateway").splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    return lines


async def _readiness(stack: Stack) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as c:
        resp = await c.get("/readyz")
    assert not LEAK.search(resp.text), resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) == {"ready", "checks"}, body
    assert set(body["checks"].values()) <= CHECK_WORDS, body
    return resp.status_code, body


async def test_readiness_names_no_exception(failing: tuple[Stack, TcpRelay]) -> None:
    stack, relay = failing
    status, body = await _readiness(stack)
    assert status == 503
    # refused connections are retried by the S3 client: "down", or "timeout" if retries last
    assert body["ready"] is False and body["checks"]["s3"] in ("down", "timeout"), body
    assert {k: v for k, v in body["checks"].items() if k != "s3"} == {"mongo": "ok", "nats": "ok"}
    logged = [e for e in _log_lines(stack) if e.get("check") == "s3"]
    assert logged and all(e["event"].startswith("readiness check") for e in logged), logged


async def test_storage_outage_is_a_short_answer_and_details_go_to_the_log(
    failing: tuple[Stack, TcpRelay],
) -> None:
    stack, relay = failing
    relay.cut()  # MongoDB gone from under the gateway
    status, body = await _readiness(stack)
    assert status == 503 and body["checks"]["mongo"] == "down", body  # fails within 0.5 s
    failed = [e for e in _log_lines(stack)
              if e.get("event") == "readiness check failed" and e.get("check") == "mongo"]
    assert failed and f"127.0.0.1:{relay.port}" in failed[-1]["error"], failed  # the details
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as c:
        resp = await c.get("/task/list")
    assert resp.status_code == 200 and "application/json" in resp.headers["content-type"]
    assert resp.json() == {"error": "Storage unavailable, please retry later"}
    for _ in range(50):  # the log line is written as the answer is sent
        logged = [e for e in _log_lines(stack)
                  if e.get("event") == "storage unavailable" and e.get("path") == "/task/list"]
        if logged:
            break
        await asyncio.sleep(0.1)
    assert logged and f"127.0.0.1:{relay.port}" in logged[-1]["error"], logged


async def test_internal_error_is_a_reference_to_the_log(
    tmp_path: Path, mongo_url: str, s3: servers.S3Endpoint
) -> None:
    """An unexpected exception (a failpoint raising one, as a bug would) answers a reference
    that finds the traceback in the log, and nothing else."""
    env = {"SCALEODM_FAILPOINTS": "gateway.run.before_publish=error"}
    with gateway_only(tmp_path / "gw", mongo_url, s3, env) as stack:
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as c:
            resp = await c.post("/task/new", files=[("images", ("a.jpg", JPEG, "image/jpeg"))])
        assert resp.status_code == 200 and "application/json" in resp.headers["content-type"]
        answer = resp.json()
        match = re.fullmatch(r"Internal error \(ref ([0-9a-f]{12})\)", answer.get("error", ""))
        assert match is not None and set(answer) == {"error"}, answer
        ref = match.group(1)
        for _ in range(50):  # the log line is written as the answer is sent
            logged = [e for e in _log_lines(stack) if e.get("ref") == ref]
            if logged:
                break
            await asyncio.sleep(0.1)
        assert len(logged) == 1, logged
        assert logged[0]["event"] == "unhandled error" and logged[0]["path"] == "/task/new"
        assert "FailpointError: gateway.run.before_publish" in logged[0].get("exception", "")


@pytest.mark.parametrize(
    ("check", "word"),
    [
        pytest.param("raises", "down", id="raises"),
        pytest.param("hangs", "timeout", id="hangs"),
        pytest.param("answers", "ok", id="answers"),
    ],
)
async def test_bus_service_readiness_names_no_exception(
    monkeypatch: pytest.MonkeyPatch, check: str, word: str
) -> None:
    async def raises() -> None:
        raise ConnectionRefusedError("[Errno 111] connect to mongodb://10.1.2.3:27017 refused")

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def answers() -> None:
        return None

    probes = {"raises": raises, "hangs": hangs, "answers": answers}
    monkeypatch.setattr(runtime, "READY_CHECK_TIMEOUT_S", 0.05)
    handler = runtime._readiness([("mongo", probes[check])])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/readyz", "headers": [],
             "query_string": b""}
    await handler(scope, receive, send)
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert not LEAK.search(body.decode()), body
    assert json.loads(body) == {"ready": word == "ok", "checks": {"mongo": word}}
    assert status == (200 if word == "ok" else 503)
