"""The outbound SSRF guard (``scaleodm.common.netguard``): address policy and the guarded transport.

Covers: which addresses are refused with and without allow-list entries (link-local/metadata
only opened by an entry inside them, IPv4-mapped IPv6 unwrapped); a name whose DNS answers mix
an allowed and a refused address is refused; the transport connects to the address it checked
(a name only our fake resolver knows still reaches the loopback server, Host header intact);
redirects are checked again. DNS is faked by replacing the event loop's ``getaddrinfo``; the
only server is on 127.0.0.1. Leaves out TLS (SNI comes from the URL's host in httpcore; not
exercised here) and the callers (integration tests: test_webhooks.py).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from scaleodm.common import netguard
from tests.harness import servers


@pytest.mark.parametrize(
    ("address", "allow", "reason"),
    [
        pytest.param("8.8.8.8", [], None, id="public-v4"),
        pytest.param("2001:4860:4860::8888", [], None, id="public-v6"),
        pytest.param("169.254.169.254", [], netguard.METADATA_REASON, id="metadata"),
        pytest.param("169.254.169.254", ["0.0.0.0/0"], netguard.METADATA_REASON,
                     id="metadata-not-opened-by-broad-entry"),
        pytest.param("169.254.169.254", ["169.254.169.254/32"], None, id="metadata-allowed"),
        pytest.param("169.254.10.1", [], netguard.METADATA_REASON, id="link-local-v4"),
        pytest.param("fe80::1", [], netguard.METADATA_REASON, id="link-local-v6"),
        pytest.param("fd00:ec2::254", ["fc00::/7"], netguard.METADATA_REASON, id="aws-metadata-v6"),
        pytest.param("::ffff:169.254.169.254", [], netguard.METADATA_REASON, id="mapped-metadata"),
        pytest.param("127.0.0.1", [], netguard.PRIVATE_REASON, id="loopback"),
        pytest.param("127.0.0.1", ["127.0.0.0/8"], None, id="loopback-allowed"),
        pytest.param("::ffff:127.0.0.1", ["127.0.0.0/8"], None, id="mapped-loopback-allowed"),
        pytest.param("::1", ["127.0.0.0/8"], netguard.PRIVATE_REASON, id="v6-loopback"),
        pytest.param("10.1.2.3", [], netguard.PRIVATE_REASON, id="rfc1918"),
        pytest.param("10.1.2.3", ["10.0.0.0/8"], None, id="rfc1918-allowed"),
        pytest.param("192.168.1.1", ["10.0.0.0/8"], netguard.PRIVATE_REASON, id="other-rfc1918"),
        pytest.param("fd12::1", [], netguard.PRIVATE_REASON, id="ula"),
        pytest.param("100.64.0.1", [], netguard.PRIVATE_REASON, id="cgnat"),
        pytest.param("0.0.0.0", [], netguard.PRIVATE_REASON, id="unspecified"),
    ],
)
def test_policy(address: str, allow: list[str], reason: str | None) -> None:
    assert netguard.OutboundPolicy(allow).refusal(address) == reason


@pytest.fixture
async def loopback_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A minimal HTTP server on 127.0.0.1 answering 200; records each request head."""
    async with servers.recording_http_server() as server:
        yield server


def _fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """Answer ``answers[host]`` from the running loop's resolver; returns the names asked."""
    asked: list[str] = []
    loop = asyncio.get_running_loop()
    real: Callable[..., Any] = loop.getaddrinfo

    async def getaddrinfo(host: str, port: int, **kwargs: Any) -> list[Any]:
        asked.append(host)
        if host not in answers:
            return list(await real(host, port, **kwargs))
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM,
             socket.IPPROTO_TCP, "", (a, port))
            for a in answers[host]
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return asked


def _client(allow: list[str]) -> httpx.AsyncClient:
    transport = netguard.GuardedTransport(netguard.OutboundPolicy(allow))
    return httpx.AsyncClient(transport=transport, timeout=5, follow_redirects=True)


async def test_mixed_dns_answer_is_refused(
    monkeypatch: pytest.MonkeyPatch, loopback_server: tuple[int, list[bytes]]
) -> None:
    port, heads = loopback_server
    _fake_dns(monkeypatch, {"mixed.test": ["127.0.0.1", "169.254.169.254"]})
    async with _client(["127.0.0.0/8"]) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get(f"http://mixed.test:{port}/x")
    assert netguard.refusal_of(info.value) == (
        "mixed.test refused (it resolves to a link-local/metadata address)"
    )
    assert heads == [], "nothing may be sent when any answer is refused"


async def test_refused_without_allow_entry(
    monkeypatch: pytest.MonkeyPatch, loopback_server: tuple[int, list[bytes]]
) -> None:
    port, heads = loopback_server
    _fake_dns(monkeypatch, {"inside.test": ["127.0.0.1"]})
    async with _client([]) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get(f"http://inside.test:{port}/x")
    assert netguard.refusal_of(info.value) == (
        "inside.test refused (it resolves to a private/loopback address)"
    )
    async with _client([]) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get(f"http://127.0.0.1:{port}/x")
    assert "127.0.0.1 refused (private/loopback address)" == netguard.refusal_of(info.value)
    assert heads == []


async def test_connects_to_the_checked_address(
    monkeypatch: pytest.MonkeyPatch, loopback_server: tuple[int, list[bytes]]
) -> None:
    port, heads = loopback_server
    asked = _fake_dns(monkeypatch, {"hook.test": ["127.0.0.1"]})
    async with _client(["127.0.0.0/8"]) as client:
        resp = await client.get(f"http://hook.test:{port}/x")
    assert resp.status_code == 200 and resp.text == "ok"
    assert asked == ["hook.test"], "resolved once: the check and the connection share it"
    assert f"host: hook.test:{port}".encode() in heads[0].lower()


async def test_redirect_target_is_checked() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/\r\n"
                     b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, _client(["127.0.0.0/8"]) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get(f"http://127.0.0.1:{port}/zip")
    assert netguard.refusal_of(info.value) == (
        "169.254.169.254 refused (link-local/metadata address)"
    )
