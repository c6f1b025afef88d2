"""Input files of a task: NodeODM's file naming, and sinks that stream each file into S3.

File names become S3 keys here, and file names on the disks of runs (Linux, and whatever a user
later unpacks ``all.zip`` or the inputs on). A name no file system could hold the same way is
refused before anything is stored (``Invalid file name: ...``), instead of failing the task later:
control characters (NUL included), more than 255 bytes of UTF-8 (the usual file-name limit),
names that are only dots and spaces, and Windows device names (``CON``, ``NUL``, ``COM1``,
``LPT1``, ... with any extension: ``CON.jpg`` cannot be created on Windows).
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from scaleodm.common import metrics
from scaleodm.common.domain.text import shown
from scaleodm.common.store.s3 import S3, S3Url
from scaleodm.common.store.uploads import NamesExhaustedError, UploadStore
from scaleodm.gateway.multipart import FileSink, MultipartError

IMAGES_FIELD = "images"
MAX_NAME_BYTES = 255
_DEVICE_NAME = re.compile(r"(CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])", re.IGNORECASE)


class InvalidFileNameError(MultipartError):
    """A file name refused before anything was stored; the message names the reason."""

    def __init__(self, filename: str, reason: str) -> None:
        super().__init__(f"Invalid file name: \"{shown(filename, 60)}\" ({reason})")


# Characters no file name needs that change how a name is shown: bidi overrides and other
# invisible format characters (a "gpj.exe" shown as "exe.jpg"), line/paragraph separators.
_INVISIBLE = frozenset({"Cf", "Zl", "Zp"})


def _bad_character(text: str) -> str | None:
    categories = {unicodedata.category(c) for c in text}
    if "Cc" in categories or "Cs" in categories:
        return "control character"
    if categories & _INVISIBLE:
        return "invisible format character"
    return None


def _refusal(name: str) -> str | None:
    """Why ``name`` (a base name) cannot be a stored file's name, or None when it can."""
    bad = _bad_character(name)
    if bad is not None:
        return bad
    if len(name.encode("utf-8", errors="surrogatepass")) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    if not name.strip(". "):
        return "reserved name"
    # Windows ignores the extension and trailing spaces of a device name: "con .tar.gz" is CON.
    if _DEVICE_NAME.fullmatch(name.split(".", 1)[0].rstrip(" ")):
        return "reserved name"
    return None


def safe_basename(filename: str) -> str:
    """The file's own name: directories, drive letters and traversal dropped.

    Raises ``InvalidFileNameError`` for a name that cannot be stored (module docstring).
    """
    bad = _bad_character(filename)  # in any part, even dropped ones
    if bad is not None:
        raise InvalidFileNameError(filename, bad)
    base = posixpath.basename(filename.replace("\\", "/"))
    if base == "":
        return "file"  # browsers send an empty file input as filename=""
    name = base.strip()
    reason = _refusal(name) or _refusal(name.lstrip("."))
    if reason is not None:
        raise InvalidFileNameError(filename, reason)
    name = name.lstrip(".")  # no hidden files
    return "_body.json" if name == "body.json" else name  # NodeODM §3.4


def next_name(name: str) -> str:
    """NodeODM §3.4: ``a.jpg`` -> ``a_.jpg`` -> ``a__.jpg``; no extension -> ``a_``."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}_.{ext}" if dot and stem else f"{name}_"


class _S3Sink:
    """One uploaded file on its way into S3; the registry keeps the name bookkeeping.

    ``complete_soon`` lets the request read its next file while this one's last bytes go to S3
    (``S3Writer.complete_soon``); ``multipart.stream_form`` waits for it before the next
    completion and before it returns.
    """

    def __init__(self, s3: S3, url: S3Url, name: str, registry: NameRegistry,
                 content_type: str | None) -> None:
        self.s3 = s3
        self.url = url
        self.writer = s3.writer(url, content_type)
        self.name = name
        self.registry = registry
        self._finishing: asyncio.Future[Any] | None = None
        self._recorded: int | None = None  # the size recorded with the name once stored

    async def write(self, data: bytes | memoryview) -> None:
        await self.writer.write(data)

    async def complete(self) -> Any:
        return await self._record(await self.writer.complete())

    async def complete_soon(self) -> asyncio.Future[Any]:
        size = await self.writer.complete_soon()
        self._finishing = asyncio.ensure_future(self._record_when(size))
        return self._finishing

    async def _record_when(self, size: asyncio.Future[int]) -> Any:
        return await self._record(await size)

    async def _record(self, size: int) -> Any:
        metrics.UPLOAD_BYTES.inc(size)
        await self.registry.stored(self.name, size)
        self._recorded = size
        return self.name

    async def abort(self) -> None:
        finishing, self._finishing = self._finishing, None
        if finishing is not None:  # let it end (bounded by the S3 and store deadlines) rather
            await asyncio.wait([finishing])  # than cut it between the object and its record
            if not finishing.cancelled():
                finishing.exception()  # retrieved: the request is failing already
        try:
            # A completion under way or done may have left the object (and a failed record
            # would leave it unknown): stop what is in flight, then delete it.
            await self.writer.abort()
            if self.writer.completing:
                await self.s3.delete(self.url)
        finally:
            await self.registry.release(self.name, stored_size=self._recorded)


@dataclass
class NameRegistry:
    """Where claimed names live: a set for one request, the upload store for chunked uploads."""

    upload_id: str | None = None
    uploads: UploadStore | None = None
    taken: set[str] = field(default_factory=set)

    async def claim(self, name: str) -> str:
        if self.uploads is not None and self.upload_id is not None:
            try:
                return await self.uploads.claim_name(self.upload_id, name, next_name)
            except NamesExhaustedError as exc:
                raise MultipartError(f"Too many files named like {shown(name, 60)}") from exc
        while name in self.taken:
            name = next_name(name)
        self.taken.add(name)
        return name

    async def stored(self, name: str, size: int) -> None:
        if self.uploads is not None and self.upload_id is not None:
            await self.uploads.mark_stored(self.upload_id, name, size)

    async def release(self, name: str, *, stored_size: int | None = None) -> None:
        """Give a name back: its file was never stored, or (``stored_size``) it was recorded
        and its object is deleted (``UploadStore.release_name``)."""
        if self.uploads is not None and self.upload_id is not None:
            await self.uploads.release_name(self.upload_id, name, stored_size=stored_size)
        self.taken.discard(name)


def s3_sinks(s3: S3, prefix: S3Url, registry: NameRegistry, *, max_files: int) -> Any:
    """A sink factory storing ``images`` parts under ``prefix``; other file fields are refused,
    and so is a request's file beyond ``max_files`` (each is an S3 object and a name claim)."""
    opened = 0

    async def open_sink(field_name: str, filename: str, content_type: str | None) -> FileSink:
        nonlocal opened
        if field_name != IMAGES_FIELD:
            raise MultipartError("Unexpected field")
        opened += 1
        if opened > max_files:
            raise MultipartError(f"Too many files in one request (limit {max_files})")
        name = await registry.claim(safe_basename(filename))
        reason = _refusal(name)  # a duplicate's "_" suffixes may take it past the limit
        if reason is not None:
            await registry.release(name)
            raise InvalidFileNameError(name, reason)
        return _S3Sink(s3, S3Url(prefix.bucket, prefix.key + name), name, registry, content_type)

    return open_sink


def refuse_files() -> Any:
    async def open_sink(_field: str, _filename: str, _content_type: str | None) -> FileSink:
        raise MultipartError("Unexpected field")

    return open_sink
