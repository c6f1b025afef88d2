"""Results through a running stack: COGs in the outputs, the STAC Item, the search, downloads.

Tasks run on the ODM test double (real GeoTIFFs: tools/odm-test-engine) with geotagged images at
two places, as two tenants (``alice``, ``bob``), through the real gateway, scheduler and watcher
on nats-server, the MongoDB wire server and moto S3. Every Item is checked with pystac against
the STAC schemas (tests/harness/stac.py) and every raster with rio-cogeo's validator.

Covered: a completed task's Item (bbox around its images, assets linking the gateway's
downloads, ``proj:`` fields) and its rasters downloaded alone (valid COGs, the same bytes as in
``all.zip``), answering ``Range`` requests (GDAL reads a window through ``/vsicurl/``, as QGIS
would; ``all.zip`` never advertises ranges); a task run with skipPostProcessing and a canceled
one (valid Items without raster assets); search by ``bbox`` (incl. across the antimeridian: no
match), ``datetime`` (instant, intervals, open ends), ``limit`` and ``numberMatched``; bad
parameters (HTTP 400 with the STAC API's ``code``/``description``, never a 5xx); a tenant's
search sees its own tasks only, an admin's everyone's; single downloads refused for unknown
names and unfinished tasks.
Another tenant's ``/task/{uuid}/stac`` is covered with every task route in test_tenants.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import rasterio
from rasterio.io import MemoryFile
from rio_cogeo.cogeo import cog_validate

from tests.harness import api, servers
from tests.harness.data import exif_block, jpeg
from tests.harness.stac import validate
from tests.harness.stack import Stack, running_stack

pytestmark = pytest.mark.integration

NODE = "node-admin-token-stac-0123"
ALICE = "alice-token-stac-0123456"
BOB = "bob-token-stac-abcdefghij"
TENANTS = f"""
tenants:
  - name: alice
    tokens: [{ALICE}]
  - name: bob
    tokens: [{BOB}]
"""
BERLIN = (52.52, 13.40)
TOKYO = (35.68, 139.69)  # exif_block writes north/east coordinates only
DEMS = '[{"name": "dsm", "value": true}, {"name": "dtm", "value": true}]'


def images(lat: float, lon: float, n: int = 5) -> list[tuple[str, Any]]:
    """``n`` geotagged images ~10 m apart around (lat, lon)."""
    return [("images", (f"img_{i}.jpg", jpeg(64, 48, exif_block("DJI", "FC6310", lat + i * 1e-4,
                                                              lon + i * 1e-4, 120.0)),
                        "image/jpeg")) for i in range(n)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mongo_url: str, s3: servers.S3Endpoint
          ) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stac-stack")
    (tmp / "tenants.yaml").write_text(TENANTS)
    with servers.nats_server(tmp / "nats") as nats:
        own = Stack(tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                    database=f"t_{uuid.uuid4().hex[:12]}", extra_env={
                        "SCALEODM_TOKEN": NODE,
                        "SCALEODM_TENANTS_FILE": str(tmp / "tenants.yaml"),
                        "SCALEODM_TEST_ENGINE_SECONDS": "0.5",
                        "SCALEODM_ADMISSION_INTERVAL_S": "0.5",
                    })
        with running_stack(own, ("gateway", "scheduler", "watcher")):
            yield own


@pytest.fixture(scope="module")
async def clients(stack: Stack) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    made = {name: httpx.AsyncClient(base_url=stack.gateway_url, params={"token": token},
                                    timeout=30)
            for name, token in (("admin", NODE), ("alice", ALICE), ("bob", BOB))}
    yield made
    for client in made.values():
        await client.aclose()


async def run(client: httpx.AsyncClient, place: tuple[float, float], **fields: str) -> str:
    files = images(*place) + [(k, (None, v)) for k, v in fields.items()]
    created = (await client.post("/task/new", files=files)).json()
    task_id: str = created["uuid"]
    info = await api.poll_until(client, task_id, api.status_is(30, 40, 50), timeout_s=60)
    assert info["status"] == {"code": 40}, info
    return task_id


@pytest.fixture(scope="module")
async def tasks(clients: dict[str, httpx.AsyncClient]) -> dict[str, str]:
    started = dt.datetime.now(dt.UTC)
    found = {
        "berlin": await run(clients["alice"], BERLIN, name="<b>Berlin</b>", options=DEMS),
        "tokyo": await run(clients["alice"], TOKYO, name="Tokyo"),
        "bob": await run(clients["bob"], BERLIN, name="bob's"),
        "skipped": await run(clients["alice"], BERLIN, name="raw", skipPostProcessing="true"),
    }
    found["started"] = started.isoformat()
    return found


async def item_of(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    resp = await client.get(f"/task/{task_id}/stac")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith(
        "application/geo+json"), (resp.status_code, resp.text[:300])
    item: dict[str, Any] = resp.json()
    validate(item)
    return item


async def test_completed_task_item_and_its_cogs(
    clients: dict[str, httpx.AsyncClient], tasks: dict[str, str], stack: Stack
) -> None:
    alice = clients["alice"]
    item = await item_of(alice, tasks["berlin"])

    assert item["id"] == tasks["berlin"] and item["properties"]["title"] == "<b>Berlin</b>"
    west, south, east, north = item["bbox"]
    assert west < BERLIN[1] < east and south < BERLIN[0] < north
    assert east - west < 0.01 and north - south < 0.01  # ~the images' spread plus a margin
    base = f"{stack.gateway_url}/task/{tasks['berlin']}"
    assert {k: a["href"] for k, a in item["assets"].items()} == {
        "orthophoto": f"{base}/download/orthophoto.tif", "dsm": f"{base}/download/dsm.tif",
        "dtm": f"{base}/download/dtm.tif", "archive": f"{base}/download/all.zip"}
    assert item["assets"]["orthophoto"]["proj:code"] == "EPSG:4326"
    assert {link["rel"]: link["href"] for link in item["links"]} == {"self": f"{base}/stac"}

    archive = zipfile.ZipFile(io.BytesIO(
        (await alice.get(f"/task/{tasks['berlin']}/download/all.zip")).content))
    assert "stac.json" in archive.namelist()
    for key, path in (("orthophoto", "odm_orthophoto/odm_orthophoto.tif"),
                      ("dsm", "odm_dem/dsm.tif"), ("dtm", "odm_dem/dtm.tif")):
        resp = await alice.get(item["assets"][key]["href"])
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/tiff"
        assert resp.headers["content-disposition"] == f"attachment; filename={key}.tif"
        assert resp.content == archive.read(path)
        with MemoryFile(resp.content) as mem:
            valid, errors, _ = cog_validate(mem.name, quiet=True)
        assert valid, (key, errors)
        assert item["assets"][key]["type"] == (
            "image/tiff; application=geotiff; profile=cloud-optimized")


async def test_items_without_rasters_are_still_valid(
    clients: dict[str, httpx.AsyncClient], tasks: dict[str, str]
) -> None:
    alice = clients["alice"]
    skipped = await item_of(alice, tasks["skipped"])
    assert skipped["geometry"] is None and set(skipped["assets"]) == {"archive"}
    assert skipped["properties"]["title"] == "raw"
    # its orthophoto is served as ODM made it (not made a COG: post-processing was skipped)
    raw = await alice.get(f"/task/{tasks['skipped']}/download/orthophoto.tif")
    assert raw.headers["content-type"] == "image/tiff"
    with MemoryFile(raw.content) as mem:
        assert not cog_validate(mem.name, quiet=True)[0]
    assert (await alice.get(f"/task/{tasks['skipped']}/download/dsm.tif")).json() == {
        "error": "Asset not ready"}  # no DSM asked

    files = images(*BERLIN) + [("name", (None, "stopped"))]
    stopped = (await alice.post("/task/new", files=files)).json()["uuid"]
    assert (await alice.post("/task/cancel", data={"uuid": stopped})).json() == {"success": True}
    info = await api.poll_until(alice, stopped, api.status_is(30, 40, 50))
    assert info["status"] == {"code": 50}
    canceled = await item_of(alice, stopped)  # never completed: no outputs at all
    assert canceled["geometry"] is None and canceled["assets"] == {}
    assert canceled["properties"]["title"] == "stopped"
    assert (await alice.get(f"/task/{stopped}/download/orthophoto.tif")).json() == {
        "error": "Asset not ready"}
    assert (await alice.get(f"/task/{tasks['berlin']}/download/stac.json")).json() == {
        "error": "Invalid asset"}
    assert (await alice.get(f"/task/{tasks['berlin']}/download/odm_dem%2Fdsm.tif")).json() == {
        "error": "Invalid asset"}
    unknown = str(uuid.uuid4())
    assert (await alice.get(f"/task/{unknown}/stac")).json() == {"error": f"{unknown} not found"}


async def search(client: httpx.AsyncClient, **params: str) -> dict[str, Any]:
    resp = await client.get("/stac/search", params=params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert body["type"] == "FeatureCollection"
    for item in body["features"]:
        validate(item)
    return body


def ids(body: dict[str, Any]) -> set[str]:
    return {item["id"] for item in body["features"]}


async def test_search_by_place_and_time(
    clients: dict[str, httpx.AsyncClient], tasks: dict[str, str]
) -> None:
    alice = clients["alice"]
    everything = await search(alice, limit="100")
    assert ids(everything) == {tasks["berlin"], tasks["tokyo"], tasks["skipped"]}
    assert everything["numberMatched"] == everything["numberReturned"] == 3

    lat, lon = BERLIN
    near_berlin = f"{lon - 0.1},{lat - 0.1},{lon + 0.1},{lat + 0.1}"
    assert ids(await search(alice, bbox=near_berlin)) == {tasks["berlin"]}
    assert ids(await search(alice, bbox="139,35,140,36")) == {tasks["tokyo"]}
    assert ids(await search(alice, bbox="170,-10,-170,10")) == set()  # across the antimeridian
    assert ids(await search(alice, bbox="-180,-90,180,90")) == {tasks["berlin"], tasks["tokyo"]}

    started = dt.datetime.fromisoformat(tasks["started"])
    hour = dt.timedelta(hours=1)
    since = f"{started.isoformat()}/.."
    assert ids(await search(alice, datetime=since)) == ids(everything)
    assert ids(await search(alice, datetime=f"../{(started - hour).isoformat()}")) == set()
    later = (started + 2 * hour).isoformat()
    assert ids(await search(alice, datetime=f"{later}/{(started + 3 * hour).isoformat()}")) == set()
    both = await search(alice, datetime=since, bbox="-180,-90,180,90", limit="1")
    assert both["numberMatched"] == 2 and both["numberReturned"] == 1
    assert ids(both) == {tasks["tokyo"]}  # newest first


async def test_search_per_tenant(
    clients: dict[str, httpx.AsyncClient], tasks: dict[str, str]
) -> None:
    assert ids(await search(clients["bob"], limit="100")) == {tasks["bob"]}
    assert {tasks["berlin"], tasks["tokyo"], tasks["bob"], tasks["skipped"]} <= ids(
        await search(clients["admin"], limit="100"))
    resp = await clients["bob"].get("/stac/search", params={"token": "wrong-token-0123456"})
    assert resp.json() == {"error": "Invalid authentication token: token does not match."}


@pytest.mark.parametrize("params", [
    {"bbox": "1,2,3"}, {"bbox": "a,b,c,d"}, {"bbox": "0,10,1,5"}, {"bbox": "0,0,200,1"},
    {"bbox": "nan,0,1,1"}, {"bbox": "1e999,0,1,1"}, {"datetime": "yesterday"},
    {"datetime": "../.."}, {"datetime": "2026-02-01T00:00:00Z/2026-01-01T00:00:00Z"},
    {"limit": "0"}, {"limit": "101"}, {"limit": "-1"}, {"limit": "ten"}, {"limit": "1e3"},
    {"datetime": "x" * 4000},
])
async def test_bad_search_parameters(
    clients: dict[str, httpx.AsyncClient], params: dict[str, str]
) -> None:
    resp = await clients["alice"].get("/stac/search", params=params)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["code"] == "InvalidParameterValue" and body["description"]
    assert len(resp.content) < 500  # the parameter is not echoed back whole


def test_cogs_in_s3_are_valid(stack: Stack, tasks: dict[str, str], tmp_path: Path) -> None:
    """Every .tif the runs stored in S3 (completed, not skipPostProcessing) is a valid COG."""
    keys = [k for k in stack.s3_keys(f"tasks/{tasks['berlin']}/")
            + stack.s3_keys(f"tasks/{tasks['tokyo']}/") if k.endswith(".tif")]
    assert len(keys) == 4  # Berlin's orthophoto, DSM and DTM; Tokyo's orthophoto (no DEMs asked)
    for key in keys:
        target = tmp_path / key.replace("/", "_")
        target.write_bytes(stack.s3_get(key))
        valid, errors, _ = cog_validate(str(target), quiet=True)
        assert valid, (key, errors)


async def test_rasters_answer_ranges_as_gis_software_reads_them(
    clients: dict[str, httpx.AsyncClient], tasks: dict[str, str], stack: Stack
) -> None:
    alice = clients["alice"]
    path = f"/task/{tasks['berlin']}/download/orthophoto.tif"
    whole_resp = await alice.get(path)
    whole = whole_resp.content
    size = len(whole)
    assert whole_resp.headers["accept-ranges"] == "bytes"

    for asked, first, last in (("bytes=10-109", 10, 109), ("bytes=-50", size - 50, size - 1),
                               (f"bytes={size - 7}-", size - 7, size - 1),
                               (f"bytes=0-{size * 2}", 0, size - 1)):
        part = await alice.get(path, headers={"Range": asked})
        assert part.status_code == 206, (asked, part.text[:200])
        assert part.content == whole[first:last + 1], asked
        assert part.headers["content-range"] == f"bytes {first}-{last}/{size}", asked
        assert part.headers["content-length"] == str(last - first + 1)
    past = await alice.get(path, headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=9-2", "bytes=x-"):
        full = await alice.get(path, headers={"Range": ignored})
        assert full.status_code == 200 and full.content == whole, ignored
    stale = await alice.get(path, headers={"Range": "bytes=0-9", "If-Range": '"etag"'})
    assert stale.status_code == 200 and stale.content == whole
    zipped = await alice.get(f"/task/{tasks['berlin']}/download/all.zip",
                             headers={"Range": "bytes=0-9"})
    assert zipped.status_code == 200 and "accept-ranges" not in zipped.headers  # PyODM §3.8

    # GDAL reads the COG through the gateway by ranges, as QGIS does (/vsicurl/, no HEAD).
    url = f"/vsicurl/{stack.gateway_url}{path}?token={ALICE}"

    def read_remote() -> Any:
        with rasterio.Env(CPL_VSIL_CURL_USE_HEAD="NO", GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), \
                rasterio.open(url) as src:
            return src.read(window=((32, 96), (32, 96))), src.bounds

    remote, bounds = await asyncio.to_thread(read_remote)
    with MemoryFile(whole) as mem, mem.open() as src:
        assert (remote == src.read(window=((32, 96), (32, 96)))).all()
        assert bounds == src.bounds
