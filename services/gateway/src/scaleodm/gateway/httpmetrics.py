"""HTTP server metrics of the gateway: requests by method, route template and status, and their
handling time (``scaleodm.common.metrics``).

A plain ASGI middleware (no per-request object beyond a closure): it reads the route FastAPI
matched (``scope["route"]``, set while routing) once the response has started, so the label is
the template (``/task/{uuid}/info``), never the path a client sent; a request no route matched
is ``unmatched``, whatever its path. Streams (SSE, downloads) are timed to their end.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scaleodm.common import metrics

UNMATCHED = "unmatched"
# Methods as labels: anything else (a client may send any token) is "other".
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


def route_of(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class HttpMetrics:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            method = scope.get("method", "")
            method = method if method in METHODS else "other"
            route = route_of(scope)
            metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
            metrics.HTTP_DURATION.labels(method, route).observe(time.perf_counter() - started)
