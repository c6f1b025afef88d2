"""Reading request bodies within their limits: size, and an idle timeout so that a stalled
client cannot hold a request.

uvicorn has no body timeout: a client that sends its headers and a few bytes of body, then
nothing, keeps its request (and whatever the request holds: an S3 part buffer, a multipart
upload) forever. Every body the gateway reads goes through here, and this is the one place
where its size and idle limits are enforced:

- ``check_declared(content_length, max_bytes)`` refuses a body whose declared
  ``Content-Length`` is over the cap before a byte of it is read;
- ``BodyReader(stream, idle_timeout_s, max_bytes=...).chunks()`` yields the body's chunks; no
  byte for ``idle_timeout_s`` raises ``BodyStalledError``, more than ``max_bytes`` in all
  ``BodyTooLargeError``. The clock restarts with every chunk: a client that keeps sending,
  however slowly, is never idle (the part-buffer hold deadline, in
  ``scaleodm.common.store.s3``, is what bounds a slow upload that holds a buffer). Uploads pass
  these chunks to ``multipart.stream_form``, which lets the errors through after its clean-up;
- ``BodyReader.interrupt(exc)`` makes the read in progress (or the next one) raise ``exc`` at
  once. The upload's part-buffer account calls it when the upload is preempted, which cuts the
  request off even while it waits for its client;
- ``read_capped(stream, max_bytes, idle_timeout_s)``: a whole small body as bytes, with both
  limits — for the action bodies (cancel, remove, restart) and anything else read in one piece.

The errors carry the NodeODM-style text for the client (``str(exc)``). The read is timed with
``asyncio.timeout`` around the ASGI receive, which is cancellation-safe in uvicorn (bytes not
yet taken stay in the connection's buffer); a body cut off is never read again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class BodyError(Exception):
    """A request body refused while it was read; ``str(exc)`` is the client-facing text."""


class BodyStalledError(BodyError):
    """The client sent no byte of its body for ``idle_timeout_s``."""


class BodyTooLargeError(BodyError):
    """The body exceeded its ``max_bytes``, as declared or as read."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"Request too large (limit {max_bytes} bytes)")
        self.max_bytes = max_bytes


def check_declared(content_length: str | None, max_bytes: int) -> None:
    """``BodyTooLargeError`` when a declared ``Content-Length`` is over ``max_bytes``.

    Only a plain decimal length is judged here (anything else is the server's to refuse); the
    reader counts what actually comes either way.
    """
    declared = (content_length or "").strip()
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLargeError(max_bytes)


class BodyReader:
    """One request body, read chunk by chunk with an idle timeout and (with ``max_bytes``) a
    size cap; interruptible."""

    def __init__(self, stream: AsyncIterator[bytes], idle_timeout_s: float, *,
                 max_bytes: int | None = None) -> None:
        self.stream = stream
        self.idle_timeout_s = idle_timeout_s
        self.max_bytes = max_bytes
        self.received = 0
        self._reading: asyncio.Timeout | None = None
        self._interrupted: BaseException | None = None

    def interrupt(self, exc: BaseException) -> None:
        """Make the current read (or the next) raise ``exc`` now; the first interrupt wins."""
        if self._interrupted is None:
            self._interrupted = exc
        if self._reading is not None and not self._reading.expired():
            self._reading.reschedule(asyncio.get_running_loop().time())

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks; ``BodyStalledError`` after ``idle_timeout_s`` without one,
        ``BodyTooLargeError`` at the chunk that passes ``max_bytes`` (it is not yielded)."""
        while True:
            if self._interrupted is not None:
                raise self._interrupted
            try:
                async with asyncio.timeout(self.idle_timeout_s) as reading:
                    self._reading = reading
                    try:
                        chunk = await anext(self.stream)
                    finally:
                        self._reading = None
            except StopAsyncIteration:
                return
            except TimeoutError:
                if self._interrupted is not None:
                    raise self._interrupted from None
                raise BodyStalledError(
                    f"Request body stalled: nothing received for {self.idle_timeout_s:g} s"
                ) from None
            if not chunk:
                continue
            self.received += len(chunk)
            if self.max_bytes is not None and self.received > self.max_bytes:
                raise BodyTooLargeError(self.max_bytes)
            yield chunk


async def read_capped(stream: AsyncIterator[bytes], max_bytes: int, idle_timeout_s: float, *,
                      content_length: str | None = None) -> bytes:
    """The whole body, at most ``max_bytes`` (``BodyTooLargeError``), with an idle timeout
    (``BodyStalledError``). A declared ``content_length`` over the cap is refused unread."""
    check_declared(content_length, max_bytes)
    body = bytearray()
    async for chunk in BodyReader(stream, idle_timeout_s, max_bytes=max_bytes).chunks():
        body += chunk
    return bytes(body)
