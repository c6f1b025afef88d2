"""The web console: one page at ``/`` and its static files under ``/console/{path}``.

The console is plain ES modules, CSS and a vendored Leaflet (``console/vendor/``), shipped inside
the gateway package and built by nothing: what is in ``console/`` is what the browser gets. It
talks to the NodeODM API of this same gateway, with the token the user typed (``?token=``, as
NodeODM's own UI does: EventSource cannot send headers).

- Not part of the API: no token needed (nodeodm-api §1.3: static UI files are not protected),
  left out of the OpenAPI document (``include_in_schema=False``: the tenant and schemathesis tests
  walk the API's routes only).
- Strict paths: segments of ``[A-Za-z0-9._-]`` that do not start with a dot (no ``..``, no hidden
  files), a known file type, a regular file that resolves inside ``console/``. Anything else is
  the app's 404 (``Cannot GET ...``), as an unknown route.
- Every answer carries a Content-Security-Policy that allows scripts and styles from this origin
  only (no inline script, no eval), images from here and ``data:``/``blob:``, requests to this
  origin only; ``X-Content-Type-Options: nosniff``; ``Referrer-Policy: no-referrer`` (tokens
  travel in query strings, NodeODM's convention, and must not leak in a ``Referer``).
- Caching: the files are read once and kept in memory with a content ETag. The page and the
  console's own files are revalidated on every use (``no-cache`` + ETag → 304), so a new gateway
  version is picked up at once; the vendored files are referenced with their version in the
  query string (``?v=1.9.4``) and cached for a year, immutable.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

router = APIRouter(tags=["console"], include_in_schema=False)

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
VENDOR_PREFIX = "vendor/"
MAX_PATH_CHARS = 200
# Segments of safe characters, none starting with a dot: no "..", no hidden files, no "//".
_SAFE_PATH = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")

CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
PLAIN_NAMES = frozenset({"LICENSE"})  # files without a suffix that may be served, as text

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "font-src 'self'",
    "manifest-src 'self'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
REVALIDATE = "no-cache"
LONG_CACHE = "public, max-age=31536000, immutable"


@dataclass(frozen=True)
class Asset:
    """One static file as served: its bytes, content type and ETag."""

    body: bytes
    content_type: str
    etag: str


def _content_type(path: Path) -> str | None:
    if path.name in PLAIN_NAMES:
        return "text/plain; charset=utf-8"
    return CONTENT_TYPES.get(path.suffix.lower())


@functools.lru_cache(maxsize=128)
def _load(relative: str) -> Asset | None:
    """The file ``relative`` to the console folder, or None when it may not be served."""
    if len(relative) > MAX_PATH_CHARS or not _SAFE_PATH.fullmatch(relative):
        return None
    root = CONSOLE_DIR.resolve()
    path = (root / relative).resolve()
    # A symlink pointing out of the folder is refused as any other unknown path.
    if not path.is_relative_to(root) or not path.is_file():
        return None
    content_type = _content_type(path)
    if content_type is None:
        return None
    body = path.read_bytes()
    return Asset(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')


def _serve(request: Request, asset: Asset, cache_control: str) -> Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": cache_control, "ETag": asset.etag}
    if asset.etag in _etags(request.headers.get("if-none-match", "")):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.content_type, headers=headers)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def _not_found() -> HTTPException:
    return HTTPException(status_code=404)  # the app's "Cannot GET <path>" (errors.py)


@router.get("/")
async def read_console(request: Request) -> Response:
    """The console's page."""
    asset = _load("index.html")
    if asset is None:  # a package built without its static files
        raise _not_found()
    return _serve(request, asset, REVALIDATE)


@router.get("/console/{path:path}")
async def read_console_file(path: str, request: Request) -> Response:
    """A static file of the console (scripts, styles, vendored Leaflet)."""
    asset = _load(path)
    if asset is None:
        raise _not_found()
    return _serve(request, asset, LONG_CACHE if path.startswith(VENDOR_PREFIX) else REVALIDATE)
