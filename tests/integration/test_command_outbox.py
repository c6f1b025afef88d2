"""Commands go through the MongoDB outbox: with NATS down the gateway still takes them, and after
NATS is back every one of them takes effect.

NATS is stopped while two runs are running; then a task is created, one running task is canceled
and the other removed — each answered at once, as NodeODM would, since MongoDB holds the event
and its command. NATS comes back on the same port (its JetStream store kept) and: the new task
runs and completes, the canceled run is stopped (its runner gets the cancel), the removed task's
documents, S3 objects and run directory are gone. Nothing is left unpublished.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from scaleodm.common import localruns
from tests.harness import api, data, servers
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration

ANSWER_BOUND_S = 3.0  # every action answers within this while NATS is down
# How long NATS stays down after the actions; the 5 minutes is
# SCALEODM_TEST_NATS_OUTAGE_S=300 (run by hand: the suite keeps it short).
OUTAGE_S = float(os.environ.get("SCALEODM_TEST_NATS_OUTAGE_S", "2"))


@contextlib.contextmanager
def _nats(tmp: Path, port: int | None = None) -> Iterator[servers.Nats]:
    with servers.nats_server(tmp, port=port) as n:
        yield n


async def _timed(coro: Any) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    resp = await coro
    return resp, time.monotonic() - start


def _mongo(stack: Stack) -> dict[str, int]:
    with MongoClient(stack.mongo_url) as client:
        db = client[stack.database]
        return {"unpublished": db["events"].count_documents({"published": False})}


async def _wait(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def test_actions_taken_while_nats_is_down_take_effect_when_it_is_back(
    tmp_path: Path, mongo_url: str, s3: servers.S3Endpoint, http_fixture: HttpFixture
) -> None:
    data.write(http_fixture.root / "outbox" / "two.zip", data.images_zip(2))
    zipurl = http_fixture.url("outbox/two.zip")
    nats_dir = tmp_path / "nats"
    stack = Stack(tmp=tmp_path, nats_url="", mongo_url=mongo_url, s3=s3,
                  database=f"t_{uuid.uuid4().hex[:12]}",
                  extra_env={"SCALEODM_TEST_ENGINE_SECONDS": "30",
                             "SCALEODM_NATS__PUBLISH_TIMEOUT_S": "1"})
    try:
        with _nats(nats_dir) as first:
            port = int(first.url.rsplit(":", 1)[1])
            stack.nats_url = first.url
            stack.start_all("gateway", "scheduler", "watcher", "notifier")
            async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as gw:
                to_cancel = (await api.create(gw, zipurl=zipurl, name="cancel me"))["uuid"]
                to_remove = (await api.create(gw, zipurl=zipurl, name="remove me"))["uuid"]
                for task_id in (to_cancel, to_remove):
                    await api.poll_until(gw, task_id, api.status_is(20), timeout_s=30)
        # NATS is down (stopped with its context); MongoDB and S3 are up.
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as gw:
            created, took_create = await _timed(gw.post("/task/new", files=api.form(
                zipurl=zipurl, name="created while NATS was down")))
            canceled, took_cancel = await _timed(gw.post("/task/cancel",
                                                         data={"uuid": to_cancel}))
            removed, took_remove = await _timed(gw.post("/task/remove",
                                                        data={"uuid": to_remove}))
            assert canceled.json() == {"success": True}
            assert removed.json() == {"success": True}
            new_id = created.json()["uuid"]
            assert max(took_create, took_cancel, took_remove) < ANSWER_BOUND_S, (
                took_create, took_cancel, took_remove)
            # Read-your-writes, from MongoDB alone.
            assert (await api.info(gw, to_cancel))["status"] == {"code": 50}
            assert (await api.info(gw, to_remove)) == {"error": f"{to_remove} not found"}
            assert (await api.info(gw, new_id))["status"] == {"code": 10}
            assert _mongo(stack)["unpublished"] >= 3, "the commands wait in the outbox"
            await asyncio.sleep(OUTAGE_S)  # > a publish timeout: nothing is lost meanwhile
            for service in stack.procs:
                assert stack.procs[service].poll() is None, f"{service} outlived the outage"

            with _nats(nats_dir, port=port):
                await api.poll_until(gw, new_id, api.status_is(20, 40), timeout_s=60)
                cancel_dir = localruns.RunDir(stack.runs_dir / f"odm-{to_cancel}-1")
                await _wait(lambda: cancel_dir.cancel_requested, 60, "the cancel reached the run")
                await _wait(lambda: not cancel_dir.runner_alive(), 30, "the run stopped")
                await _wait(lambda: not (stack.runs_dir / f"odm-{to_remove}-1").exists(), 60,
                            "the removed task's run directory is deleted")
                await _wait(lambda: stack.s3_keys(f"tasks/{to_remove}/") == [], 30,
                            "the removed task's S3 objects are deleted")
                await _wait(lambda: _mongo(stack)["unpublished"] == 0, 30,
                            "every recorded event is published")
                assert (await api.info(gw, to_cancel))["status"] == {"code": 50}

                def removed_documents() -> bool:  # deleted last, after the S3 objects
                    with MongoClient(stack.mongo_url) as client:
                        db = client[stack.database]
                        return (db["tasks"].find_one({"_id": to_remove}) is None
                                and db["events"].count_documents({"task_id": to_remove}) == 0)

                await _wait(removed_documents, 30, "the removed task's documents are deleted")
    finally:
        stack.stop()
