"""What tenants store, on every wire server (nx-27017, mongoeco, or a real MongoDB from the env).

Covered: ``UsageStore`` (monthly images per tenant): a take within the quota counts, one beyond it
counts nothing and tells what is used; concurrent takes at the boundary never pass the quota
together (one conditional ``$inc`` each), also when the month's document does not exist yet (first
inserts racing); a quota of 0 and no quota; ``give_back``; months and tenants apart.
``TaskStore.list_task_ids`` per tenant, with tasks from before tenants (no ``tenant`` field)
listed as ``default``'s (``owned_by``).

Left out: the gateway's use of them (``tests/integration/test_tenants.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from scaleodm.common import clock
from scaleodm.common.store.tasks import TaskStore
from scaleodm.common.store.usage import UsageStore

pytestmark = pytest.mark.integration

MONTH = "2031-05"


@pytest.fixture
def usage(wire_db: Any) -> UsageStore:
    return UsageStore(wire_db)


async def test_takes_count_until_the_quota_and_refusals_count_nothing(usage: UsageStore) -> None:
    assert await usage.take("alice", MONTH, 6, 10) is None  # the month's first: inserted
    assert await usage.take("alice", MONTH, 4, 10) is None  # exactly at the quota
    assert await usage.take("alice", MONTH, 1, 10) == 10  # refused: 10 used
    assert await usage.used("alice", MONTH) == 10
    await usage.give_back("alice", MONTH, 4)
    assert await usage.take("alice", MONTH, 5, 10) == 6
    assert await usage.take("alice", MONTH, 4, 10) is None
    # Other months and tenants are counted apart.
    assert await usage.take("alice", "2031-06", 10, 10) is None
    assert await usage.take("bob", MONTH, 10, 10) is None
    assert await usage.used("alice", MONTH) == 10


async def test_no_quota_counts_and_quota_zero_refuses(usage: UsageStore) -> None:
    assert await usage.take("carol", MONTH, 1000, None) is None
    assert await usage.take("carol", MONTH, 1000, None) is None
    assert await usage.used("carol", MONTH) == 2000
    assert await usage.take("dave", MONTH, 1, 0) == 0
    assert await usage.take("dave", MONTH, 11, 10) == 0  # more than the whole quota
    assert await usage.used("dave", MONTH) == 0


@pytest.mark.parametrize("used_before", [pytest.param(None, id="first-of-the-month"),
                                         pytest.param(1, id="month-started")])
async def test_concurrent_takes_at_the_boundary_never_pass_the_quota(
    usage: UsageStore, used_before: int | None
) -> None:
    tenant = f"t{used_before}"
    if used_before is not None:
        assert await usage.take(tenant, MONTH, used_before, 10) is None
    results = await asyncio.gather(*(usage.take(tenant, MONTH, 3, 10) for _ in range(8)))
    counted = [r for r in results if r is None]
    start = used_before or 0
    assert len(counted) == (10 - start) // 3, results
    assert await usage.used(tenant, MONTH) == start + 3 * len(counted)
    assert all(r is not None and r + 3 > 10 for r in results if r is not None), results


async def test_concurrent_first_takes_without_quota_all_count(usage: UsageStore) -> None:
    await asyncio.gather(*(usage.take("erin", MONTH, 2, None) for _ in range(8)))
    assert await usage.used("erin", MONTH) == 16


async def test_tasks_are_listed_per_tenant_and_old_tasks_are_defaults(wire_db: Any) -> None:
    store = TaskStore(wire_db)
    await store.ensure_indexes()
    base = clock.now()
    rows = [("a1", "alice"), ("old", None), ("b1", "bob"), ("d1", "default"), ("a2", "alice")]
    for n, (task_id, tenant) in enumerate(rows):
        doc: dict[str, Any] = {"_id": task_id, "removed": False, "state": "queued",
                               "created_at": base.replace(microsecond=n)}
        if tenant is not None:
            doc["tenant"] = tenant
        await store.tasks.insert_one(doc)
    await store.tasks.insert_one({"_id": "gone", "removed": True, "tenant": "alice",
                                  "created_at": base})

    assert await store.list_task_ids("alice") == ["a1", "a2"]
    assert await store.list_task_ids("bob") == ["b1"]
    assert await store.list_task_ids("default") == ["old", "d1"]
    assert await store.list_task_ids("nobody") == []
    assert await store.list_task_ids() == ["a1", "old", "b1", "d1", "a2"]
