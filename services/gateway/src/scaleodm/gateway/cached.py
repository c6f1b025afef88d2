"""Per-process caches of the gateway: ``CachedValue`` and ``BoundedLRU``.

``CachedValue``: a value read from the store at most once per interval, shared by concurrent
callers.

``/info`` is polled by every WebODM and ClusterODM client; its ``taskQueueCount`` is a count over
the tasks collection. Caching it briefly (``SCALEODM_INFO_CACHE_S``) and letting concurrent
requests share one read keeps ``/info`` cheap however many clients poll. A failed read is not
cached: the next caller tries again.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


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


class BoundedLRU(Generic[K, V]):
    """Least-recently-used mapping holding at most ``max_size`` units, each value costing
    ``size_of(value)`` (bytes of tiles or Items, 1 for metadata), and at most ``max_entries``
    values when given. A value larger than the whole bound is not kept. Used from the event
    loop only: no locking."""

    def __init__(self, max_size: int, size_of: Callable[[V], int],
                 max_entries: int | None = None) -> None:
        self.max_size = max_size
        self.max_entries = max_entries
        self._size_of = size_of
        self._items: collections.OrderedDict[K, V] = collections.OrderedDict()
        self.size = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        cost = self._size_of(value)
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= self._size_of(old)
        if cost > self.max_size:
            return
        self._items[key] = value
        self.size += cost
        while self.size > self.max_size or (
                self.max_entries is not None and len(self._items) > self.max_entries):
            _, dropped = self._items.popitem(last=False)
            self.size -= self._size_of(dropped)
