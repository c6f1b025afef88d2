"""A small Server-Sent Events client for tests: parse the wire format, read until a condition.

Parsing follows the HTML spec's event-stream rules that our streams use: ``field: value`` lines,
``:`` comment lines, a blank line ends a message. Messages without ``data`` (comments, ``retry``)
are returned too, so tests can see heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.harness.servers import free_port, stop_process, wait_http
from tests.harness.stack import Stack


@dataclass
class Message:
    id: str | None = None
    event: str | None = None
    data: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def is_event(self) -> bool:
        return self.data is not None

    def json(self) -> dict[str, Any]:
        assert self.data is not None
        body: dict[str, Any] = json.loads(self.data)
        return body

    def key(self) -> tuple[str | None, str | None, str | None]:
        return self.id, self.event, self.data


async def messages(resp: httpx.Response) -> AsyncIterator[Message]:
    """Every message of a streaming response, until the server closes it."""
    msg = Message()
    data: list[str] = []
    started = False
    async for line in resp.aiter_lines():
        if line == "":
            if started:
                msg.data = "\n".join(data) if data else None
                yield msg
            msg, data, started = Message(), [], False
            continue
        started = True
        if line.startswith(":"):
            msg.comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            msg.id = value
        elif name == "event":
            msg.event = value
        elif name == "data":
            data.append(value)
        elif name == "retry":
            msg.retry = int(value)


@dataclass
class Read:
    events: list[Message]  # messages with data, in order
    ended: bool  # the server closed the stream (else the condition stopped the read)
    all: list[Message]  # every message, comments included


async def read(
    client: httpx.AsyncClient, path: str, *, until: Callable[[Message], bool] | None = None,
    headers: dict[str, str] | None = None, params: dict[str, Any] | None = None,
    timeout_s: float = 30.0, on_open: Callable[[], Any] | None = None,
) -> Read:
    """Read ``path`` until the server ends the stream or ``until(message)`` holds."""
    got: list[Message] = []

    async def run() -> bool:
        async with client.stream("GET", path, headers=headers, params=params) as resp:
            assert resp.status_code == 200, resp.status_code
            ctype = resp.headers["content-type"]
            assert ctype.startswith("text/event-stream"), (ctype, await resp.aread())
            async for msg in messages(resp):
                got.append(msg)
                if on_open is not None and len(got) == 1:
                    opened = on_open()
                    if inspect.isawaitable(opened):
                        await opened
                if until is not None and until(msg):
                    return False
        return True

    ended = await asyncio.wait_for(run(), timeout_s)
    return Read([m for m in got if m.is_event], ended, got)


# -- a gateway process with the event routes --------------------------------------------------


@contextlib.contextmanager
def events_gateway(stack: Stack, extra: dict[str, str] | None = None) -> Iterator[str]:
    """One more gateway on the stack's servers (``tests.harness.events_gateway``); its URL."""
    port = free_port()
    env = stack.env("gateway", extra)
    env["SCALEODM_GATEWAY_PORT"] = str(port)
    log = (stack.tmp / f"events-gateway-{port}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.harness.events_gateway"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout_s=60, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc, 25)


def serves_events(base_url: str) -> bool:
    """Whether a gateway has the event routes (``main.py`` includes ``routes.events``)."""
    resp = httpx.get(f"{base_url}/events", params={"status": "1"}, timeout=10)
    return resp.headers.get("content-type", "").startswith("application/json")
