"""Map tiles of completed tasks (``/task/{uuid}/tiles/{z}/{x}/{y}.png``, ``/tilejson.json``) on the
session stack, with the ODM test double's rasters in moto's S3, over real HTTP.

Covered: TileJSON (bounds equal the raster's in WGS84, the tile URL absolute and carrying the
caller's token, zoom range); orthophoto tiles as PNGs, coloured inside the footprint and
transparent outside it; DSM tiles colour-mapped (viridis colours only, several of them); a tile of
the grid outside the raster (200, fully transparent); zoom and x/y off the grid or beyond
``maxzoom`` (404); another tenant's task (a second gateway on the same database with a tenants
file: the unknown-uuid answer); tasks without the raster (failed, completed without a DSM, a
corrupt object: 404 JSON, never a 500); the tile cache (a second request counted as a cache hit
in ``/metrics``, same bytes); and GDAL's reads of the raster being range reads (every GET of the
object answered 206 Partial Content by moto, from moto's request log in this process).

Left out: a frozen S3 (the deadline is the S3 request timeout; ``test_dependency_outages`` covers
the facade), real ODM's UTM rasters (the unit tests reproject an UTM raster), latency
(``bench/tiles.py``).
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import morecantile
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rasterio.io import MemoryFile
from rasterio.warp import transform_bounds
from rio_tiler.colormap import cmap

from tests.harness import api, data, servers
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration

TMS = morecantile.tms.get("WebMercatorQuad")
ORTHOPHOTO = "odm_orthophoto/odm_orthophoto.tif"
DSM = "odm_dem/dsm.tif"
DTM = "odm_dem/dtm.tif"
NODE = "tiles-node-token-0123456"  # the second gateway's SCALEODM_TOKEN: an admin
BOB = "tiles-bob-token-abcdefgh"
TENANTS = f"""
tenants:
  - name: bob
    tokens: [{BOB}]
"""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REQUEST = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3})')


class S3Requests(logging.Handler):
    """moto's request log (werkzeug's, in this process): (method, path, status) of each."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        found = _REQUEST.search(_ANSI.sub("", record.getMessage()))
        if found:
            with self._lock:
                self.seen.append((found["method"], found["path"], int(found["status"])))

    def of(self, key: str) -> list[tuple[str, int]]:
        with self._lock:
            return [(m, s) for m, p, s in self.seen if p.split("?")[0].endswith(key)]


@pytest.fixture(scope="module")
def s3_requests(s3: servers.S3Endpoint) -> Iterator[S3Requests]:  # noqa: ARG001
    logger = logging.getLogger("werkzeug")
    handler = S3Requests()
    level = logger.level
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _s3(stack: Stack) -> Any:
    return boto3.client("s3", endpoint_url=stack.s3.url, aws_access_key_id=stack.s3.access_key,
                        aws_secret_access_key=stack.s3.secret_key, region_name=stack.s3.region)


def _object(stack: Stack, task_id: str, key: str) -> bytes:
    body: bytes = _s3(stack).get_object(
        Bucket=stack.bucket, Key=f"tasks/{task_id}/outputs/{key}")["Body"].read()
    return body


async def _completed(client: httpx.AsyncClient, options: str = "[]") -> str:
    created = await api.create(client, files=[(n, data.JPEG) for n in data.image_names(4)],
                               options=options)
    final = await api.poll_until(client, created["uuid"], api.status_is(30, 40, 50))
    assert final["status"] == {"code": 40}, final
    return str(created["uuid"])


@pytest.fixture(scope="module")
async def done(stack: Stack, s3_requests: S3Requests) -> str:  # noqa: ARG001
    """A completed task with an orthophoto, a DSM and a DTM (the DTM is read by GDAL only)."""
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as c:
        return await _completed(c, '[{"name": "dsm", "value": true}, '
                                   '{"name": "dtm", "value": true}]')




def _wgs84_bounds(tif: bytes) -> tuple[float, float, float, float]:
    with MemoryFile(tif) as memfile, memfile.open() as src:
        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds,
                                                    densify_pts=21)
        return west, south, east, north


def _centre_tile(bounds: list[float], z: int) -> morecantile.Tile:
    west, south, east, north = bounds
    return TMS.tile((west + east) / 2, (south + north) / 2, z)


async def _tilejson(client: httpx.AsyncClient, task_id: str, layer: str = "orthophoto",
                    **params: str) -> dict[str, Any]:
    resp = await client.get(f"/task/{task_id}/tilejson.json", params={"layer": layer, **params})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert "error" not in body, body
    return body


async def _tile(client: httpx.AsyncClient, task_id: str, tile: morecantile.Tile,
                layer: str = "orthophoto") -> httpx.Response:
    return await client.get(f"/task/{task_id}/tiles/{tile.z}/{tile.x}/{tile.y}.png",
                            params={"layer": layer})


def _counter(text: str, name: str, **labels: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v
                                              for k, v in labels.items()))


async def test_tilejson_bounds_are_the_rasters_in_wgs84(
    client: httpx.AsyncClient, stack: Stack, done: str
) -> None:
    for layer, key in (("orthophoto", ORTHOPHOTO), ("dsm", DSM)):
        resp = await client.get(f"/task/{done}/tilejson.json", params={"layer": layer})
        assert resp.status_code == 200
        assert resp.headers["cache-control"].startswith("private")
        tj = resp.json()
        assert tj["tilejson"] == "3.0.0"
        assert tj["tiles"] == [f"{stack.gateway_url}/task/{done}/tiles/{{z}}/{{x}}/{{y}}.png"
                               f"?layer={layer}&attempt=1"]
        assert tj["bounds"] == pytest.approx(_wgs84_bounds(_object(stack, done, key)), abs=1e-9)
        west, south, east, north = tj["bounds"]
        assert west < tj["center"][0] < east and south < tj["center"][1] < north
        assert 0 <= tj["minzoom"] <= tj["center"][2] <= tj["maxzoom"] <= 24
        assert layer in tj["name"]


async def test_orthophoto_tile_is_coloured_inside_and_transparent_outside(
    client: httpx.AsyncClient, done: str
) -> None:
    tj = await _tilejson(client, done)
    resp = await _tile(client, done, _centre_tile(tj["bounds"], tj["maxzoom"] - 2))
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "image/png"
    assert resp.headers["cache-control"] == "private, max-age=86400"
    pixels = data.png_pixels(resp.content)
    assert pixels.shape == (4, 256, 256)
    alpha = pixels[3]
    opaque = pixels[:3, alpha == 255]
    assert opaque.shape[1] > 1000, "the footprint shows"
    assert (alpha == 0).sum() > 1000, "outside the footprint is transparent"
    assert len({tuple(c) for c in opaque.T}) > 20, "not a flat colour"


async def test_dsm_tile_is_colour_mapped(client: httpx.AsyncClient, done: str) -> None:
    tj = await _tilejson(client, done, "dsm")
    resp = await _tile(client, done, _centre_tile(tj["bounds"], tj["maxzoom"] - 2), "dsm")
    assert resp.status_code == 200, resp.text
    pixels = data.png_pixels(resp.content)
    colours = {tuple(int(v) for v in c) for c in pixels[:3, pixels[3] == 255].T}
    viridis = {tuple(rgba[:3]) for rgba in cmap.get("viridis").values()}  # type: ignore[union-attr]
    assert len(colours) >= 8, colours
    assert colours <= viridis, "every opaque pixel is a viridis colour"
    assert (pixels[3] == 0).any(), "nodata is transparent"


async def test_a_tile_outside_the_raster_is_transparent(
    client: httpx.AsyncClient, done: str
) -> None:
    tj = await _tilejson(client, done)
    centre = _centre_tile(tj["bounds"], tj["maxzoom"])
    far = morecantile.Tile(centre.x + 50, centre.y, centre.z)
    resp = await _tile(client, done, far)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "image/png"
    pixels = data.png_pixels(resp.content)
    assert pixels.shape == (4, 256, 256) and not pixels[3].any()


async def test_tiles_off_the_grid_or_too_deep_are_404(
    client: httpx.AsyncClient, done: str
) -> None:
    tj = await _tilejson(client, done)
    z = tj["maxzoom"]
    centre = _centre_tile(tj["bounds"], z)
    for tile in [(z + 1, 2 * centre.x, 2 * centre.y),  # beyond maxzoom, inside the raster
                 (-1, 0, 0), (10**6, 0, 0),  # off the grid's zoom levels
                 (z, 1 << z, centre.y), (z, centre.x, -1)]:  # x, y off the grid
        resp = await client.get(f"/task/{done}/tiles/{tile[0]}/{tile[1]}/{tile[2]}.png")
        assert resp.status_code == 404, tile
        assert "error" in resp.json()
        assert resp.headers["cache-control"] == "no-store"


async def test_tasks_without_the_raster_answer_404_never_500(
    client: httpx.AsyncClient, stack: Stack, done: str
) -> None:
    failed = await api.create(client, files=[("A.JPG", data.JPEG),
                                             ("odm-test-engine-fail-1.jpg", data.JPEG)])
    await api.poll_until(client, failed["uuid"], api.status_is(30, 40, 50))
    no_dsm = await _completed(client)
    corrupt = await _completed(client)
    _s3(stack).put_object(Bucket=stack.bucket, Key=f"tasks/{corrupt}/outputs/{ORTHOPHOTO}",
                          Body=b"not a tiff" * 100)
    cases = [(failed["uuid"], "orthophoto", "Task not completed"),
             (no_dsm, "dsm", "Task has no dsm"),
             (no_dsm, "dtm", "Task has no dtm"),
             (corrupt, "orthophoto", "The orthophoto cannot be read as a raster")]
    for task_id, layer, error in cases:
        for path in (f"/task/{task_id}/tiles/18/0/0.png", f"/task/{task_id}/tilejson.json"):
            resp = await client.get(path, params={"layer": layer})
            assert (resp.status_code, resp.json()) == (404, {"error": error}), (path, layer)
    # The orthophoto of the task without a DSM is there.
    assert (await _tilejson(client, no_dsm))["bounds"]
    # A layer that does not exist: a parameter error, NodeODM's way (HTTP 200).
    resp = await client.get(f"/task/{done}/tilejson.json", params={"layer": "ndvi"})
    assert resp.status_code == 200 and resp.json()["error"].startswith("Invalid request")


async def test_a_second_request_is_a_cache_hit(client: httpx.AsyncClient, done: str) -> None:
    tj = await _tilejson(client, done)
    tile = _centre_tile(tj["bounds"], tj["maxzoom"])  # requested by no other test
    before = (await client.get("/metrics")).text
    first = await _tile(client, done, tile)
    middle = (await client.get("/metrics")).text
    second = await _tile(client, done, tile)
    after = (await client.get("/metrics")).text
    assert first.status_code == second.status_code == 200
    assert first.content == second.content

    def delta(a: str, b: str, source: str) -> float:
        name = "scaleodm_tiles_total"
        return (_counter(b, name, layer="orthophoto", source=source)
                - _counter(a, name, layer="orthophoto", source=source))

    assert delta(before, middle, "rendered") == 1 and delta(before, middle, "cache") == 0
    assert delta(middle, after, "rendered") == 0 and delta(middle, after, "cache") == 1


async def test_gdal_reads_the_raster_with_range_requests(
    client: httpx.AsyncClient, s3_requests: S3Requests, done: str
) -> None:
    # The DTM: no other test reads it (the others read the DSM and the orthophoto whole with
    # boto3, as a reference).
    tj = await _tilejson(client, done, "dtm")
    resp = await _tile(client, done, _centre_tile(tj["bounds"], tj["minzoom"]), "dtm")
    assert resp.status_code == 200
    gets = [status for method, status in s3_requests.of(f"tasks/{done}/outputs/{DTM}")
            if method == "GET"]
    assert gets, s3_requests.seen[-20:]
    assert set(gets) == {206}, "every GET of the raster asked for a range (206 Partial Content)"


# --- tenants: a second gateway on the same database, with a tenants file ---------------------


@pytest.fixture(scope="module")
def tenant_gateway(tmp_path_factory: pytest.TempPathFactory, stack: Stack) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("tiles-tenants")
    (tmp / "tenants.yaml").write_text(TENANTS)
    own = Stack(tmp=tmp, nats_url=stack.nats_url, mongo_url=stack.mongo_url, s3=stack.s3,
                database=stack.database, extra_env={
                    "SCALEODM_TOKEN": NODE, "SCALEODM_TENANTS_FILE": str(tmp / "tenants.yaml")})
    try:
        own.start("gateway")
        yield own
    finally:
        own.stop()


@pytest.fixture
async def tenant_client(tenant_gateway: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=tenant_gateway.gateway_url, timeout=30) as c:
        yield c


async def test_another_tenants_task_is_an_unknown_uuid(
    tenant_client: httpx.AsyncClient, done: str
) -> None:
    unknown = str(uuid.uuid4())
    for path in ("/task/{}/tilejson.json", "/task/{}/tiles/18/0/0.png"):
        theirs = await tenant_client.get(path.format(done), params={"token": BOB})
        none = await tenant_client.get(path.format(unknown), params={"token": BOB})
        assert theirs.status_code == none.status_code == 200
        assert theirs.json() == {"error": f"{done} not found"}
        assert none.json() == {"error": f"{unknown} not found"}
        refused = await tenant_client.get(path.format(done))
        assert refused.json()["error"].startswith("Invalid authentication token")


async def test_tilejson_carries_the_callers_token(
    tenant_client: httpx.AsyncClient, tenant_gateway: Stack, done: str
) -> None:
    tj = await _tilejson(tenant_client, done, token=NODE)  # the admin sees every task
    template = tj["tiles"][0]
    assert template.startswith(f"{tenant_gateway.gateway_url}/task/{done}/tiles/")
    assert f"token={NODE}" in template
    tile = _centre_tile(tj["bounds"], tj["maxzoom"] - 1)
    url = template.format(z=tile.z, x=tile.x, y=tile.y)
    resp = await tenant_client.get(url)  # as a map client: the URL as it is
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
