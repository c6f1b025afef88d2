"""``S3Writer``'s parts and the part buffers they hold, in memory (a fake S3 client).

Covered: an object of at most one part is one ``PutObject`` whose body is the written bytes as
one ``bytearray`` (a part is cut only once a byte beyond it came); larger objects are parts of
exactly the part size in order, their bytes identical to what was written; with a spare buffer
free, a part goes out while the next one fills (``write`` returns with the part in flight), at
most one part in flight per writer (the next cut waits for it), and the spare is given back when
it is sent; with no buffer free the part is sent inline; the buffers held plus the spares lent
never exceed the pool's limit; a waiting account gets the spare once the part in flight is sent;
a part that fails in flight fails the next ``write`` (and ``complete``), and ``abort`` then
aborts the multipart upload; ``abort`` with a part in flight stops it, aborts the multipart
upload and gives every buffer back. ``complete_soon``: with a spare, the filling buffer is given
back at once (the account's next writer fills while the last bytes are sent) and the future
gives the size; without one it completes inline; ``abort`` during it stops the completion, aborts
the multipart upload and leaves ``completing`` set (the object may exist).

Left out: moto and real S3 (``tests/integration/test_s3_writer.py``), the hold deadline and
preemption (``tests/security/test_dos_uploads.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from scaleodm.common.store import s3 as s3mod

PART = s3mod.MIN_PART
LONG_S = 30.0  # waits that must not run out (loaded CI machines)


class FakeS3Client:
    """The calls ``S3Writer`` makes, recorded; ``gate`` holds every ``upload_part`` until set;
    ``fail_part`` makes that part number fail."""

    def __init__(self, pool: s3mod.PartBuffers | None = None) -> None:
        self.pool = pool
        self.calls: list[tuple[str, Any]] = []
        self.bodies: dict[int, bytes] = {}
        self.put: bytes | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.most_in_flight = 0
        self.most_buffers = 0
        self.fail_part: int | None = None

    def _watch(self) -> None:
        if self.pool is not None:
            self.most_buffers = max(self.most_buffers, self.pool.held + self.pool.spares)

    async def put_object(self, *, Body: Any, **_: Any) -> dict[str, Any]:  # noqa: N803
        self._watch()
        assert type(Body) is bytearray  # hashed and sent as it is (no BytesIO)
        self.calls.append(("put", len(Body)))
        await self.gate.wait()
        self.put = Body
        return {"ETag": "p"}

    async def create_multipart_upload(self, **_: Any) -> dict[str, Any]:
        self.calls.append(("create", None))
        return {"UploadId": "u1"}

    async def upload_part(self, *, PartNumber: int, Body: Any, **_: Any  # noqa: N803
                          ) -> dict[str, Any]:
        self._watch()
        assert type(Body) is bytearray  # hashed and sent as it is (no BytesIO)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self.calls.append(("part", PartNumber))
            await self.gate.wait()
            if PartNumber == self.fail_part:
                raise ConnectionResetError("S3 went away")
            self.bodies[PartNumber] = Body
            return {"ETag": f"e{PartNumber}"}
        finally:
            self.in_flight -= 1

    async def complete_multipart_upload(self, *, MultipartUpload: Any, **_: Any  # noqa: N803
                                        ) -> dict[str, Any]:
        self.calls.append(("complete", [p["PartNumber"] for p in MultipartUpload["Parts"]]))
        return {}

    async def abort_multipart_upload(self, **_: Any) -> dict[str, Any]:
        self.calls.append(("abort", None))
        return {}


def writer(client: FakeS3Client, account: s3mod.BufferAccount | None) -> s3mod.S3Writer:
    return s3mod.S3Writer(client, s3mod.S3Url("bucket", "key"), PART, account=account)


async def _eventually(cond: Any) -> None:
    async with asyncio.timeout(LONG_S):
        while not cond():
            await asyncio.sleep(0.001)


@pytest.mark.parametrize("size", [pytest.param(0, id="empty"), pytest.param(1000, id="small"),
                                  pytest.param(PART, id="exactly-one-part")])
async def test_at_most_one_part_is_one_put(size: int) -> None:
    client = FakeS3Client()
    out = writer(client, s3mod.PartBuffers(2).account())
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    for i in range(0, size, 70_000):
        await out.write(data[i : i + 70_000])
    assert await out.complete() == size
    assert client.calls == [("put", size)]
    assert client.put == data


async def test_parts_are_cut_at_the_part_size_in_order() -> None:
    client = FakeS3Client()
    pool = s3mod.PartBuffers(2)
    out = writer(client, pool.account())
    data = bytes(i % 251 for i in range(2 * PART + 12345))
    for piece in (data[:100], bytearray(data[100:PART + 7]), memoryview(data)[PART + 7:]):
        await out.write(piece)  # mutable buffers are copied, bytes kept
    assert out.parts_uploaded == 2  # the third waits for the end
    assert await out.complete() == len(data)
    assert [c for c in client.calls if c[0] != "part"] == [("create", None),
                                                            ("complete", [1, 2, 3])]
    assert [len(client.bodies[n]) for n in (1, 2, 3)] == [PART, PART, 12345]
    assert b"".join(client.bodies[n] for n in (1, 2, 3)) == data
    assert pool.held == 0 and pool.spares == 0


async def test_a_part_goes_out_while_the_next_fills_one_at_a_time() -> None:
    pool = s3mod.PartBuffers(2)
    client = FakeS3Client(pool)
    client.gate.clear()
    out = writer(client, pool.account())
    await out.write(b"a" * (PART + 1))  # part 1 in flight on a spare: write returned
    await _eventually(lambda: client.in_flight == 1)
    assert pool.held == 1 and pool.spares == 1
    second = asyncio.create_task(out.write(b"b" * PART))  # part 2 cut: waits for part 1
    await asyncio.sleep(0.05)
    assert not second.done() and client.calls == [("create", None), ("part", 1)]
    client.gate.set()
    await asyncio.wait_for(second, LONG_S)
    assert await out.complete() == 2 * PART + 1
    assert client.most_in_flight == 1 and client.most_buffers <= 2
    assert pool.held == 0 and pool.spares == 0


async def test_without_a_free_buffer_a_part_is_sent_inline() -> None:
    pool = s3mod.PartBuffers(1)
    client = FakeS3Client(pool)
    client.gate.clear()
    out = writer(client, pool.account())
    writing = asyncio.create_task(out.write(b"a" * (PART + 1)))
    await _eventually(lambda: client.in_flight == 1)
    assert not writing.done() and pool.spares == 0  # the producer waits for S3
    client.gate.set()
    await asyncio.wait_for(writing, LONG_S)
    await out.complete()
    assert client.most_buffers == 1


async def test_the_spare_goes_to_a_waiting_account_when_its_part_is_sent() -> None:
    pool = s3mod.PartBuffers(2)
    client = FakeS3Client(pool)
    client.gate.clear()
    out = writer(client, pool.account())
    await out.write(b"a" * (PART + 1))
    await _eventually(lambda: pool.spares == 1)
    other = pool.account(wait_s=LONG_S)
    waiting = asyncio.create_task(other.acquire())
    await _eventually(lambda: pool.waiting == 1)
    client.gate.set()
    await asyncio.wait_for(waiting, LONG_S)
    assert other.holding and pool.held == 2 and pool.spares == 0
    other.release()
    await out.complete()


async def test_a_part_that_fails_in_flight_fails_the_next_write_then_abort_cleans_up() -> None:
    pool = s3mod.PartBuffers(2)
    client = FakeS3Client(pool)
    client.fail_part = 1
    out = writer(client, pool.account())
    await out.write(b"a" * (PART + 1))  # in flight, failing
    with pytest.raises(ConnectionResetError):
        await out.write(b"b" * PART)
    await out.abort()
    assert client.calls[-1] == ("abort", None)
    assert pool.held == 0 and pool.spares == 0


async def test_complete_raises_the_failure_of_the_part_in_flight() -> None:
    pool = s3mod.PartBuffers(2)
    client = FakeS3Client(pool)
    client.fail_part = 1
    out = writer(client, pool.account())
    await out.write(b"a" * (PART + 1))
    with pytest.raises(ConnectionResetError):
        await out.complete()
    assert not out.completed
    await out.abort()
    assert pool.held == 0 and pool.spares == 0


async def test_abort_stops_the_part_in_flight_and_the_upload() -> None:
    pool = s3mod.PartBuffers(2)
    client = FakeS3Client(pool)
    client.gate.clear()
    out = writer(client, pool.account())
    await out.write(b"a" * (PART + 1))
    await _eventually(lambda: client.in_flight == 1)
    await asyncio.wait_for(out.abort(), LONG_S)
    assert client.in_flight == 0 and client.calls[-1] == ("abort", None)
    assert 1 not in client.bodies
    assert pool.held == 0 and pool.spares == 0
    await out.abort()  # idempotent


async def test_complete_soon_frees_the_filling_buffer_for_the_next_object() -> None:
    pool = s3mod.PartBuffers(2)
    client = FakeS3Client(pool)
    client.gate.clear()
    account = pool.account()
    first = writer(client, account)
    await first.write(b"a" * 1000)
    size = await first.complete_soon()
    assert not size.done() and first.completing
    assert pool.held == 0 and pool.spares == 1
    second = writer(client, account)
    await second.write(b"b" * 10)  # fills while the first object is sent
    assert pool.held == 1 and pool.spares == 1
    client.gate.set()
    assert await asyncio.wait_for(size, LONG_S) == 1000 and first.completed
    assert await first.complete() == 1000
    assert await second.complete() == 10
    assert pool.held == 0 and pool.spares == 0 and client.most_buffers <= 2


async def test_complete_soon_without_a_spare_completes_inline() -> None:
    pool = s3mod.PartBuffers(1)
    client = FakeS3Client(pool)
    out = writer(client, pool.account())
    await out.write(b"a" * 1000)
    size = await out.complete_soon()
    assert size.done() and size.result() == 1000 and out.completed
    assert pool.held == 0 and pool.spares == 0


async def test_abort_during_complete_soon_stops_it() -> None:
    pool = s3mod.PartBuffers(3)
    client = FakeS3Client(pool)
    out = writer(client, pool.account())
    await out.write(b"a" * (PART + 10))  # part 1 sent (on a spare), 10 bytes left
    client.gate.clear()
    size = await out.complete_soon()
    await _eventually(lambda: client.in_flight == 1)  # the last part, on a spare
    await asyncio.wait_for(out.abort(), LONG_S)
    assert size.cancelled() and out.completing and not out.completed
    assert client.calls[-1] == ("abort", None)
    assert pool.held == 0 and pool.spares == 0
