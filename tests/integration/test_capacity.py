"""Capacity end to end: gateway, scheduler (admission) and watcher with the ODM test double.

More tasks than slots: the runs never exceed the capacity (checked on the runs' own start and
end events, not on what admission believes), waiting tasks show their ``queuePosition`` and
stay at status 10 with no run, ``/info`` tells the capacity, and every way a run ends — success,
cancel, remove, a scheduler killed with SIGKILL — frees its slot for the next task.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from scaleodm.common.contracts.ids import run_name
from tests.harness import api, data, servers
from tests.harness.httpfixture import HttpFixture
from tests.harness.runs import most_at_once, run_intervals
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration


def capacity(max_active: int, **slots: int) -> dict[str, str]:
    classes = [{"name": name, "max_images": None, "slots": n} for name, n in slots.items()]
    return {"SCALEODM_CAPACITY__MAX_ACTIVE": str(max_active),
            "SCALEODM_CAPACITY__CLASSES": json.dumps(classes)}


async def test_runs_never_exceed_capacity_and_waiting_tasks_show_their_place(
    fresh_stack: tuple[Stack, servers.Nats], http_fixture: HttpFixture,
) -> None:
    stack, _ = fresh_stack
    data.write(http_fixture.root / "capacity" / "two.zip", data.images_zip(2))
    zipurl = http_fixture.url("capacity/two.zip")
    stack.extra_env = {**capacity(2, any=5), "SCALEODM_TEST_ENGINE_SECONDS": "1.5"}
    stack.start_all("gateway", "scheduler", "watcher")
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as gw:
        info = (await gw.get("/info")).json()
        assert info["maxParallelTasks"] == 2
        ids = [(await api.create(gw, zipurl=zipurl, name=f"t{n}"))["uuid"] for n in range(6)]
        positions: dict[str, list[int]] = {i: [] for i in ids}
        deadline = time.monotonic() + 90
        while True:
            infos = [await api.info(gw, i) for i in ids]
            for i, body in zip(ids, infos, strict=True):
                if "queuePosition" in body:
                    assert body["status"]["code"] == 10, body
                    positions[i].append(body["queuePosition"])
            if all(b["status"]["code"] == 40 for b in infos):
                break
            assert time.monotonic() < deadline, infos
            await asyncio.sleep(0.1)
    assert most_at_once(run_intervals(stack, ids)) == 2
    # The last tasks waited, their places only moving forward; the first two never waited.
    # (Its first place seen depends on the polls' timing under load: 4 when seen at once.)
    assert positions[ids[-1]] and positions[ids[-1]][0] >= 2, positions
    for seen in positions.values():
        assert seen == sorted(seen, reverse=True), positions
    assert not positions[ids[0]] and not positions[ids[1]], positions


async def test_cancel_remove_and_a_killed_scheduler_free_their_slots(
    fresh_stack: tuple[Stack, servers.Nats], http_fixture: HttpFixture,
) -> None:
    stack, _ = fresh_stack
    data.write(http_fixture.root / "capacity" / "long.zip", data.images_zip(2))
    zipurl = http_fixture.url("capacity/long.zip")
    stack.extra_env = {**capacity(1, any=1), "SCALEODM_TEST_ENGINE_SECONDS": "60",
                       "SCALEODM_ADMISSION_INTERVAL_S": "1"}
    stack.start_all("gateway", "scheduler", "watcher")
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as gw:
        a, b, c, d = [(await api.create(gw, zipurl=zipurl, name=n))["uuid"] for n in "abcd"]
        await api.poll_until(gw, a, api.status_is(20), timeout_s=30)
        deadline = time.monotonic() + 5  # places as of the last pass, read <= 1 s ago
        while True:
            waiting = [await api.info(gw, t) for t in (b, c, d)]
            assert [w["status"]["code"] for w in waiting] == [10, 10, 10]
            if [w.get("queuePosition") for w in waiting] == [1, 2, 3]:
                break
            assert time.monotonic() < deadline, waiting
            await asyncio.sleep(0.2)
        ran = [p.name for p in stack.runs_dir.iterdir()] if stack.runs_dir.exists() else []
        assert ran == [run_name(a, 1)], ran  # no run of a waiting task

        # Canceled: the next one runs.
        assert (await gw.post("/task/cancel", data={"uuid": a})).json() == {"success": True}
        await api.poll_until(gw, b, api.status_is(20), timeout_s=30)
        # Removed while running: the next one runs.
        assert (await gw.post("/task/remove", data={"uuid": b})).json() == {"success": True}
        await api.poll_until(gw, c, api.status_is(20), timeout_s=30)
        # Its place as of the last pass, read at most SCALEODM_INFO_CACHE_S ago.
        await api.poll_until(gw, d, lambda i: i.get("queuePosition") == 1, timeout_s=5)
        # The scheduler killed: c keeps its slot (d still waits), whoever admits next.
        stack.kill("scheduler")
        stack.start("scheduler")
        await asyncio.sleep(2)  # a pass or two of the new scheduler
        assert (await api.info(gw, d))["status"]["code"] == 10
        assert (await gw.post("/task/cancel", data={"uuid": c})).json() == {"success": True}
        await api.poll_until(gw, d, api.status_is(20), timeout_s=30)
        assert (await gw.post("/task/cancel", data={"uuid": d})).json() == {"success": True}
        await api.poll_until(gw, d, api.status_is(50), timeout_s=30)
    assert most_at_once(run_intervals(stack, [a, b, c, d])) == 1


