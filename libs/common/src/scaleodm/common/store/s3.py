"""S3 access with aioboto3: one client per process, opened in the lifespan (stack-notes §7).

Uploads of unknown length go through ``S3Writer``, the one streaming-upload implementation
(``upload_stream`` and ``upload_file`` are built on it; the gateway feeds it multipart file parts
as they arrive from the client):

- bytes are appended to a buffer; as soon as it holds ``part_size_bytes`` (at least 5 MiB, S3's
  minimum for every part but the last) exactly one part is cut off and uploaded with
  ``UploadPart``, the multipart upload being created lazily on the first full part. Memory is
  therefore about one part plus one incoming chunk (plus the part's bytes copy while it is sent),
  whatever the object's size, and the writer awaits each part: a slow S3 back-pressures the
  producer instead of piling data up;
- ``complete()`` sends an object smaller than one part as a single ``PutObject`` (no multipart
  upload ever exists for it), otherwise uploads the remainder as the last part and completes;
- ``abort()`` (idempotent) aborts a started multipart upload, so a failed or cancelled upload
  leaves neither an object nor billable orphaned parts behind. As an async context manager the
  writer aborts when the block is left without ``complete()`` (an exception, a cancellation, or
  a forgotten ``complete``). The abort request is shielded from a second cancellation so that a
  client disconnect cannot leave it half-sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import ClientError

from scaleodm.common.settings import S3Settings

MIN_PART = 5 * 1024 * 1024
MAX_PARTS = 10_000  # S3's limit on the number of parts of one multipart upload

_background: set[asyncio.Task[Any]] = set()  # shielded cleanups still running after a cancel


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str  # an object key, or a prefix ending in "/" (or "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")


def parse_s3_url(url: str) -> S3Url:
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url}")
    bucket, _, key = url[5:].partition("/")
    if len(bucket) < 3:
        raise ValueError(f"invalid bucket in {url}")
    return S3Url(bucket, key)


class S3:
    """Thin async facade over one aioboto3 S3 client."""

    def __init__(self, client: Any, settings: S3Settings) -> None:
        self.client = client
        self.settings = settings
        # The process's part buffers: bounds upload memory however many uploads run at once.
        self.buffers = (
            asyncio.Semaphore(settings.upload_buffers) if settings.upload_buffers > 0 else None
        )

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: S3Settings) -> AsyncIterator[S3]:
        session = aioboto3.Session()
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        async with session.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key.get_secret_value(),
            config=config,
        ) as client:
            s3 = cls(client, settings)
            if settings.create_bucket:
                await s3.ensure_bucket(settings.bucket)
            yield s3

    async def ensure_bucket(self, bucket: str) -> None:
        try:
            await self.client.head_bucket(Bucket=bucket)
        except ClientError:
            kwargs: dict[str, Any] = {"Bucket": bucket}
            if self.settings.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
            with contextlib.suppress(ClientError):  # created concurrently by another service
                await self.client.create_bucket(**kwargs)

    async def ping(self) -> None:
        await self.client.head_bucket(Bucket=self.settings.bucket)

    async def put_bytes(self, url: S3Url, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        await self.client.put_object(Bucket=url.bucket, Key=url.key, Body=data, **extra)

    def writer(self, url: S3Url, content_type: str | None = None) -> S3Writer:
        """A streaming writer for one object; see ``S3Writer``."""
        return S3Writer(self.client, url, max(MIN_PART, self.settings.part_size_bytes),
                        content_type, self.buffers)

    async def upload_stream(self, url: S3Url, chunks: AsyncIterator[bytes]) -> int:
        """Upload an async byte stream; memory is bounded by one part. Returns bytes written."""
        async with self.writer(url) as out:
            async for chunk in chunks:
                await out.write(chunk)
            return await out.complete()

    async def upload_file(self, path: Path, url: S3Url) -> int:
        async def read() -> AsyncIterator[bytes]:
            with path.open("rb") as fh:
                while chunk := fh.read(1024 * 1024):
                    yield chunk

        return await self.upload_stream(url, read())

    async def list_objects(self, prefix: S3Url) -> list[tuple[str, int]]:
        """(key, size) of every object under a prefix."""
        found: list[tuple[str, int]] = []
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key):
            for obj in page.get("Contents", []):
                found.append((obj["Key"], int(obj["Size"])))
        return found

    async def iter_object(self, url: S3Url, chunk_size: int = 1024 * 1024) -> AsyncIterator[bytes]:
        obj = await self.client.get_object(Bucket=url.bucket, Key=url.key)
        body = obj["Body"]
        try:
            async for chunk in body.iter_chunks(chunk_size):
                yield chunk
        finally:
            body.close()

    async def download_file(self, url: S3Url, path: Path) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        total = 0
        with path.open("wb") as fh:
            async for chunk in self.iter_object(url):
                fh.write(chunk)
                total += len(chunk)
        return total

    async def size(self, url: S3Url) -> int | None:
        try:
            head = await self.client.head_object(Bucket=url.bucket, Key=url.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(head["ContentLength"])

    async def delete(self, url: S3Url) -> None:
        """Delete one object (no error if it does not exist)."""
        await self.client.delete_object(Bucket=url.bucket, Key=url.key)

    async def delete_prefix(self, prefix: S3Url) -> int:
        keys = [k for k, _ in await self.list_objects(prefix)]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            await self.client.delete_objects(
                Bucket=prefix.bucket, Delete={"Objects": batch, "Quiet": True}
            )
        return len(keys)


async def _shielded(aw: Awaitable[Any]) -> None:
    """Await ``aw`` so that cancelling the caller does not cancel it: it then finishes alone."""
    task = asyncio.ensure_future(aw)
    _background.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        _background.discard(t)
        if not t.cancelled():
            t.exception()  # retrieved here; the awaiting caller (if any) sees it too

    task.add_done_callback(done)
    await asyncio.shield(task)


class S3Writer:
    """One object written as a stream: ``write``* then ``complete``, or ``abort``.

    Not safe for concurrent ``write`` calls (callers write sequentially, awaiting each call).
    """

    def __init__(self, client: Any, url: S3Url, part_size: int,
                 content_type: str | None = None,
                 budget: asyncio.Semaphore | None = None) -> None:
        if part_size < MIN_PART:
            raise ValueError(f"part size {part_size} is below S3's minimum of {MIN_PART}")
        self.client = client
        self.url = url
        self.part_size = part_size
        self.content_type = content_type
        self._buf = bytearray()
        self._total = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._state = "open"  # -> "completed" | "aborted"
        self._budget = budget
        self._holding = False  # this writer holds one of the process's part buffers

    @property
    def bytes_written(self) -> int:
        """Bytes accepted by ``write`` so far (buffered or uploaded)."""
        return self._total

    @property
    def completed(self) -> bool:
        return self._state == "completed"

    @property
    def parts_uploaded(self) -> int:
        """Parts sent with ``UploadPart`` so far (0: still buffered, or a single ``PutObject``)."""
        return len(self._parts)

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"S3Writer for {self.url} is {self._state}")

    def _extra(self) -> dict[str, Any]:
        return {"ContentType": self.content_type} if self.content_type else {}

    async def write(self, data: bytes) -> None:
        """Buffer ``data``; upload every full part right away (awaited: back-pressure).

        With a budget, a writer first waits for one of the process's part buffers, so many
        concurrent uploads hold at most ``budget`` parts in memory; the others stop reading
        their requests meanwhile (TCP back-pressure on their clients).
        """
        self._check_open()
        if not data:
            return
        await self._hold()
        self._buf += data
        self._total += len(data)
        while len(self._buf) >= self.part_size:
            # Hand the buffer itself to the upload (no copy of a whole part); keep the tail.
            body, self._buf = self._buf, self._buf[self.part_size:]
            del body[self.part_size:]
            await self._upload_part(body)
        if not self._buf:
            self._release()

    async def _hold(self) -> None:
        if self._budget is not None and not self._holding:
            await self._budget.acquire()
            self._holding = True

    def _release(self) -> None:
        if self._budget is not None and self._holding:
            self._holding = False
            self._budget.release()

    async def _upload_part(self, body: bytes | bytearray) -> None:
        if len(self._parts) >= MAX_PARTS:
            raise ValueError(f"{self.url}: more than {MAX_PARTS} parts of {self.part_size} bytes")
        if self._upload_id is None:
            created = await self.client.create_multipart_upload(
                Bucket=self.url.bucket, Key=self.url.key, **self._extra()
            )
            self._upload_id = created["UploadId"]
        n = len(self._parts) + 1
        res = await self.client.upload_part(
            Bucket=self.url.bucket, Key=self.url.key, UploadId=self._upload_id, PartNumber=n,
            Body=body,
        )
        self._parts.append({"PartNumber": n, "ETag": res["ETag"]})

    async def complete(self) -> int:
        """Make the object visible; returns its size. A no-op once completed."""
        if self._state == "completed":
            return self._total
        self._check_open()
        if self._upload_id is None:  # smaller than one part: a single PUT
            await self.client.put_object(
                Bucket=self.url.bucket, Key=self.url.key, Body=bytes(self._buf), **self._extra()
            )
        else:
            if self._buf:
                body = bytes(self._buf)
                self._buf = bytearray()
                await self._upload_part(body)
            await self.client.complete_multipart_upload(
                Bucket=self.url.bucket, Key=self.url.key, UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
            self._upload_id = None
        self._buf = bytearray()
        self._release()
        self._state = "completed"
        return self._total

    async def abort(self) -> None:
        """Drop everything written; abort a started multipart upload. Idempotent.

        After ``complete()`` this does nothing (the object stays; delete it to undo).
        """
        if self._state != "open":
            return
        self._state = "aborted"
        self._buf = bytearray()
        self._release()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            await _shielded(self.client.abort_multipart_upload(
                Bucket=self.url.bucket, Key=self.url.key, UploadId=upload_id
            ))

    async def __aenter__(self) -> S3Writer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != "open":
            return
        if exc_type is None:
            await self.abort()  # left without complete(): nothing is published
            return
        with contextlib.suppress(Exception):  # never mask the original error
            await self.abort()


def task_prefix(bucket: str, task_id: str) -> S3Url:
    return S3Url(bucket, f"tasks/{task_id}/")


def task_inputs(bucket: str, task_id: str) -> S3Url:
    return S3Url(bucket, f"tasks/{task_id}/inputs/")


def task_outputs(bucket: str, task_id: str) -> S3Url:
    return S3Url(bucket, f"tasks/{task_id}/outputs/")
