"""Results of a finished run: ``all.zip`` in ODM's layout and the outputs in S3 (NodeODM §7.1).

A failed upload is an ``UploadError`` whose message is the task's errorMessage: generic on
purpose (S3's error text names buckets and keys and tells whether they exist); the details are
logged.
"""

from __future__ import annotations

import asyncio
import posixpath
import zipfile
from pathlib import Path

from scaleodm.common import stac
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.domain.progress import clean_line
from scaleodm.common.logging import get_logger
from scaleodm.common.store.s3 import S3, S3Url

log = get_logger(__name__)

# What NodeODM ships when the task names no ``outputs`` (§7.1), in its order.
NODEODM_OUTPUTS = (
    "odm_orthophoto/odm_orthophoto.tif",
    "odm_orthophoto/odm_orthophoto.tfw",
    "odm_orthophoto/odm_orthophoto.png",
    "odm_orthophoto/odm_orthophoto.wld",
    "odm_orthophoto/odm_orthophoto.mbtiles",
    "odm_orthophoto/odm_orthophoto.kmz",
    "odm_orthophoto/odm_orthophoto_extent.dxf",
    "odm_orthophoto/cutline.gpkg",
    "odm_georeferencing",
    "odm_texturing",
    "odm_dem/dsm.tif",
    "odm_dem/dtm.tif",
    "dsm_tiles",
    "dtm_tiles",
    "odm_dem/dsm.euclideand.tif",
    "odm_dem/dtm.euclideand.tif",
    "orthophoto_tiles",
    "potree_pointcloud",
    "entwine_pointcloud",
    "3d_tiles",
    "images.json",
    "cameras.json",
    "task_output.txt",
    "log.json",
    "odm_report",
)
# ... and the task's STAC Item (``results``), when the run made one.
DEFAULT_OUTPUTS = (*NODEODM_OUTPUTS, stac.ITEM_FILE)


def write_task_output(console: Path, project: Path) -> None:
    """``task_output.txt``: the console as clients saw it, one cleaned line per line."""
    lines = []
    if console.exists():
        with console.open("r", errors="replace") as fh:
            lines = [clean_line(raw) for raw in fh]
    (project / "task_output.txt").write_text("\n".join(lines))


async def post_process(project: Path, spec: RunSpec) -> None:
    """COGs and the STAC Item (``results``) unless the task skips post-processing; in a worker
    thread (GDAL work), imported only here so that a run's other steps don't load GDAL.

    A ``stac.json`` already in the project is removed first, skipped or not: it is not this
    run's (a user's ``seed.zip`` puts files anywhere in the project), and would be shipped and
    served as the task's Item."""
    (project / stac.ITEM_FILE).unlink(missing_ok=True)
    if spec.skip_post_processing:
        return
    from scaleodm.run import results  # noqa: PLC0415 - GDAL only where it is used

    await asyncio.to_thread(results.make_results, project, task_id=spec.task_id, title=spec.name)


def collect(project: Path, outputs: list[str] | None) -> list[Path]:
    """Files to ship, in list order; directories recursively; missing entries skipped.

    As NodeODM (§7.2) each path is normalised first (``opensfm/../cameras.json`` is
    ``cameras.json``); one that still leaves the project (``..``, absolute) or names the project
    itself (the inputs with it) is skipped. Every file is judged where it really is, so a link
    out of the project, requested or met inside a requested folder, ships nothing. Files keep
    the name they were asked by (a link's target's name would move them in ``all.zip``), and a
    file asked twice, itself and through its folder, as ODM's split-merge lists may do, ships
    once.
    """
    root = project.resolve()
    files: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        if path not in seen and path.is_file() and path.resolve().is_relative_to(root):
            seen.add(path)
            files.append(path)

    for rel in outputs or DEFAULT_OUTPUTS:
        norm = posixpath.normpath(rel.replace("\\", "/"))
        if norm in (".", "..") or norm.startswith(("../", "/")):
            continue
        path = root / norm
        if not path.resolve().is_relative_to(root):
            continue
        if path.is_dir():
            for found in sorted(path.rglob("*")):
                add(found)
        else:
            add(path)
    return files


def build_zip(project: Path, files: list[Path], dest: Path) -> None:
    """No top-level folder in the archive; deflate level 1 as NodeODM's zip fallback."""
    root = project.resolve()
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in files:
            zf.write(path, path.relative_to(root).as_posix())


class UploadError(Exception):
    """The outputs could not be stored; the message is shown to the user as errorMessage."""


async def upload_outputs(
    s3: S3, prefix: S3Url, project: Path, files: list[Path], archive: Path
) -> None:
    root = project.resolve()
    try:
        for path in files:
            rel = path.relative_to(root).as_posix()
            await s3.upload_file(path, S3Url(prefix.bucket, prefix.key + rel))
        await s3.upload_file(archive, S3Url(prefix.bucket, prefix.key + "all.zip"))
    except Exception as exc:
        log.error("outputs not uploaded", prefix=str(prefix), error=repr(exc))
        raise UploadError("Could not store the task's outputs") from exc
