"""Input files of a task: NodeODM's file naming, and sinks that stream each file into S3."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

from scaleodm.common.store.s3 import S3, S3Url, S3Writer
from scaleodm.common.store.uploads import UploadStore
from scaleodm.gateway.multipart import FileSink, MultipartError

IMAGES_FIELD = "images"


def safe_basename(filename: str) -> str:
    """The file's own name: directories, drive letters and traversal dropped."""
    name = posixpath.basename(filename.replace("\\", "/")).strip().lstrip(".")
    if name in ("", ".", ".."):
        return "file"
    return "_body.json" if name == "body.json" else name  # NodeODM §3.4


def next_name(name: str) -> str:
    """NodeODM §3.4: ``a.jpg`` -> ``a_.jpg`` -> ``a__.jpg``; no extension -> ``a_``."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}_.{ext}" if dot and stem else f"{name}_"


class _S3Sink:
    """One uploaded file on its way into S3; the registry keeps the name bookkeeping."""

    def __init__(self, writer: S3Writer, name: str, registry: NameRegistry) -> None:
        self.writer = writer
        self.name = name
        self.registry = registry

    async def write(self, data: bytes) -> None:
        await self.writer.write(data)

    async def complete(self) -> Any:
        size = await self.writer.complete()
        await self.registry.stored(self.name, size)
        return self.name

    async def abort(self) -> None:
        await self.writer.abort()
        await self.registry.release(self.name)


@dataclass
class NameRegistry:
    """Where claimed names live: a set for one request, the upload store for chunked uploads."""

    upload_id: str | None = None
    uploads: UploadStore | None = None
    taken: set[str] = field(default_factory=set)

    async def claim(self, name: str) -> str:
        if self.uploads is not None and self.upload_id is not None:
            return await self.uploads.claim_name(self.upload_id, name, next_name)
        while name in self.taken:
            name = next_name(name)
        self.taken.add(name)
        return name

    async def stored(self, name: str, size: int) -> None:
        if self.uploads is not None and self.upload_id is not None:
            await self.uploads.mark_stored(self.upload_id, name, size)

    async def release(self, name: str) -> None:
        if self.uploads is not None and self.upload_id is not None:
            await self.uploads.release_name(self.upload_id, name)
        self.taken.discard(name)


def s3_sinks(s3: S3, prefix: S3Url, registry: NameRegistry) -> Any:
    """A sink factory storing ``images`` parts under ``prefix``; other file fields are refused."""

    async def open_sink(field_name: str, filename: str, content_type: str | None) -> FileSink:
        if field_name != IMAGES_FIELD:
            raise MultipartError("Unexpected field")
        name = await registry.claim(safe_basename(filename))
        writer = s3.writer(S3Url(prefix.bucket, prefix.key + name), content_type)
        return _S3Sink(writer, name, registry)

    return open_sink


def refuse_files() -> Any:
    async def open_sink(_field: str, _filename: str, _content_type: str | None) -> FileSink:
        raise MultipartError("Unexpected field")

    return open_sink
