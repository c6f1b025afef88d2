"""NodeODM's error transport (nodeodm-api §1.1): application errors are HTTP 200 + ``{"error"}``.

Only unknown routes answer 404 (HTML ``Cannot GET /path``, as Express does). Validation problems
and unexpected exceptions are logged and turned into ``{"error": ...}``: never a 500, never a
traceback. An unexpected exception answers only ``Internal error (ref <id>)``: its type and text
may name hosts, paths or internals, so they go to the log under the same ref, never to the client.
A storage outage (MongoDB or S3 away or frozen: ``store.is_unavailable``) is no bug: it answers
``Storage unavailable, please retry later`` as soon as the store's deadline has passed (MongoDB
``timeoutMS``, S3 ``request_timeout_s``), and is logged as a warning without a traceback.
Client input echoed in an error goes through ``shown``: bounded, control characters escaped.
"""

from __future__ import annotations

import html
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from scaleodm.common import store
from scaleodm.common.domain.text import shown
from scaleodm.common.logging import get_logger
from scaleodm.gateway.responses import JsonResponse

log = get_logger(__name__)
STORAGE_UNAVAILABLE = "Storage unavailable, please retry later"


class NodeOdmError(Exception):
    """An error answered as HTTP 200 with this JSON body."""

    def __init__(self, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.body: dict[str, Any] = {**({"success": False} if extra.pop("action", False) else {}),
                                     "error": error, **extra}


def not_found(task_id: str) -> NodeOdmError:
    return NodeOdmError(f"{shown(task_id)} not found")


def install(app: FastAPI) -> None:
    @app.exception_handler(NodeOdmError)
    async def _nodeodm(request: Request, exc: NodeOdmError) -> Response:
        log.info("request refused", path=request.url.path, error=exc.body.get("error"))
        return JsonResponse(exc.body)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        log.info("invalid request", path=request.url.path, error=detail)
        return JsonResponse({"error": f"Invalid request: {detail}"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (404, 405):
            path = html.escape(request.url.path)
            return HTMLResponse(
                "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                "<title>Error</title>\n</head>\n<body>\n"
                f"<pre>Cannot {request.method} {path}</pre>\n</body>\n</html>\n",
                status_code=404,
            )
        return JsonResponse({"error": str(exc.detail)})

    async def _unexpected(request: Request, exc: Exception) -> Response:
        if store.is_unavailable(exc):
            log.warning("storage unavailable", path=request.url.path, error=repr(exc))
            return JsonResponse({"error": STORAGE_UNAVAILABLE})  # NodeODM: errors are HTTP 200
        ref = secrets.token_hex(6)
        log.error("unhandled error", ref=ref, path=request.url.path, exc_info=exc)
        return JsonResponse({"error": f"Internal error (ref {ref})"})

    # The storage errors by class first: Starlette answers those in its exception middleware,
    # while the catch-all handler answers and then re-raises (uvicorn logs a second traceback).
    for outage in store.OUTAGE_TYPES:
        app.add_exception_handler(outage, _unexpected)
    app.add_exception_handler(Exception, _unexpected)
