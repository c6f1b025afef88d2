"""A task's STAC Item (STAC 1.1, projection extension v2): one builder for the run and the gateway.

The run's results step (``scaleodm.run.results``) knows the rasters — it has just written them —
and stores the Item as ``stac.json`` beside the outputs, its asset hrefs relative to the output
folder (``./odm_orthophoto/odm_orthophoto.tif``). The gateway serves that Item with every href
made absolute (``with_hrefs``); for a task without one (not finished, skipPostProcessing, no
rasters, a run from before this step) it builds the bare Item from the task document with the
same function here: geometry null, no assets — still a valid Item.

Geometry: the WGS84 bounding box of the orthophoto (else the DSM, else the DTM) as a polygon;
``bbox`` the same. A footprint traced along the valid pixels would be tighter; the box is what
search by ``bbox`` needs and what every raster has.

Library: pystac (the STAC reference implementation in Python) builds the Item, so field names,
extension URIs and the serialisation are pystac's, not ours.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pystac
from pystac.extensions.projection import ProjectionExtension

COG_MEDIA_TYPE = pystac.MediaType.COG  # image/tiff; application=geotiff; profile=cloud-optimized
GEOTIFF_MEDIA_TYPE = pystac.MediaType.GEOTIFF
ITEM_FILE = "stac.json"  # beside the outputs, and in all.zip

# Each raster a run may leave: STAC asset key -> (path in ODM's layout, roles, title).
RASTERS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "orthophoto": ("odm_orthophoto/odm_orthophoto.tif", ("data", "visual"), "Orthophoto"),
    "dsm": ("odm_dem/dsm.tif", ("data", "elevation"), "Digital surface model"),
    "dtm": ("odm_dem/dtm.tif", ("data", "elevation"), "Digital terrain model"),
}
# The single files the gateway serves besides all.zip (the Item's asset hrefs): download name ->
# path in the outputs.
DOWNLOADS = {f"{key}.tif": path for key, (path, _, _) in RASTERS.items()}

Bbox = tuple[float, float, float, float]


@dataclass(frozen=True)
class Raster:
    """What the Item says of one raster output (all read from the file by the run)."""

    key: str  # a key of RASTERS
    cog: bool  # passed rio-cogeo's validation
    bbox: Bbox  # WGS84 (west, south, east, north)
    shape: tuple[int, int]  # rows, columns
    transform: tuple[float, ...]  # the affine's first six coefficients (a, b, c, d, e, f)
    native_bbox: Bbox  # in the raster's own CRS
    code: str | None  # "EPSG:32633", when the CRS has an authority code
    wkt2: str | None  # otherwise the CRS as WKT2


def polygon(bbox: Bbox) -> dict[str, Any]:
    west, south, east, north = bbox
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {"type": "Polygon", "coordinates": [ring]}


def build_item(
    task_id: str,
    *,
    title: str,
    start: dt.datetime,
    end: dt.datetime | None = None,
    rasters: Sequence[Raster] = (),
    archive: bool = False,
) -> dict[str, Any]:
    """The Item as a dict; ``start``..``end`` when the images span time, else ``start``.

    Hrefs are relative to the output folder; ``with_hrefs`` makes them absolute.
    """
    by_key = {r.key: r for r in rasters}
    footprint = next((by_key[k] for k in RASTERS if k in by_key), None)
    bbox = list(footprint.bbox) if footprint is not None else None
    item = pystac.Item(
        id=task_id,
        geometry=polygon(footprint.bbox) if footprint is not None else None,
        bbox=bbox,
        datetime=start if end is None or end == start else None,
        start_datetime=start if end is not None and end != start else None,
        end_datetime=end if end is not None and end != start else None,
        properties={"title": title},
    )
    if rasters:
        ProjectionExtension.add_to(item)
    for raster in rasters:
        path, roles, label = RASTERS[raster.key]
        asset = pystac.Asset(
            href=f"./{path}", title=label, roles=list(roles),
            media_type=COG_MEDIA_TYPE if raster.cog else GEOTIFF_MEDIA_TYPE,
        )
        item.add_asset(raster.key, asset)
        proj = ProjectionExtension.ext(asset)
        proj.apply(
            code=raster.code, wkt2=raster.wkt2 if raster.code is None else None,
            shape=list(raster.shape), transform=list(raster.transform),
            bbox=list(raster.native_bbox),
        )
    if archive:
        item.add_asset("archive", pystac.Asset(
            href="./all.zip", title="All outputs", roles=["archive"], media_type="application/zip",
        ))
    return item.to_dict(include_self_link=False, transform_hrefs=False)


def with_hrefs(item: dict[str, Any], *, task_url: str, self_url: str) -> dict[str, Any]:
    """``item`` with each asset's relative href as the gateway's download URL of that asset
    (``<task_url>/download/<name>``) and a self link; an href that names no served download is
    dropped with its asset (nothing points into the bucket)."""
    served = {path: name for name, path in DOWNLOADS.items()} | {"all.zip": "all.zip"}
    assets = {}
    for key, asset in (item.get("assets") or {}).items():
        href = str(asset.get("href", "")).removeprefix("./")
        if href in served:
            assets[key] = {**asset, "href": f"{task_url}/download/{served[href]}"}
    links = [link for link in item.get("links", []) if link.get("rel") != "self"]
    links.append({"rel": "self", "href": self_url, "type": pystac.MediaType.GEOJSON})
    return {**item, "assets": assets, "links": links}


def intersects(item: dict[str, Any], bbox: Bbox) -> bool:
    """Whether the Item's bbox meets ``bbox`` (an Item without one meets none)."""
    own = item.get("bbox")
    if not own or len(own) != 4:
        return False
    west, south, east, north = bbox
    return not (own[2] < west or own[0] > east or own[3] < south or own[1] > north)


def time_span(item: dict[str, Any]) -> tuple[dt.datetime, dt.datetime]:
    """The Item's instant or interval, as aware datetimes."""
    props = item["properties"]
    start = props.get("start_datetime") or props["datetime"]
    end = props.get("end_datetime") or props["datetime"]
    return _parse(start), _parse(end)


def _parse(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
