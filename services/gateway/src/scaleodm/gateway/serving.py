"""The gateway's HTTP server: uvicorn on its httptools protocol and uvloop, with connection bounds.

uvicorn (0.54) bounds none of these by itself: a connection that sends half a request line and
stops stays open forever (the keep-alive timer only runs after a response), its httptools
protocol lets a request's headers grow for as long as they keep coming, and a connection closed
while its peer does not read keeps its unsent bytes for as long as the peer likes. So the
protocol class is ours, passed to uvicorn explicitly (``http=``: naming the class makes sure this
one runs, whatever else is installed):

- **header deadline**: from the moment a connection is made, and again from the end of each
  response, the next request's headers must be complete within ``header_timeout_s``; else the
  connection is closed (after a ``408`` when part of a request came). Bytes of a body the app did
  not read (a request refused mid-upload) are not a new request: the deadline bounds how long
  such a body can keep the connection too, while the client gets time to see the answer;
- **header size**: a request line and headers of more than ``MAX_HEAD_BYTES`` (16 KiB, what
  uvicorn's h11 protocol allowed, Node's default too) are answered ``431`` and the connection is
  closed. httptools buffers a header until it is complete and has no bound of its own, so the
  bytes are counted as they arrive, before the parser sees them (up to the head's blank line).
  One case is counted only from the next read on: a pipelined request whose head starts in the
  same read as the end of the request before it (its bytes in that read are not counted);
- **keep-alive**: uvicorn's own timer, with ``keep_alive_timeout_s`` as given (uvicorn's
  setting is whole seconds);
- **closing**: a transport closes a connection only once its peer has taken every byte still
  buffered for it, so a client that stops reading would keep the buffer, the socket and its
  place under the connection limit for as long as it likes (an event-stream client that stopped
  reading, after its send timeout). A connection closed with bytes still unsent is aborted
  ``keep_alive_timeout_s`` later. The protocol hands uvicorn a wrapper of the transport whose
  ``close`` does that (``_BoundedClose``), so it holds on uvloop's transports (which take no
  instance attributes) as on asyncio's;
- **concurrency**: ``limit_concurrency = max_connections`` (uvicorn answers 503 beyond it);
- **client address**: ``X-Forwarded-For`` is believed only from ``trusted_proxies`` (the
  ingress), so per-client limits count the client behind the proxy, and nobody else can choose
  the address they are counted as.

Why httptools and uvloop rather than h11 and asyncio (measured in ``docs/performance.md``):
every NodeODM client polls ``/task/{uuid}/info`` all day, and h11's pure-Python parsing and
framing cost ~75 µs of CPU per request where httptools' cost ~20 µs. uvloop saves ~5 µs more
per request in-process (under load, within the noise).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from scaleodm.common.logging import get_logger
from scaleodm.common.settings import GatewaySettings

log = get_logger(__name__)

MAX_HEAD_BYTES = 16 * 1024
DEADLINE_SLACK_S = 0.01
REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                   b"content-length: 15\r\nconnection: close\r\n\r\nRequest Timeout")
HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                  b"content-type: text/plain; charset=utf-8\r\ncontent-length: 31\r\n"
                  b"connection: close\r\n\r\nRequest Header Fields Too Large")


class _BoundedClose(asyncio.Transport):
    """The connection's transport as uvicorn sees it: every ``close`` (uvicorn's or ours) also
    starts the bound on unflushed bytes (``DeadlineProtocol._closed``); the rest is passed on."""

    def __init__(self, transport: asyncio.Transport, protocol: DeadlineProtocol) -> None:
        super().__init__()
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._transport.close()
        self._protocol._closed()

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._transport.writelines(list_of_data)

    def abort(self) -> None:
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self._transport.write_eof()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a bound on the size of a request's
    head and a bound on closing connections."""

    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.keep_alive_timeout_s  # type: ignore[assignment]
        # The header deadline: a time, checked by one timer that re-arms itself when it fires
        # early (arming and disarming on every request costs a stored float, not a timer).
        self._header_deadline: float | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._raw: asyncio.Transport | None = None
        self._in_message = False  # from a request's first byte to the end of its body
        self._head_pending = False  # from a request's first byte to the end of its headers
        self._head_bytes = 0  # bytes of the current request's head received so far
        self._head_tail = b""  # its last bytes (at most 3): a blank line may span two reads

    # -- the connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        super().connection_made(_BoundedClose(transport, self))
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._disarm_header_deadline()
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_pending or not self._in_message:  # a head, or what may start the next
            length = _head_length(self._head_tail, data)
            if length < 0:  # the head goes on
                self._head_bytes += len(data)
                self._head_tail = (self._head_tail + data[-3:])[-3:]
            else:
                self._head_bytes += length
                self._head_tail = b""
            if self._head_bytes > MAX_HEAD_BYTES:
                log.info("request headers too large; connection closed",
                         client=_peer(self.client), limit_bytes=MAX_HEAD_BYTES)
                self.transport.write(HEAD_TOO_LARGE)
                self.transport.close()
                return
        super().data_received(data)

    # -- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = self._head_pending = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_pending = False
        self._disarm_header_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_message = False
        self._head_bytes = 0  # the next request's head starts here
        self._head_tail = b""
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # A pipelined request already has its headers: it starts now, and no deadline applies.
        idle = not self.pipeline
        super().on_response_complete()
        if idle and not self.transport.is_closing():
            self._arm_header_deadline()

    # -- deadlines ---------------------------------------------------------------------------

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.time() + self.header_timeout_s
        if self._header_timer is None:
            self._header_timer = self.loop.call_at(self._header_deadline, self._check_deadline)

    def _disarm_header_deadline(self) -> None:
        self._header_deadline = None

    def _check_deadline(self) -> None:
        self._header_timer = None
        if self._header_deadline is None or self._lost:
            return
        # Re-armed since (a timer may also fire a little early: a loop's clock granularity).
        if self.loop.time() < self._header_deadline - DEADLINE_SLACK_S:
            self._header_timer = self.loop.call_at(self._header_deadline, self._check_deadline)
            return
        self._header_deadline = None
        self._headers_late()

    def _headers_late(self) -> None:
        if self.transport.is_closing():
            return
        if self._head_pending or not self._in_message:
            if self._head_pending:
                self.transport.write(REQUEST_TIMEOUT)
            log.info("request headers not complete in time; connection closed",
                     client=_peer(self.client), timeout_s=self.header_timeout_s)
        else:  # still sending the body of a request answered early (refused, cut off)
            log.info("body of an answered request still arriving; connection closed",
                     client=_peer(self.client), timeout_s=self.header_timeout_s)
        self.transport.close()

    def _closed(self) -> None:
        """After every close: bytes still unsent are dropped ``keep_alive_timeout_s`` later."""
        if not self._lost and self._raw is not None and self._raw.get_write_buffer_size():
            self.loop.call_later(self.keep_alive_timeout_s, self._abort_unflushed)

    def _abort_unflushed(self) -> None:
        if not self._lost and self._raw is not None:  # the peer still has not taken the rest
            log.info("closed connection's peer takes no data; aborted", client=_peer(self.client))
            self._raw.abort()


def _head_length(tail: bytes, data: bytes) -> int:
    """How many bytes of ``data`` belong to a request head whose bytes so far end with ``tail``,
    its blank line included; -1 when the head does not end in ``data``."""
    if tail:  # the blank line may have begun in the previous read
        at = (tail + data[:3]).find(b"\r\n\r\n")
        if at >= 0:
            return at + 4 - len(tail)
    at = data.find(b"\r\n\r\n")
    return -1 if at < 0 else at + 4


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


def protocol_class(settings: GatewaySettings) -> type[DeadlineProtocol]:
    """``DeadlineProtocol`` with the deadlines of ``settings``."""
    return type("GatewayHttpProtocol", (DeadlineProtocol,), {
        "header_timeout_s": settings.header_timeout_s,
        "keep_alive_timeout_s": settings.keep_alive_timeout_s,
    })


def config(app: Any, settings: GatewaySettings) -> uvicorn.Config:
    """The gateway's uvicorn configuration (logging is ours: ``log_config=None``)."""
    return uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        http=protocol_class(settings),
        loop="uvloop",  # the closing bound holds on its transports too (_BoundedClose)
        timeout_keep_alive=max(1, math.ceil(settings.keep_alive_timeout_s)),
        limit_concurrency=settings.max_connections,
        # Forwarded headers only from the configured proxies (uvicorn trusts loopback otherwise,
        # which would let a local client pick its own address for the per-client limits).
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=[str(n) for n in settings.trusted_proxies],
        log_config=None,
        timeout_graceful_shutdown=20,
    )
