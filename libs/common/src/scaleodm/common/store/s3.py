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

Part buffers (``PartBuffers``, ``S3.buffers``) bound a process's upload memory: at most
``upload_buffers`` writers hold a part's bytes at once, whatever the number of uploads. A writer
draws on them through a ``BufferAccount``: one per upload, or one per request in the gateway (bound
with ``account.bound()``, so every writer the request opens shares it); an account holds at most
one buffer. An account's wait for a buffer is bounded (``wait_s``: then ``BuffersBusyError``), and
so is its hold while it fills a part (``hold_s``): an account past that deadline is preempted, but
only while another account waits — a slow upload costs nobody anything when buffers are free, and
memory is bounded by the number of buffers either way; cutting it then would only fail uploads on
slow links. Preemption calls the account's ``on_preempt`` (the gateway's body reader raises at
once, even while it waits for the client) and its next ``write`` raises ``BufferPreemptedError``.
The hold clock runs only while the buffer fills: it stops while a part goes to S3 and restarts
after it, so a slow S3 never preempts anyone.

Deadlines: every S3 request the facade and its writers make (an upload part, a small object, a
listing page, a download's start and each of its chunks) is bounded by ``request_timeout_s``,
botocore's retries (``max_attempts`` in all, the first included) within it; socket connect and
read timeouts bound each attempt. A request that gets no answer in time, cannot connect, loses
its connection or gets a 5xx raises ``StorageUnavailable`` (``store.is_unavailable``), so a
frozen S3 gives callers a bounded, recognisable failure and no caller needs botocore's types.
Closing the client is bounded too (``CLOSE_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aioboto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from scaleodm.common.logging import get_logger
from scaleodm.common.settings import S3Settings
from scaleodm.common.store.availability import StorageUnavailable

log = get_logger(__name__)
T = TypeVar("T")

MIN_PART = 5 * 1024 * 1024
MAX_PARTS = 10_000  # S3's limit on the number of parts of one multipart upload

_background: set[asyncio.Task[Any]] = set()  # shielded cleanups still running after a cancel
CLOSE_TIMEOUT_S = 2.0


def _status(exc: ClientError) -> int:
    code = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return int(code) if isinstance(code, int) else 0


async def _request(aw: Awaitable[T], deadline_s: float | None, what: str) -> T:
    """Await one S3 request within ``deadline_s`` (None: none); S3 being away (no answer in
    time, no connection, a 5xx) becomes ``StorageUnavailable``, other errors pass unchanged."""
    try:
        async with asyncio.timeout(deadline_s):
            return await aw
    except TimeoutError:
        raise StorageUnavailable(f"S3 {what}: no answer within {deadline_s:g} s") from None
    except (HTTPClientError, BotoConnectionError) as exc:
        raise StorageUnavailable(f"S3 {what}: {exc}") from exc
    except ClientError as exc:
        if _status(exc) >= 500:
            raise StorageUnavailable(f"S3 {what}: {exc}") from exc
        raise


class BuffersBusyError(Exception):
    """No part buffer came free within the account's ``wait_s``."""


class BufferPreemptedError(Exception):
    """The account held a part buffer past its hold deadline while another account waited."""


class BufferAccount:
    """One upload's (or one request's) draw on the process's part buffers: at most one at a time.

    ``acquire`` is a no-op while the account holds its buffer, so writers sharing an account (one
    after the other, as the files of one request) never hold two. Not for concurrent writers.
    """

    def __init__(self, pool: PartBuffers, wait_s: float | None, hold_s: float | None) -> None:
        self.pool = pool
        self.wait_s = wait_s
        self.hold_s = hold_s
        self.holding = False
        self.preempted = False
        self.deadline = math.inf  # loop time the current part must be full by (inf: no clock)
        self.on_preempt: Callable[[BaseException], None] | None = None

    async def acquire(self) -> None:
        """Hold one buffer; waits at most ``wait_s`` (``BuffersBusyError``)."""
        self.check()
        if not self.holding:
            await self.pool._acquire(self)

    def check(self) -> None:
        """Raise ``BufferPreemptedError`` once the account has been preempted."""
        if self.preempted:
            raise self._preempted_error()

    def renew(self) -> None:
        """A new part starts filling: the hold clock restarts."""
        if self.holding and self.hold_s is not None:
            self.deadline = asyncio.get_running_loop().time() + self.hold_s
            self.pool._review()  # someone may wait: watch the new deadline

    def suspend(self) -> None:
        """The part is full and on its way to S3: the hold clock stops until ``renew``."""
        self.deadline = math.inf

    def release(self) -> None:
        """Give the buffer back (idempotent); the longest waiter gets it."""
        self.pool._release(self)

    @contextlib.contextmanager
    def bound(self) -> Iterator[BufferAccount]:
        """Writers opened inside the block (``S3.writer``) draw on this account; the buffer is
        given back when the block is left."""
        token = _bound_account.set(self)
        try:
            yield self
        finally:
            _bound_account.reset(token)
            self.release()

    def _preempted_error(self) -> BufferPreemptedError:
        return BufferPreemptedError(
            f"held a part buffer more than {self.hold_s:g} s without filling it while other "
            "uploads waited"
        )

    def _preempt(self) -> None:
        self.preempted = True
        if self.on_preempt is not None:
            self.on_preempt(self._preempted_error())


_bound_account: contextvars.ContextVar[BufferAccount | None] = contextvars.ContextVar(
    "scaleodm_s3_buffer_account", default=None
)


class PartBuffers:
    """The process's part buffers (``S3Settings.upload_buffers``; None = unbounded).

    Waiters are served first come, first served. While anyone waits, the holders past their hold
    deadline are preempted, the longest overdue first and no more than there are waiters; a
    timer reviews the holders again at the next deadline.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._held: set[BufferAccount] = set()
        self._waiters: collections.deque[tuple[BufferAccount, asyncio.Future[None]]] = (
            collections.deque()
        )
        self._timer: asyncio.TimerHandle | None = None

    def account(self, *, wait_s: float | None = None, hold_s: float | None = None
                ) -> BufferAccount:
        """A new account; ``None`` = wait as long as it takes / no hold deadline."""
        return BufferAccount(self, wait_s, hold_s)

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def waiting(self) -> int:
        return sum(1 for _, fut in self._waiters if not fut.done())

    async def _acquire(self, account: BufferAccount) -> None:
        if self.limit is None:
            account.holding = True
            account.renew()
            return
        if len(self._held) < self.limit and not self._waiters:
            self._grant(account)
            return
        entry = (account, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        self._review()
        try:
            async with asyncio.timeout(account.wait_s):
                await entry[1]
        except TimeoutError:
            if not account.holding:  # (granted just as the wait ran out: keep it)
                raise BuffersBusyError(
                    f"no part buffer came free within {account.wait_s:g} s"
                ) from None
        except BaseException:
            self._release(account)  # cancelled, perhaps just after the grant
            raise
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
            self._settle()

    def _grant(self, account: BufferAccount) -> None:
        account.holding = True
        self._held.add(account)
        account.renew()

    def _release(self, account: BufferAccount) -> None:
        if not account.holding:
            return
        account.holding = False
        account.suspend()
        self._held.discard(account)
        while self._waiters and self.limit is not None and len(self._held) < self.limit:
            waiter, fut = self._waiters.popleft()
            if fut.done():  # given up (timed out or cancelled)
                continue
            self._grant(waiter)
            fut.set_result(None)
        self._settle()

    def _settle(self) -> None:
        if not self.waiting and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _review(self) -> None:
        """Preempt overdue holders for the waiters; arm the timer for the next deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting = self.waiting
        if not waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        leaving = sum(1 for a in self._held if a.preempted)  # cut off, not yet released
        overdue = sorted((a for a in self._held if not a.preempted and a.deadline <= now),
                         key=lambda a: a.deadline)
        for account in overdue[: max(0, waiting - leaving)]:
            account._preempt()
        upcoming = min((a.deadline for a in self._held if not a.preempted and a.deadline > now),
                       default=math.inf)
        if upcoming < math.inf:
            self._timer = loop.call_at(upcoming, self._review)


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
    """Thin async facade over one aioboto3 S3 client; every request bounded (module docstring).

    ``client`` is the raw aiobotocore client (no deadline): for tests and one-off calls only.
    """

    def __init__(self, client: Any, settings: S3Settings) -> None:
        self.client = client
        self.settings = settings
        self.deadline_s = settings.request_timeout_s
        # The process's part buffers: bounds upload memory however many uploads run at once.
        self.buffers = PartBuffers(settings.upload_buffers if settings.upload_buffers > 0 else None)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: S3Settings) -> AsyncIterator[S3]:
        session = aioboto3.Session()
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
        )
        client_cm = session.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key.get_secret_value(),
            config=config,
        )
        client = await client_cm.__aenter__()
        try:
            s3 = cls(client, settings)
            if settings.create_bucket:
                await s3.ensure_bucket(settings.bucket)
            yield s3
        finally:
            try:  # closes the HTTP connection pool; a frozen S3 must not hold a shutdown
                await asyncio.wait_for(client_cm.__aexit__(None, None, None), CLOSE_TIMEOUT_S)
            except Exception as exc:
                log.warning("S3 client did not close cleanly", error=repr(exc))

    async def _call(self, aw: Awaitable[T], what: str) -> T:
        return await _request(aw, self.deadline_s, what)

    async def ensure_bucket(self, bucket: str) -> None:
        try:
            await self._call(self.client.head_bucket(Bucket=bucket), "HeadBucket")
        except ClientError:
            kwargs: dict[str, Any] = {"Bucket": bucket}
            if self.settings.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
            with contextlib.suppress(ClientError):  # created concurrently by another service
                await self._call(self.client.create_bucket(**kwargs), "CreateBucket")

    async def ping(self) -> None:
        await self._call(self.client.head_bucket(Bucket=self.settings.bucket), "HeadBucket")

    async def put_bytes(self, url: S3Url, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        await self._call(
            self.client.put_object(Bucket=url.bucket, Key=url.key, Body=data, **extra),
            "PutObject",
        )

    def writer(self, url: S3Url, content_type: str | None = None,
               account: BufferAccount | None = None) -> S3Writer:
        """A streaming writer for one object; see ``S3Writer``.

        It draws on ``account``, else on the account bound by ``BufferAccount.bound``, else on an
        account of its own (no wait or hold bound).
        """
        account = account or _bound_account.get() or self.buffers.account()
        return S3Writer(self.client, url, max(MIN_PART, self.settings.part_size_bytes),
                        content_type, account, deadline_s=self.deadline_s)

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
        """(key, size) of every object under a prefix (each page bounded)."""
        found: list[tuple[str, int]] = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key).__aiter__()
        while True:
            try:
                page = await self._call(anext(pages), "ListObjectsV2")
            except StopAsyncIteration:
                break
            for obj in page.get("Contents", []):
                found.append((obj["Key"], int(obj["Size"])))
        return found

    async def iter_object(self, url: S3Url, chunk_size: int = 1024 * 1024) -> AsyncIterator[bytes]:
        """The object's bytes in chunks; its start and each chunk bounded by the deadline."""
        obj = await self._call(self.client.get_object(Bucket=url.bucket, Key=url.key),
                               "GetObject")
        body = obj["Body"]
        try:
            chunks = body.iter_chunks(chunk_size).__aiter__()
            while True:
                try:
                    chunk = await self._call(anext(chunks), "GetObject body")
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            body.close()

    async def size(self, url: S3Url) -> int | None:
        try:
            head = await self._call(self.client.head_object(Bucket=url.bucket, Key=url.key),
                                    "HeadObject")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(head["ContentLength"])

    async def delete(self, url: S3Url) -> None:
        """Delete one object (no error if it does not exist)."""
        await self._call(self.client.delete_object(Bucket=url.bucket, Key=url.key),
                         "DeleteObject")

    async def delete_prefix(self, prefix: S3Url) -> int:
        keys = [k for k, _ in await self.list_objects(prefix)]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            await self._call(self.client.delete_objects(
                Bucket=prefix.bucket, Delete={"Objects": batch, "Quiet": True}
            ), "DeleteObjects")
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
    Each S3 request is bounded by ``deadline_s`` (None: unbounded; ``S3.writer`` passes
    ``request_timeout_s``).
    """

    def __init__(self, client: Any, url: S3Url, part_size: int,
                 content_type: str | None = None,
                 account: BufferAccount | None = None, *,
                 deadline_s: float | None = None) -> None:
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
        self._account = account
        self._holding = False  # this writer holds its account's part buffer
        self._deadline_s = deadline_s

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

        With an account, a writer first takes one of the process's part buffers, so many
        concurrent uploads hold at most ``upload_buffers`` parts in memory; the others stop
        reading their requests meanwhile (TCP back-pressure on their clients). Raises
        ``BuffersBusyError`` when none came free in time and ``BufferPreemptedError`` once the
        account was preempted (see the module docstring).
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
            if self._account is not None:
                self._account.suspend()
            await self._upload_part(body)
            if self._account is not None:
                self._account.renew()
        if not self._buf:
            self._release()

    async def _hold(self) -> None:
        if self._account is not None:
            self._account.check()
            if not self._holding:
                await self._account.acquire()
                self._holding = True

    def _release(self) -> None:
        if self._account is not None and self._holding:
            self._holding = False
            self._account.release()

    async def _upload_part(self, body: bytes | bytearray) -> None:
        if len(self._parts) >= MAX_PARTS:
            raise ValueError(f"{self.url}: more than {MAX_PARTS} parts of {self.part_size} bytes")
        if self._upload_id is None:
            created = await _request(self.client.create_multipart_upload(
                Bucket=self.url.bucket, Key=self.url.key, **self._extra()
            ), self._deadline_s, "CreateMultipartUpload")
            self._upload_id = created["UploadId"]
        n = len(self._parts) + 1
        res = await _request(self.client.upload_part(
            Bucket=self.url.bucket, Key=self.url.key, UploadId=self._upload_id, PartNumber=n,
            Body=body,
        ), self._deadline_s, "UploadPart")
        self._parts.append({"PartNumber": n, "ETag": res["ETag"]})

    async def complete(self) -> int:
        """Make the object visible; returns its size. A no-op once completed."""
        if self._state == "completed":
            return self._total
        self._check_open()
        if self._account is not None:
            self._account.suspend()  # nothing more to fill
        if self._upload_id is None:  # smaller than one part: a single PUT
            await _request(self.client.put_object(
                Bucket=self.url.bucket, Key=self.url.key, Body=bytes(self._buf), **self._extra()
            ), self._deadline_s, "PutObject")
        else:
            if self._buf:
                body = bytes(self._buf)
                self._buf = bytearray()
                await self._upload_part(body)
            await _request(self.client.complete_multipart_upload(
                Bucket=self.url.bucket, Key=self.url.key, UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            ), self._deadline_s, "CompleteMultipartUpload")
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
            await _shielded(_request(self.client.abort_multipart_upload(
                Bucket=self.url.bucket, Key=self.url.key, UploadId=upload_id
            ), self._deadline_s, "AbortMultipartUpload"))

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


TASKS_ROOT = "tasks/"  # all tasks' inputs and outputs live under this prefix of the service bucket


def task_prefix(bucket: str, task_id: str) -> S3Url:
    return S3Url(bucket, f"{TASKS_ROOT}{task_id}/")


def task_inputs(bucket: str, task_id: str) -> S3Url:
    return S3Url(bucket, f"{TASKS_ROOT}{task_id}/inputs/")


def task_outputs(bucket: str, task_id: str) -> S3Url:
    return S3Url(bucket, f"{TASKS_ROOT}{task_id}/outputs/")

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4_LIKE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def valid_bucket(name: str) -> bool:
    """S3 bucket naming: 3-63 of ``a-z 0-9 . -``, alphanumeric ends, no ``..``, not an IP."""
    return (
        _BUCKET_NAME.fullmatch(name) is not None
        and ".." not in name and ".-" not in name and "-." not in name
        and _IPV4_LIKE.fullmatch(name) is None
    )


def safe_key(key: str) -> bool:
    """No empty, ``.`` or ``..`` segment and no control character (a trailing ``/`` is fine).

    S3 keys are literal (``a/../b`` is its own key), but such keys mean something else to
    anything that normalises paths, so they are never read.
    """
    if key == "":
        return True
    body = key[:-1] if key.endswith("/") else key
    return _CONTROL.search(key) is None and all(
        seg not in ("", ".", "..") for seg in body.split("/")
    )


def _allowed_location(text: str) -> S3Url | None:
    """An ``input_allow`` entry as a prefix (``s3://b/p`` means ``s3://b/p/``); None if invalid."""
    try:
        loc = parse_s3_url(text.strip())
    except ValueError:
        return None
    if not valid_bucket(loc.bucket) or not safe_key(loc.key):
        return None
    return loc if loc.is_prefix else S3Url(loc.bucket, loc.key + "/")


def input_allowed(url: S3Url, *, task_id: str, bucket: str, allow: Sequence[str]) -> bool:
    """May the run of ``task_id`` read ``url`` (an object, or a prefix it will list)?

    Yes when ``url`` is under the task's own upload prefix ``tasks/<task_id>/inputs/`` in the
    service ``bucket``, or under one of the operator's ``allow`` locations (``S3Settings.
    input_allow``, ``s3://bucket/prefix/``; matched segment-wise, so ``s3://b/allowed`` does
    not cover ``s3://b/allowed-other/``). Never anything else under ``tasks/`` of the service
    bucket, nor a prefix whose listing would reach into it, whatever ``allow`` says. Invalid
    bucket names and unsafe keys (see ``safe_key``) are refused. Pure: no S3 call.
    """
    if not valid_bucket(url.bucket) or not safe_key(url.key):
        return False
    if task_id and "/" not in task_id and safe_key(task_id):
        own = task_inputs(bucket, task_id)
        if url.bucket == own.bucket and url.key.startswith(own.key):
            return True
    if url.bucket == bucket and (
        url.key.startswith(TASKS_ROOT) or (url.is_prefix and TASKS_ROOT.startswith(url.key))
    ):
        return False
    for text in allow:
        loc = _allowed_location(text)
        if loc is not None and url.bucket == loc.bucket and url.key.startswith(loc.key):
            return True
    return False
