"""The results step of a run: Cloud-Optimized GeoTIFFs and a STAC Item, after ODM, before upload.

Runs unless the task said ``skipPostProcessing`` (as ODM's own post-processing), in the run's
process (local runs) or its upload container (Argo), on the project folder ODM left:

- each of the orthophoto, DSM and DTM (``stac.RASTERS``) that exists becomes a COG **in place**
  (same path, so ``all.zip``, NodeODM clients and ODM's own layout are unchanged), written by
  rio-cogeo next to it and moved over it, then checked with rio-cogeo's validator. A file that
  already is a valid COG (ODM run with ``--cog``) is kept as it is. Deflate, with the predictor
  that suits the data type; overviews averaged (images) or nearest (elevations, so no invented
  heights at edges); nodata and alpha carried over as rio-cogeo does.
- ``stac.json``: the task's STAC Item (``scaleodm.common.stac``): bbox and geometry from the
  rasters' WGS84 bounds, datetime from the images' EXIF ``DateTimeOriginal`` (their span when
  they differ; taken as UTC, as EXIF carries no zone) or else the time of this step, one asset
  per raster with media type, roles and ``proj:`` fields.

A raster that cannot be converted or read is logged and left out of the Item, the run goes on
(the outputs are still the ones ODM made): this step adds to ODM's results, it never costs them.

Library: rio-cogeo (COG creation and validation, on rasterio/GDAL). rasterio also reads the
JPEGs' EXIF (GDAL's JPEG driver exposes it as ``EXIF_*`` tags), so no EXIF library is added.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import warnings
from pathlib import Path

import rasterio
import rasterio.errors
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from rio_cogeo.cogeo import cog_translate, cog_validate
from rio_cogeo.profiles import cog_profiles

from scaleodm.common import stac
from scaleodm.common.logging import get_logger

log = get_logger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".tif", ".tiff")
MAX_IMAGES_READ = 5000  # EXIF is read from at most this many images (headers only)
EXIF_TIME = "%Y:%m:%d %H:%M:%S"
# GDAL's block cache defaults to 5 % of the machine's memory, not of the container's: an Argo
# upload container (1 GiB limit) on a large node would be killed. The intermediate file of
# cog_translate goes beside the raster (the workspace volume), not to /tmp (ephemeral storage).
GDAL_CONFIG = {"GDAL_CACHEMAX": 256 * 1024 * 1024}  # bytes (rasterio sets it as a number)
# The only GDAL drivers that open anything here. The images are the user's, and so may be the
# rasters (a ``seed.zip`` puts files anywhere in the project but images/, and ODM options can
# keep ODM from overwriting them): left to probe every driver, GDAL follows a VRT's sources
# (local files, /vsis3/ with the run's credentials, /vsicurl/), fetches a WMS/WMTS
# description's URLs (a request from the run past the outbound guard), and so on.
RASTER_DRIVER = "GTiff"
IMAGE_DRIVERS = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "GTiff", ".tiff": "GTiff"}


def make_results(project: Path, *, task_id: str, title: str) -> list[Path]:
    """Convert the rasters and write ``stac.json``; returns the files to ship (the Item)."""
    rasters = []
    for key, (rel, _, _) in stac.RASTERS.items():
        path = project / rel
        if path.is_symlink() or not path.is_file():
            continue  # a link is never followed (nor shipped: packaging.collect)
        try:
            rasters.append(_as_cog(key, path))
        except Exception as exc:  # noqa: BLE001 - one bad raster must not cost the run
            log.error("raster left out of the results", raster=rel, error=repr(exc))
    start, end = image_times(project / "images")
    if start is None:
        start = end = dt.datetime.now(dt.UTC)
    item = stac.build_item(
        task_id, title=title, start=start, end=end, rasters=rasters, archive=True
    )
    target = project / stac.ITEM_FILE
    target.unlink(missing_ok=True)  # whatever was there (a link) is replaced, never written to
    target.write_text(json.dumps(item, indent=1, allow_nan=False))
    log.info("results made", rasters=[r.key for r in rasters],
             cogs=sum(r.cog for r in rasters))
    return [target]


def _as_cog(key: str, path: Path) -> stac.Raster:
    with rasterio.open(path, driver=RASTER_DRIVER):
        pass  # a GeoTIFF, or an error: only then do rio-cogeo's own opens see the file
    valid, _, _ = cog_validate(str(path), quiet=True)
    if not valid:
        _translate(path)
        valid, errors, _ = cog_validate(str(path), quiet=True)
        if not valid:
            log.error("COG not valid after conversion", raster=path.name, errors=errors)
    return _describe(key, path, cog=valid)


def _translate(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.cog")
    try:
        with rasterio.open(path, driver=RASTER_DRIVER) as src:
            floating = src.dtypes[0].startswith("float")
            profile = dict(cog_profiles["deflate"])
            profile.update(predictor=3 if floating else 2)
            tmp.unlink(missing_ok=True)
            cog_translate(
                src, str(tmp), profile, quiet=True, in_memory=False,
                overview_resampling="nearest" if floating else "average", config=GDAL_CONFIG,
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _describe(key: str, path: Path, *, cog: bool) -> stac.Raster:
    with rasterio.open(path, driver=RASTER_DRIVER) as src:
        crs: CRS = src.crs
        native = tuple(src.bounds)
        west, south, east, north = transform_bounds(crs, "EPSG:4326", *native, densify_pts=21)
        if not all(math.isfinite(v) for v in (*native, west, south, east, north)):
            raise ValueError("raster bounds are not finite")
        epsg = crs.to_epsg()
        return stac.Raster(
            key=key, cog=cog, bbox=(west, south, east, north), shape=(src.height, src.width),
            transform=tuple(src.transform)[:6], native_bbox=(native[0], native[1], native[2],
                                                               native[3]),
            code=f"EPSG:{epsg}" if epsg is not None else None,
            wkt2=None if epsg is not None else crs.to_wkt(version="WKT2_2019"),
        )


def image_times(images: Path) -> tuple[dt.datetime | None, dt.datetime | None]:
    """The earliest and latest EXIF ``DateTimeOriginal`` of the images (None, None: none)."""
    if not images.is_dir():
        return None, None
    times: list[dt.datetime] = []
    paths = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in paths[:MAX_IMAGES_READ]:
        found = _exif_time(path)
        if found is not None:
            times.append(found)
    if not times:
        return None, None
    return min(times), max(times)


def _exif_time(path: Path) -> dt.datetime | None:
    try:
        with warnings.catch_warnings(), rasterio.Env(GDAL_PAM_ENABLED="NO"):
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path, driver=IMAGE_DRIVERS[path.suffix.lower()]) as src:
                tags = src.tags()
    except Exception:  # noqa: BLE001 - not an image GDAL reads: no time from it
        return None
    raw = tags.get("EXIF_DateTimeOriginal") or tags.get("EXIF_DateTime")
    if not raw:
        return None
    try:
        return dt.datetime.strptime(raw.strip("\x00 ")[:19], EXIF_TIME).replace(tzinfo=dt.UTC)
    except ValueError:
        return None
