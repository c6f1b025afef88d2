"""The gateway's HTTP server: uvicorn on its h11 protocol, with connection deadlines.

uvicorn (0.54) bounds none of these by itself: a connection that sends half a request line and
stops stays open forever (the keep-alive timer only runs after a response), and a connection
closed while its peer does not read keeps its unsent bytes for as long as the peer likes. So the
protocol class is ours, passed to uvicorn explicitly (``http=``: httptools is not installed,
and naming the class makes sure this one runs, whatever is installed later):

- **header deadline**: from the moment a connection is made, and again from the end of each
  response, the next request's headers must be complete within ``header_timeout_s``; else the
  connection is closed (after a ``408`` when part of a request came). Bytes of a body the app did
  not read (a request refused mid-upload) are not a new request: the deadline bounds how long
  such a body can keep the connection too, while the client gets time to see the answer;
- **keep-alive**: uvicorn's own timer, with ``keep_alive_timeout_s`` as given (uvicorn's
  setting is whole seconds);
- **closing**: asyncio closes a connection only once its peer has taken every byte still
  buffered for it, so a client that stops reading would keep the buffer, the socket and its
  place under the connection limit for as long as it likes (an event-stream client that stopped
  reading, after its send timeout). A connection closed with bytes still unsent is aborted
  ``keep_alive_timeout_s`` later;
- **concurrency**: ``limit_concurrency = max_connections`` (uvicorn answers 503 beyond it);
- **client address**: ``X-Forwarded-For`` is believed only from ``trusted_proxies`` (the
  ingress), so per-client limits count the client behind the proxy, and nobody else can choose
  the address they are counted as.

The event loop is asyncio's (``loop="asyncio"``): the closing bound wraps its transports' ``close``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from scaleodm.common.logging import get_logger
from scaleodm.common.settings import GatewaySettings

log = get_logger(__name__)

REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                   b"content-length: 15\r\nconnection: close\r\n\r\nRequest Timeout")


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a bound on closing connections."""

    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.keep_alive_timeout_s  # type: ignore[assignment]
        self._header_timer: asyncio.TimerHandle | None = None
        self._lost = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        close = transport.close

        def close_bounded() -> None:  # every close, whoever asks for it (uvicorn or us)
            close()
            if not self._lost and transport.get_write_buffer_size():
                self.loop.call_later(self.keep_alive_timeout_s, self._abort_unflushed)

        try:
            transport.close = close_bounded  # type: ignore[method-assign]
        except AttributeError:  # a transport without instance attributes (not asyncio's own)
            log.warning("unflushed closed connections are not bounded on this transport",
                        transport=type(transport).__name__)
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        # Armed first: a pipelined request handled inside uvicorn's method disarms it again.
        if not self.transport.is_closing():
            self._arm_header_deadline()
        super().on_response_complete()

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            partial, _ = self.conn.trailing_data
            if partial:
                self.transport.write(REQUEST_TIMEOUT)
            log.info("request headers not complete in time; connection closed",
                     client=_peer(self.client), timeout_s=self.header_timeout_s)
        else:  # still sending the body of a request answered early (refused, cut off)
            log.info("body of an answered request still arriving; connection closed",
                     client=_peer(self.client), timeout_s=self.header_timeout_s)
        self.transport.close()

    def _abort_unflushed(self) -> None:
        if not self._lost:  # the peer still has not taken the rest
            log.info("closed connection's peer takes no data; aborted", client=_peer(self.client))
            self.transport.abort()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


def protocol_class(settings: GatewaySettings) -> type[DeadlineH11Protocol]:
    """``DeadlineH11Protocol`` with the deadlines of ``settings``."""
    return type("GatewayH11Protocol", (DeadlineH11Protocol,), {
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
        loop="asyncio",  # the closing bound wraps asyncio's own transports (see the protocol)
        timeout_keep_alive=max(1, math.ceil(settings.keep_alive_timeout_s)),
        limit_concurrency=settings.max_connections,
        # Forwarded headers only from the configured proxies (uvicorn trusts loopback otherwise,
        # which would let a local client pick its own address for the per-client limits).
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=[str(n) for n in settings.trusted_proxies],
        log_config=None,
        timeout_graceful_shutdown=20,
    )
