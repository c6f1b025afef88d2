"""A split-merge submodel as ODM's ``opendm/remote.py`` sends it, through the whole stack.

Covers, with the ODM test double as the engine: a task created by the chunked flow (init with
``outputs`` and ``skipPostProcessing``, one upload per file, commit) holding a few JPEGs and a
``seed.zip`` reaches 40, and its ``all.zip`` holds exactly the requested outputs: files and
folders (recursively), a requested path that does not exist skipped, nothing else (no default
output, no image, no seed); the seed's own files come back byte for byte, which proves it was
extracted into the project root with its paths kept (the run directory itself is emptied once
the outputs are stored). A seed with a ``../`` entry fails the task (30) with the refusal as its
errorMessage, and nothing lands beside the project.

Leaves out: every other hostile entry and the limits (``tests/unit/test_seed_zip.py``), Argo runs
(the fetch step calls the same ``stages.fetch_images``).
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import httpx
import pytest

from tests.harness import api, data
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration

# The toolchain seed of opendm/remote.py (ToolchainTask.process_remote), contents made up.
CAMERA_MODELS = b'{"v2 dji fc6310 4864 3648 brown 0.5555 rgb": {"projection_type": "brown"}}'
SEED = {
    "opensfm/camera_models.json": CAMERA_MODELS,
    "opensfm/reference_lla.json": b'{"latitude": 46.84, "longitude": -91.99, "altitude": 0}',
    "opensfm/tracks.csv": b"OPENSFM_TRACKS_VERSION_v1\n",
    "opensfm/features/empty": b"",
    "opensfm/matches/empty": b"",
    "opensfm/exif/empty": b"",
}
OUTPUTS = [
    "opensfm/camera_models.json",  # from the seed only: the engine never writes it
    "opensfm/features",  # a folder holding only the seed's touch file
    "opensfm/reconstruction.json",
    "cameras.json",
    "odm_dem",
    "odm_report",
    "odm_georeferencing",
    "odm_orthophoto/odm_orthophoto_cut.tif",  # asked by ODM, not written by the double: skipped
]


async def _create_chunked(
    client: httpx.AsyncClient, files: list[tuple[str, bytes, str]], **fields: str
) -> str:
    """As PyODM's ``create_task``: init with the fields, one upload per file, commit."""
    init = await client.post("/task/new/init", files=api.form(**fields))
    assert init.status_code == 200, init.text
    task_id: str = init.json()["uuid"]
    for name, body, content_type in files:
        resp = await client.post(
            f"/task/new/upload/{task_id}", files=[("images", (name, body, content_type))]
        )
        assert resp.json() == {"success": True}, resp.text
    commit = await client.post(f"/task/new/commit/{task_id}")
    assert commit.json() == {"uuid": task_id}, commit.text
    return task_id


def _images(n: int) -> list[tuple[str, bytes, str]]:
    return [(name, data.JPEG, "image/jpeg") for name in data.image_names(n)]


def _covered(name: str) -> bool:
    return any(name == out or name.startswith(out + "/") for out in OUTPUTS)


async def test_seed_reaches_project_and_all_zip_holds_exactly_the_outputs(
    client: httpx.AsyncClient,
) -> None:
    seed = ("seed.zip", data.zip_bytes(SEED), "application/zip")
    task_id = await _create_chunked(
        client, [*_images(3), seed], name="submodel_0000",
        options=json.dumps([{"name": "dsm", "value": True}]),
        skipPostProcessing="true", outputs=json.dumps(OUTPUTS),
    )

    final = await api.poll_until(client, task_id, api.status_is(30, 40, 50), timeout_s=30)
    assert final["status"] == {"code": 40}, final
    assert final["imagesCount"] == 3, "the seed is no image"

    resp = await client.get(f"/task/{task_id}/download/all.zip")
    assert resp.status_code == 200, resp.text[:200]
    with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
        names = zf.namelist()
        contents: dict[str, bytes] = {n: zf.read(n) for n in names}

    assert len(names) == len(set(names)), "a file shipped twice"
    assert [n for n in names if not _covered(n)] == [], "only the requested outputs"
    assert contents["opensfm/camera_models.json"] == CAMERA_MODELS  # the seed, paths kept
    assert contents["opensfm/features/empty"] == b""  # its touch file
    assert [n for n in names if n.startswith("opensfm/features/")] == ["opensfm/features/empty"]
    for present in ("opensfm/reconstruction.json", "cameras.json", "odm_dem/dsm.tif"):
        assert present in names, (present, names)
    for folder in ("odm_report/", "odm_georeferencing/"):
        assert any(n.startswith(folder) for n in names), (folder, names)
    assert "odm_orthophoto/odm_orthophoto_cut.tif" not in names
    for absent in ("seed.zip", "opensfm/tracks.csv", "task_output.txt", "images.json",
                   "odm_orthophoto/odm_orthophoto.tif"):
        assert absent not in names, absent
    assert not any(n.startswith("images/") for n in names)


async def test_hostile_seed_fails_the_task_with_a_clear_message(
    client: httpx.AsyncClient, stack: Stack,
) -> None:
    hostile = data.zip_bytes({"opensfm/camera_models.json": b"{}", "../evil.txt": b"evil"})
    task_id = await _create_chunked(
        client, [*_images(2), ("seed.zip", hostile, "application/zip")],
        skipPostProcessing="true", outputs=json.dumps(OUTPUTS),
    )

    final: dict[str, Any] = await api.poll_until(
        client, task_id, api.status_is(30, 40, 50), timeout_s=30
    )

    assert final["status"] == {
        "code": 30,
        "errorMessage": "seed.zip refused: entry '../evil.txt' would land outside the project",
    }, final
    run = stack.runs_dir / f"odm-{task_id}-1"
    assert not (run / "work" / "evil.txt").exists()
    assert not list(run.rglob("camera_models.json")), "the refused seed's files are removed"
