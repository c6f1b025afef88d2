"""STAC: a task's Item, and an items search over the caller's completed tasks.

``GET /task/{uuid}/stac`` answers every task the caller may see (``stacitems``: the run's Item
once completed, the bare one before); an unknown uuid, or another tenant's, answers NodeODM's
``<uuid> not found`` as every ``/task/{uuid}/...`` route does.

``GET /stac/search`` is the item search of the STAC API (``bbox``, ``datetime``, ``limit``; no
``intersects``, ``ids``, ``collections``, paging nor POST: a full STAC API is out of scope): the
caller's completed tasks (an admin's: everyone's), newest first, whose Item meets ``bbox``
(``west,south,east,north`` in WGS84; west > east crosses the antimeridian) and ``datetime`` (an
RFC 3339 instant or interval, ``..`` for an open end). A task without geometry meets no
``bbox``. Bad parameters answer the STAC API's way, HTTP 400 ``{"code", "description"}``.
Filtering reads each completed attempt's footprint (bbox, time) from ``stacitems``' cache: the
first search after a start reads each completed task's ``stac.json`` from S3 once (a few at a
time); later searches read from S3 only the Items of their page no longer cached. The tasks
themselves are one MongoDB query (ids, names, attempts; newest first) per search.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from scaleodm.common import stac
from scaleodm.gateway import deps, stacitems
from scaleodm.gateway.deps import CallerDep, CallerRequired, ResourcesDep
from scaleodm.gateway.responses import JsonResponse

router = APIRouter(tags=["stac"], dependencies=[CallerRequired])

GEOJSON = "application/geo+json"
MAX_LIMIT = 100
READS_AT_ONCE = 8

ITEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The task's STAC Item (STAC 1.1, projection extension), or NodeODM's "
          "`<uuid> not found` as HTTP 200 JSON.",
          "content": {GEOJSON: {"schema": {"type": "object"}},
                      "application/json": {"schema": {"type": "object"}}}},
}
SEARCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "A GeoJSON FeatureCollection of Items (STAC API item search).",
          "content": {GEOJSON: {"schema": {"type": "object"}},
                      "application/json": {"schema": {"type": "object"}}}},
    400: {"description": "A parameter is invalid: `{\"code\": \"InvalidParameterValue\", "
          "\"description\": ...}`.",
          "content": {"application/json": {"schema": {"type": "object"}}}},
}


class BadParameter(ValueError):
    """A search parameter that cannot be understood; the message tells the client why."""


def _geojson(body: dict[str, Any]) -> JsonResponse:
    return JsonResponse(body, media_type=GEOJSON)


@router.get("/task/{uuid}/stac", operation_id="stac-read_task_item", response_model=None,
            responses=ITEM_RESPONSES)
async def read_task_item(uuid: str, request: Request, res: ResourcesDep, caller: CallerDep
                         ) -> JsonResponse:
    """The task's STAC Item; asset hrefs are this gateway's downloads (add your ``?token=``)."""
    doc = await deps.task_or_not_found(res, uuid, caller)
    return _geojson(await stacitems.task_item(res.stac_items, res.s3, doc,
                                              str(request.base_url)))


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    if len(parts) != 4:
        raise BadParameter("bbox must be four numbers: west,south,east,north")
    try:
        west, south, east, north = (float(p) for p in parts)
    except ValueError:
        raise BadParameter("bbox must be four numbers: west,south,east,north") from None
    if not all(math.isfinite(v) for v in (west, south, east, north)):
        raise BadParameter("bbox values must be finite numbers")
    if not (-180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= north <= 90):
        raise BadParameter("bbox must be in WGS84 degrees with south <= north")
    return west, south, east, north


def _instant(text: str) -> dt.datetime | None:
    if text in ("", ".."):
        return None
    try:
        value = dt.datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise BadParameter(f"datetime is not RFC 3339: {text[:40]!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def parse_datetime(text: str) -> tuple[dt.datetime | None, dt.datetime | None]:
    """An instant (start = end) or an interval ``start/end`` with ``..`` or empty open."""
    if "/" not in text:
        instant = _instant(text)
        if instant is None:
            raise BadParameter("datetime must be an instant or an interval start/end")
        return instant, instant
    start_text, _, end_text = text.partition("/")
    start, end = _instant(start_text), _instant(end_text)
    if start is None and end is None:
        raise BadParameter("datetime interval must have at least one end")
    if start is not None and end is not None and start > end:
        raise BadParameter("datetime interval must not end before it starts")
    return start, end


def _meets_bbox(item: dict[str, Any], bbox: tuple[float, float, float, float]) -> bool:
    west, south, east, north = bbox
    if west <= east:
        return stac.intersects(item, bbox)
    return (stac.intersects(item, (west, south, 180.0, north))
            or stac.intersects(item, (-180.0, south, east, north)))


def _meets_time(item: dict[str, Any], start: dt.datetime | None, end: dt.datetime | None
                ) -> bool:
    try:
        first, last = stac.time_span(item)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return (end is None or first <= end) and (start is None or last >= start)


@router.get("/stac/search", operation_id="stac-search_items", response_model=None,
            responses=SEARCH_RESPONSES)
async def search_items(
    request: Request,
    res: ResourcesDep,
    caller: CallerDep,
    bbox: Annotated[str | None, Query(description="west,south,east,north (WGS84).")] = None,
    datetime: Annotated[str | None, Query(
        description="An RFC 3339 instant, or an interval start/end (`..` = open).")] = None,
    limit: Annotated[str | None, Query(description=f"Items per answer, 1 to {MAX_LIMIT} "
                                       "(default 10).")] = None,
) -> Response:
    """The caller's completed tasks' Items that meet ``bbox`` and ``datetime``, newest first."""
    try:
        box = parse_bbox(bbox) if bbox is not None else None
        start, end = parse_datetime(datetime) if datetime is not None else (None, None)
        # ASCII digits only: str.isdigit() also holds for "²", which int() refuses.
        digits = limit.strip() if limit is not None else ""
        count = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 4 else (
            10 if limit is None else -1)
        if not 1 <= count <= MAX_LIMIT:
            raise BadParameter(f"limit must be an integer from 1 to {MAX_LIMIT}")
    except BadParameter as exc:
        return JsonResponse({"code": "InvalidParameterValue", "description": str(exc)},
                            status_code=400)
    owner = None if caller.role == "admin" else caller.name
    docs = await res.store.completed_tasks(owner, caller.parent)
    gate = asyncio.Semaphore(READS_AT_ONCE)
    base = str(request.base_url)

    async def footprint_of(doc: dict[str, Any]) -> dict[str, Any]:
        async with gate:
            return await res.stac_items.footprint(res.s3, doc)

    footprints = await asyncio.gather(*(footprint_of(doc) for doc in docs))
    matched = [doc for doc, footprint in zip(docs, footprints, strict=True)
               if (box is None or _meets_bbox(footprint, box))
               and (datetime is None or _meets_time(footprint, start, end))]
    page = await asyncio.gather(*(stacitems.task_item(res.stac_items, res.s3, doc, base)
                                  for doc in matched[:count]))
    return _geojson({
        "type": "FeatureCollection",
        "features": page,
        "numberMatched": len(matched),
        "numberReturned": len(page),
        "links": [{"rel": "self", "href": str(request.url.remove_query_params("token")),
                   "type": GEOJSON}],
    })
