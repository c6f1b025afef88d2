"""A value read from the store at most once per interval, shared by concurrent callers.

``/info`` is polled by every WebODM and ClusterODM client; its ``taskQueueCount`` is a count over
the tasks collection. Caching it briefly (``SCALEODM_INFO_CACHE_S``) and letting concurrent
requests share one read keeps ``/info`` cheap however many clients poll. A failed read is not
cached: the next caller tries again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class CachedValue(Generic[T]):
    def __init__(self, fetch: Callable[[], Awaitable[T]], ttl_s: float) -> None:
        self._fetch = fetch
        self._ttl_s = ttl_s
        self._value: T | None = None
        self._expires = 0.0
        self._pending: asyncio.Future[T] | None = None

    async def get(self) -> T:
        if self._value is not None and time.monotonic() < self._expires:
            return self._value
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._refresh())
        # shield: a caller that goes away must not cancel the read the others wait for
        return await asyncio.shield(self._pending)

    async def _refresh(self) -> T:
        try:
            value = await self._fetch()
            self._value, self._expires = value, time.monotonic() + self._ttl_s
            return value
        finally:
            self._pending = None
