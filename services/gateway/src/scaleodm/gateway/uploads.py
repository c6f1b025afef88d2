"""Input files of a new task: NodeODM's file naming, then straight into S3."""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile

from scaleodm.common.store.s3 import S3, S3Url


def safe_basename(filename: str) -> str:
    """The file's own name: directories, drive letters and traversal dropped."""
    name = posixpath.basename(filename.replace("\\", "/")).strip()
    if name in ("", ".", ".."):
        return "file"
    return name


def unique_name(name: str, taken: set[str]) -> str:
    """NodeODM §3.4: ``a.jpg`` -> ``a_.jpg`` -> ``a__.jpg``; ``body.json`` -> ``_body.json``."""
    if name == "body.json":
        name = "_body.json"
    while name in taken:
        stem, dot, ext = name.rpartition(".")
        name = f"{stem}_.{ext}" if dot and stem else f"{name}_"
    taken.add(name)
    return name


async def _chunks(upload: UploadFile, size: int = 1024 * 1024) -> AsyncIterator[bytes]:
    while chunk := await upload.read(size):
        yield chunk


async def store_uploads(s3: S3, prefix: S3Url, files: list[UploadFile]) -> list[str]:
    """Upload each file under ``prefix``; returns the stored names."""
    taken: set[str] = set()
    names = []
    for upload in files:
        name = unique_name(safe_basename(upload.filename or "file"), taken)
        await s3.upload_stream(S3Url(prefix.bucket, prefix.key + name), _chunks(upload))
        names.append(name)
    return names
