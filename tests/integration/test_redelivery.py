"""No task is lost when the scheduler dies mid-command, and a redelivered create is a no-op.

Uses a stack of its own (own nats-server and database) so it can kill its scheduler: SIGKILL, no
cleanup, the command left unacked. JetStream redelivers it after ``ack_wait`` to the restarted
scheduler. Covers a kill after the run started (the redelivery must not start a second run) and
a kill before it started (the redelivery must start it). Leaves out Argo runs (same contract,
409 on the deterministic Workflow name).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import api, data, servers
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration


def _consumer(nats: servers.Nats, name: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{nats.monitor_url}/jsz?consumers=true", timeout=5) as resp:
        jsz = json.load(resp)
    for account in jsz.get("account_details", []):
        for stream in account.get("stream_detail", []):
            for consumer in stream.get("consumer_detail", []) or []:
                if consumer["name"] == name:
                    return dict(consumer)
    raise AssertionError(f"consumer {name} not found")


def _redelivered(stack: Stack, event: str) -> bool:
    """The restarted scheduler handled the command as a redelivery (num_delivered >= 2)."""
    for line in stack.log("scheduler").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event", "").startswith(event) and entry.get("delivered", 1) >= 2:
                return True
    return False


async def _wait_path(path: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.05)


async def _run_with_killed_scheduler(
    fresh_stack: tuple[Stack, servers.Nats], http_fixture: HttpFixture, failpoint: str
) -> tuple[Stack, servers.Nats, str]:
    stack, nats = fresh_stack
    # A run long enough to still be going when the command comes back after ack_wait (the
    # restarted scheduler first warms its runner fork server: seconds on a loaded machine).
    stack.extra_env = {"SCALEODM_ACK_WAIT_S": "3", "SCALEODM_TEST_ENGINE_SECONDS": "8"}
    stack.start_all("gateway", "watcher", "notifier", "scheduler", extra={
        "scheduler": {"SCALEODM_FAILPOINTS": f"{failpoint}=hang"}})
    data.write(http_fixture.root / "redeliver.zip", data.images_zip(3))
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        task_id = (await api.create(client, zipurl=http_fixture.url("redeliver.zip")))["uuid"]
        deadline = time.monotonic() + 20
        while "failpoint hit" not in stack.log("scheduler"):
            assert time.monotonic() < deadline, "the scheduler never reached the failpoint"
            await asyncio.sleep(0.05)
        stack.kill("scheduler")
        stack.start("scheduler")
        final = await api.poll_until(client, task_id, api.status_is(30, 40, 50), timeout_s=60)
        assert final["status"] == {"code": 40}, final
    return stack, nats, task_id


async def test_kill_after_run_started_redelivery_changes_nothing(
    fresh_stack: tuple[Stack, servers.Nats], http_fixture: HttpFixture
) -> None:
    stack, nats, task_id = await _run_with_killed_scheduler(
        fresh_stack, http_fixture, "scheduler.create.before_ack"
    )
    runs = sorted(p.name for p in stack.runs_dir.iterdir())
    assert runs == [f"odm-{task_id}-1"], "exactly one run for the one attempt"
    spawns = (stack.runs_dir / runs[0] / "runner.log").read_text().count('"engine started"')
    assert spawns == 1, "the engine ran once"
    # The redelivery is a no-op either way: it finds the run (usually), or, on a slow machine,
    # a task that already ended.
    assert _redelivered(stack, "redelivered command: run already exists") or _redelivered(
        stack, "command is not for the task's current active attempt; no run started"
    )
    consumer = _consumer(nats, "scheduler")
    assert consumer["num_ack_pending"] == 0 and consumer["num_pending"] == 0


async def test_kill_before_run_started_redelivery_starts_it(
    fresh_stack: tuple[Stack, servers.Nats], http_fixture: HttpFixture
) -> None:
    stack, nats, task_id = await _run_with_killed_scheduler(
        fresh_stack, http_fixture, "scheduler.create.before_start"
    )
    assert sorted(p.name for p in stack.runs_dir.iterdir()) == [f"odm-{task_id}-1"]
    assert _redelivered(stack, "run requested")
    consumer = _consumer(nats, "scheduler")
    assert consumer["num_ack_pending"] == 0 and consumer["num_pending"] == 0
