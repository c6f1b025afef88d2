"""Map tiles: ``GET /task/{uuid}/tiles/{z}/{x}/{y}.png`` of a large orthophoto, against rendering
the same tiles with rio-tiler directly, without HTTP.

One task is run to completion by the stack (gateway, scheduler, watcher; the ODM test double),
then its orthophoto in S3 is replaced by a ``--tiles-size``² RGBA Cloud-Optimized GeoTIFF (UTM
32N, 5 cm pixels, deflate, internal overviews; made with rio-cogeo's ``cog_translate`` from a
generated image with a round footprint) before any tile of it is read. The tiles are those of the
raster's native zoom and the one above it (every tile that intersects it, shuffled with a fixed
seed). Two gateway processes serve them from the same database: ``cached`` (a tile cache big
enough for all of them, warmed by one pass) and ``uncached`` (``SCALEODM_TILES__CACHE_BYTES=0``:
every request renders: ``/vsis3/`` range reads, reprojection, PNG). ``--tiles-requests``
requests per level, by 1 and by 10 concurrent map clients (one HTTP connection each, tiles in
turn). The direct side renders the same tiles in this process with the gateway's own
``render_tile`` and GDAL settings (rio-tiler ``Reader`` on the same ``/vsis3/`` object), 1 and 10
threads. Figures, per level:

- ``tile_uncached_p50_ms@N``, ``tile_uncached_p95_ms@N``, ``tile_cached_p50_ms@N``,
  ``tile_cached_p95_ms@N``, ``direct_p50_ms@N``, ``direct_p95_ms@N``;
- ``uncached_vs_direct_p50@N`` (what HTTP, the task lookup and the thread hop add; 1.0: nothing)
  and ``tiles_uncached_per_s@N``.

Details: tile sizes, the cache counters from ``/metrics`` (the cached runs are all hits), the
gateways' worker threads, CPU shares. moto serves S3 as its own process; on 2 cores the client,
the gateway and moto share the CPU.

    uv run python -m bench.tiles [--quick] [--tiles-size 4096] [--tiles-requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import morecantile
import numpy
import rasterio
from prometheus_client.parser import text_string_to_metric_families
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin
from rio_cogeo.cogeo import cog_translate
from rio_cogeo.profiles import cog_profiles

from bench.common import BenchEnv, CpuWindow, Figure, percentile, standalone, wait_final
from scaleodm.common.settings import S3Settings, TilesSettings
from scaleodm.gateway import tiles
from tests.harness import data

NAME = "tiles"
DATABASE = "tiles"
QUICK: dict[str, Any] = {"tiles_size": 1024, "tiles_requests": 40}
LEVELS = (1, 10)
TMS = morecantile.tms.get("WebMercatorQuad")
PIXEL_M = 0.05
CACHE_BYTES = 512 * 1024 * 1024  # the cached gateway keeps every tile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tiles")
    group.add_argument("--tiles-size", type=int, default=4096,
                       help="pixels a side of the orthophoto COG (default 4096)")
    group.add_argument("--tiles-requests", type=int, default=200,
                       help="requests per measured run (default 200)")


def make_cog(path: Path, size: int) -> None:
    """An RGBA COG of ``size``² pixels in UTM 32N: smooth colours with a little noise (a photo
    compresses about so), transparent outside a disc (ODM's collar)."""
    yy, xx = numpy.mgrid[0:size, 0:size].astype(numpy.float32) / size
    rng = numpy.random.default_rng(15)
    noise = rng.integers(0, 12, (3, size, size), dtype=numpy.uint8)
    rgba = numpy.empty((4, size, size), dtype=numpy.uint8)
    rgba[0] = 110 + 60 * numpy.sin(xx * 23) * numpy.cos(yy * 17)
    rgba[1] = 130 + 50 * numpy.cos(xx * 11 + yy * 7)
    rgba[2] = 70 + 40 * numpy.sin(yy * 31)
    rgba[:3] += noise
    rgba[3] = numpy.where((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.23, 255, 0)
    del yy, xx, noise
    plain = path.with_suffix(".plain.tif")
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 4, "dtype": "uint8",
               "crs": "EPSG:32632", "transform": from_origin(500_000, 5_000_000, PIXEL_M, PIXEL_M),
               "tiled": True, "blockxsize": 512, "blockysize": 512, "photometric": "RGB"}
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(rgba)
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue,
                           ColorInterp.alpha]
    with rasterio.open(plain) as src:
        cog_translate(src, str(path), cog_profiles.get("deflate"), quiet=True)
    plain.unlink()


def tile_list(bounds: tuple[float, float, float, float], native: int) -> list[morecantile.Tile]:
    """Every tile of zooms ``native - 1`` and ``native`` over ``bounds``, shuffled."""
    found = [t for z in (native - 1, native) for t in TMS.tiles(*bounds, zooms=[z])]
    random.Random(15).shuffle(found)
    return found


async def _complete_a_task(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        files = [("images", (name, data.JPEG, "image/jpeg")) for name in data.image_names(3)]
        resp = await client.post("/task/new", files=files)
        task = str(resp.json()["uuid"])
        done = await wait_final(client, url, task, time.perf_counter(), 120)
        if done.info.get("status", {}).get("code") != 40:
            raise RuntimeError(f"the task did not complete: {done.info}")
        return {"uuid": task}


async def _clients(url: str, paths: list[str], level: int, requests: int
                   ) -> tuple[list[float], int, float]:
    """``level`` map clients sharing ``requests`` GETs of ``paths`` (each client its own
    connection, its tiles in turn): latencies (s), errors, wall time."""
    latencies: list[float] = []
    errors = 0

    async def client(n: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     limits=httpx.Limits(max_connections=1)) as http:
            for i in range(n, requests, level):
                started = time.perf_counter()
                resp = await http.get(paths[i % len(paths)])
                body = resp.content
                latencies.append(time.perf_counter() - started)
                if resp.status_code != 200 or not body.startswith(b"\x89PNG"):
                    errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(level)))
    return latencies, errors, time.perf_counter() - started


def _direct(render: Callable[[morecantile.Tile], bytes | None], tiles_: list[morecantile.Tile],
            level: int, requests: int) -> tuple[list[float], float]:
    """The same renders in ``level`` threads of this process: latencies (s), wall time."""
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(n, requests, level):
            started = time.perf_counter()
            render(tiles_[i % len(tiles_)])
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(level)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - started


def _tile_counts(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {sample.labels["source"]: sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == "scaleodm_tiles_total" and sample.labels.get("layer") == "orthophoto"}


def _ms(values: list[float], pct: float) -> float:
    return percentile(values, pct) * 1000


async def measure(env: BenchEnv, args: argparse.Namespace) -> list[Figure]:
    size, requests = int(args.tiles_size), int(args.tiles_requests)
    cached = env.stack(DATABASE, {"SCALEODM_TILES__CACHE_BYTES": str(CACHE_BYTES),
                                  "SCALEODM_TEST_ENGINE_SECONDS": "1"})
    uncached = env.stack(DATABASE, {"SCALEODM_TILES__CACHE_BYTES": "0"})
    uncached.tmp = uncached.tmp.parent / f"{DATABASE}-uncached"
    uncached.tmp.mkdir(parents=True, exist_ok=True)
    s3 = S3Settings(endpoint_url=env.s3.url, access_key_id=env.s3.access_key,
                    secret_access_key=env.s3.secret_key, region=env.s3.region)
    figures: list[Figure] = []
    try:
        cached.start_all("gateway", "scheduler", "watcher")
        uncached.start("gateway")
        task = (await _complete_a_task(cached.gateway_url))["uuid"]
        cog = env.tmp / "orthophoto-cog.tif"
        started = time.perf_counter()
        make_cog(cog, size)
        cog_s = time.perf_counter() - started
        key = f"tasks/{task}/outputs/{tiles.TileLayer.ORTHOPHOTO.key}"
        boto3.client("s3", endpoint_url=env.s3.url, aws_access_key_id=env.s3.access_key,
                     aws_secret_access_key=env.s3.secret_key, region_name=env.s3.region
                     ).upload_file(str(cog), cached.bucket, key)
        path = tiles.vsis3_path(tiles.raster_url(f"s3://{cached.bucket}/tasks/{task}/outputs/",
                                                 tiles.TileLayer.ORTHOPHOTO))
        options, session = tiles.gdal_options(s3), tiles.aws_session(s3)

        def in_env(work: Callable[..., Any], *a: Any) -> Any:
            with rasterio.Env(session=session, **options):
                return work(*a)

        info: tiles.RasterInfo = in_env(tiles.read_info, path, tiles.TileLayer.ORTHOPHOTO, 2)
        tiles_ = tile_list(info.bounds, info.native_zoom)
        paths = [f"/task/{task}/tiles/{t.z}/{t.x}/{t.y}.png" for t in tiles_]
        detail: dict[str, Any] = {
            "cog_pixels": size, "cog_bytes": cog.stat().st_size, "cog_make_s": round(cog_s, 1),
            "zooms": [info.native_zoom - 1, info.native_zoom], "tiles": len(tiles_),
            "requests": requests, "worker_threads": TilesSettings().worker_threads,
            "what": "GET of a tile (status and PNG checked), one connection per client"}

        # Warm both gateways' metadata (and the cached one's tiles, with one pass over them).
        await _clients(uncached.gateway_url, paths[:1], 1, 1)
        await _clients(cached.gateway_url, paths, 4, len(paths))
        sizes = [len(httpx.get(cached.gateway_url + p, timeout=60).content) for p in paths[:20]]
        detail["png_bytes_median"] = sorted(sizes)[len(sizes) // 2]
        for level in LEVELS:
            gw_pids = {"gateway": uncached.procs["gateway"].pid, "s3": env.s3.pid,
                       "client": None}
            cpu = CpuWindow(gw_pids)
            cpu.start()
            lat_u, err_u, wall_u = await _clients(uncached.gateway_url, paths, level, requests)
            cpu_u = cpu.stop()
            before = _tile_counts(cached.gateway_url)
            lat_c, err_c, _ = await _clients(cached.gateway_url, paths, level, requests)
            after = _tile_counts(cached.gateway_url)
            hits = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            lat_d, wall_d = await asyncio.to_thread(
                _direct, lambda t: in_env(tiles.render_tile, path, info, t.z, t.x, t.y),
                tiles_, level, requests)
            d_u = {**detail, "errors": err_u, **cpu_u}
            figures += [
                Figure(NAME, f"tile_uncached_p50_ms@{level}", _ms(lat_u, 50), "ms", None, d_u),
                Figure(NAME, f"tile_uncached_p95_ms@{level}", _ms(lat_u, 95), "ms", None, d_u),
                Figure(NAME, f"tiles_uncached_per_s@{level}", len(lat_u) / wall_u, "tiles/s",
                       None, d_u),
                Figure(NAME, f"tile_cached_p50_ms@{level}", _ms(lat_c, 50), "ms", None,
                       {**detail, "errors": err_c, "tile_counts_delta": hits}),
                Figure(NAME, f"tile_cached_p95_ms@{level}", _ms(lat_c, 95), "ms", None,
                       {**detail, "errors": err_c, "tile_counts_delta": hits}),
                Figure(NAME, f"direct_p50_ms@{level}", _ms(lat_d, 50), "ms", None,
                       {**detail, "direct_per_s": round(len(lat_d) / wall_d, 1),
                        "what": "tiles.render_tile in threads of the bench, same GDAL env"}),
                Figure(NAME, f"direct_p95_ms@{level}", _ms(lat_d, 95), "ms", None, detail),
                Figure(NAME, f"uncached_vs_direct_p50@{level}",
                       _ms(lat_u, 50) / _ms(lat_d, 50), "×", None, detail),
            ]
    finally:
        uncached.stop()
        cached.stop()
    return figures


if __name__ == "__main__":
    sys.exit(standalone(NAME, measure, add_arguments, QUICK))
