"""Attacks on the results step (COGs, STAC Item), the gateway's stored Items and STAC search, and
the tile renderer, by a user who controls its own task's inputs (issue 15). Unit tests: no stack.

How an attacker gets files where the run and the gateway read them:

- *images*: every uploaded ``.jpg``/``.tif`` is opened by the results step to read its EXIF time
  (fetching keeps any content under an image extension);
- *anything else in the project*: a ``seed.zip`` upload is extracted into the project with its
  paths kept (anywhere but ``images/``), so ``odm_orthophoto/odm_orthophoto.tif`` or
  ``stac.json`` can be the user's; ODM options (``end-with``, ``skip-orthophoto``) keep ODM from
  overwriting them, ``skipPostProcessing`` kept the results step from replacing ``stac.json``,
  and both are shipped to S3 (``packaging.DEFAULT_OUTPUTS``), where the gateway reads them.

Covered:

- GDAL's drivers: a "raster" or an "image" that is a VRT (sources: other files, other S3 objects
  with the reader's credentials) or a WMTS description (a GET to any URL, past the outbound
  guard) is opened by the GTiff/JPEG drivers only, so refused: in the tile renderer (gateway),
  the COG step and the EXIF read (run);
- a seeded ``stac.json`` is removed before packaging, skipPostProcessing or not;
- links in the project: a raster that is a symbolic link is not converted (a COG of the link's
  target would become a regular file in the project, shipped), ``stac.json`` as a link is
  replaced, not written through;
- stored Items of the wrong shape (bbox of strings, assets a list, properties a list, times not
  strings, nesting too deep, integers beyond floats, foreign links): never a 500 in
  ``/task/{uuid}/stac`` or ``/stac/search``, whoever searches (an admin's search covers every
  tenant's Items); the cache does not keep a blown-up Item in memory;
- ``/stac/search?limit=²``: a 400, not a 500;
- tile rendering work: a render past its deadline keeps its thread slot (no pile-up of GDAL
  threads), huge blocks are refused, zooms that would read a whole huge raster without overviews
  are not served.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from scaleodm.common import stac
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.domain.status import TaskState
from scaleodm.common.settings import GatewaySettings
from scaleodm.common.tenants import Tenant
from scaleodm.gateway import stacitems, tiles
from scaleodm.gateway.routes import stac as stac_routes
from scaleodm.run import packaging, results

ORTHO = stac.RASTERS["orthophoto"][0]
WEST, NORTH, SIDE = 13.40, 52.51, 0.01


def _geotiff(path: Path, value: int = 200, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3,
                       dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(WEST, NORTH, SIDE / size, SIDE / size)) as dst:
        dst.write(np.full((3, size, size), value, np.uint8))
    return path


def _vrt_of(source: Path, *, exif_time: str | None = None, size: int = 64) -> str:
    """A VRT (XML) showing ``source``'s pixels: what a ``.tif`` or ``.jpg`` may hold."""
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><ColorInterp>{c}</ColorInterp>'
        f'<SimpleSource><SourceFilename relativeToVRT="0">{source}</SourceFilename>'
        f"<SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>"
        for b, c in ((1, "Red"), (2, "Green"), (3, "Blue")))
    meta = (f'<Metadata><MDI key="EXIF_DateTimeOriginal">{exif_time}</MDI></Metadata>'
            if exif_time else "")
    return (f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>EPSG:4326</SRS>'
            f"<GeoTransform>{WEST}, {SIDE / size}, 0, {NORTH}, 0, {-SIDE / size}</GeoTransform>"
            f"{meta}{bands}</VRTDataset>")


# --------------------------------------------------------------- GDAL drivers: the gateway


def test_tile_renderer_does_not_follow_a_vrt_to_another_raster(tmp_path: Path) -> None:
    """A stored "orthophoto" that is a VRT naming another raster (another tenant's object as
    /vsis3/..., read with the gateway's credentials) must not be rendered."""
    victim = _geotiff(tmp_path / "other-tenant" / "odm_orthophoto.tif")
    evil = tmp_path / "mine" / "odm_orthophoto.tif"
    evil.parent.mkdir()
    evil.write_text(_vrt_of(victim))
    with rasterio.Env(), pytest.raises(tiles.RasterUnreadable):
        tiles.read_info(str(evil), tiles.TileLayer.ORTHOPHOTO, 2)


def test_tile_renderer_refuses_huge_blocks(tmp_path: Path) -> None:
    """One compressed tile of 8192×8192 pixels (a few KiB of deflate) would be decoded whole,
    64 MiB and up, for every map tile that touches it."""
    path = tmp_path / "block.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8192, height=8192, count=1,
                       dtype="uint8", crs="EPSG:4326", tiled=True, blockxsize=8192,
                       blockysize=8192, compress="deflate",
                       transform=from_origin(WEST, NORTH, SIDE / 8192, SIDE / 8192)) as dst:
        dst.write(np.zeros((1, 8192, 8192), np.uint8))
    assert path.stat().st_size < 1024 * 1024
    with rasterio.Env(), pytest.raises(tiles.RasterUnreadable):
        tiles.read_info(str(path), tiles.TileLayer.DSM, 2)


def test_low_zoom_tiles_of_a_huge_raster_without_overviews_are_not_served(
        tmp_path: Path) -> None:
    """A 65536² raster without overviews: a tile at rio-tiler's minzoom covers the whole raster,
    i.e. 4 Gpx decoded per request. No zoom served may read more than 4096 px a side."""
    size = 65536
    path = tmp_path / "huge.tif"
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1,
                       dtype="float32", crs="EPSG:4326", tiled=True, sparse_ok=True,
                       transform=from_origin(WEST, NORTH, SIDE / size, SIDE / size)):
        pass
    with rasterio.Env():
        info = tiles.read_info(str(path), tiles.TileLayer.DSM, 2)
    # A tile at zoom native - k reads (256 * 2**k)² pixels of a raster without overviews.
    assert info.minzoom >= info.native_zoom - 4
    assert info.floor_zoom >= info.native_zoom - 4


async def test_a_render_past_its_deadline_keeps_its_thread_slot() -> None:
    """Renders that time out must not free their slot while GDAL still runs: else each slow
    request (a huge raster, a slow S3) adds one more GDAL thread, without bound."""
    settings = GatewaySettings()
    settings.tiles.worker_threads = 1
    service = tiles.TileService(settings)
    service.deadline_s = 0.1
    running = 0
    most = 0
    lock = threading.Lock()

    def slow() -> bytes:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.4)
        with lock:
            running -= 1
        return b""

    for _ in range(4):
        with pytest.raises(tiles.RasterUnavailable):
            await service._in_thread(slow)
    await asyncio.sleep(0.6)  # let whatever runs end
    assert most <= settings.tiles.worker_threads


# --------------------------------------------------------------- GDAL drivers: the run


def test_cog_step_does_not_materialize_a_vrt(tmp_path: Path) -> None:
    """A seeded ``odm_orthophoto.tif`` that is a VRT naming a file outside the project: its COG
    would copy that file's pixels into the outputs."""
    victim = _geotiff(tmp_path / "outside" / "secret.tif", value=77)
    project = tmp_path / "task"
    (project / "images").mkdir(parents=True)
    (project / ORTHO).parent.mkdir(parents=True)
    (project / ORTHO).write_text(_vrt_of(victim))
    results.make_results(project, task_id="t", title="t")
    item = json.loads((project / stac.ITEM_FILE).read_text())
    assert "orthophoto" not in item["assets"]
    assert (project / ORTHO).read_text().startswith("<VRTDataset")  # left as it was


def test_cog_step_does_not_follow_a_link(tmp_path: Path) -> None:
    """A raster that is a link out of the project is not shipped (``collect``); its COG, a
    regular file in its place, would be."""
    outside = _geotiff(tmp_path / "outside" / "secret.tif", value=77, size=1024)  # no COG
    project = tmp_path / "task"
    (project / "images").mkdir(parents=True)
    (project / ORTHO).parent.mkdir(parents=True)
    (project / ORTHO).symlink_to(outside)
    results.make_results(project, task_id="t", title="t")
    assert (project / ORTHO).is_symlink()
    assert project / ORTHO not in packaging.collect(project, None)


def test_item_is_not_written_through_a_link(tmp_path: Path) -> None:
    project = tmp_path / "task"
    (project / "images").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("untouched")
    (project / stac.ITEM_FILE).symlink_to(elsewhere)
    results.make_results(project, task_id="t", title="t")
    assert elsewhere.read_text() == "untouched"
    assert not (project / stac.ITEM_FILE).is_symlink()


async def test_a_seeded_item_is_never_shipped(tmp_path: Path) -> None:
    """A ``stac.json`` the user put in the project (``seed.zip``), with skipPostProcessing so
    that the run writes none: it would be uploaded and served as the task's Item."""
    project = tmp_path / "task"
    (project / "images").mkdir(parents=True)
    (project / stac.ITEM_FILE).write_text('{"type": "Feature", "bbox": ["a", "b", "c", "d"]}')
    spec = RunSpec(task_id="5f1b4a38-2bb1-4b6f-8bd0-6d7b0c2a6c11", attempt=1, name="t",
                   sources=[], output_prefix="s3://b/p/", skip_post_processing=True)
    await packaging.post_process(project, spec)
    assert project / stac.ITEM_FILE not in packaging.collect(project, None)
    assert project / stac.ITEM_FILE not in packaging.collect(project, [stac.ITEM_FILE])


def test_exif_read_does_not_open_a_vrt_image(tmp_path: Path) -> None:
    victim = _geotiff(tmp_path / "outside" / "secret.tif")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_text(_vrt_of(victim, exif_time="1999:01:01 00:00:00"))
    assert results.image_times(images) == (None, None)


def test_exif_read_makes_no_request_for_a_wmts_image(tmp_path: Path) -> None:
    """An uploaded "image" holding a GDAL_WMTS description: opening it with every driver makes
    the run GET the URL it names (blind SSRF from the upload container, past netguard)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    images = tmp_path / "images"
    images.mkdir()
    (images / "b.jpg").write_text(
        f"<GDAL_WMTS><GetCapabilitiesUrl>http://127.0.0.1:{port}/latest/meta-data/"
        "</GetCapabilitiesUrl></GDAL_WMTS>")
    connected: list[bytes] = []

    def answer() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(1)
            connected.append(conn.recv(4096))
            conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with rasterio.Env(GDAL_HTTP_TIMEOUT="2", GDAL_HTTP_MAX_RETRY="0"):
            results.image_times(images)
        thread.join(2)
    finally:
        listener.close()
    assert connected == []


# ------------------------------------------------------------ stored Items in the gateway


class FakeS3:
    """``size`` and ``iter_object`` of the S3 facade, over one object body."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def size(self, url: Any) -> int:
        return len(self.body)

    async def iter_object(self, url: Any, chunk: int = 65536) -> AsyncIterator[bytes]:
        for i in range(0, len(self.body), chunk):
            yield self.body[i:i + chunk]


def _doc(n: int = 0) -> dict[str, Any]:
    return {"_id": f"00000000-0000-4000-8000-{n:012d}", "attempt": 1,
            "state": TaskState.COMPLETED.value,
            "name": "mine", "date_created_ms": 1_700_000_000_000,
            "output_prefix": f"s3://bucket/outputs/{n}/"}


def _valid_item() -> dict[str, Any]:
    raster = stac.Raster(key="orthophoto", cog=True, bbox=(13.4, 52.5, 13.41, 52.51),
                         shape=(64, 64), transform=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
                         native_bbox=(13.4, 52.5, 13.41, 52.51), code="EPSG:4326", wkt2=None)
    return stac.build_item("x", title="t", start=dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
                           rasters=[raster], archive=True)


def _with(**changes: Any) -> bytes:
    item = _valid_item()
    for dotted, value in changes.items():
        target = item
        *path, last = dotted.split("__")
        for part in path:
            target = target[part]
        target[last] = value
    return json.dumps(item).encode()


HOSTILE_ITEMS = {
    "bbox-of-strings": _with(bbox=["a", "b", "c", "d"]),
    "bbox-nan": _with(bbox=[float("nan"), 0, 1, 1]),
    "bbox-huge-int": _with(bbox=[10**400, 0, 1, 1]),
    "assets-a-list": _with(assets=["x"]),
    "asset-a-string": _with(assets={"orthophoto": "x"}),
    "properties-a-list": _with(properties=[1]),
    "datetime-an-int": _with(properties__datetime=5),
    "datetime-null": _with(properties__datetime=None),
    "links-a-dict": _with(links={"a": 1}),
    "link-a-string": _with(links=["x"]),
    "deep-nesting": b'{"type": "Feature", "x": ' + b"[" * 60000 + b"]" * 60000 + b"}",
}


@pytest.mark.parametrize("body", list(HOSTILE_ITEMS.values()), ids=list(HOSTILE_ITEMS))
async def test_a_hostile_stored_item_never_breaks_the_item_nor_the_search(body: bytes) -> None:
    cache = stacitems.ItemCache()
    item = await stacitems.task_item(cache, FakeS3(body), _doc(), "http://gw/")  # type: ignore[arg-type]
    json.dumps(item, allow_nan=False)  # renderable
    # What the search does with every Item (an admin's search: every tenant's Items).
    stac_routes._meets_bbox(item, (-180.0, -90.0, 180.0, 90.0))
    stac_routes._meets_bbox(item, (170.0, -90.0, -170.0, 90.0))
    stac_routes._meets_time(item, dt.datetime(2000, 1, 1, tzinfo=dt.UTC), None)


async def test_a_stored_item_keeps_no_foreign_links_nor_fields() -> None:
    item = _valid_item()
    item["links"] = [{"rel": "license", "href": "https://evil.example/phish"}]
    item["properties"]["description"] = "<script>x</script>"
    item["assets"]["evil"] = {"href": "s3://bucket/other-tenant/all.zip"}
    got = await stacitems.task_item(stacitems.ItemCache(), FakeS3(json.dumps(item).encode()),  # type: ignore[arg-type]
                                    _doc(), "http://gw/")
    assert [link["rel"] for link in got["links"]] == ["self"]
    assert "description" not in got["properties"]
    assert set(got["assets"]) == {"orthophoto", "archive"}
    assert all(a["href"].startswith("http://gw/task/") for a in got["assets"].values())
    assert got["bbox"] == [13.4, 52.5, 13.41, 52.51]


async def test_cached_items_do_not_hold_a_blown_up_item() -> None:
    """A stored Item of 1 MiB of ``[{},{},...]`` is some 20 MiB of Python objects; the cache
    keeps 2000 of them (40 GiB) if they are taken as they are."""
    filler = b"[" + b"{}," * (340 * 1024) + b"{}]"
    body = b'{"type": "Feature", "stac_version": "1.1.0", "x": ' + filler + b"}"
    assert len(body) < 1024 * 1024
    cache = stacitems.ItemCache()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(2):
            await cache.stored(FakeS3(body), _doc(n))  # type: ignore[arg-type]
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 4 * 1024 * 1024


# ------------------------------------------------------------------------------ search


async def test_search_limit_of_a_non_ascii_digit_is_a_400() -> None:
    """``"²".isdigit()`` holds, ``int("²")`` raises: an unhandled ValueError, a 500."""
    caller = Tenant(name="bob")
    resp = await stac_routes.search_items(request=None, res=None, caller=caller,  # type: ignore[arg-type]
                                          bbox=None, datetime=None, limit="²")
    assert resp.status_code == 400
