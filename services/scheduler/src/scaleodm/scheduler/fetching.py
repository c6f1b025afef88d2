"""Bringing a run's inputs into its project: ``images/`` flattened, plus GCP/geo text files.

Sources are http(s) URLs of zips, ``s3://`` zip objects, or ``s3://bucket/prefix/`` folders of
images and/or zips. Archives are extracted flattened (no paths, so no traversal), non-images are
dropped except ``.txt`` control files (GCP, geo, image groups), and name clashes get NodeODM's
``_`` suffix. Archive size and entry counts are bounded (zip bombs). http(s) downloads go through
the outbound guard (``netguard``): every connection, redirects included, is checked on the
address it connects to.
"""

from __future__ import annotations

import posixpath
import shutil
import zipfile
import zlib
from pathlib import Path

import httpx

from scaleodm.common import netguard
from scaleodm.common.logging import get_logger
from scaleodm.common.store.s3 import S3, S3Url, parse_s3_url

log = get_logger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".tif", ".tiff", ".png", ".dng"})
CONTROL_EXTS = frozenset({".txt"})
MAX_ENTRIES = 500_000
_ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError)


class InputError(Exception):
    """The inputs cannot be used; the message is shown to the user as errorMessage."""


def _ext(name: str) -> str:
    return posixpath.splitext(name)[1].lower()


def _wanted(name: str) -> bool:
    return _ext(name) in IMAGE_EXTS or _ext(name) in CONTROL_EXTS


def _target(dest: Path, name: str) -> Path:
    base = posixpath.basename(name.replace("\\", "/")) or "file"
    path = dest / base
    while path.exists():
        stem, ext = posixpath.splitext(path.name)
        path = dest / f"{stem}_{ext}"
    return path


def extract_zip(archive: Path, dest: Path, max_bytes: int) -> int:
    """Extract wanted files flattened; returns how many were written."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise InputError(f"Could not extract .zip file: {exc}") from exc
    written = 0
    total = 0
    with zf:
        members = zf.infolist()
        if len(members) > MAX_ENTRIES:
            raise InputError(f"Archive has too many entries ({len(members)})")
        for info in members:
            if info.is_dir() or not _wanted(info.filename):
                continue
            total += info.file_size
            if total > max_bytes:
                raise InputError("Archive expands beyond the size limit")
            try:
                with zf.open(info) as src, _target(dest, info.filename).open("wb") as out:
                    shutil.copyfileobj(src, out, 1024 * 1024)
            except _ZIP_READ_ERRORS as exc:  # damaged, encrypted or unsupported member
                raise InputError(f"Could not extract .zip file: {exc}") from exc
            written += 1
    return written


async def _download_http(
    url: str, path: Path, max_bytes: int, timeout_s: float, outbound: netguard.OutboundPolicy
) -> None:
    timeout = httpx.Timeout(connect=15.0, read=timeout_s, write=30.0, pool=15.0)
    transport = netguard.GuardedTransport(outbound)
    try:
        async with httpx.AsyncClient(
            transport=transport, timeout=timeout, follow_redirects=True
        ) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise InputError(f"Could not download zipurl: HTTP {resp.status_code}")
                size = 0
                with path.open("wb") as fh:
                    async for chunk in resp.aiter_bytes(1024 * 1024):
                        size += len(chunk)
                        if size > max_bytes:
                            raise InputError("zipurl is larger than the size limit")
                        fh.write(chunk)
    except httpx.HTTPError as exc:
        reason = netguard.refusal_of(exc) or exc or type(exc).__name__
        raise InputError(f"Could not download zipurl: {reason}") from exc


async def fetch_inputs(
    sources: list[str], images: Path, s3: S3, *, max_bytes: int, timeout_s: float,
    outbound: netguard.OutboundPolicy | None = None,
) -> int:
    """Fill ``images`` from every source; returns the number of images it holds.

    ``outbound`` says which non-public addresses http(s) sources may use (default: none).
    """
    outbound = outbound or netguard.OutboundPolicy()
    images.mkdir(parents=True, exist_ok=True)
    scratch = images.parent / ".downloads"
    scratch.mkdir(exist_ok=True)
    try:
        for n, source in enumerate(sources):
            if source.startswith(("http://", "https://")):
                archive = scratch / f"{n}.zip"
                await _download_http(source, archive, max_bytes, timeout_s, outbound)
                extract_zip(archive, images, max_bytes)
                archive.unlink()
            elif source.startswith("s3://"):
                await _fetch_s3(parse_s3_url(source), images, scratch, s3, max_bytes)
            else:
                raise InputError(f"Unsupported input URL: {source}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return sum(1 for p in images.iterdir() if _ext(p.name) in IMAGE_EXTS)


async def _fetch_s3(url: S3Url, images: Path, scratch: Path, s3: S3, max_bytes: int) -> None:
    try:
        if not url.is_prefix:
            keys = [(url.key, 0)]
        else:
            keys = await s3.list_objects(url)
        for key, _ in keys:
            name = posixpath.basename(key)
            if _ext(name) == ".zip":
                archive = scratch / "s3.zip"
                await s3.download_file(S3Url(url.bucket, key), archive)
                extract_zip(archive, images, max_bytes)
                archive.unlink()
            elif _wanted(name):
                await s3.download_file(S3Url(url.bucket, key), _target(images, name))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"Could not read inputs from {url}: {exc}") from exc


def control_file_args(images: Path, project: Path) -> list[str]:
    """Move .txt control files out of images/ and map them to ODM flags (NodeODM §6)."""
    args: list[str] = []
    gcp_dir = project / "gcp"
    gcp_seen = False
    for path in sorted(images.iterdir()):
        if _ext(path.name) not in CONTROL_EXTS:
            continue
        gcp_dir.mkdir(exist_ok=True)
        target = gcp_dir / path.name
        path.rename(target)
        lower = path.name.lower()
        if lower == "geo.txt":
            args += ["--geo", str(target)]
        elif lower == "image_groups.txt":
            args += ["--split-image-groups", str(target)]
        elif not gcp_seen:
            args += ["--gcp", str(target)]
            gcp_seen = True
    return args
