"""The gateway's one JSON response class: what every JSON answer goes out as.

- ``Content-Type: application/json; charset=utf-8``, as NodeODM (Express) sends it (nodeodm-api
  §1.1; Starlette's ``JSONResponse`` sends no charset);
- rendered by orjson: the same compact JSON as Starlette's ``json.dumps`` for the values the
  routes return, ~15x faster. Where they differ: a non-finite float is ``null`` (``json.dumps``
  with ``allow_nan=False`` raised, an internal error), and a value orjson has no rule for goes
  through FastAPI's ``jsonable_encoder`` first (``default``), as it did before;
- routes on the polling paths return it themselves (``JsonResponse(body)``), which also skips
  FastAPI's ``jsonable_encoder`` walk over the returned value (on ``/task/{uuid}/info`` it cost
  more than the rendering itself): their values are JSON already (the task document's). The
  others return plain values and get it as the app's ``default_response_class``.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from fastapi.encoders import jsonable_encoder
from starlette.responses import JSONResponse

JSON_MEDIA_TYPE = "application/json; charset=utf-8"


class JsonResponse(JSONResponse):
    """JSON, ``application/json; charset=utf-8``, rendered by orjson. A ``JSONResponse`` for
    FastAPI: the OpenAPI document describes its answers as JSON, under this content type."""

    media_type = JSON_MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content, default=jsonable_encoder)
        except orjson.JSONEncodeError:  # an int beyond 64 bits, a key not a str: json takes them
            return json.dumps(content, default=jsonable_encoder, ensure_ascii=False,
                              allow_nan=False, separators=(",", ":")).encode("utf-8")
