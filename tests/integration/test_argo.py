"""Kubernetes execution end to end against the Kubernetes API double (tests/k8s).

The real scheduler and watcher processes talk to the double through a kubeconfig with the real
kubernetes_asyncio client; the controller double runs each Workflow's ``main`` container with the
ODM test double and streams its log. Covers: create -> Running -> log lines -> Succeeded = 40
with stage progress; cancel mid-run = 50 (shutdown Terminate); a watcher killed mid-run resumes
without losing or repeating a line; two watcher replicas (shards) produce no duplicate event; a
redelivered create makes no second Workflow (409); an image-pull error = 30 with a clear message;
capacity: the scheduler creates no Workflow for a task it has not admitted, never more than the
capacity run at once (the double's semaphore records agree), a killed run (exit 137) frees its
slot; a Workflow beyond the semaphores' ConfigMap waits Pending in the double without a pod.
Every test has the ConfigMap of the Workflows' semaphores (``scaleodm-capacity``) as deployed,
matching the stack's capacity settings. Leaves out a real cluster (``on_cluster`` tests, none
yet).
"""

from __future__ import annotations

import asyncio
import json
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
CAPACITY_CONFIGMAP = "scaleodm-capacity"  # SCALEODM_ARGO__CAPACITY_CONFIGMAP's default


def capacity_data(stack: Stack) -> dict[str, str]:
    """The semaphore limits matching the stack's capacity settings, as deploy/k8s keeps them:
    ``all`` (the global cap) and one key per size class."""
    env = stack.env("scheduler")
    classes = json.loads(env["SCALEODM_CAPACITY__CLASSES"])
    return {"all": env["SCALEODM_CAPACITY__MAX_ACTIVE"],
            **{c["name"]: str(c["slots"]) for c in classes}}


def set_capacity(k8s: FakeCluster, data: dict[str, str]) -> None:
    """(Re)write the ConfigMap of the Workflows' semaphores in the double's namespace."""
    if k8s.server.find("configmaps", NAMESPACE, CAPACITY_CONFIGMAP) is not None:
        k8s.server.delete("configmaps", NAMESPACE, CAPACITY_CONFIGMAP)
    k8s.server.create("configmaps", NAMESPACE, {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": CAPACITY_CONFIGMAP}, "data": data,
    })


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
        # as deployed: every Workflow waits on the semaphores of this ConfigMap
        set_capacity(k8s, capacity_data(stack))
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
    await k8s.controller.wait_phase_async(NAMESPACE, name, "Failed", timeout=30)
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


# --------------------------------------------------------------------------- capacity on Argo


def _capacity_env(max_active: int, slots: int) -> dict[str, str]:
    return {
        "SCALEODM_CAPACITY__MAX_ACTIVE": str(max_active),
        "SCALEODM_CAPACITY__CLASSES": json.dumps(
            [{"name": "any", "max_images": None, "slots": slots}]),
        "SCALEODM_ARGO__CAPACITY_CONFIGMAP": CAPACITY_CONFIGMAP,
    }


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, step in points:  # an end sorts before a start at the same instant
        now += step
        best = max(best, now)
    return best


def _run_interval(k8s: FakeCluster, name: str) -> tuple[float, float]:
    """When the double ran the Workflow: from Running (its semaphores held) to its end."""
    info = k8s.controller.run_info(name, NAMESPACE)
    assert info is not None and info.started_at is not None and info.ended_at is not None, info
    return info.started_at, info.ended_at


class _WorkflowSampler:
    """Samples the Workflows the API holds: the most not yet completed, and Running, at once."""

    def __init__(self, k8s: FakeCluster) -> None:
        self.k8s = k8s
        self.most_open = self.most_running = 0
        self.names: set[str] = set()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _WorkflowSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            wfs = await asyncio.to_thread(self.k8s.server.list_objects, "workflows", NAMESPACE)
            ours = [w for w in wfs if w["metadata"]["name"].startswith("odm-")]
            self.names |= {w["metadata"]["name"] for w in ours}
            unfinished = [w for w in ours if (w["metadata"].get("labels") or {}).get(
                "workflows.argoproj.io/completed") != "true"]
            running = [w for w in ours if (w.get("status") or {}).get("phase") == "Running"]
            self.most_open = max(self.most_open, len(unfinished))
            self.most_running = max(self.most_running, len(running))
            await asyncio.sleep(0.05)


async def test_capacity_runs_at_most_two_workflows_and_a_killed_run_frees_its_slot(
    argo_stack: tuple[Stack, FakeCluster], http_fixture: HttpFixture
) -> None:
    """Capacity 2 (global and class), the semaphores at 2: a waiting task has no Workflow at all
    (the scheduler creates it on admission), never more than 2 run at once, the double's
    semaphores are held by 2 at most, and a run whose pod is killed (exit 137) ends 30 and hands
    its slot to the next task while the other run goes on."""
    stack, k8s = argo_stack
    stack.extra_env.update(_capacity_env(2, 2))
    set_capacity(k8s, {"all": "2", "any": "2"})
    _start(stack, "gateway", "scheduler", "watcher", "notifier")
    ids = [str(uuid.uuid4()) for _ in range(6)]
    names = [f"odm-{t}-1" for t in ids]
    long_run, killed, rest = names[0], names[1], names[2:]
    k8s.controller.set_engine_seconds(long_run, 5)
    k8s.controller.set_engine_seconds(killed, 0.5)
    k8s.controller.fail_with_exit(killed, 137)
    for name in rest:
        k8s.controller.set_engine_seconds(name, 1.5)
    for name in (long_run, killed):
        k8s.controller.hold(name)  # the first two stay queued in "Argo" until all are submitted

    async with _WorkflowSampler(k8s) as sampler:
        for task_id in ids:
            await _create(stack, http_fixture, headers={"set-uuid": task_id})
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
            for task_id in ids[2:]:  # admission keeps them waiting, in submission order
                await api.poll_until(client, task_id, lambda i: "queuePosition" in i,
                                     timeout_s=20)
        await asyncio.sleep(1)  # the scheduler has had every chance to create more
        present = {w["metadata"]["name"] for w in k8s.server.list_objects("workflows", NAMESPACE)}
        assert present == {long_run, killed}, "a waiting task has no Workflow at all"
        k8s.controller.release(long_run)
        k8s.controller.release(killed)
        finals = {t: await _poll(stack, t, api.status_is(30, 40, 50), timeout_s=90) for t in ids}

    assert finals[ids[1]]["status"] == {"code": 30, "errorMessage": "Not enough memory"}
    assert [finals[t]["status"]["code"] for t in ids if t != ids[1]] == [40] * 5, finals
    assert sampler.names == set(names)
    assert sampler.most_open <= 2, sampler.most_open  # Workflows not completed, at any sample
    assert sampler.most_running == 2, sampler.most_running
    # the double's own records: the semaphores and the runs' intervals
    assert k8s.controller.max_holders(NAMESPACE, CAPACITY_CONFIGMAP, "all") == 2
    assert k8s.controller.max_holders(NAMESPACE, CAPACITY_CONFIGMAP, "any") == 2
    intervals = {name: _run_interval(k8s, name) for name in names}
    assert _most_at_once(list(intervals.values())) == 2
    assert not any((k8s.controller.run_info(n, NAMESPACE) or pytest.fail(n)).waited
                   for n in names), "admission alone kept them within the semaphores"
    # the killed run's slot went to the next task while the long run still ran
    assert intervals[killed][1] < intervals[rest[0]][0] < intervals[long_run][1], intervals
    killed_wf = k8s.server.get("workflows", NAMESPACE, killed)
    assert killed_wf["status"]["phase"] == "Failed"
    assert "exit code 137" in killed_wf["status"]["message"]


async def test_a_workflow_beyond_the_configmap_limit_waits_pending_in_argo(
    argo_stack: tuple[Stack, FakeCluster], http_fixture: HttpFixture
) -> None:
    """The scheduler admits 2 runs but the ConfigMap allows 1 (`all`): the second Workflow is
    created and waits Pending in "Argo", without a pod, on the semaphore the scheduler wrote,
    and runs once the first ends."""
    stack, k8s = argo_stack
    stack.extra_env.update(_capacity_env(2, 2))
    set_capacity(k8s, {"all": "1", "any": "2"})
    _start(stack, "gateway", "scheduler", "watcher", "notifier")
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    wf1, wf2 = f"odm-{first}-1", f"odm-{second}-1"
    k8s.controller.set_engine_seconds(wf1, 2)
    k8s.controller.set_engine_seconds(wf2, 1)
    await _create(stack, http_fixture, headers={"set-uuid": first})
    await k8s.controller.wait_phase_async(NAMESPACE, wf1, "Running", timeout=30)
    await _create(stack, http_fixture, headers={"set-uuid": second})
    waiting = await k8s.controller.wait_phase_async(NAMESPACE, wf2, "Pending", timeout=30)
    assert waiting["status"]["message"] == (
        f"Waiting for {NAMESPACE}/ConfigMap/{CAPACITY_CONFIGMAP}/all lock. Lock status: 0/1")
    assert waiting["spec"]["synchronization"]["semaphores"] == [
        {"configMapKeyRef": {"name": CAPACITY_CONFIGMAP, "key": "any"}},
        {"configMapKeyRef": {"name": CAPACITY_CONFIGMAP, "key": "all"}},
    ]
    assert k8s.server.list_objects(
        "pods", NAMESPACE, f"workflows.argoproj.io/workflow={wf2}") == []
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        assert (await api.info(client, second))["status"]["code"] == 10  # not running yet
    assert (await _poll(stack, first, api.status_is(30, 40, 50)))["status"]["code"] == 40
    assert (await _poll(stack, second, api.status_is(30, 40, 50)))["status"]["code"] == 40
    info = k8s.controller.run_info(wf2, NAMESPACE)
    assert info is not None and info.waited
    assert _run_interval(k8s, wf2)[0] >= _run_interval(k8s, wf1)[1]
    assert k8s.controller.max_holders(NAMESPACE, CAPACITY_CONFIGMAP, "all") == 1
    # all or nothing: waiting on `all`, it held no `any` slot either
    assert k8s.controller.max_holders(NAMESPACE, CAPACITY_CONFIGMAP, "any") == 1


async def test_a_cancel_while_the_workflow_waits_for_its_semaphores_ends_50_at_once(
    argo_stack: tuple[Stack, FakeCluster], http_fixture: HttpFixture
) -> None:
    """Argo ends a Workflow terminated while it waited for its locks "Succeeded", without a
    pod: the task ends 50 (never 40), and the watcher, with no log to wait for, goes straight
    on to the next events (the other task's end is seen within seconds, not 30 s later)."""
    stack, k8s = argo_stack
    stack.extra_env.update(_capacity_env(2, 2))
    set_capacity(k8s, {"all": "1", "any": "2"})
    _start(stack, "gateway", "scheduler", "watcher", "notifier")
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    wf1, wf2 = f"odm-{first}-1", f"odm-{second}-1"
    k8s.controller.set_engine_seconds(wf1, 4)
    await _create(stack, http_fixture, headers={"set-uuid": first})
    await k8s.controller.wait_phase_async(NAMESPACE, wf1, "Running", timeout=30)
    await _create(stack, http_fixture, headers={"set-uuid": second})
    await k8s.controller.wait_phase_async(NAMESPACE, wf2, "Pending", timeout=30)
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        assert (await client.post("/task/cancel", data={"uuid": second})).json() == {
            "success": True}
    ended = await k8s.controller.wait_phase_async(NAMESPACE, wf2, "Succeeded", timeout=30)
    assert not (ended.get("status") or {}).get("nodes"), "no pod ever ran"
    assert (await _poll(stack, second, api.status_is(30, 40, 50)))["status"]["code"] == 50
    done = await k8s.controller.wait_phase_async(NAMESPACE, wf1, "Succeeded", timeout=60)
    assert done["status"]["phase"] == "Succeeded"
    seen = time.monotonic()
    assert (await _poll(stack, first, api.status_is(30, 40, 50)))["status"]["code"] == 40
    assert time.monotonic() - seen < 10, "the watcher was held up"
    kinds = [e["kind"] for e in _events(stack, second)]
    assert "completed" not in kinds and kinds.count("canceled") == 1, kinds
