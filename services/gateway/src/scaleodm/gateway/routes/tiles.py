"""Map tiles of a completed task's rasters: ``/task/{uuid}/tiles/{z}/{x}/{y}.png`` and
``/task/{uuid}/tilejson.json`` (issue 15; rendering in ``scaleodm.gateway.tiles``).

Two conventions meet here. The caller and the task are NodeODM's, as on every task route: the
token (``CallerRequired``), and an unknown uuid or another tenant's task answers HTTP 200
``{"error": "<uuid> not found"}`` (nodeodm-api §1.1), from the same read. Past that, the answers
are a map client's: a task not completed, a layer it has no raster of, a tile off the grid or
beyond ``maxzoom`` answer HTTP 404 ``{"error": ...}`` (Leaflet and MapLibre show nothing and go
on); a raster S3 cannot serve now answers 503. A tile of the grid outside the raster is HTTP 200
with a fully transparent PNG. Nothing here answers 500.

Caching: a completed attempt's rasters do not change, so tiles are ``private`` (the URL may
carry a token) and cacheable for a day; the TileJSON's URLs name the attempt (a restarted task's
tiles are other URLs); errors are ``no-store``.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from typing_extensions import TypedDict

from scaleodm.common import tenants
from scaleodm.common.domain.status import TaskState
from scaleodm.common.store.s3 import S3Url
from scaleodm.gateway import deps, models, openapi, tiles
from scaleodm.gateway.deps import CallerDep, CallerRequired, Resources, ResourcesDep
from scaleodm.gateway.responses import JsonResponse

router = APIRouter(tags=["tiles"], dependencies=[CallerRequired])

TILE_CACHE_CONTROL = "private, max-age=86400"
TILEJSON_CACHE_CONTROL = "private, max-age=300"
NO_STORE = "no-store"
NOT_COMPLETED = "Task not completed"

LayerQuery = Annotated[tiles.TileLayer, Query(
    description="The raster: `orthophoto` (its colours, alpha as transparency), `dsm` or `dtm` "
    "(colour-mapped, viridis, from the raster's minimum to its maximum).")]


# GET /task/{uuid}/tilejson.json
class TileJsonPublic(TypedDict):
    tilejson: str
    name: str
    tiles: list[str]
    scheme: str
    minzoom: int
    maxzoom: int
    bounds: list[float]
    center: list[float]


_MAP_ERRORS: openapi.Responses = {
    404: {
        "model": models.ErrorResponse,
        "description": "Task not completed, no such raster, a tile off the grid or beyond "
        "`maxzoom` (`{\"error\"}`); or an unknown route, as Express answers it.",
        "content": openapi.NOT_FOUND_HTML[404]["content"],
    },
    503: {
        "model": models.ErrorResponse,
        "description": "The raster cannot be read from S3 now; retry later (`{\"error\"}`).",
    },
}
TILE_RESPONSES: openapi.Responses = {
    200: {
        "model": models.ErrorResponse,
        "description": "A 256×256 PNG (Web Mercator); fully transparent outside the raster. "
        "Or a NodeODM error as HTTP 200 JSON (`<uuid> not found`, the token's, an invalid "
        "parameter: nodeodm-api §1.1).",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    },
    **_MAP_ERRORS,
}
TILEJSON_RESPONSES: openapi.Responses = {
    **openapi.ok(TileJsonPublic, "TileJSON 3.0.0 of the layer."),
    **_MAP_ERRORS,
}


async def get_tile_service(request: Request, res: ResourcesDep) -> tiles.TileService:
    """The process's tile renderer, made on first use (most gateways never serve a tile)."""
    service: tiles.TileService | None = getattr(request.app.state, "tiles", None)
    if service is None:
        service = request.app.state.tiles = tiles.TileService(res.settings)
    return service


async def _raster(res: Resources, service: tiles.TileService, uuid: str,
                  caller: tenants.Tenant, layer: tiles.TileLayer
                  ) -> tuple[dict[str, Any], S3Url, tiles.RasterInfo] | Response:
    """The task's document, its raster's object and metadata; or the error to answer."""
    doc = await deps.task_or_not_found(res, uuid, caller)  # NodeODM's, as any task route
    if doc["state"] != TaskState.COMPLETED.value or not doc.get("output_prefix"):
        return _map_error(404, NOT_COMPLETED)
    url = tiles.raster_url(doc["output_prefix"], layer)
    try:
        info = await service.info(res.s3, doc["_id"], int(doc.get("attempt", 1)), layer, url)
    except tiles.RasterAbsent:
        return _map_error(404, f"Task has no {layer.value}")
    except tiles.RasterUnreadable:
        return _map_error(404, f"The {layer.value} cannot be read as a raster")
    except tiles.RasterUnavailable:
        return _map_error(503, "Storage unavailable, please retry later")
    return doc, url, info


def _map_error(status: int, error: str) -> Response:
    return JsonResponse({"error": error}, status_code=status,
                        headers={"Cache-Control": NO_STORE})


TileServiceDep = Annotated[tiles.TileService, Depends(get_tile_service)]


@router.get("/task/{uuid}/tiles/{z}/{x}/{y}.png", operation_id="tiles-read_tile",
            response_model=None, responses=TILE_RESPONSES)
async def read_tile(uuid: str, z: int, x: int, y: int, res: ResourcesDep, caller: CallerDep,
                    service: TileServiceDep, layer: LayerQuery = tiles.TileLayer.ORTHOPHOTO
                    ) -> Response:
    """A 256×256 Web Mercator PNG tile of a completed task's orthophoto, DSM or DTM."""
    found = await _raster(res, service, uuid, caller, layer)
    if isinstance(found, Response):
        return found
    doc, url, info = found
    if not tiles.tile_in_grid(z, x, y) or z > info.maxzoom or z < info.floor_zoom:
        return _map_error(404, f"No tile {z}/{x}/{y} (zoom {info.minzoom}-{info.maxzoom})")
    key = tiles.TileKey(doc["_id"], int(doc.get("attempt", 1)), layer, z, x, y)
    try:
        png = await service.tile(key, url, info, caller.name)
    except tiles.RasterUnreadable:
        return _map_error(404, f"The {layer.value} cannot be read as a raster")
    except tiles.RasterUnavailable:
        return _map_error(503, "Storage unavailable, please retry later")
    return Response(png, media_type="image/png",
                    headers={"Cache-Control": TILE_CACHE_CONTROL})


@router.get("/task/{uuid}/tilejson.json", operation_id="tiles-read_tilejson",
            response_model=None, responses=TILEJSON_RESPONSES)
async def read_tilejson(uuid: str, request: Request, res: ResourcesDep, caller: CallerDep,
                        service: TileServiceDep, layer: LayerQuery = tiles.TileLayer.ORTHOPHOTO
                        ) -> Response:
    """TileJSON 3.0.0 of a completed task's layer: the tile URL (with the caller's ``token``
    when it sent one), bounds in WGS84, center and zoom range."""
    found = await _raster(res, service, uuid, caller, layer)
    if isinstance(found, Response):
        return found
    doc, _, info = found
    # ``attempt`` is not read by the tile route: it makes each attempt's tiles other URLs, so a
    # browser's day-long cache never shows a restarted task's old tiles.
    query = {"layer": layer.value, "attempt": str(doc["attempt"])}
    token = request.query_params.get("token")
    if token is not None:
        query["token"] = token  # a map client repeats the URL as it is: it must authenticate
    base = str(request.base_url).rstrip("/")
    tiles_url = f"{base}/task/{doc['_id']}/tiles/{{z}}/{{x}}/{{y}}.png?{urlencode(query)}"
    name = f"{doc.get('name') or doc['_id']} ({layer.value})"
    return JsonResponse(tiles.tilejson(tiles_url=tiles_url, name=name, info=info),
                        headers={"Cache-Control": TILEJSON_CACHE_CONTROL})
