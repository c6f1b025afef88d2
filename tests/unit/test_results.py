"""The run's results step (``scaleodm.run.results``): COGs in place, and the task's STAC Item.

Rasters are the ODM test double's real GeoTIFFs (WGS84) and one written here in UTM, as ODM's
are; images are JPEGs written by GDAL with an EXIF ``DateTimeOriginal``. Every Item is checked
with pystac against the STAC schemas (tests/harness/stac.py: core + projection, offline).

Covered: orthophoto/DSM/DTM become COGs that pass rio-cogeo's validation with the same pixels
and georeferencing; a COG is kept byte for byte; bbox/geometry in WGS84 from a UTM raster;
``proj:`` fields; datetime from the images (one instant, or their span) or else now; a project
without rasters (valid Item, no geometry); an unreadable raster left out without failing;
skipPostProcessing does nothing; the Item's hrefs made absolute for the gateway; bbox and time
helpers of search. Left to the integration tests: the step inside real runs (local) and the
upload (Argo stage), the gateway's routes.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pystac.errors import STACValidationError
from rasterio.transform import from_origin
from rio_cogeo import cog_profiles, cog_translate, cog_validate

from odm_test_engine import artifacts
from scaleodm.common import stac
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.run import packaging, results
from tests.harness.stac import validate

SCENE = artifacts.Scene(images=(), west=13.40, south=52.50, east=13.41, north=52.51,
                        ground=30.0, top=55.0)
ORTHO, DSM, DTM = (stac.RASTERS[k][0] for k in ("orthophoto", "dsm", "dtm"))


def _project(tmp_path: Path, *, rasters: bool = True) -> Path:
    project = tmp_path / "task"
    (project / "images").mkdir(parents=True)
    if rasters:
        for rel, data in ((ORTHO, artifacts.orthophoto_tiff(SCENE)),
                          (DSM, artifacts.dem_tiff(SCENE, surface=True)),
                          (DTM, artifacts.dem_tiff(SCENE, surface=False))):
            (project / rel).parent.mkdir(parents=True, exist_ok=True)
            (project / rel).write_bytes(data)
    return project


def _jpeg(path: Path, taken: str | None) -> None:
    with rasterio.open(path, "w", driver="JPEG", width=8, height=8, count=3,
                       dtype="uint8") as dst:
        dst.write(np.full((3, 8, 8), 100, np.uint8))
        if taken is not None:
            dst.update_tags(EXIF_DateTimeOriginal=taken)


def _item(project: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((project / stac.ITEM_FILE).read_text())


def _pixels(path: Path) -> tuple[np.ndarray, tuple[float, ...], object]:  # type: ignore[type-arg]
    with rasterio.open(path) as src:
        return src.read(), tuple(src.transform), src.crs


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_rasters_become_valid_cogs_with_the_same_pixels(tmp_path: Path) -> None:
    project = _project(tmp_path)
    before = {rel: _pixels(project / rel) for rel in (ORTHO, DSM, DTM)}
    for rel in (ORTHO, DSM, DTM):
        assert not cog_validate(str(project / rel), quiet=True)[0]  # the double's are not COGs

    shipped = results.make_results(project, task_id="t-1", title="Field")

    assert shipped == [project / stac.ITEM_FILE]
    for rel in (ORTHO, DSM, DTM):
        valid, errors, _ = cog_validate(str(project / rel), quiet=True)
        assert valid, errors
        pixels, transform, crs = _pixels(project / rel)
        assert np.array_equal(pixels, before[rel][0])
        assert transform == pytest.approx(before[rel][1]) and crs == before[rel][2]
    assert not list(project.rglob(".*.cog"))  # no temporary left behind


def test_a_cog_is_kept_byte_for_byte(tmp_path: Path) -> None:
    project = _project(tmp_path)
    cog = project / "odm_orthophoto" / "cog.tif"
    cog_translate(str(project / ORTHO), str(cog), cog_profiles.get("deflate"), quiet=True)
    cog.replace(project / ORTHO)
    kept = (project / ORTHO).read_bytes()

    results.make_results(project, task_id="t-1", title="Field")

    assert (project / ORTHO).read_bytes() == kept
    assert _item(project)["assets"]["orthophoto"]["type"] == stac.COG_MEDIA_TYPE


def test_item_validates_and_describes_each_raster(tmp_path: Path) -> None:
    project = _project(tmp_path)
    results.make_results(project, task_id="t-1", title="<b>Field</b>")
    item = _item(project)

    validate(item)
    assert item["id"] == "t-1" and item["properties"]["title"] == "<b>Field</b>"
    assert item["bbox"] == pytest.approx([SCENE.west, SCENE.south, SCENE.east, SCENE.north])
    ring = item["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and {tuple(p) for p in ring} == {
        (SCENE.west, SCENE.south), (SCENE.east, SCENE.south),
        (SCENE.east, SCENE.north), (SCENE.west, SCENE.north)}
    assert set(item["assets"]) == {"orthophoto", "dsm", "dtm", "archive"}
    ortho = item["assets"]["orthophoto"]
    assert ortho["href"] == f"./{ORTHO}" and ortho["roles"] == ["data", "visual"]
    assert ortho["proj:code"] == "EPSG:4326" and ortho["proj:shape"] == [128, 128]
    assert ortho["proj:transform"][2] == pytest.approx(SCENE.west)
    assert item["assets"]["dsm"]["roles"] == ["data", "elevation"]
    assert item["assets"]["archive"]["type"] == "application/zip"


def test_utm_raster_has_a_wgs84_bbox_and_its_own_code(tmp_path: Path) -> None:
    project = _project(tmp_path, rasters=False)
    path = project / ORTHO
    path.parent.mkdir(parents=True)
    # 200 m x 100 m at 1 m per pixel in UTM 33N, near 13.4 E 52.5 N (Berlin)
    with rasterio.open(path, "w", driver="GTiff", width=200, height=100, count=4,
                       dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(391_000, 5_818_000, 1, 1)) as dst:
        dst.write(np.full((4, 100, 200), 200, np.uint8))
    results.make_results(project, task_id="t-1", title="utm")
    item = _item(project)

    validate(item)
    west, south, east, north = item["bbox"]
    assert 13.39 < west < east < 13.41 and 52.50 < south < north < 52.52
    assert (east - west) * 68_000 == pytest.approx(200, rel=0.05)  # ~68 km per degree there
    asset = item["assets"]["orthophoto"]
    assert asset["proj:code"] == "EPSG:32633"
    assert asset["proj:bbox"] == pytest.approx([391_000, 5_817_900, 391_200, 5_818_000])


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_datetime_comes_from_the_images(tmp_path: Path) -> None:
    project = _project(tmp_path)
    _jpeg(project / "images" / "a.jpg", "2026:05:01 10:20:00")
    _jpeg(project / "images" / "b.JPG", "2026:05:01 10:00:00")
    _jpeg(project / "images" / "c.jpg", None)
    results.make_results(project, task_id="t-1", title="t")
    props = _item(project)["properties"]
    assert props["start_datetime"] == "2026-05-01T10:00:00Z"
    assert props["end_datetime"] == "2026-05-01T10:20:00Z"
    assert props["datetime"] is None

    (project / "images" / "a.jpg").unlink()
    results.make_results(project, task_id="t-1", title="t")
    assert _item(project)["properties"]["datetime"] == "2026-05-01T10:00:00Z"


def test_without_images_the_time_is_now(tmp_path: Path) -> None:
    project = _project(tmp_path)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    results.make_results(project, task_id="t-1", title="t")
    start, end = stac.time_span(_item(project))
    assert start == end and before <= start <= dt.datetime.now(dt.UTC)


def test_no_rasters_still_gives_a_valid_item(tmp_path: Path) -> None:
    project = _project(tmp_path, rasters=False)
    results.make_results(project, task_id="t-1", title="t")
    item = _item(project)
    validate(item)
    assert item["geometry"] is None and "bbox" not in item
    assert set(item["assets"]) == {"archive"}
    assert not stac.intersects(item, (-180, -90, 180, 90))


def test_an_unreadable_raster_is_left_out(tmp_path: Path) -> None:
    project = _project(tmp_path)
    (project / DSM).write_bytes(b"II*\x00 not really a tiff")
    results.make_results(project, task_id="t-1", title="t")
    item = _item(project)
    validate(item)
    assert set(item["assets"]) == {"orthophoto", "dtm", "archive"}
    assert (project / DSM).read_bytes() == b"II*\x00 not really a tiff"  # left as ODM made it


async def test_skip_post_processing_leaves_the_outputs_alone(tmp_path: Path) -> None:
    project = _project(tmp_path)
    before = (project / ORTHO).read_bytes()
    spec = RunSpec(task_id="5f1b4a38-2bb1-4b6f-8bd0-6d7b0c2a6c11", attempt=1, name="t",
                   sources=[], output_prefix="s3://b/p/", skip_post_processing=True)
    await packaging.post_process(project, spec)
    assert (project / ORTHO).read_bytes() == before and not (project / stac.ITEM_FILE).exists()

    await packaging.post_process(project, spec.model_copy(update={"skip_post_processing": False}))
    assert (project / stac.ITEM_FILE).exists()
    assert project / stac.ITEM_FILE in packaging.collect(project, None)


def test_validator_refuses_a_bad_projection_field(tmp_path: Path) -> None:
    project = _project(tmp_path)
    results.make_results(project, task_id="t-1", title="t")
    item = _item(project)
    item["assets"]["dsm"]["proj:shape"] = [128, 128, 1]
    with pytest.raises(STACValidationError):
        validate(item)
    item["assets"]["dsm"]["proj:shape"] = [128, 128]
    item["properties"]["datetime"] = "yesterday"  # core schema
    with pytest.raises(STACValidationError):
        validate(item)


def test_hrefs_become_the_gateways_downloads(tmp_path: Path) -> None:
    project = _project(tmp_path)
    results.make_results(project, task_id="t-1", title="t")
    item = _item(project)
    item["assets"]["evil"] = {"href": "./../../other-task/secret.tif", "roles": ["data"]}
    base = "http://gw/task/t-1"
    served = stac.with_hrefs(item, task_url=base, self_url=f"{base}/stac")

    validate(served)
    assert {k: a["href"] for k, a in served["assets"].items()} == {
        "orthophoto": f"{base}/download/orthophoto.tif", "dsm": f"{base}/download/dsm.tif",
        "dtm": f"{base}/download/dtm.tif", "archive": f"{base}/download/all.zip"}
    assert served["links"] == [{"rel": "self", "href": f"{base}/stac",
                                "type": "application/geo+json"}]


def test_search_helpers() -> None:
    day = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    item = stac.build_item("t", title="t", start=day, end=day + dt.timedelta(hours=1),
                           rasters=[stac.Raster(key="orthophoto", cog=True,
                                                bbox=(10, 50, 11, 51), shape=(1, 1),
                                                transform=(1, 0, 0, 0, -1, 0),
                                                native_bbox=(10, 50, 11, 51),
                                                code="EPSG:4326", wkt2=None)])
    assert stac.intersects(item, (10.5, 50.5, 12, 52))
    assert stac.intersects(item, (11, 51, 12, 52))  # touching counts
    assert not stac.intersects(item, (11.1, 50, 12, 51))
    assert stac.time_span(item) == (day, day + dt.timedelta(hours=1))
