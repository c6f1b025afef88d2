"""Kubernetes execution end to end against the Kubernetes API double (tests/k8s).

The real scheduler and watcher processes talk to the double through a kubeconfig with the real
kubernetes_asyncio client; the controller double runs each Workflow's ``main`` container with the
ODM test double and streams its log. Covers: create -> Running -> log lines -> Succeeded = 40
with stage progress; cancel mid-run = 50 (shutdown Terminate); a watcher killed mid-run resumes
without losing or repeating a line; two watcher replicas (shards) produce no duplicate event; a
redelivered create makes no second Workflow (409); an image-pull error = 30 with a clear message.
Leaves out a real cluster (``on_cluster`` tests, none yet).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from tests.harness import api, data, servers
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import Stack
from tests.k8s.controller import FakeCluster, fake_cluster

pytestmark = pytest.mark.integration
NAMESPACE = "scaleodm"


@pytest.fixture
def argo_stack(
    fresh_stack: tuple[Stack, servers.Nats], tmp_path: Path
) -> Iterator[tuple[Stack, FakeCluster]]:
    stack, _ = fresh_stack
    with fake_cluster(tmp_path / "k8s", engine_seconds=3) as k8s:
        stack.extra_env = {
            "SCALEODM_EXECUTOR": "argo",
            "SCALEODM_SOURCE": "argo",
            "SCALEODM_ARGO__KUBECONFIG": str(k8s.kubeconfig),
            "SCALEODM_ARGO__NAMESPACE": NAMESPACE,
            "SCALEODM_ARGO__WATCH_TIMEOUT_S": "5",
            "SCALEODM_ACK_WAIT_S": "3",
            "SCALEODM_OUTPUT_BATCH_LINES": "20",
        }
        yield stack, k8s
        stack.stop()


def _start(stack: Stack, *services: str) -> None:
    stack.start_all(*services)


def _events(stack: Stack, task_id: str) -> list[dict[str, Any]]:
    mongo: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_url)
    try:
        return list(mongo[stack.database]["events"].find({"task_id": task_id}).sort("seq", 1))
    finally:
        mongo.close()


async def _create(stack: Stack, http_fixture: HttpFixture,
                  headers: dict[str, str] | None = None, **fields: str) -> str:
    data.write(http_fixture.root / "argo.zip", data.images_zip(3))
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        created = await api.create(client, zipurl=http_fixture.url("argo.zip"),
                                   headers=headers, **fields)
    return str(created["uuid"])


async def _poll(stack: Stack, task_id: str, done: Any, timeout_s: float = 60,
                seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        return await api.poll_until(client, task_id, done, timeout_s=timeout_s, seen=seen)


def _main_log(k8s: FakeCluster, task_id: str) -> str:
    """The ``main`` container log of every pod of the attempt's workflow, in creation order."""
    pods = k8s.server.list_objects(
        "pods", NAMESPACE, f"workflows.argoproj.io/workflow=odm-{task_id}-1"
    )
    pods.sort(key=lambda p: p["metadata"]["creationTimestamp"])
    return "".join(k8s.server.log_text(NAMESPACE, p["metadata"]["name"], "main") for p in pods)


def _assert_console_exact(stack: Stack, task_id: str, engine_log: str) -> None:
    """Recorded output == the main container's log, line for line: no gap, no repeat."""
    outputs = [e for e in _events(stack, task_id) if e["kind"] == "output"]
    starts = [e["line_start"] for e in outputs]
    assert len(starts) == len(set(starts)), "an output batch was recorded twice"
    lines: list[str] = []
    for e in sorted(outputs, key=lambda e: e["line_start"]):
        assert e["line_start"] == len(lines), f"gap or overlap at line {len(lines)}"
        lines.extend(e["body"]["lines"])
    from scaleodm.common.domain.progress import clean_line

    expected = [clean_line(x) for x in engine_log.splitlines() if clean_line(x)]
    assert expected, "the engine wrote a log"
    assert lines == expected


async def test_workflow_succeeds_with_stage_progress(
    argo_stack: tuple[Stack, FakeCluster], http_fixture: HttpFixture
) -> None:
    stack, k8s = argo_stack
    _start(stack, "gateway", "scheduler", "watcher", "notifier")
    task_id = await _create(stack, http_fixture, options='[{"name": "dsm", "value": true}]')
    seen: list[dict[str, Any]] = []
    final = await _poll(stack, task_id, api.status_is(30, 40, 50), seen=seen)
    assert final["status"] == {"code": 40}, final
    assert final["progress"] == 100
    progress = [i["progress"] for i in seen]
    assert progress == sorted(progress)
    assert len(set(progress)) >= 4, sorted(set(progress))
    wf = k8s.server.get("workflows", NAMESPACE, f"odm-{task_id}-1")
    assert wf["metadata"]["labels"]["scaleodm.io/task"] == task_id
    assert "--dsm" in wf["spec"]["templates"][0]["containerSet"]["containers"][1]["args"]
    _assert_console_exact(stack, task_id, _main_log(k8s, task_id))


async def test_cancel_mid_run_terminates_the_workflow_and_ends_50(
    argo_stack: tuple[Stack, FakeCluster], http_fixture: HttpFixture
) -> None:
    stack, k8s = argo_stack
    _start(stack, "gateway", "scheduler", "watcher", "notifier")
    task_id = await _create(stack, http_fixture)
    await _poll(stack, task_id, lambda i: i["progress"] > 0)
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        assert (await client.post("/task/cancel", data={"uuid": task_id})).json() == {
            "success": True}
    name = f"odm-{task_id}-1"
    await asyncio.to_thread(k8s.controller.wait_phase, NAMESPACE, name, "Failed", 30)
    wf = k8s.server.get("workflows", NAMESPACE, name)
    assert wf["spec"]["shutdown"] == "Terminate"
    await asyncio.sleep(2)  # let the watcher see the Failed phase
    final = await _poll(stack, task_id, api.status_is(30, 40, 50))
    assert final["status"]["code"] == 50
    kinds = [e["kind"] for e in _events(stack, task_id)]
    assert "failed" not in kinds, "a terminated workflow is a cancel, never a failure"


async def test_watcher_killed_mid_run_loses_and_repeats_nothing(
    argo_stack: tuple[Stack, FakeCluster], http_fixture: HttpFixture
) -> None:
    stack, k8s = argo_stack
    _start(stack, "gateway", "scheduler", "watcher", "notifier")
    task_id = await _create(stack, http_fixture)
    await _poll(stack, task_id, lambda i: i["progress"] >= 22)  # mid-run, lines recorded
    stack.kill("watcher")
    await asyncio.sleep(1.5)  # the run goes on without a watcher
    stack.start("watcher")
    final = await _poll(stack, task_id, api.status_is(30, 40, 50))
    assert final["status"]["code"] == 40
    _assert_console_exact(stack, task_id, _main_log(k8s, task_id))


async def test_two_watcher_replicas_produce_no_duplicate_event(
    argo_stack: tuple[Stack, FakeCluster], http_fixture: HttpFixture
) -> None:
    stack, k8s = argo_stack
    _start(stack, "gateway", "scheduler", "notifier")
    stack.start("watcher", {"SCALEODM_REPLICA": "0", "SCALEODM_REPLICAS": "2"})
    first = stack.procs.pop("watcher")
    stack.start("watcher", {"SCALEODM_REPLICA": "1", "SCALEODM_REPLICAS": "2"})
    stack.procs["watcher-0"] = first
    tasks = [await _create(stack, http_fixture) for _ in range(4)]
    for task_id in tasks:
        final = await _poll(stack, task_id, api.status_is(30, 40, 50))
        assert final["status"]["code"] == 40
        seqs = [e["seq"] for e in _events(stack, task_id)]
        assert seqs == list(range(1, len(seqs) + 1)), "no gap, no duplicate seq"
        _assert_console_exact(stack, task_id, _main_log(k8s, task_id))
    shards = {k8s.server.get("workflows", NAMESPACE, f"odm-{t}-1")["metadata"]["labels"][
        "scaleodm.io/shard"] for t in tasks}
    assert shards, "workflows carry shard labels"
    # Each replica's watch selects only its own shards.
    watches = [r for r in k8s.server.requests if r.method == "GET" and "workflows" in r.path
               and "labelSelector" in r.query]
    selectors = {r.query["labelSelector"] for r in watches}
    assert len(selectors) == 2, selectors


async def test_redelivered_create_makes_no_second_workflow(
    argo_stack: tuple[Stack, FakeCluster], http_fixture: HttpFixture
) -> None:
    stack, k8s = argo_stack
    _start(stack, "gateway", "watcher", "notifier")
    stack.start("scheduler", {"SCALEODM_FAILPOINTS": "scheduler.create.before_ack=hang"})
    task_id = str(uuid.uuid4())
    k8s.controller.hold(f"odm-{task_id}-1")  # queued in "Argo" until the redelivery is seen
    created = await _create(stack, http_fixture, headers={"set-uuid": task_id})
    assert created == task_id
    deadline = time.monotonic() + 20
    while "failpoint hit" not in stack.log("scheduler"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    stack.kill("scheduler")
    stack.start("scheduler")
    while "redelivered command: run already exists" not in stack.log("scheduler"):
        assert time.monotonic() < deadline + 30, "the create was not redelivered"
        await asyncio.sleep(0.05)
    k8s.controller.release(f"odm-{task_id}-1")
    final = await _poll(stack, task_id, api.status_is(30, 40, 50))
    assert final["status"]["code"] == 40
    creates = [r for r in k8s.server.requests if r.method == "POST" and "workflows" in r.path]
    assert [r.status for r in creates] == [201, 409]
    assert len(k8s.server.list_objects("workflows", NAMESPACE, None)) == 1


async def test_image_pull_error_ends_30_with_a_clear_message(
    argo_stack: tuple[Stack, FakeCluster], http_fixture: HttpFixture
) -> None:
    stack, k8s = argo_stack
    _start(stack, "gateway", "scheduler", "watcher", "notifier")
    data.write(http_fixture.root / "argo.zip", data.images_zip(3))
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        resp = await client.post("/task/new/init", files={"name": (None, "pull")})
        task_id = resp.json()["uuid"]
        k8s.controller.fail_with_image_pull(f"odm-{task_id}-1")
        await client.post(f"/task/new/upload/{task_id}",
                          files=[("images", ("a.jpg", data.JPEG, "image/jpeg"))])
        await client.post(f"/task/new/commit/{task_id}")
    final = await _poll(stack, task_id, api.status_is(30, 40, 50))
    assert final["status"]["code"] == 30
    message = final["status"]["errorMessage"]
    assert message.startswith("Could not start the run's containers")
    assert "ErrImagePull" in message or "ImagePullBackOff" in message


async def test_watch_expiry_relists_and_misses_nothing(
    argo_stack: tuple[Stack, FakeCluster], http_fixture: HttpFixture
) -> None:
    stack, k8s = argo_stack
    stack.extra_env["SCALEODM_ARGO__WATCH_TIMEOUT_S"] = "1"  # reconnect often
    _start(stack, "gateway", "scheduler", "watcher", "notifier")
    task_id = await _create(stack, http_fixture)
    await _poll(stack, task_id, lambda i: i["status"]["code"] == 20)
    watcher = stack.procs["watcher"]
    watcher.send_signal(signal.SIGSTOP)  # its watch times out meanwhile, at the old version
    try:
        await asyncio.sleep(1.5)
        k8s.server.create("workflows", "elsewhere", {  # moves the resourceVersion on
            "apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
            "metadata": {"name": "unrelated"}, "spec": {"entrypoint": "x", "templates": []},
        })
        k8s.server.compact()  # so a watch from the watcher's version answers 410 Gone
    finally:
        watcher.send_signal(signal.SIGCONT)
    final = await _poll(stack, task_id, api.status_is(30, 40, 50))
    assert final["status"]["code"] == 40
    assert "watch expired (410); relisting" in stack.log("watcher")
    _assert_console_exact(stack, task_id, _main_log(k8s, task_id))


async def test_engine_exit_code_maps_to_nodeodm_error(
    argo_stack: tuple[Stack, FakeCluster], http_fixture: HttpFixture
) -> None:
    stack, k8s = argo_stack
    _start(stack, "gateway", "scheduler", "watcher", "notifier")
    task_id = str(uuid.uuid4())
    k8s.controller.fail_with_exit(f"odm-{task_id}-1", 137)
    await _create(stack, http_fixture, headers={"set-uuid": task_id})
    final = await _poll(stack, task_id, api.status_is(30, 40, 50))
    assert final["status"] == {"code": 30, "errorMessage": "Not enough memory"}
