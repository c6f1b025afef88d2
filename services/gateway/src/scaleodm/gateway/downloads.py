"""``all.zip`` of a finished task, streamed from S3 (NodeODM §3.8, §7.1).

A finished run leaves its outputs under the task's output prefix in ODM's folder layout and
normally ``all.zip`` beside them. ``all_zip`` serves that archive as it is, streamed in chunks
of at most 1 MiB with its exact ``Content-Length``. When it is missing but outputs exist, the
archive is built *while it is sent*: every object under the prefix except the top-level
``all.zip`` becomes an entry named by its path relative to the prefix (no top-level folder, as
§7.1 requires). The archive is never held in memory or on disk, nor is any whole file: at any
time the gateway holds about one chunk (at most 1 MiB) per download.

Ranges: the response never carries ``Accept-Ranges`` (NodeODM doesn't either). PyODM switches to
16 parallel ``Range`` requests when it sees ``Accept-Ranges: bytes`` with a ``Content-Length``
over 10 MB (§12.1); neither path here can answer ranges, and an on-the-fly archive could not
honour them cheaply. ``streaming_response`` strips the header whatever the caller passed.

Library: zipstream-ng (pure Python, no dependencies, maintained, packaged by Debian). It was
chosen over stream-zip because it is the one that can compute the archive's *final size before
any data is generated* for stored entries whose sizes are known — which S3's listing gives us —
while still writing each entry's CRC-32 in a data descriptor after the data, so every file is
read exactly once. That gives the on-the-fly archive an exact ``Content-Length`` (PyODM and
WebODM use it for progress, and a short body is then detectable by the client). stream-zip has
a native async API, but its stored modes need each file's CRC-32 up front (or buffer the whole
file to get it), and its streamed deflate mode cannot know the size, so no ``Content-Length``.
zipstream-ng switches to ZIP64 by itself, per entry (files near or over 4 GiB) and for the end
records (archive over 4 GiB, or more than 65,535 entries), and counts it in the size.

Compression: entries are stored, not deflated. ODM's products are already compressed (GeoTIFF
with internal compression, LAZ, PNG/JPEG tiles, GLB, MBTiles), so deflate would save little but
cost CPU on the gateway and lose the up-front size. NodeODM uses deflate level 1; any unzipper
reads stored entries (Python's ``zipfile``, which WebODM and PyODM use, included).

Sync/async bridge: zipstream-ng is a synchronous generator that pulls each entry's data from a
plain iterable. It runs in a worker thread (``anyio.to_thread``, one step per output chunk, so
the CRC-32 work is off the event loop too), and each entry's iterable fetches the next S3 chunk
on the event loop with ``anyio.from_thread.run``. Only the public contract of the library is
relied on ("an iterable of bytes of the announced size"). Left unread or cancelled (client
gone), the stream closes the S3 object being read.

Caveats: entries carry the time they were streamed (zipstream-ng's ``add`` takes no mtime) and
mode 0600, as zipstream-ng sets for data that does not come from a file. Keys that would not be
safe archive names (``..``, ``.``, empty segments, NUL) are left out and logged. An object that
disappears or changes size between the listing and its turn fails the stream part way; the
client then gets fewer bytes than ``Content-Length`` announced, never a silently wrong archive.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from typing import cast
from zipfile import ZIP_STORED

import anyio
import anyio.from_thread
import anyio.to_thread
from starlette.responses import StreamingResponse
from zipstream import ZipStream  # type: ignore[import-untyped]

from scaleodm.common.logging import get_logger
from scaleodm.common.store.s3 import S3, S3Url

log = get_logger(__name__)

CHUNK_SIZE = 1024 * 1024
ARCHIVE_NAME = "all.zip"


@dataclass(frozen=True)
class Download:
    """What to send: status, response headers and the body as an async byte stream."""

    headers: dict[str, str]
    body: AsyncIterator[bytes]
    status: int = 200


def _headers(length: int) -> dict[str, str]:
    return {
        "Content-Type": "application/zip",
        "Content-Disposition": f"attachment; filename={ARCHIVE_NAME}",
        "Content-Length": str(length),
    }


def _safe_name(rel: str) -> bool:
    """A relative key usable as an archive name: no traversal, no empty segment, no NUL."""
    if not rel or "\x00" in rel or rel.startswith("/"):
        return False
    parts = rel.split("/")
    if rel.endswith("/"):  # a "directory marker" object
        parts = parts[:-1]
    return all(part not in ("", ".", "..") for part in parts)


async def all_zip(s3: S3, output_prefix: S3Url) -> Download | None:
    """The task's ``all.zip``: the stored one, else one built on the fly; None if no outputs."""
    prefix = output_prefix.folder
    stored = prefix.child(ARCHIVE_NAME)
    size = await s3.size(stored)
    if size is not None:
        return Download(_headers(size), s3.iter_object(stored, CHUNK_SIZE))

    entries: list[tuple[str, int]] = []
    for key, obj_size in await s3.list_objects(prefix):
        rel = key[len(prefix.key):]
        if rel == ARCHIVE_NAME:  # appeared since the HEAD: still build from the outputs
            continue
        if not _safe_name(rel):
            log.warning("output left out of all.zip: unsafe name", key=key)
            continue
        entries.append((rel, obj_size))
    if not entries:
        return None
    stream = _OnTheFlyZip(s3, prefix, entries)
    return Download(_headers(stream.size), stream.body())


async def single_file(s3: S3, output_prefix: S3Url, rel: str, name: str,
                      range_header: str | None = None) -> Download | None:
    """One output file (``rel`` under the prefix) as ``name``, streamed; None if absent.

    Unlike ``all.zip`` it answers ``Range`` (RFC 9110 §14): a COG is read by ranges (GDAL's
    ``/vsicurl/``, QGIS). One range of ``bytes`` — ``a-b``, ``a-``, ``-n`` — is served as 206
    with ``Content-Range``; a range past the end is ``Unsatisfiable`` (416, the caller answers
    it); anything else (several ranges, another unit, bad syntax, ``If-Range``, which would
    need validators this does not keep) gets the whole file, as RFC 9110 allows.
    """
    url = output_prefix.child(rel)
    size = await s3.size(url)
    if size is None:
        return None
    headers = {
        "Content-Type": "image/tiff" if name.endswith(".tif") else "application/octet-stream",
        "Content-Disposition": f"attachment; filename={name}",
        "Accept-Ranges": "bytes",
    }
    wanted = parse_range(range_header, size) if range_header is not None else None
    if wanted is None:
        return Download({**headers, "Content-Length": str(size)},
                        s3.iter_object(url, CHUNK_SIZE))
    first, last = wanted
    headers.update({"Content-Length": str(last - first + 1),
                    "Content-Range": f"bytes {first}-{last}/{size}"})
    return Download(headers, s3.iter_object(url, CHUNK_SIZE, (first, last)), status=206)


class Unsatisfiable(Exception):
    """A ``Range`` that starts past the end of the file (416, ``Content-Range: bytes */size``)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable (size {size})")
        self.size = size


MAX_RANGE_HEADER = 200  # one range is short; a longer header is many ranges (ignored)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The one byte range ``header`` asks for, clamped to ``size``: (first, last) inclusive;
    None to send the whole file; ``Unsatisfiable`` when it starts past the end."""
    if len(header) > MAX_RANGE_HEADER:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    start, dash, end = spec.partition("-")
    start, end = start.strip(), end.strip()
    if not dash or not all(p == "" or (p.isascii() and p.isdigit()) for p in (start, end)):
        return None
    if start == "":  # a suffix: the last n bytes
        if end == "":
            return None
        if int(end) == 0 or size == 0:
            raise Unsatisfiable(size)
        return max(0, size - int(end)), size - 1
    first = int(start)
    if end != "" and int(end) < first:
        return None  # invalid, so ignored
    if first >= size:
        raise Unsatisfiable(size)
    return first, size - 1 if end == "" else min(int(end), size - 1)


class _ObjectChunks:
    """One S3 object as a *synchronous* iterator of chunks, for zipstream-ng.

    ``__next__`` runs in a worker thread (where zipstream-ng's generator runs) and fetches the
    next chunk on the event loop. The S3 request is made on the first ``next``.
    """

    def __init__(self, s3: S3, url: S3Url) -> None:
        self._s3 = s3
        self._url = url
        self._chunks: AsyncIterator[bytes] | None = None
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        chunk = anyio.from_thread.run(self._next_chunk)
        if chunk is None:
            self._done = True
            raise StopIteration
        return chunk

    async def _next_chunk(self) -> bytes | None:
        if self._chunks is None:
            self._chunks = self._s3.iter_object(self._url, CHUNK_SIZE)
        async for chunk in self._chunks:
            if chunk:
                return chunk
        return None

    async def aclose(self) -> None:
        """Release the S3 response if the object was left part-read (idempotent)."""
        self._done = True
        chunks, self._chunks = self._chunks, None
        closer = getattr(chunks, "aclose", None)
        if closer is not None:
            await closer()


class _OnTheFlyZip:
    """A stored (uncompressed) zip of S3 objects, sized up front and generated on demand."""

    def __init__(self, s3: S3, prefix: S3Url, entries: list[tuple[str, int]]) -> None:
        self._zip = ZipStream(compress_type=ZIP_STORED, sized=True)
        self._readers: list[_ObjectChunks] = []
        for rel, size in entries:
            if rel.endswith("/"):
                self._zip.add(None, rel)  # an empty folder: a directory entry, no data
                continue
            reader = _ObjectChunks(s3, prefix.child(rel))
            self._readers.append(reader)
            self._zip.add(reader, rel, size=size)
        self.size = int(len(self._zip))

    async def body(self) -> AsyncIterator[bytes]:
        generator = cast(Generator[bytes, None, None], iter(self._zip))
        try:
            while (chunk := await anyio.to_thread.run_sync(_step, generator)) is not None:
                yield chunk
        finally:
            # The worker thread has finished its step here (run_sync waits for it even when
            # cancelled), so nothing else touches the generator or the readers.
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    generator.close()
                for reader in self._readers:
                    with contextlib.suppress(Exception):
                        await reader.aclose()


def _step(generator: Iterator[bytes]) -> bytes | None:
    return next(generator, None)


def streaming_response(download: Download) -> StreamingResponse:
    """A ``StreamingResponse`` for ``all.zip``; never advertises ``Accept-Ranges``."""
    headers = {k: v for k, v in download.headers.items() if k.lower() != "accept-ranges"}
    response = StreamingResponse(download.body, headers=headers)
    if "accept-ranges" in response.headers:
        del response.headers["accept-ranges"]
    return response


def file_response(download: Download) -> StreamingResponse:
    """A ``StreamingResponse`` for one file (``single_file``): its status, ranges advertised."""
    return StreamingResponse(download.body, status_code=download.status,
                             headers=download.headers)
