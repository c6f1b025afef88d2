"""S3 access with aioboto3: one client per process, opened in the lifespan (stack-notes §7).

Uploads of unknown length go through ``S3Writer``, the one streaming-upload implementation
(``upload_stream`` and ``upload_file`` are built on it; the gateway feeds it multipart file parts
as they arrive from the client):

- bytes are appended to a buffer; once it holds more than ``part_size_bytes`` (at least 5 MiB,
  S3's minimum for every part but the last) exactly one part is cut off and uploaded with
  ``UploadPart``, the multipart upload being created on the first part. A part is cut only when
  a byte beyond it has arrived, so an object of at most one part — the usual drone image with
  the default 8 MiB — is always one ``PutObject`` at ``complete()``: one request instead of
  three, and no server-side concatenation;
- parts are pipelined: while one part goes to S3 the next one fills from the producer, so one
  upload keeps S3 busy. At most one part per writer is in flight (the next cut waits for it),
  and the part in flight holds a buffer of its own (a *spare*, below); when no spare is free
  the part is sent inline and the producer waits for it, as a slow S3 back-pressures it either
  way. A part is joined once from the chunks as they came (the one copy) into a ``bytearray``,
  which botocore hashes as it is and aiohttp sends in one write;
- ``complete()`` sends an object of at most one part as a single ``PutObject`` (no multipart
  upload ever exists for it), otherwise uploads the remainder as the last part and completes;
- ``abort()`` (idempotent) stops a part in flight and aborts a started multipart upload, so a
  failed or cancelled upload leaves neither an object nor billable orphaned parts behind. As an
  async context manager the writer aborts when the block is left without ``complete()`` (an
  exception, a cancellation, or a forgotten ``complete``). The abort is shielded from a second
  cancellation so that a client disconnect cannot leave it half-sent.

Part buffers (``PartBuffers``, ``S3.buffers``) bound a process's upload memory: at most
``upload_buffers`` parts' bytes are held at once, whatever the number of uploads — about
``upload_buffers`` x (part size + one incoming chunk). A buffer is either *filling* (held by a
``BufferAccount``) or a *spare* carrying a part in flight. A writer draws on them through an
account: one per upload, or one per request in the gateway (bound with ``account.bound()``, so
every writer the request opens shares it); an account holds at most one filling buffer, and its
writer takes a spare only when one is free and nobody waits (a spare never jumps the queue), so
pipelining is what a lone upload gets on an idle gateway, and many uploads share the buffers
as before. An account's wait for a buffer is bounded (``wait_s``: then ``BuffersBusyError``),
and so is its hold while it fills a part (``hold_s``): an account past that deadline is
preempted, but only while another account waits — a slow upload costs nobody anything when
buffers are free, and memory is bounded by the number of buffers either way; cutting it then
would only fail uploads on slow links. Preemption calls the account's ``on_preempt`` (the
gateway's body reader raises at once, even while it waits for the client) and its next
``write`` raises ``BufferPreemptedError``. The hold clock runs only while the buffer fills: it
stops while a part goes to S3 inline and restarts after it, so a slow S3 never preempts anyone.

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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aioboto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from scaleodm.common import metrics
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
    started = time.perf_counter()
    failed = True
    try:
        async with asyncio.timeout(deadline_s):
            result = await aw
        failed = False
        return result
    except TimeoutError:
        raise StorageUnavailable(f"S3 {what}: no answer within {deadline_s:g} s") from None
    except (HTTPClientError, BotoConnectionError) as exc:
        raise StorageUnavailable(f"S3 {what}: {exc}") from exc
    except ClientError as exc:
        if _status(exc) >= 500:
            raise StorageUnavailable(f"S3 {what}: {exc}") from exc
        failed = _status(exc) not in (404, 412)  # a missing key or a failed precondition: answers
        raise
    finally:
        metrics.S3_DURATION.labels(what).observe(time.perf_counter() - started)
        if failed:
            metrics.S3_ERRORS.labels(what).inc()


class BuffersBusyError(Exception):
    """No part buffer came free within the account's ``wait_s``."""


class BufferPreemptedError(Exception):
    """The account held a part buffer past its hold deadline while another account waited."""


class BufferAccount:
    """One upload's (or one request's) draw on the process's part buffers: at most one filling
    buffer at a time, and spares for parts in flight (``try_spare``) when they are free.

    ``acquire`` is a no-op while the account holds its buffer, so writers sharing an account (one
    after the other, as the files of one request) never fill two. Not for concurrent writers.
    """

    def __init__(self, pool: PartBuffers, wait_s: float | None, hold_s: float | None) -> None:
        self.pool = pool
        self.wait_s = wait_s
        self.hold_s = hold_s
        self.holding = False
        self.spares = 0  # parts of this account in flight, each on a spare buffer
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

    def try_spare(self) -> bool:
        """Take a spare buffer for a part in flight, without waiting: only while this account
        fills a buffer of its own, a buffer is free and no account waits for one."""
        if self.preempted or not self.holding or not self.pool._take_spare():
            return False
        self.spares += 1
        return True

    def release_spare(self) -> None:
        """The part in flight is done (sent or not): its spare goes back to the pool."""
        if self.spares > 0:
            self.spares -= 1
            self.pool._release_spare()

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

    Waiters are served first come, first served; spares (parts in flight) are lent only when no
    one waits. While anyone waits, the holders past their hold deadline are preempted, the
    longest overdue first and no more than there are waiters; a timer reviews the holders again
    at the next deadline.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._held: set[BufferAccount] = set()
        self._spares = 0
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
    def spares(self) -> int:
        """Buffers lent to parts in flight."""
        return self._spares

    @property
    def waiting(self) -> int:
        return sum(1 for _, fut in self._waiters if not fut.done())

    def _free(self) -> bool:
        return self.limit is None or len(self._held) + self._spares < self.limit

    async def _acquire(self, account: BufferAccount) -> None:
        if self.limit is None:
            account.holding = True
            account.renew()
            return
        if self._free() and not self._waiters:
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
        self._serve_waiters()

    def _take_spare(self) -> bool:
        if not self._free() or self.waiting:
            return False
        self._spares += 1
        return True

    def _release_spare(self) -> None:
        self._spares -= 1
        self._serve_waiters()

    def _serve_waiters(self) -> None:
        while self._waiters and self._free():
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

    @property
    def folder(self) -> S3Url:
        """This URL as a prefix: ``tasks/x/outputs`` and ``tasks/x/outputs/`` name one folder."""
        return self if self.is_prefix else S3Url(self.bucket, self.key + "/")

    def child(self, rel: str) -> S3Url:
        """The object ``rel`` (a relative key) in this folder."""
        return S3Url(self.bucket, self.folder.key + rel)


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

    async def iter_object(self, url: S3Url, chunk_size: int = 1024 * 1024,
                          byte_range: tuple[int, int] | None = None) -> AsyncIterator[bytes]:
        """The object's bytes in chunks (bytes ``first..last`` inclusive with ``byte_range``);
        its start and each chunk bounded by the deadline."""
        extra = {} if byte_range is None else {"Range": "bytes={}-{}".format(*byte_range)}
        obj = await self._call(self.client.get_object(Bucket=url.bucket, Key=url.key, **extra),
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


async def _stopped(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait for its end; its outcome is dropped (retrieved)."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()


class S3Writer:
    """One object written as a stream: ``write``* then ``complete``, or ``abort``.

    Not safe for concurrent ``write`` calls (callers write sequentially, awaiting each call).
    Each S3 request is bounded by ``deadline_s`` (None: unbounded; ``S3.writer`` passes
    ``request_timeout_s``). Parts go out pipelined when the account lends a spare buffer (module
    docstring); a failure of a part in flight is raised by the next ``write`` or ``complete``.
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
        # The part filling: the written chunks as they came (immutable: held, not copied), joined
        # once into the part's body when it is cut (the one copy). A ``bytearray`` body, as
        # botocore hashes it and aiohttp sends it in one write; a ``bytes`` body botocore would
        # wrap in a BytesIO, read again in 1 MiB pieces to hash it and send in 64 KiB writes.
        self._chunks: list[bytes | memoryview] = []
        self._buffered = 0
        self._total = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []  # sent: PartNumber and ETag
        self._cut = 0  # parts cut off so far (sent or in flight): the last PartNumber used
        self._sending: asyncio.Task[None] | None = None  # the part in flight on a spare
        self._finishing: asyncio.Task[int] | None = None  # complete_soon's completion
        self._completing = False
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
        """Parts handed to ``UploadPart`` so far, one in flight included (0: still buffered, or
        a single ``PutObject``)."""
        return self._cut

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"S3Writer for {self.url} is {self._state}")

    def _extra(self) -> dict[str, Any]:
        return {"ContentType": self.content_type} if self.content_type else {}

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data``; send every full part as soon as a byte beyond it arrives.

        With an account, a writer first takes one of the process's part buffers, so many
        concurrent uploads hold at most ``upload_buffers`` parts in memory; the others stop
        reading their requests meanwhile (TCP back-pressure on their clients). Raises
        ``BuffersBusyError`` when none came free in time and ``BufferPreemptedError`` once the
        account was preempted (see the module docstring).
        """
        self._check_open()
        if self._completing:
            raise RuntimeError(f"S3Writer for {self.url} is completing")
        if not data:
            return
        await self._hold()
        if not isinstance(data, bytes):  # the caller may reuse a mutable buffer: keep a copy
            data = bytes(data)
        self._chunks.append(data)
        self._buffered += len(data)
        self._total += len(data)
        while self._buffered > self.part_size:
            await self._send_part(self._cut_part())

    def _cut_part(self) -> bytearray:
        """The first ``part_size`` buffered bytes as one body; the rest stays buffered."""
        taken: list[bytes | memoryview] = []
        need = self.part_size
        chunks = self._chunks
        i = 0
        while need:
            chunk = chunks[i]
            if len(chunk) <= need:
                taken.append(chunk)
                need -= len(chunk)
                i += 1
            else:  # split without copying: views of the chunk, joined below
                view = memoryview(chunk)
                taken.append(view[:need])
                chunks[i] = view[need:]
                need = 0
        del chunks[:i]
        self._buffered -= self.part_size
        return bytearray().join(taken)

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

    async def _send_part(self, body: bytearray) -> None:
        """Send one full part: in flight on a spare buffer while the next fills, or inline."""
        await self._sent()  # at most one part in flight: its buffer is free again after this
        number = self._next_number()
        if self._upload_id is None:  # created here, never in flight: abort always knows it
            created = await _request(self.client.create_multipart_upload(
                Bucket=self.url.bucket, Key=self.url.key, **self._extra()
            ), self._deadline_s, "CreateMultipartUpload")
            self._upload_id = created["UploadId"]
        account = self._account
        if account is not None and account.try_spare():
            self._sending = asyncio.ensure_future(self._upload_on_spare(account, body, number))
            account.renew()  # the next part starts filling now
            return
        if account is not None:
            account.suspend()
        await self._upload_part(body, number)
        if account is not None:
            account.renew()

    def _next_number(self) -> int:
        if self._cut >= MAX_PARTS:
            raise ValueError(f"{self.url}: more than {MAX_PARTS} parts of {self.part_size} bytes")
        self._cut += 1
        return self._cut

    async def _upload_on_spare(self, account: BufferAccount, body: bytearray, number: int
                               ) -> None:
        try:
            await self._upload_part(body, number)
        finally:
            account.release_spare()

    async def _sent(self) -> None:
        """Wait for the part in flight, if any; its failure is raised here."""
        sending, self._sending = self._sending, None
        if sending is not None:
            await sending

    async def _upload_part(self, body: bytearray, number: int) -> None:
        assert self._upload_id is not None
        res = await _request(self.client.upload_part(
            Bucket=self.url.bucket, Key=self.url.key, UploadId=self._upload_id,
            PartNumber=number, Body=body,
        ), self._deadline_s, "UploadPart")
        self._parts.append({"PartNumber": number, "ETag": res["ETag"]})

    async def complete(self) -> int:
        """Make the object visible; returns its size. A no-op once completed."""
        if self._state == "completed":
            return self._total
        if self._finishing is not None:  # after complete_soon: its outcome
            return await self._finishing
        self._check_open()
        self._completing = True
        if self._account is not None:
            self._account.suspend()  # nothing more to fill
        return await self._finish()

    async def complete_soon(self) -> asyncio.Future[int]:
        """``complete()`` without waiting for S3 when the account lends a spare buffer: the
        filling buffer is given back at once (the next object of the account can fill it) while
        the last bytes go to S3 on the spare. The future gives the size or raises the failure;
        without a spare the object is completed here and the future is done already."""
        if self._state == "completed" or self._finishing is not None:
            return asyncio.ensure_future(self.complete())
        self._check_open()
        account = self._account
        if account is not None and self._holding and account.try_spare():
            self._completing = True
            self._release()
            self._finishing = asyncio.ensure_future(self._finish_on_spare(account))
            return self._finishing
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        done.set_result(await self.complete())
        return done

    @property
    def completing(self) -> bool:
        """``complete`` (or ``complete_soon``) began: the object may exist from then on, even
        when the writer is aborted during the last request."""
        return self._completing

    async def _finish_on_spare(self, account: BufferAccount) -> int:
        try:
            return await self._finish()
        finally:
            account.release_spare()

    async def _finish(self) -> int:
        await self._sent()
        body = bytearray().join(self._chunks)  # the one copy, as for a part
        self._chunks, self._buffered = [], 0
        if self._upload_id is None:  # at most one part: a single PUT
            await _request(self.client.put_object(
                Bucket=self.url.bucket, Key=self.url.key, Body=body, **self._extra()
            ), self._deadline_s, "PutObject")
        else:
            if body:
                await self._upload_part(body, self._next_number())
            await _request(self.client.complete_multipart_upload(
                Bucket=self.url.bucket, Key=self.url.key, UploadId=self._upload_id,
                MultipartUpload={"Parts": sorted(self._parts, key=lambda p: p["PartNumber"])},
            ), self._deadline_s, "CompleteMultipartUpload")
            self._upload_id = None
        self._release()
        self._state = "completed"
        return self._total

    async def abort(self) -> None:
        """Drop everything written; stop a part (or the completion) in flight and abort a
        started multipart upload. Idempotent.

        After ``complete()`` this does nothing (the object stays; delete it to undo). An object
        whose completion was under way may exist all the same (``completing``).
        """
        if self._state != "open":
            return
        finishing, self._finishing = self._finishing, None
        if finishing is not None:  # stop the completion first: it may still cut or send
            await _shielded(_stopped(finishing))
            if self._state != "open":  # it completed meanwhile: the object stays
                return
        self._state = "aborted"
        self._chunks, self._buffered = [], 0
        self._release()
        sending, self._sending = self._sending, None
        upload_id, self._upload_id = self._upload_id, None
        if sending is None and upload_id is None:
            return
        await _shielded(self._stop(sending, upload_id))

    async def _stop(self, sending: asyncio.Task[None] | None, upload_id: str | None) -> None:
        if sending is not None:
            await _stopped(sending)  # its spare is given back as it ends
        if upload_id is not None:
            await _request(self.client.abort_multipart_upload(
                Bucket=self.url.bucket, Key=self.url.key, UploadId=upload_id
            ), self._deadline_s, "AbortMultipartUpload")

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
