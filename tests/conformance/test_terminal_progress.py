"""``progress`` of a finished task, through HTTP against the running gateway (nodeodm-api §4.4).

What NodeODM 2.2.4 does (``libs/Task.js``): progress only rises while the engine runs
(``updateProgress``), and every way a started run ends goes through one end-of-run step that
raises it to 100 — after a successful run with its post-processing, after a failed engine or
post-processing step, after a failure to start the engine, and after the engine of a canceled
task exits. ``cancel`` itself changes the status and the processing time, not the progress: for
the moment between the cancel and the killed engine's exit (the kill is a signal, the exit
follows within moments), a canceled task still shows the progress it had reached; then 100.
In test mode (``--test``) there is no engine and no progress: a task canceled while "running"
shows 0 and later turns 40 at 100 when the test timer fires (§11 quirk 20, not copied), which is
what a side-by-side comparison against a test-mode node shows. A task that fails while
initializing (before the engine runs: a bad zipurl, too many images) keeps 0, and so does a task
canceled while queued: neither ever reaches the end-of-run step.

This node records a run's end state at once (it has no moment between the cancel and the killed
engine's exit that a client could tell from NodeODM's): completed, failed and canceled while
running all read 100, and stay there.

Covered: a task canceled while running (progress between 0 and 100 when canceled) reads 100 at
once and after its killed run has ended; a run that fails in the engine reads 30 at 100; a
completed run reads 100.
Left out: a task canceled while queued (0; the stack starts runs at once, so a queued state
cannot be held from outside: ``tests/unit/test_projection.py``), failures before the engine runs
(store rules, ``tests/integration/test_store.py``), and the processing time of a canceled task.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.harness import api, data

pytestmark = pytest.mark.integration

IMAGES = [(name, data.JPEG) for name in data.image_names(3)]
RUN_S = 2.0  # the ODM test double's run length in the session stack (SCALEODM_TEST_ENGINE_SECONDS)


async def _holds(client: httpx.AsyncClient, task_id: str, expected: dict[str, Any],
                 seconds: float) -> None:
    """Status and progress stay put for ``seconds`` (a late event of the run must not move
    them)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        info = await api.info(client, task_id)
        assert {"status": info["status"], "progress": info["progress"]} == expected, info
        await asyncio.sleep(0.2)


async def test_canceled_while_running_ends_at_100(client: httpx.AsyncClient) -> None:
    created = await api.create(client, files=IMAGES, name="cancel-progress")
    task_id = created["uuid"]
    running = await api.poll_until(
        client, task_id, lambda i: i["status"]["code"] != 10 and (
            i["status"]["code"] != 20 or i["progress"] > 0), interval_s=0.05)
    assert running["status"] == {"code": 20}, running
    assert 0 < running["progress"] < 100, running

    resp = await client.post("/task/cancel", data={"uuid": task_id})
    assert resp.json() == {"success": True}, resp.text
    canceled = await api.info(client, task_id)
    assert canceled["status"] == {"code": 50}, canceled
    assert canceled["progress"] == 100, canceled
    await _holds(client, task_id, {"status": {"code": 50}, "progress": 100}, RUN_S + 0.5)


async def test_failed_in_the_engine_ends_at_100(client: httpx.AsyncClient) -> None:
    # The ODM test double exits 1 half-way through a stage when an input is named so.
    created = await api.create(client, files=[*IMAGES, ("odm-test-engine-fail-1.jpg", data.JPEG)],
                               name="fail-progress")
    final = await api.poll_until(client, created["uuid"], api.status_is(30, 40, 50))
    assert final["status"] == {"code": 30, "errorMessage": "Cannot process dataset"}, final
    assert final["progress"] == 100, final


async def test_completed_ends_at_100(client: httpx.AsyncClient) -> None:
    created = await api.create(client, files=IMAGES, name="complete-progress")
    final = await api.poll_until(client, created["uuid"], api.status_is(30, 40, 50))
    assert final["status"] == {"code": 40}, final
    assert final["progress"] == 100, final
