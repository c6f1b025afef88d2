"""Map tiles of a completed task's rasters, rendered from S3 with rio-tiler (issue 15, "tiles").

A completed task's orthophoto and DEMs (``odm_orthophoto/odm_orthophoto.tif``, ``odm_dem/dsm.tif``,
``odm_dem/dtm.tif`` under its output prefix) become 256×256 Web Mercator PNG tiles, whatever the
raster's CRS (the ODM test double writes EPSG:4326, ODM writes UTM). Design:

- **Range reads, never whole files.** GDAL opens the object as ``/vsis3/<bucket>/<key>`` and reads
  the header and the blocks a tile needs with HTTP ``Range`` GETs. A Cloud-Optimized GeoTIFF (the
  run's COG step) has overviews, so a low-zoom tile reads a small overview; a plain tiled
  GeoTIFF still works, reading more blocks at low zoom. GDAL's own block cache of ``/vsicurl``
  (process-wide, by object) spares the header reads of later tiles of the same object.
- **GDAL configured per call.** Each render enters ``rasterio.Env`` with one ``AWSSession`` (the
  gateway's S3 settings: endpoint, keys, region; path-style addressing, http for a loopback
  endpoint) and the HTTP deadlines of ``S3Settings``. In a worker thread rasterio sets these as
  GDAL *thread-local* options, so nothing of the process's environment changes.
- **Never on the event loop.** Opening, reading, reprojecting and PNG encoding run in worker
  threads (``anyio.to_thread``) limited by a ``CapacityLimiter`` of
  ``SCALEODM_TILES__WORKER_THREADS``; concurrent requests for the same tile or the same raster's
  metadata share one piece of work (single flight).
- **Bounded in time.** A render (its wait for a thread included) has the S3 request deadline
  (``request_timeout_s``); GDAL's own HTTP timeout and retries come from the same settings. A
  frozen S3 answers ``RasterUnavailable`` (HTTP 503), never a hang; the thread of a render past
  its deadline keeps its limiter token until it ends, so slow renders never pile up threads.
- **Bounded in work.** Rasters are opened by the GTiff driver only (no VRT, WMS, ... following
  references); blocks over ``MAX_BLOCK_PIXELS`` are refused; zooms where a tile would read over
  ``MAX_TILE_READ_SIDE`` pixels a side of the coarsest overview are not served (``floor_zoom``).
- **Caches.** Per raster (task, attempt, layer): bounds in WGS84, zoom range, band layout and,
  for DEMs, the value range used to colour-map (the dataset's own statistics if it has them,
  else min/max read once from a small overview). Per tile: the PNG bytes, in a byte-bounded LRU
  (``SCALEODM_TILES__CACHE_BYTES``). Only completed tasks get here, whose outputs never change;
  the attempt is in every key, so a restarted task's new outputs are new entries.
- **Layers.** ``orthophoto``: its RGB(A) bands as they are, the alpha band (or nodata, or the
  mask) as transparency. ``dsm`` and ``dtm``: band 1 rescaled from the raster's min/max and
  colour-mapped with rio-tiler's ``viridis``, nodata transparent.

Metrics: ``scaleodm_tiles_total{layer,source}`` (``cache``: answered from memory, ``rendered``:
read from S3, ``blank``: outside the raster, the constant transparent tile) and
``scaleodm_tile_render_seconds{layer}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import math
import struct
import threading
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

import anyio
import anyio.to_thread
import numpy
import rasterio  # type: ignore[import-untyped, unused-ignore]
import rasterio.errors  # type: ignore[import-untyped, unused-ignore]
from morecantile import Tile
from rasterio._err import CPLE_BaseError  # type: ignore[import-untyped, unused-ignore]
from rasterio.session import AWSSession  # type: ignore[import-untyped, unused-ignore]
from rio_tiler.colormap import cmap
from rio_tiler.constants import WEB_MERCATOR_TMS, WGS84_CRS
from rio_tiler.errors import RioTilerError, TileOutsideBounds
from rio_tiler.io import Reader

from scaleodm.common import metrics, stac, store
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import GatewaySettings, S3Settings
from scaleodm.common.store import s3 as s3store
from scaleodm.common.store.s3 import S3, S3Url
from scaleodm.gateway.cached import BoundedLRU

log = get_logger(__name__)

TILE_SIZE = 256
COLORMAP = "viridis"
# Zoom levels of the Web Mercator grid (WebMercatorQuad: 0-24); a z beyond it is no tile.
TMS_MAXZOOM: int = WEB_MERCATOR_TMS.maxzoom
METADATA_ENTRIES = 4096  # rasters whose metadata a process remembers
STATS_MAX_SIZE = 256  # longest side of the overview read once for a DEM's min/max
RASTER_DRIVER = "GTiff"  # the only GDAL driver that opens a raster object (a COG is a GTiff)
MAX_BLOCK_PIXELS = 4096 * 4096  # a larger block (tile or strip) is refused: unreadable
MAX_TILE_READ_SIDE = 4096  # pixels a side one tile may read from the raster or an overview



class TileLayer(enum.StrEnum):
    """The rasters a completed task's tiles show."""

    ORTHOPHOTO = "orthophoto"
    DSM = "dsm"
    DTM = "dtm"

    @property
    def key(self) -> str:
        """The raster's path under the task's output prefix (ODM's layout)."""
        return stac.RASTERS[self.value][0]

    @property
    def colour_mapped(self) -> bool:
        return self is not TileLayer.ORTHOPHOTO


class RasterAbsent(Exception):
    """The task has no such raster (its run wrote none); HTTP 404."""


class RasterUnreadable(Exception):
    """The object is there, but GDAL cannot read it as a raster; HTTP 404."""


class RasterUnavailable(Exception):
    """S3 did not answer in time, or failed; a retry may succeed. HTTP 503."""


@dataclass(frozen=True)
class RasterInfo:
    """What tiles and TileJSON need of one raster, read once."""

    bounds: tuple[float, float, float, float]  # west, south, east, north in WGS84 degrees
    minzoom: int
    native_zoom: int  # the zoom whose resolution is closest to the raster's
    maxzoom: int  # native_zoom + max_zoom_over_native, within the grid
    indexes: tuple[int, ...]  # bands rendered: RGB, or one (grey, or a DEM's values)
    value_range: tuple[float, float] | None  # DEMs: what the colour map spans
    # Below this zoom a tile would read too much of the raster (no overviews coarse enough):
    # no tile (404).
    floor_zoom: int = 0


class TileKey(NamedTuple):
    task_id: str
    attempt: int
    layer: TileLayer
    z: int
    x: int
    y: int


# ----------------------------------------------------------------------------- pure helpers


def tile_in_grid(z: int, x: int, y: int) -> bool:
    """Whether (z, x, y) names a tile of the Web Mercator grid (0 <= x, y < 2**z)."""
    if not 0 <= z <= TMS_MAXZOOM:  # first: 2**z of a fuzzed z would be huge
        return False
    side = 1 << z
    return 0 <= x < side and 0 <= y < side


def tile_may_intersect(bounds: tuple[float, float, float, float], z: int, x: int, y: int
                       ) -> bool:
    """Whether tile (z, x, y) may show part of a raster of WGS84 ``bounds``: False only when it
    surely lies outside them (a raster across the antimeridian is never ruled out)."""
    west, south, east, north = bounds
    if west > east:
        return True
    tile = WEB_MERCATOR_TMS.bounds(Tile(x, y, z))
    return (tile.left < east and tile.right > west
            and tile.bottom < north and tile.top > south)


def gdal_options(s3: S3Settings) -> dict[str, Any]:
    """GDAL configuration for ``/vsis3/`` reads with the gateway's S3 settings (the credentials
    come from the ``AWSSession``, see :func:`aws_session`)."""
    options: dict[str, Any] = {
        # Path-style addressing, as the S3 facade (store/s3.py) uses: MinIO, moto and dotted
        # bucket names need it.
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "AWS_REGION": s3.region,
        # Open the object alone: no listing of its "directory" looking for sidecar files.
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff",
        "VSI_CACHE": "TRUE",
        # A COG's header and its first IFDs in the first GET.
        "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        # One HTTP request's deadline and retries, as the S3 facade's (whole seconds for GDAL).
        "GDAL_HTTP_TIMEOUT": str(max(1, math.ceil(s3.request_timeout_s))),
        "GDAL_HTTP_CONNECTTIMEOUT": str(max(1, math.ceil(s3.connect_timeout_s))),
        "GDAL_HTTP_MAX_RETRY": str(s3.max_attempts - 1),
        "GDAL_HTTP_RETRY_DELAY": "0.5",
        # No .aux.xml written next to anything, nor looked for.
        "GDAL_PAM_ENABLED": "NO",
    }
    if s3.endpoint_url:
        parts = urllib.parse.urlsplit(s3.endpoint_url)
        options["AWS_S3_ENDPOINT"] = parts.netloc
        options["AWS_HTTPS"] = "YES" if parts.scheme == "https" else "NO"
    return options


def aws_session(s3: S3Settings) -> Any:
    """rasterio's AWS session for the gateway's S3 credentials (built once: it wraps a boto3
    session; its credentials are handed to GDAL on each ``rasterio.Env``)."""
    return AWSSession(
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key.get_secret_value(),
        region_name=s3.region,
        endpoint_url=(urllib.parse.urlsplit(s3.endpoint_url).netloc
                      if s3.endpoint_url else None),
    )


def vsis3_path(url: S3Url) -> str:
    return f"/vsis3/{url.bucket}/{url.key}"


def raster_url(output_prefix: str, layer: TileLayer) -> S3Url:
    """The S3 object of ``layer`` under a task's ``output_prefix`` (``s3://bucket/prefix/``)."""
    return s3store.parse_s3_url(output_prefix).child(layer.key)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def blank_png(size: int = TILE_SIZE) -> bytes:
    """A fully transparent RGBA PNG of ``size``×``size`` pixels."""
    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)  # 8-bit RGBA
    rows = (b"\x00" + b"\x00" * 4 * size) * size  # filter byte 0, then transparent pixels
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows, 9)) + _png_chunk(b"IEND", b""))


# A tile of the grid outside the raster's bounds: the same bytes every time.
BLANK_TILE = blank_png()

V = TypeVar("V")


def tilejson(*, tiles_url: str, name: str, info: RasterInfo) -> dict[str, Any]:
    """TileJSON 3.0.0 of one raster; ``tiles_url`` is the absolute ``{z}/{x}/{y}`` template."""
    west, south, east, north = info.bounds
    return {
        "tilejson": "3.0.0",
        "name": name,
        "tiles": [tiles_url],
        "scheme": "xyz",
        "minzoom": info.minzoom,
        "maxzoom": info.maxzoom,
        "bounds": [west, south, east, north],
        "center": [(west + east) / 2, (south + north) / 2, info.minzoom],
    }


# --------------------------------------------------------------------- GDAL work (threads)

# What reading a raster may raise: rasterio's errors, GDAL's own (``CPLE_*``, e.g. from a
# warp), rio-tiler's, and ValueError (a CRS or window rasterio cannot use).
_GDAL_ERRORS = (rasterio.errors.RasterioError, CPLE_BaseError, RioTilerError, ValueError)

# Messages of GDAL errors that mean "not a raster we can read", not "S3 failed".
_UNREADABLE_MARKERS = ("not recognized as", "not a tiff", "tiffreaddirectory", "unsupported",
                       "not a valid")


def _gdal_error(exc: Exception, path: str) -> Exception:
    """A rasterio/rio-tiler failure as ``RasterUnreadable`` (the object is no raster GDAL can
    read) or ``RasterUnavailable`` (anything else: S3 failed or timed out under GDAL)."""
    text = str(exc).replace(path, "<raster>")  # no bucket/key in answers or logs
    if any(marker in text.lower() for marker in _UNREADABLE_MARKERS):
        return RasterUnreadable(text)
    return RasterUnavailable(text)


def _open(path: str) -> Any:
    """The raster at ``path``, read by GDAL's GTiff driver alone. The object is the run's, and
    the run's project may hold what the user sent (a ``seed.zip``): left to probe every driver,
    GDAL would follow a VRT's sources (other objects of the bucket with the gateway's
    credentials, local files), a WMS/WMTS description's URLs, and so on."""
    return rasterio.open(path, driver=RASTER_DRIVER)


def _check_blocks(dataset: Any) -> None:
    """Refuse a raster whose blocks are too large to decode for one tile (GDAL reads whole
    blocks: one strip of a huge untiled image would be decoded, in memory, for every tile)."""
    rows, cols = dataset.block_shapes[0]
    if rows * cols > MAX_BLOCK_PIXELS:
        raise ValueError(f"unsupported block size {cols}x{rows}")


def _cheapest_zoom(dataset: Any, native: int) -> int:
    """The lowest zoom whose tiles read at most ``MAX_TILE_READ_SIDE`` pixels a side from the
    raster's coarsest overview (or the raster itself, without overviews): below it, a tile of
    a huge raster without overviews would decode the whole raster."""
    factors = dataset.overviews(1) or [1]
    coarsest = max(1, max(factors))
    steps = int(math.floor(math.log2(coarsest))) + int(math.log2(MAX_TILE_READ_SIDE / TILE_SIZE))
    return max(0, native - steps)


def _value_range(src: Any) -> tuple[float, float]:
    """Min/max of band 1: the dataset's statistics when it carries them, else read from an
    overview of at most ``STATS_MAX_SIZE`` pixels a side (nodata left out)."""
    tags = src.dataset.tags(1)
    if "STATISTICS_MINIMUM" in tags and "STATISTICS_MAXIMUM" in tags:
        low, high = float(tags["STATISTICS_MINIMUM"]), float(tags["STATISTICS_MAXIMUM"])
    else:
        image = src.preview(indexes=(1,), max_size=STATS_MAX_SIZE)
        values = image.array.compressed()
        values = values[numpy.isfinite(values)]
        if values.size == 0:
            return 0.0, 1.0
        low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low, low + 1.0)


def _indexes(src: Any, layer: TileLayer) -> tuple[int, ...]:
    if layer.colour_mapped:
        return (1,)
    colour = [i for i, interp in zip(src.dataset.indexes, src.dataset.colorinterp, strict=True)
              if interp.name != "alpha"]
    return tuple(colour[:3]) if len(colour) >= 3 else tuple(colour[:1])


def read_info(path: str, layer: TileLayer, max_zoom_over_native: int) -> RasterInfo:
    """Open the raster at ``path`` (in a GDAL environment already entered) and describe it."""
    try:
        with _open(path) as dataset, Reader(path, dataset=dataset) as src:
            west, south, east, north = src.get_geographic_bounds(WGS84_CRS)
            native = int(src.maxzoom)
            _check_blocks(dataset)
            floor = min(_cheapest_zoom(dataset, native), native)
            return RasterInfo(
                bounds=(float(west), float(south), float(east), float(north)),
                minzoom=min(max(int(src.minzoom), floor), native),
                floor_zoom=floor,
                native_zoom=native,
                maxzoom=min(native + max_zoom_over_native, TMS_MAXZOOM),
                indexes=_indexes(src, layer),
                value_range=_value_range(src) if layer.colour_mapped else None,
            )
    except _GDAL_ERRORS as exc:
        raise _gdal_error(exc, path) from None


def render_tile(path: str, info: RasterInfo, z: int, x: int, y: int) -> bytes | None:
    """The PNG of tile (z, x, y) of the raster at ``path`` (in a GDAL environment already
    entered); None when the tile lies outside the raster."""
    try:
        with _open(path) as dataset, Reader(path, dataset=dataset) as src:
            try:
                image = src.tile(x, y, z, tilesize=TILE_SIZE, indexes=info.indexes)
            except TileOutsideBounds:
                return None
            if info.value_range is not None:
                image.rescale(in_range=(info.value_range,))
                png: bytes = image.render(img_format="PNG", colormap=cmap.get(COLORMAP))
            else:
                png = image.render(img_format="PNG")
            return png
    except _GDAL_ERRORS as exc:
        raise _gdal_error(exc, path) from None


# ------------------------------------------------------------------------------ the service


class TileService:
    """The gateway process's tile renderer: GDAL settings, worker threads, caches."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings.tiles
        self.deadline_s = settings.s3.request_timeout_s
        self._options = gdal_options(settings.s3)
        self._session = aws_session(settings.s3)
        self._limiter = anyio.CapacityLimiter(self.settings.worker_threads)
        self.tiles: BoundedLRU[TileKey, bytes] = BoundedLRU(self.settings.cache_bytes, len)
        self._infos: BoundedLRU[tuple[str, int, TileLayer], RasterInfo | RasterAbsent] = (
            BoundedLRU(METADATA_ENTRIES, lambda _: 1))
        self._inflight: dict[Hashable, asyncio.Task[Any]] = {}
        self._running: set[asyncio.Future[Any]] = set()  # GDAL work, its caller gone or not
        # Per tenant: [its renders' semaphore, callers using it] (dropped when none does).
        self._shares: dict[str, list[Any]] = {}

    @contextlib.asynccontextmanager
    async def _share_of(self, tenant: str) -> AsyncIterator[None]:
        """One of ``tenant``'s ``renders_per_tenant`` turns, waited for within the deadline:
        a tenant's many tiles queue behind each other, not in front of other tenants'."""
        share = self._shares.setdefault(
            tenant, [asyncio.Semaphore(self.settings.renders_per_tenant), 0])
        share[1] += 1
        try:
            try:
                async with asyncio.timeout(self.deadline_s):
                    await share[0].acquire()
            except TimeoutError:
                raise RasterUnavailable(
                    f"no turn to render within {self.deadline_s:g} s") from None
            try:
                yield
            finally:
                share[0].release()
        finally:
            share[1] -= 1
            if share[1] == 0:
                del self._shares[tenant]

    def _in_gdal_env(self, work: Callable[..., V], *args: Any) -> V:
        with rasterio.Env(session=self._session, **self._options):
            return work(*args)

    async def _in_thread(self, work: Callable[..., V], *args: Any) -> V:
        """``work(*args)`` in a worker thread with the GDAL environment, within the deadline
        (the wait for a thread included). The caller is answered at the deadline, but a thread
        already running keeps its place in the limiter until it ends (GDAL's own HTTP timeout
        ends a stalled read): threads are never abandoned, so at most ``worker_threads`` GDAL
        threads run whatever the requests do. Work still waiting for a thread is dropped."""
        # Cancelling ``run_sync`` would release the token at once, the thread still running:
        # only work that has not started is cancelled (``dropped``, under the lock).
        lock = threading.Lock()
        state = {"started": False, "dropped": False}

        def run() -> V | None:
            with lock:
                if state["dropped"]:
                    return None
                state["started"] = True
            return self._in_gdal_env(work, *args)

        job = asyncio.ensure_future(anyio.to_thread.run_sync(run, limiter=self._limiter))
        self._running.add(job)
        job.add_done_callback(self._job_done)
        try:
            async with asyncio.timeout(self.deadline_s):
                # None from ``run`` only when dropped, and then nobody awaits it any more.
                return cast(V, await asyncio.shield(job))
        except TimeoutError:
            with lock:
                state["dropped"] = not state["started"]
            if state["dropped"]:
                job.cancel()  # still waiting for a thread: it never runs
            raise RasterUnavailable(f"no answer from S3 within {self.deadline_s:g} s") from None

    def _job_done(self, job: asyncio.Future[Any]) -> None:
        self._running.discard(job)
        if not job.cancelled():
            job.exception()  # retrieved: the caller may have left at the deadline

    async def _once(self, key: Hashable, work: Callable[[], Awaitable[V]]) -> V:
        """``work()``, shared by every concurrent caller with the same ``key``; a caller that
        goes away does not cancel it for the others."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._settled, key))
        result: V = await asyncio.shield(task)
        return result

    def _settled(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when every caller left

    async def info(self, s3: S3, task_id: str, attempt: int, layer: TileLayer,
                   url: S3Url) -> RasterInfo:
        """The raster's metadata (cached); ``RasterAbsent``, ``RasterUnreadable`` or
        ``RasterUnavailable`` when it cannot be had."""
        key = (task_id, attempt, layer)
        cached = self._infos.get(key)
        if isinstance(cached, RasterAbsent):
            raise cached
        if cached is not None:
            return cached

        async def load() -> RasterInfo:
            try:
                # S3's own answer for "no such object": GDAL's open error would not tell a
                # missing key from an outage.
                size = await s3.size(url)
            except Exception as exc:  # S3 away (store.is_unavailable), or refusing us
                if not store.is_unavailable(exc):
                    log.warning("raster metadata not readable", task_id=task_id,
                                layer=layer.value, error=repr(exc))
                raise RasterUnavailable(f"S3: {type(exc).__name__}") from None
            if size is None:
                absent = RasterAbsent(f"the task has no {layer.value}")
                self._infos.put(key, absent)  # a completed task's outputs never change
                raise absent
            info = await self._in_thread(read_info, vsis3_path(url), layer,
                                         self.settings.max_zoom_over_native)
            self._infos.put(key, info)
            return info

        return await self._once(("info", *key), load)

    async def tile(self, key: TileKey, url: S3Url, info: RasterInfo, tenant: str) -> bytes:
        """The PNG of a tile of the grid (``key``: within ``info``'s zoom range), from the cache
        or rendered in one of ``tenant``'s turns; ``BLANK_TILE`` outside the raster."""
        if not tile_may_intersect(info.bounds, key.z, key.x, key.y):
            metrics.TILES.labels(key.layer.value, "blank").inc()
            return BLANK_TILE
        cached = self.tiles.get(key)
        if cached is not None:
            metrics.TILES.labels(key.layer.value, "cache").inc()
            return cached

        async def render() -> bytes:
            started = time.perf_counter()
            png = await self._in_thread(render_tile, vsis3_path(url), info,
                                        key.z, key.x, key.y)
            elapsed = time.perf_counter() - started
            metrics.TILE_RENDER_DURATION.labels(key.layer.value).observe(elapsed)
            if png is None:  # in the bounds' box, outside the raster
                metrics.TILES.labels(key.layer.value, "blank").inc()
                png = BLANK_TILE
            else:
                metrics.TILES.labels(key.layer.value, "rendered").inc()
            self.tiles.put(key, png)
            return png

        async with self._share_of(tenant):
            return await self._once(key, render)
