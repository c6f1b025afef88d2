"""The gateway's CachedValue (taskQueueCount of /info): one read per interval, shared."""

from __future__ import annotations

import asyncio

import pytest

from scaleodm.gateway.cached import CachedValue


class Counter:
    def __init__(self) -> None:
        self.calls = 0
        self.fail_next = False
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self) -> int:
        self.calls += 1
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("store down")
        return self.calls


async def test_concurrent_callers_share_one_read_and_reuse_it() -> None:
    fetch = Counter()
    fetch.gate.clear()
    cached = CachedValue(fetch, ttl_s=60)
    waiters = [asyncio.ensure_future(cached.get()) for _ in range(20)]
    await asyncio.sleep(0)
    fetch.gate.set()
    assert await asyncio.gather(*waiters) == [1] * 20
    assert await cached.get() == 1
    assert fetch.calls == 1


async def test_zero_ttl_reads_every_time() -> None:
    fetch = Counter()
    cached = CachedValue(fetch, ttl_s=0)
    assert [await cached.get() for _ in range(3)] == [1, 2, 3]


async def test_a_failed_read_is_not_cached() -> None:
    fetch = Counter()
    fetch.fail_next = True
    cached = CachedValue(fetch, ttl_s=60)
    with pytest.raises(RuntimeError):
        await cached.get()
    assert await cached.get() == 2


async def test_a_caller_cancelled_mid_read_does_not_cancel_the_others() -> None:
    fetch = Counter()
    fetch.gate.clear()
    cached = CachedValue(fetch, ttl_s=60)
    first = asyncio.ensure_future(cached.get())
    second = asyncio.ensure_future(cached.get())
    await asyncio.sleep(0)
    first.cancel()
    fetch.gate.set()
    assert await second == 1
