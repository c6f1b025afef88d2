"""Uploads that try to starve the others, against a real gateway process; the part-buffer pool's
rules in memory.

One gateway of its own (no other service) with 2 part buffers of 5 MiB, a 2 s body idle timeout,
a 3 s hold deadline and a 6 s wait bound. Attackers are raw sockets speaking HTTP by hand
(``POST /task/new``, one image, ``set-uuid`` so their S3 prefixes are known); the honest client is
httpx sending 3 images of 6 MiB (each one a 5 MiB part and a 1 MiB last part).

Covered, on the gateway: two uploads that send a part and a few KiB more and then stall hold both
buffers and an S3 multipart upload each; an honest upload started meanwhile completes within a
few seconds, the stalled ones are cut off by the idle timeout with a NodeODM-style error, their
connections closed and their multipart uploads aborted (moto lists none) with nothing stored; two
slowloris uploads (a byte every 0.5 s, never idle) lose their buffers to honest uploads that
wait for one, each as soon as it is past its hold deadline and only then — one waiter cuts one
of them, the other goes on undisturbed until more honest uploads wait; an upload that finds
both buffers held by uploads that keep filling their parts in time is refused after the wait
bound with ``Server busy: ...``, nothing of it stored. The gateway's peak RSS stays under 300 MiB
throughout. In memory (``PartBuffers``): the wait bound, preemption only
while someone waits, the longest overdue first and no more than the waiters, the hold clock
stopped while a part goes to S3, one buffer per account, cancelled waiters, and a preempted
writer's next write failing.

The chunked upload's route (``/task/new/upload/{uuid}``, the same ``_parse``): a stalled upload
is cut off by the idle timeout, its open image's multipart upload aborted, the image completed
before it deleted, both names given back, and the upload session stays usable (a retry stores
the same names, the commit makes the task).

In memory, time bounds are generous (loaded CI machines): lower bounds show that a timer did
not fire early, upper bounds (10x the expected or more) only that it fired.

Left out: real AWS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from scaleodm.common.store import s3 as s3mod
from tests.harness import servers
from tests.harness.stack import Stack
from tests.security.gateway_only import gateway_only, s3_keys

MiB = 1024 * 1024
PART = 5 * MiB
IDLE_S = 2.0
HOLD_S = 3.0
WAIT_S = 6.0
HEADER_S = 2.0
RSS_LIMIT = 300 * MiB


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, mongo_url: str,
            s3: servers.S3Endpoint) -> Iterator[Stack]:
    env = {
        "SCALEODM_S3__UPLOAD_BUFFERS": "2",
        "SCALEODM_S3__PART_SIZE_BYTES": str(PART),
        "SCALEODM_BODY_IDLE_TIMEOUT_S": str(IDLE_S),
        "SCALEODM_UPLOAD_BUFFER_HOLD_S": str(HOLD_S),
        "SCALEODM_UPLOAD_BUFFER_WAIT_S": str(WAIT_S),
        "SCALEODM_HEADER_TIMEOUT_S": str(HEADER_S),
        "SCALEODM_KEEP_ALIVE_TIMEOUT_S": "1",
    }
    with gateway_only(Path(tmp_path_factory.mktemp("dos-uploads")), mongo_url, s3, env) as stack:
        yield stack


class RawUpload:
    """``POST /task/new`` with one image of ``size`` bytes, its bytes sent when told to.

    With ``upload_id``: ``POST /task/new/upload/{upload_id}`` (a chunked upload's files)
    instead, and ``before`` (file name -> bytes) are whole images sent ahead of that one.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 task_id: str) -> None:
        self.reader = reader
        self.writer = writer
        self.task_id = task_id
        self.last_sent = time.monotonic()

    @classmethod
    async def open(cls, stack: Stack, size: int, *, upload_id: str | None = None,
                   before: dict[str, bytes] | None = None, name: str = "a.jpg") -> RawUpload:
        boundary = uuid.uuid4().hex

        def file_head(filename: str) -> bytes:
            return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; "
                    f"filename=\"{filename}\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()

        head = b"".join(file_head(n) + payload + b"\r\n" for n, payload in (before or {}).items())
        head += file_head(name)
        length = len(head) + size + len(f"\r\n--{boundary}--\r\n")
        if upload_id is None:
            task_id = str(uuid.uuid4())
            request = f"POST /task/new HTTP/1.1\r\nHost: gateway\r\nset-uuid: {task_id}\r\n"
        else:
            task_id = upload_id
            request = f"POST /task/new/upload/{upload_id} HTTP/1.1\r\nHost: gateway\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.ports["gateway"])
        writer.write(
            f"{request}Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {length}\r\n\r\n".encode() + head
        )
        upload = cls(reader, writer, task_id)
        await upload.send(b"")
        return upload

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()
        self.last_sent = time.monotonic()

    async def drip(self, every_s: float) -> None:
        """One byte every ``every_s`` until the server closes the connection."""
        with contextlib.suppress(ConnectionError):
            while not self.writer.is_closing():
                await self.send(b"d")
                await asyncio.sleep(every_s)

    async def answer(self, timeout_s: float) -> dict[str, Any] | None:
        """The response's JSON body; None if none came within ``timeout_s`` (nothing taken)."""
        try:
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout_s)
        except TimeoutError:
            return None
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body: dict[str, Any] = json.loads(await self.reader.readexactly(length))
        return body

    async def closed_within(self, timeout_s: float) -> bool:
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout_s):
                pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


def _s3(stack: Stack) -> Any:
    return boto3.client("s3", endpoint_url=stack.s3.url, aws_access_key_id=stack.s3.access_key,
                        aws_secret_access_key=stack.s3.secret_key, region_name=stack.s3.region)


def _multipart_uploads(stack: Stack, task_ids: list[str]) -> list[str]:
    listed = _s3(stack).list_multipart_uploads(Bucket=stack.bucket).get("Uploads", [])
    return [u["Key"] for u in listed if any(t in u["Key"] for t in task_ids)]


async def _until(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(cond):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.1)


async def _honest_upload(stack: Stack) -> float:
    """3 images of 6 MiB through ``/task/new``; seconds it took."""
    images = [("images", (f"h{i}.jpg", bytes([i]) * (6 * MiB), "image/jpeg")) for i in range(3)]
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as client:
        resp = await client.post("/task/new", files=images)
    assert resp.status_code == 200 and "uuid" in resp.json(), resp.text
    return time.monotonic() - started


@pytest.mark.integration
async def test_stalled_uploads_are_cut_off_and_do_not_starve_an_honest_one(
    gateway: Stack, record_property: Callable[[str, object], None],
) -> None:
    pid = gateway.procs["gateway"].pid
    stalled = [await RawUpload.open(gateway, 20 * MiB) for _ in range(2)]
    try:
        for upload in stalled:  # a whole part (into S3) and a few KiB held in the buffer
            await upload.send(b"s" * (PART + 4096))
        ids = [u.task_id for u in stalled]
        await _until(lambda: len(_multipart_uploads(gateway, ids)) == 2, 10,
                     "both stalled uploads hold a buffer and a multipart upload")

        honest_s = await _honest_upload(gateway)
        assert honest_s < IDLE_S + 6, honest_s

        for upload in stalled:
            answer = await upload.answer(IDLE_S + 2)
            cut_after = time.monotonic() - upload.last_sent
            assert answer == {"error": f"Request body stalled: nothing received for {IDLE_S:g} s"}
            assert cut_after < IDLE_S + 5
            assert await upload.closed_within(HEADER_S + 2)
        await _until(lambda: not _multipart_uploads(gateway, ids), 5, "multipart uploads aborted")
        for task_id in ids:
            assert s3_keys(gateway, f"tasks/{task_id}/") == []
        peak = servers.peak_rss_bytes(pid)
        record_property("honest_upload_s", round(honest_s, 2))
        record_property("gateway_peak_rss_mib", round(peak / MiB, 1))
        assert peak < RSS_LIMIT
    finally:
        for upload in stalled:
            upload.close()


@pytest.mark.integration
async def test_a_stalled_chunked_upload_is_cut_off_and_the_upload_stays_usable(
    gateway: Stack,
) -> None:
    """``/task/new/upload/{uuid}`` goes through the same reader and buffer account: a whole
    image, then a part and a few KiB of a second one, then nothing."""
    async with httpx.AsyncClient(base_url=gateway.gateway_url, timeout=60) as client:
        init = await client.post("/task/new/init", files=[("name", (None, "stalled"))])
        upload_id = init.json()["uuid"]
        stalled = await RawUpload.open(gateway, 20 * MiB, upload_id=upload_id,
                                       before={"a.jpg": b"a" * 4096}, name="b.jpg")
        try:
            await stalled.send(b"s" * (PART + 4096))
            await _until(lambda: len(_multipart_uploads(gateway, [upload_id])) == 1, 10,
                         "the stalled image holds a multipart upload")
            assert s3_keys(gateway, f"tasks/{upload_id}/") == [f"tasks/{upload_id}/inputs/a.jpg"]

            answer = await stalled.answer(IDLE_S + 10)
            assert answer == {"error": f"Request body stalled: nothing received for {IDLE_S:g} s"}
            assert time.monotonic() - stalled.last_sent < IDLE_S + 10
            assert await stalled.closed_within(HEADER_S + 5)
        finally:
            stalled.close()
        # The open image's multipart upload aborted, the whole one deleted: nothing stored.
        await _until(lambda: not _multipart_uploads(gateway, [upload_id]), 10,
                     "multipart upload aborted")
        assert s3_keys(gateway, f"tasks/{upload_id}/") == []

        # Both names were given back (a name still claimed would make these a_.jpg, b_.jpg),
        # and the upload is still open: the client retries and commits.
        images = [("images", (n, bytes([i]) * 1024, "image/jpeg"))
                  for i, n in enumerate(("a.jpg", "b.jpg"))]
        resp = await client.post(f"/task/new/upload/{upload_id}", files=images)
        assert resp.json() == {"success": True}
        assert sorted(s3_keys(gateway, f"tasks/{upload_id}/")) == [
            f"tasks/{upload_id}/inputs/a.jpg", f"tasks/{upload_id}/inputs/b.jpg"]
        resp = await client.post(f"/task/new/commit/{upload_id}")
        assert resp.json() == {"uuid": upload_id}
        info = (await client.get(f"/task/{upload_id}/info")).json()
        assert info["imagesCount"] == 2, info
        await client.post("/task/remove", data={"uuid": upload_id})


@pytest.mark.integration
async def test_slow_uploads_lose_their_buffers_to_waiting_ones_only(
    gateway: Stack, record_property: Callable[[str, object], None],
) -> None:
    pid = gateway.procs["gateway"].pid
    slow = [await RawUpload.open(gateway, MiB) for _ in range(2)]
    drips: list[asyncio.Task[None]] = []
    try:
        for upload in slow:
            await upload.send(b"x" * 1024)  # the first file bytes: a buffer is taken
        drips = [asyncio.create_task(upload.drip(0.5)) for upload in slow]
        await asyncio.sleep(0.5)

        first_s = await _honest_upload(gateway)  # waits until one of them is past its deadline
        assert first_s < HOLD_S + 4, first_s
        answers = [await upload.answer(1.0) for upload in slow]
        cut = [a for a in answers if a is not None]
        assert len(cut) == 1, answers  # one waiter, one slow upload cut off
        assert cut[0]["error"].startswith("Upload too slow: held a part buffer more than 3 s")
        assert cut[0]["error"].endswith("please retry")
        survivor = slow[answers.index(None)]
        await asyncio.sleep(1.0)  # past its deadline too, but nobody waits: it goes on
        assert await survivor.answer(0.1) is None

        more = await asyncio.gather(_honest_upload(gateway), _honest_upload(gateway))
        assert max(more) < HOLD_S + 4, more
        last = await survivor.answer(2.0)
        assert last is not None and last["error"].startswith("Upload too slow")
        for upload in slow:  # the server closes them (header deadline after the answer)
            assert await upload.closed_within(HEADER_S + 3)
            assert s3_keys(gateway, f"tasks/{upload.task_id}/") == []
        peak = servers.peak_rss_bytes(pid)
        record_property("honest_upload_s", [round(s, 2) for s in (first_s, *more)])
        record_property("gateway_peak_rss_mib", round(peak / MiB, 1))
        assert peak < RSS_LIMIT
    finally:
        for task in drips:
            task.cancel()
        for upload in slow:
            upload.close()


@pytest.mark.integration
async def test_an_upload_that_waits_too_long_for_a_buffer_is_refused_as_busy(
    gateway: Stack,
) -> None:
    """Both buffers held by uploads that fill a part every 1.5 s (never overdue): a third upload
    gets none within the wait bound and is refused, nothing of it stored."""
    steady = [await RawUpload.open(gateway, 64 * MiB) for _ in range(2)]

    async def feed(upload: RawUpload) -> None:
        # Sizes that never add up to a whole part: a buffer emptied exactly at a part's end is
        # given back, and the waiter would rightly get it.
        with contextlib.suppress(ConnectionError):
            while True:
                await upload.send(b"f" * 1_000_003)
                await asyncio.sleep(0.3)

    feeders = [asyncio.create_task(feed(upload)) for upload in steady]
    waiter = None
    try:
        await asyncio.sleep(0.5)
        waiter = await RawUpload.open(gateway, MiB)
        started = time.monotonic()
        await waiter.send(b"w" * 65536)
        answer = await waiter.answer(WAIT_S + 3)
        waited = time.monotonic() - started
        assert answer == {"error": "Server busy: too many uploads in progress, please retry"}
        assert WAIT_S - 0.5 < waited < WAIT_S + 3, waited
        for upload in steady:  # they were never cut off: still uploading
            assert await upload.answer(0.01) is None
        assert s3_keys(gateway, f"tasks/{waiter.task_id}/") == []
    finally:
        for task in feeders:
            task.cancel()
        for upload in (*steady, *([waiter] if waiter else [])):
            upload.close()
    ids = [u.task_id for u in steady]  # dropped by their client: aborted, nothing left
    await _until(lambda: not _multipart_uploads(gateway, ids), 10, "multipart uploads aborted")


# -- the pool in memory -----------------------------------------------------------------------


# Real time, but no tight window: a lower bound shows a timer did not fire early, an upper bound
# (at least 10x the expected) only that it fired; waits that must not run out are long.
LONG_S = 30.0


async def _eventually(cond: Callable[[], bool], timeout_s: float = LONG_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.005)


async def test_waiting_for_a_buffer_is_bounded() -> None:
    pool = s3mod.PartBuffers(1)
    holder = pool.account()
    await holder.acquire()
    waiter = pool.account(wait_s=0.1)
    started = time.monotonic()
    with pytest.raises(s3mod.BuffersBusyError):
        await waiter.acquire()
    assert 0.09 < time.monotonic() - started < 2.0
    assert pool.waiting == 0 and not waiter.holding
    holder.release()
    await waiter.acquire()  # free again: at once
    assert pool.held == 1


async def test_overdue_holders_are_preempted_only_while_someone_waits() -> None:
    pool = s3mod.PartBuffers(2)
    cut: list[str] = []
    holders = {name: pool.account(hold_s=0.05) for name in ("old", "young")}
    for name, account in holders.items():
        account.on_preempt = lambda exc, name=name: cut.append(name)
        await account.acquire()
        await asyncio.sleep(0.02)  # "young" is due later
    await asyncio.sleep(0.2)  # both overdue, nobody waits
    assert cut == [] and pool.held == 2

    waiter = pool.account(wait_s=LONG_S)
    waiting = asyncio.create_task(waiter.acquire())
    await _eventually(lambda: pool.waiting == 1)
    assert cut == ["old"]  # at once: the longest overdue, and one per waiter
    with pytest.raises(s3mod.BufferPreemptedError):
        holders["old"].check()
    assert not waiting.done()
    holders["old"].release()  # what its request does once cut off
    await asyncio.wait_for(waiting, LONG_S)
    assert waiter.holding and not holders["young"].preempted and cut == ["old"]
    with pytest.raises(s3mod.BufferPreemptedError):
        await holders["old"].acquire()  # a preempted account gets no buffer again


async def test_a_holder_is_preempted_when_its_deadline_passes_during_a_wait() -> None:
    pool = s3mod.PartBuffers(1)
    holder = pool.account(hold_s=0.3)
    preempted = asyncio.Event()
    holder.on_preempt = lambda exc: (preempted.set(), holder.release())
    await holder.acquire()
    started = time.monotonic()
    # Not overdue when the wait starts: the wait arms a timer for the holder's deadline.
    await asyncio.wait_for(pool.account(wait_s=LONG_S).acquire(), LONG_S)
    assert preempted.is_set() and 0.25 < time.monotonic() - started < 3.0


async def test_the_hold_clock_stops_while_a_part_goes_to_s3() -> None:
    pool = s3mod.PartBuffers(1)
    holder = pool.account(hold_s=0.1)
    holder.on_preempt = lambda exc: holder.release()
    await holder.acquire()
    holder.suspend()  # a full part on its way to S3: not filling, not overdue
    waiter = asyncio.create_task(pool.account(wait_s=LONG_S).acquire())
    await _eventually(lambda: pool.waiting == 1)
    await asyncio.sleep(0.3)  # three hold periods: it would be overdue if the clock ran
    assert not holder.preempted and not waiter.done()
    renewed = time.monotonic()
    holder.renew()  # the next part starts filling: 0.1 s from now it is overdue
    await asyncio.wait_for(waiter, LONG_S)
    assert holder.preempted and 0.09 < time.monotonic() - renewed < 1.0


async def test_one_buffer_per_account_and_cancelled_waiters_leave_nothing() -> None:
    pool = s3mod.PartBuffers(2)
    account = pool.account()
    await account.acquire()
    await account.acquire()
    assert pool.held == 1
    other = pool.account()
    await other.acquire()
    cancelled = asyncio.create_task(pool.account().acquire())
    queued = pool.account(wait_s=LONG_S)
    queued_task = asyncio.create_task(queued.acquire())
    await _eventually(lambda: pool.waiting == 2)
    cancelled.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    account.release()
    await asyncio.wait_for(queued_task, LONG_S)  # first come first served, cancelled skipped
    assert queued.holding and pool.held == 2 and pool.waiting == 0


class FakeClient:
    """The S3 calls S3Writer makes, in memory."""

    def __init__(self) -> None:
        self.aborted = 0

    async def create_multipart_upload(self, **_: Any) -> dict[str, Any]:
        return {"UploadId": "u1"}

    async def upload_part(self, **_: Any) -> dict[str, Any]:
        return {"ETag": "e"}

    async def abort_multipart_upload(self, **_: Any) -> None:
        self.aborted += 1


async def test_a_preempted_writer_fails_its_next_write_and_frees_its_buffer() -> None:
    pool = s3mod.PartBuffers(1)
    account = pool.account(hold_s=0.05)
    client = FakeClient()
    url = s3mod.S3Url("bucket", "key")
    with account.bound():
        writer = s3mod.S3Writer(client, url, PART, account=account)
        await writer.write(b"a" * (PART + 10))  # one part sent, 10 bytes buffered
        assert pool.held == 1
        waiter = asyncio.create_task(pool.account(wait_s=LONG_S).acquire())
        await _eventually(lambda: account.preempted)  # its part overdue while someone waits
        with pytest.raises(s3mod.BufferPreemptedError):
            await writer.write(b"b")
        await writer.abort()
        await asyncio.wait_for(waiter, LONG_S)
    assert client.aborted == 1 and pool.held == 1
