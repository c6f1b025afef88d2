"""Reading request bodies with an idle timeout, so that a stalled client cannot hold a request.

uvicorn has no body timeout: a client that sends its headers and a few bytes of body, then
nothing, keeps its request (and whatever the request holds: an S3 part buffer, a multipart
upload) forever. Every body the gateway reads goes through here:

- ``BodyReader(stream, idle_timeout_s).chunks()`` yields the body's chunks; no byte for
  ``idle_timeout_s`` raises ``BodyStalledError``. The clock restarts with every chunk: a client
  that keeps sending, however slowly, is never idle (the part-buffer hold deadline, in
  ``scaleodm.common.store.s3``, is what bounds a slow upload that holds a buffer);
- ``BodyReader.interrupt(exc)`` makes the read in progress (or the next one) raise ``exc`` at
  once. The upload's part-buffer account calls it when the upload is preempted, which cuts the
  request off even while it waits for its client;
- ``read_capped(stream, max_bytes, idle_timeout_s)``: a whole small body as bytes, at most
  ``max_bytes`` of it (``BodyTooLargeError``), with the same idle timeout — for the action
  bodies (cancel, remove, restart) and anything else read in one piece.

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
    """The body exceeded the reader's ``max_bytes``."""


class BodyReader:
    """One request body, read chunk by chunk with an idle timeout; interruptible."""

    def __init__(self, stream: AsyncIterator[bytes], idle_timeout_s: float) -> None:
        self.stream = stream
        self.idle_timeout_s = idle_timeout_s
        self._reading: asyncio.Timeout | None = None
        self._interrupted: BaseException | None = None

    def interrupt(self, exc: BaseException) -> None:
        """Make the current read (or the next) raise ``exc`` now; the first interrupt wins."""
        if self._interrupted is None:
            self._interrupted = exc
        if self._reading is not None and not self._reading.expired():
            self._reading.reschedule(asyncio.get_running_loop().time())

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks; ``BodyStalledError`` after ``idle_timeout_s`` without one."""
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
            if chunk:
                yield chunk


async def read_capped(stream: AsyncIterator[bytes], max_bytes: int, idle_timeout_s: float, *,
                      content_length: str | None = None) -> bytes:
    """The whole body, at most ``max_bytes`` (``BodyTooLargeError``), with an idle timeout
    (``BodyStalledError``). A declared ``content_length`` over the cap is refused unread."""
    too_large = BodyTooLargeError(f"Request too large (limit {max_bytes} bytes)")
    if content_length and content_length.strip().isdigit() and int(content_length) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in BodyReader(stream, idle_timeout_s).chunks():
        if len(body) + len(chunk) > max_bytes:
            raise too_large
        body += chunk
    return bytes(body)
