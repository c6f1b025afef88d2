"""``S3Writer`` (and ``S3.upload_stream`` on top of it) against the real moto S3 server.

Each test works in a bucket of its own (unique name) through ``S3.open`` with a 5 MiB part size,
the smallest S3 accepts, so that multipart behaviour shows with small objects.

Covered: an object smaller than one part is one ``PutObject`` (no multipart upload, plain ETag,
content type kept), and so is one of exactly one part; 12 MiB written in uneven chunks becomes a
3-part upload (ETag ``-3``) with identical content (sha256) and content type, parts going out while
writing (pipelined: the process's buffers are free); ``abort`` after partial writes leaves no
object and no pending multipart upload, and is idempotent; the context manager aborts on an
exception and when left without ``complete()``; ``upload_stream`` round-trips; ``S3.delete``; the
part size is at least 5 MiB.

Left out: real AWS behaviour beyond moto (checksums, throttling) and the multipart parser
(``tests/unit/test_multipart.py``).
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import AsyncIterator

import pytest
from botocore.exceptions import ClientError

from scaleodm.common.settings import S3Settings
from scaleodm.common.store.s3 import MIN_PART, S3, S3Url, S3Writer
from tests.harness import servers

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture
async def store(s3: servers.S3Endpoint) -> AsyncIterator[S3]:
    bucket = f"writer-{uuid.uuid4().hex[:16]}"
    settings = S3Settings(
        endpoint_url=s3.url, region=s3.region, access_key_id=s3.access_key,
        secret_access_key=s3.secret_key, bucket=bucket, create_bucket=True,
        part_size_bytes=5 * MiB,
    )
    async with S3.open(settings) as opened:
        yield opened


def url(store: S3, name: str) -> S3Url:
    return S3Url(store.settings.bucket, f"objects/{name}")


async def pending_uploads(store: S3) -> list[str]:
    res = await store.client.list_multipart_uploads(Bucket=store.settings.bucket)
    return [u["Key"] for u in res.get("Uploads", [])]


async def exists(store: S3, target: S3Url) -> bool:
    return await store.size(target) is not None


async def read_all(store: S3, target: S3Url) -> bytes:
    return b"".join([chunk async for chunk in store.iter_object(target)])


async def test_small_object_is_one_put(store: S3) -> None:
    target = url(store, "small.txt")
    writer = store.writer(target, "text/plain")
    assert writer.part_size == 5 * MiB
    for piece in (b"hello ", b"", b"world"):
        await writer.write(piece)
    assert writer.bytes_written == 11
    assert await writer.complete() == 11
    assert writer.completed and writer.parts_uploaded == 0
    head = await store.client.head_object(Bucket=target.bucket, Key=target.key)
    assert "-" not in head["ETag"]  # not a multipart object
    assert head["ContentType"] == "text/plain"
    assert await read_all(store, target) == b"hello world"
    assert await pending_uploads(store) == []
    assert await writer.complete() == 11  # idempotent
    await writer.abort()  # no-op once completed: the object stays
    assert await exists(store, target)
    await store.delete(target)  # what callers do with files of a refused request
    assert not await exists(store, target)
    await store.delete(target)  # already gone: no error


async def test_empty_object(store: S3) -> None:
    target = url(store, "empty")
    async with store.writer(target) as writer:
        assert await writer.complete() == 0
    assert await store.size(target) == 0


async def test_an_object_of_exactly_one_part_is_one_put(store: S3) -> None:
    target = url(store, "one-part.bin")
    data = random.Random(6).randbytes(5 * MiB)
    async with store.writer(target) as writer:
        for i in range(0, len(data), MiB):
            await writer.write(data[i : i + MiB])
        assert writer.parts_uploaded == 0  # a part is cut only once a byte beyond it came
        assert await writer.complete() == len(data)
    assert writer.parts_uploaded == 0
    head = await store.client.head_object(Bucket=target.bucket, Key=target.key)
    assert "-" not in head["ETag"]
    assert await read_all(store, target) == data
    assert await pending_uploads(store) == []


async def test_multipart_upload_is_identical(store: S3) -> None:
    target = url(store, "big.bin")
    data = random.Random(7).randbytes(12 * MiB)
    rng = random.Random(8)
    async with store.writer(target, "image/tiff") as writer:
        i = 0
        while i < len(data):  # uneven chunks, so parts are cut across chunk boundaries
            n = rng.randint(1, 3 * MiB)
            await writer.write(data[i : i + n])
            i += n
        assert writer.parts_uploaded == 2  # the first two parts went out while writing
        assert await writer.complete() == len(data)
    assert writer.parts_uploaded == 3
    head = await store.client.head_object(Bucket=target.bucket, Key=target.key)
    assert head["ETag"].strip('"').endswith("-3")
    assert head["ContentLength"] == len(data)
    assert head["ContentType"] == "image/tiff"
    stored = await read_all(store, target)
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()
    assert await pending_uploads(store) == []


async def test_exact_multiple_of_the_part_size(store: S3) -> None:
    target = url(store, "ten.bin")
    data = b"\x01" * (10 * MiB)
    async with store.writer(target) as writer:
        await writer.write(data)
        assert writer.parts_uploaded == 1  # the second waits for a byte beyond it, or the end
        await writer.complete()
    assert writer.parts_uploaded == 2  # no empty third part
    assert await read_all(store, target) == data


async def test_abort_after_partial_writes_leaves_nothing(store: S3) -> None:
    target = url(store, "aborted.bin")
    writer = store.writer(target)
    await writer.write(b"a" * (6 * MiB))  # one part uploaded, 1 MiB buffered
    assert writer.parts_uploaded == 1
    assert await pending_uploads(store) == [target.key]
    await writer.abort()
    await writer.abort()  # idempotent
    assert await pending_uploads(store) == []
    assert not await exists(store, target)
    with pytest.raises(RuntimeError):
        await writer.write(b"more")
    with pytest.raises(RuntimeError):
        await writer.complete()


async def test_abort_before_any_part(store: S3) -> None:
    target = url(store, "tiny-aborted")
    writer = store.writer(target)
    await writer.write(b"buffered only")
    await writer.abort()
    assert not await exists(store, target)
    assert await pending_uploads(store) == []


async def test_context_manager_aborts_on_exception(store: S3) -> None:
    target = url(store, "failed.bin")
    with pytest.raises(ValueError, match="client went away"):
        async with store.writer(target) as writer:
            await writer.write(b"b" * (7 * MiB))
            assert await pending_uploads(store) == [target.key]
            raise ValueError("client went away")
    assert await pending_uploads(store) == []
    assert not await exists(store, target)


async def test_context_manager_without_complete_publishes_nothing(store: S3) -> None:
    target = url(store, "forgotten.bin")
    async with store.writer(target) as writer:
        await writer.write(b"c" * (6 * MiB))
    assert await pending_uploads(store) == []
    assert not await exists(store, target)


async def test_upload_stream_on_top_of_the_writer(store: S3) -> None:
    target = url(store, "stream.bin")
    data = random.Random(9).randbytes(11 * MiB + 123)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), MiB):
            yield data[i : i + MiB]

    assert await store.upload_stream(target, chunks()) == len(data)
    assert await read_all(store, target) == data
    head = await store.client.head_object(Bucket=target.bucket, Key=target.key)
    assert head["ETag"].strip('"').endswith("-3")


async def test_upload_stream_failure_leaves_nothing(store: S3) -> None:
    target = url(store, "stream-failed.bin")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"d" * (6 * MiB)
        raise ConnectionResetError("source failed")

    with pytest.raises(ConnectionResetError):
        await store.upload_stream(target, chunks())
    assert await pending_uploads(store) == []
    assert not await exists(store, target)


async def test_write_to_a_missing_bucket_fails_cleanly(store: S3) -> None:
    writer = store.writer(S3Url(f"missing-{uuid.uuid4().hex[:12]}", "x"))
    with pytest.raises(ClientError):
        async with writer:
            await writer.write(b"e" * (5 * MiB + 1))
    assert not writer.completed


async def test_part_size_floor(store: S3) -> None:
    with pytest.raises(ValueError, match="below S3's minimum"):
        S3Writer(store.client, url(store, "x"), MIN_PART - 1)
