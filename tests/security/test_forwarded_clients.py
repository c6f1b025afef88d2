"""Who a client is, for per-client limits, when the gateway sits behind a proxy.

Attack: a client sends ``X-Forwarded-For`` with a fresh address on every request to escape the
per-client event-stream cap. Forwarded headers count only from ``SCALEODM_TRUSTED_PROXIES`` (the
ingress), so from anyone else they change nothing; from a trusted proxy, the client behind it is
what counts, and two clients behind one ingress are two clients.
Covers the SSE per-client cap only (the one per-client limit today).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import servers
from tests.harness.stack import Stack
from tests.security.gateway_only import gateway_only

pytestmark = pytest.mark.integration

PER_CLIENT = 2
REFUSED = f"Too many event streams: at most {PER_CLIENT} per client"


@contextlib.contextmanager
def _gateway(tmp: Path, mongo_url: str, s3: servers.S3Endpoint,
             trusted: str | None) -> Iterator[Stack]:
    env = {"SCALEODM_SSE_MAX_STREAMS": "50",
           "SCALEODM_SSE_MAX_STREAMS_PER_CLIENT": str(PER_CLIENT)}
    if trusted is not None:
        env["SCALEODM_TRUSTED_PROXIES"] = trusted
    with gateway_only(tmp, mongo_url, s3, env) as stack:
        yield stack


async def _stream(held: contextlib.AsyncExitStack, client: httpx.AsyncClient,
                  forwarded_for: str) -> str | None:
    """Open ``/events`` as the client behind ``forwarded_for``: None when it streams (kept open
    by ``held``), else the error it was refused with."""
    resp = await held.enter_async_context(
        client.stream("GET", "/events", headers={"X-Forwarded-For": forwarded_for})
    )
    if resp.headers["content-type"].startswith("text/event-stream"):
        lines = resp.aiter_lines()
        await anext(lines)
        held.push_async_callback(lines.aclose)
        return None
    await resp.aread()
    error: str = resp.json()["error"]
    return error


@contextlib.asynccontextmanager
async def _client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=10) as client:
        yield client


async def test_forged_forwarded_for_does_not_escape_the_cap(
    tmp_path: Path, mongo_url: str, s3: servers.S3Endpoint
) -> None:
    with _gateway(tmp_path, mongo_url, s3, trusted=None) as stack:
        async with contextlib.AsyncExitStack() as held, _client(stack) as client:
            for n in range(PER_CLIENT):
                assert await _stream(held, client, f"203.0.113.{n + 1}") is None
            assert await _stream(held, client, "203.0.113.99") == REFUSED


async def test_clients_behind_a_trusted_proxy_count_one_by_one(
    tmp_path: Path, mongo_url: str, s3: servers.S3Endpoint
) -> None:
    with _gateway(tmp_path, mongo_url, s3, trusted='["127.0.0.1/32"]') as stack:
        async with contextlib.AsyncExitStack() as held, _client(stack) as client:
            for _ in range(PER_CLIENT):
                assert await _stream(held, client, "198.51.100.7") is None
            assert await _stream(held, client, "198.51.100.7") == REFUSED
            # another client behind the same ingress has its own streams
            assert await _stream(held, client, "198.51.100.8") is None
