"""S3 access with aioboto3: one client per process, opened in the lifespan (stack-notes §7).

Uploads of unknown length go through a manual multipart upload holding one part in memory and
aborted on any error, so a failed or cancelled upload leaves nothing behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import ClientError

from scaleodm.common.settings import S3Settings

MIN_PART = 5 * 1024 * 1024


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

    async def upload_stream(self, url: S3Url, chunks: AsyncIterator[bytes]) -> int:
        """Upload an async byte stream; memory is bounded by one part. Returns bytes written."""
        part_size = max(MIN_PART, self.settings.part_size_bytes)
        buf = bytearray()
        total = 0
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            async for chunk in chunks:
                buf += chunk
                total += len(chunk)
                while len(buf) >= part_size:
                    if upload_id is None:
                        created = await self.client.create_multipart_upload(
                            Bucket=url.bucket, Key=url.key
                        )
                        upload_id = created["UploadId"]
                    body, buf = bytes(buf[:part_size]), buf[part_size:]
                    n = len(parts) + 1
                    res = await self.client.upload_part(
                        Bucket=url.bucket, Key=url.key, UploadId=upload_id, PartNumber=n, Body=body
                    )
                    parts.append({"PartNumber": n, "ETag": res["ETag"]})
            if upload_id is None:  # small: one PUT
                await self.client.put_object(Bucket=url.bucket, Key=url.key, Body=bytes(buf))
                return total
            if buf:
                n = len(parts) + 1
                res = await self.client.upload_part(
                    Bucket=url.bucket, Key=url.key, UploadId=upload_id, PartNumber=n,
                    Body=bytes(buf),
                )
                parts.append({"PartNumber": n, "ETag": res["ETag"]})
            await self.client.complete_multipart_upload(
                Bucket=url.bucket, Key=url.key, UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            upload_id = None
            return total
        finally:
            if upload_id is not None:
                with contextlib.suppress(Exception):
                    await self.client.abort_multipart_upload(
                        Bucket=url.bucket, Key=url.key, UploadId=upload_id
                    )

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

    async def delete_prefix(self, prefix: S3Url) -> int:
        keys = [k for k, _ in await self.list_objects(prefix)]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            await self.client.delete_objects(
                Bucket=prefix.bucket, Delete={"Objects": batch, "Quiet": True}
            )
        return len(keys)


def task_prefix(bucket: str, task_id: str) -> S3Url:
    return S3Url(bucket, f"tasks/{task_id}/")


def task_inputs(bucket: str, task_id: str) -> S3Url:
    return S3Url(bucket, f"tasks/{task_id}/inputs/")


def task_outputs(bucket: str, task_id: str) -> S3Url:
    return S3Url(bucket, f"tasks/{task_id}/outputs/")
