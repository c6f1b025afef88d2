"""The tile renderer's pure parts (``scaleodm.gateway.tiles``), without servers: the grid checks,
the byte-bounded LRU, GDAL's options from the S3 settings, raster keys, the blank tile, TileJSON,
and rendering from local GeoTIFFs in two CRSs (EPSG:4326 as the ODM test double writes, UTM as
ODM does).

Left out: ``/vsis3/`` reads, the routes, the caches' single flight and deadlines (integration:
``tests/integration/test_tiles.py``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import types
from pathlib import Path
from typing import Any

import morecantile
import numpy
import pytest
import rasterio
from rasterio.transform import from_origin
from rio_tiler.colormap import cmap

from scaleodm.common.settings import GatewaySettings, S3Settings
from scaleodm.common.store.s3 import S3Url
from scaleodm.gateway import tiles
from scaleodm.gateway.cached import BoundedLRU
from tests.harness import data

TMS = morecantile.tms.get("WebMercatorQuad")




@pytest.mark.parametrize(("z", "x", "y", "inside"), [
    pytest.param(0, 0, 0, True, id="the-world"),
    pytest.param(3, 7, 7, True, id="last-tile"),
    pytest.param(3, 8, 0, False, id="x-past-the-edge"),
    pytest.param(3, 0, -1, False, id="negative-y"),
    pytest.param(-1, 0, 0, False, id="negative-zoom"),
    pytest.param(25, 0, 0, False, id="beyond-the-grid"),
    pytest.param(10**12, 0, 0, False, id="huge-zoom"),
])
def test_tile_in_grid(z: int, x: int, y: int, inside: bool) -> None:
    assert tiles.tile_in_grid(z, x, y) is inside


def test_tile_may_intersect() -> None:
    bounds = (10.0, 45.0, 10.01, 45.01)
    inside = TMS.tile(10.005, 45.005, 16)
    assert tiles.tile_may_intersect(bounds, inside.z, inside.x, inside.y)
    assert not tiles.tile_may_intersect(bounds, inside.z, inside.x + 10, inside.y)
    assert tiles.tile_may_intersect(bounds, 0, 0, 0)
    # Across the antimeridian (west > east): never ruled out.
    assert tiles.tile_may_intersect((179.9, 0.0, -179.9, 0.1), 16, 0, 0)


def test_lru_is_bounded_in_bytes_and_drops_the_least_recently_used() -> None:
    cache: BoundedLRU[str, bytes] = BoundedLRU(10, len)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # "b" is now the least recently used
    cache.put("c", b"1234")
    assert (cache.get("b"), cache.get("a"), cache.get("c")) == (None, b"1234", b"1234")
    assert cache.size == 8 and len(cache) == 2
    cache.put("a", b"12")  # replaced: its size counted once
    assert cache.size == 6
    cache.put("big", b"x" * 11)  # larger than the whole bound: not kept, nothing dropped
    assert cache.get("big") is None and cache.size == 6
    off: BoundedLRU[str, bytes] = BoundedLRU(0, len)
    off.put("a", b"1")
    assert off.get("a") is None


@pytest.mark.parametrize(("endpoint", "host", "https"), [
    pytest.param("http://127.0.0.1:9000", "127.0.0.1:9000", "NO", id="moto-http"),
    pytest.param("https://minio.example:9443/", "minio.example:9443", "YES", id="minio-https"),
])
def test_gdal_options_from_the_s3_settings(endpoint: str, host: str, https: str) -> None:
    s3 = S3Settings(endpoint_url=endpoint, region="eu-west-3", request_timeout_s=2.5,
                    connect_timeout_s=0.2, max_attempts=3)
    options = tiles.gdal_options(s3)
    assert options["AWS_S3_ENDPOINT"] == host
    assert options["AWS_HTTPS"] == https
    assert options["AWS_VIRTUAL_HOSTING"] == "FALSE"
    assert options["AWS_REGION"] == "eu-west-3"
    assert options["GDAL_HTTP_TIMEOUT"] == "3"  # whole seconds, never below the setting
    assert options["GDAL_HTTP_CONNECTTIMEOUT"] == "1"
    assert options["GDAL_HTTP_MAX_RETRY"] == "2"
    assert options["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    # Credentials travel in the AWSSession, never as options (rasterio refuses them there).
    assert not any(k.startswith("AWS_ACCESS") or "SECRET" in k for k in options)
    assert "AWS_S3_ENDPOINT" not in tiles.gdal_options(S3Settings())  # AWS itself


def test_raster_url() -> None:
    url = tiles.raster_url("s3://scaleodm/tasks/abc/outputs/", tiles.TileLayer.DSM)
    assert (url.bucket, url.key) == ("scaleodm", "tasks/abc/outputs/odm_dem/dsm.tif")
    assert tiles.raster_url("s3://bkt/p", tiles.TileLayer.ORTHOPHOTO).key == \
        "p/odm_orthophoto/odm_orthophoto.tif"
    assert tiles.vsis3_path(url) == "/vsis3/scaleodm/tasks/abc/outputs/odm_dem/dsm.tif"


def test_the_blank_tile_is_a_transparent_png() -> None:
    pixels = data.png_pixels(tiles.BLANK_TILE)
    assert pixels.shape == (4, 256, 256)
    assert not pixels.any()


def test_tilejson() -> None:
    info = tiles.RasterInfo(bounds=(1.0, 2.0, 3.0, 4.0), minzoom=12, native_zoom=17,
                            maxzoom=19, indexes=(1, 2, 3), value_range=None)
    tj = tiles.tilejson(tiles_url="http://h/t/{z}/{x}/{y}.png", name="n", info=info)
    assert tj == {"tilejson": "3.0.0", "name": "n", "tiles": ["http://h/t/{z}/{x}/{y}.png"],
                  "scheme": "xyz", "minzoom": 12, "maxzoom": 19, "bounds": [1.0, 2.0, 3.0, 4.0],
                  "center": [2.0, 3.0, 12]}


def test_settings_defaults() -> None:
    settings = GatewaySettings().tiles
    assert settings.cache_bytes > 0 and settings.worker_threads >= 1
    assert settings.max_zoom_over_native >= 0


# --- rendering local rasters -------------------------------------------------------------------

SIZE = 256


def _write(path: Path, crs: str, transform: Any, bands: numpy.ndarray[Any, Any],
           **profile: Any) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=len(bands),
                       crs=crs, transform=transform, dtype=bands.dtype, tiled=True,
                       blockxsize=128, blockysize=128, **profile) as dst:
        dst.write(bands)
    return path


@pytest.fixture
def utm_orthophoto(tmp_path: Path) -> Path:
    """RGBA in UTM 32N (5 cm pixels), transparent in its left quarter."""
    rng = numpy.random.default_rng(15)
    rgba = rng.integers(0, 255, (4, SIZE, SIZE), dtype=numpy.uint8)
    rgba[3] = 255
    rgba[3, :, : SIZE // 4] = 0
    return _write(tmp_path / "ortho.tif", "EPSG:32632", from_origin(500000, 5000000, 0.05, 0.05),
                  rgba, photometric="RGB", alpha="UNSPECIFIED")


@pytest.fixture
def wgs84_dsm(tmp_path: Path) -> Path:
    """A float32 slope in EPSG:4326, nodata -9999 in its top rows."""
    values = numpy.tile(numpy.linspace(100, 150, SIZE, dtype=numpy.float32), (SIZE, 1))
    values[:16] = -9999
    return _write(tmp_path / "dsm.tif", "EPSG:4326", from_origin(10.0, 45.0, 1e-6, 1e-6),
                  values[numpy.newaxis], nodata=-9999)


def test_a_utm_orthophoto_renders_with_its_alpha(utm_orthophoto: Path) -> None:
    with rasterio.Env():
        info = tiles.read_info(str(utm_orthophoto), tiles.TileLayer.ORTHOPHOTO, 2)
        west, south, east, north = info.bounds
        assert 8.9 < west < east < 9.1 and 45.1 < south < north < 45.2  # UTM 32N, x=500 km
        assert info.indexes == (1, 2, 3) and info.value_range is None
        assert info.maxzoom == info.native_zoom + 2
        # One zoom out: the tile holds the whole raster and some of its surroundings.
        tile = TMS.tile((west + east) / 2, (south + north) / 2, info.native_zoom - 1)
        png = tiles.render_tile(str(utm_orthophoto), info, tile.z, tile.x, tile.y)
        assert png is not None
        pixels = data.png_pixels(png)
        assert pixels.shape == (4, 256, 256)
        assert (pixels[3] == 255).any() and (pixels[3] == 0).any()
        assert tiles.render_tile(str(utm_orthophoto), info, tile.z, tile.x + 40, tile.y) is None


def test_a_dsm_renders_colour_mapped_from_its_range(wgs84_dsm: Path) -> None:
    with rasterio.Env():
        info = tiles.read_info(str(wgs84_dsm), tiles.TileLayer.DSM, 2)
        assert info.indexes == (1,)
        assert info.value_range is not None
        assert info.value_range == pytest.approx((100, 150), abs=0.5)  # nodata left out
        west, south, east, north = info.bounds
        tile = TMS.tile((west + east) / 2, (south + north) / 2, info.native_zoom)
        png = tiles.render_tile(str(wgs84_dsm), info, tile.z, tile.x, tile.y)
    assert png is not None
    pixels = data.png_pixels(png)
    colours = {tuple(int(v) for v in c) for c in pixels[:3, pixels[3] == 255].T}
    viridis = {tuple(rgba[:3]) for rgba in cmap.get("viridis").values()}  # type: ignore[union-attr]
    assert len(colours) > 20 and colours <= viridis
    assert (pixels[3] == 0).any()


def test_an_unreadable_object_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "bad.tif"
    path.write_bytes(b"not a tiff" * 100)
    with rasterio.Env(), pytest.raises(tiles.RasterUnreadable) as raised:
        tiles.read_info(str(path), tiles.TileLayer.ORTHOPHOTO, 2)
    assert str(path) not in str(raised.value)  # no key or path in the error


async def test_a_tenant_renders_no_more_than_its_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """4 threads, 2 per tenant: tenant a's six tiles queue behind each other, and tenant b's
    tile, asked last, renders before a's third (rendering is a stand-in that sleeps)."""
    settings = GatewaySettings()
    settings.tiles.worker_threads = 4
    settings.tiles.renders_per_tenant = 2
    service = tiles.TileService(settings)
    lock = threading.Lock()
    running = {"a": 0, "b": 0}
    most = {"a": 0, "b": 0}
    started: list[str] = []

    def render(_path: str, _info: object, _z: int, x: int, _y: int) -> bytes:
        tenant = "b" if x >= 100 else "a"
        with lock:
            running[tenant] += 1
            most[tenant] = max(most[tenant], running[tenant])
            started.append(tenant)
        time.sleep(0.2)
        with lock:
            running[tenant] -= 1
        return b"png"

    monkeypatch.setattr(tiles, "render_tile", render)
    monkeypatch.setattr(tiles, "tile_may_intersect", lambda *_: True)
    url = S3Url("bucket", "tasks/t/outputs/odm_orthophoto/odm_orthophoto.tif")
    info: Any = types.SimpleNamespace(bounds=(0.0, 0.0, 1.0, 1.0))  # for the stand-ins
    layer = tiles.TileLayer.ORTHOPHOTO
    calls = [service.tile(tiles.TileKey("t1", 1, layer, 10, i, 0), url, info, "a")
             for i in range(6)]
    calls.append(service.tile(tiles.TileKey("t2", 1, layer, 10, 100, 0), url, info, "b"))
    assert await asyncio.gather(*calls) == [b"png"] * 7
    assert most == {"a": 2, "b": 1}
    assert started.index("b") < 3
    assert not service._shares  # nothing kept for tenants with nothing to render
