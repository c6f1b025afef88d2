"""The controller double's Workflow-level semaphores (``spec.synchronization``), as Argo v3.7's
controller runs them (workflow/sync, workflow/controller/operator.go).

Covers: a Workflow beyond a semaphore's limit waits ``Pending`` with Argo's message and no pod,
and starts once a holder ends (after the notify delay); several semaphores are all or nothing, and
the front of a queue holds back the Workflows behind it even on a lock they could take; queue
order is priority, then creation; a missing ConfigMap, key or a limit of 0 fails the Workflow
with Argo's message (and the queue entry such a Workflow leaves behind); a changed limit is read
again (up: waiters start; down: holders keep running); Terminate while waiting (Succeeded),
Stop while waiting, delete and shutdown of holders; ``status.synchronization``;
:meth:`Controller.max_holders`; ConfigMaps through the real client (the apiserver double). Not
covered: mutexes and database semaphores (not modelled).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from tests.k8s.apiserver import api_client
from tests.k8s.controller import FakeCluster, fake_cluster

pytestmark = pytest.mark.integration

CM = "caps"
NOTIFY = 0.3  # semaphore_notify_delay of this module's controller


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    with fake_cluster(
        tmp_path_factory.mktemp("semaphores"), engine_seconds=0.4,
        semaphore_notify_delay=NOTIFY, existence_check_period=0.3,
    ) as k8s:  # fmt: skip
        yield k8s


@pytest.fixture
def ns() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


def manifest(
    name: str, *keys: str, priority: int | None = None, singular: str | None = None,
    sync: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A one-container Workflow waiting on semaphores ``keys`` of ConfigMap ``caps``."""
    spec: dict[str, Any] = {
        "entrypoint": "main",
        "templates": [{"name": "main", "container": {
            "image": "ghcr.io/hotosm/odm:3.6.1",
            "command": ["python3", "run.py", "--fast-orthophoto", "{{workflow.name}}"],
        }}],
    }  # fmt: skip
    synchronization = dict(sync or {})
    if keys:
        synchronization["semaphores"] = [{"configMapKeyRef": {"name": CM, "key": k}} for k in keys]
    if singular:
        synchronization["semaphore"] = {"configMapKeyRef": {"name": CM, "key": singular}}
    if synchronization:
        spec["synchronization"] = synchronization
    if priority is not None:
        spec["priority"] = priority
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "scaleodm"}},
        "spec": spec,
    }


def caps(k8s: FakeCluster, ns: str, **data: str) -> None:
    """Create or replace ConfigMap ``caps`` in ``ns``."""
    body = {"metadata": {"name": CM}, "data": data}
    if k8s.server.find("configmaps", ns, CM) is None:
        k8s.server.create("configmaps", ns, body)
    else:
        k8s.server.patch("configmaps", ns, CM, {"data": None})
        k8s.server.patch("configmaps", ns, CM, {"data": data})


def submit(k8s: FakeCluster, ns: str, body: dict[str, Any], seconds: float | None = None) -> str:
    name = str(body["metadata"]["name"])
    if seconds is not None:
        k8s.controller.set_engine_seconds(name, seconds)
    k8s.server.create("workflows", ns, body)
    return name


def status(k8s: FakeCluster, ns: str, name: str) -> dict[str, Any]:
    return dict(k8s.server.get("workflows", ns, name).get("status") or {})


def pods(k8s: FakeCluster, ns: str, name: str) -> list[dict[str, Any]]:
    return k8s.server.list_objects("pods", ns, f"workflows.argoproj.io/workflow={name}")


def lock(ns: str, key: str) -> str:
    return f"{ns}/ConfigMap/{CM}/{key}"


async def until(predicate: Any, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


async def phase(k8s: FakeCluster, ns: str, name: str, *phases: str) -> dict[str, Any]:
    return await k8s.controller.wait_phase_async(ns, name, *phases, timeout=20)


async def test_a_workflow_beyond_the_limit_waits_pending_until_a_holder_ends(
    cluster: FakeCluster, ns: str
) -> None:
    k8s = cluster
    caps(k8s, ns, all="2")
    first = submit(k8s, ns, manifest("first", "all"), seconds=1.0)
    second = submit(k8s, ns, manifest("second", "all"), seconds=2.0)
    await phase(k8s, ns, first, "Running")
    await phase(k8s, ns, second, "Running")
    third = submit(k8s, ns, manifest("third", singular="all"))  # the older, singular form
    waiting = await phase(k8s, ns, third, "Pending")
    await asyncio.sleep(0.3)

    now = status(k8s, ns, third)
    assert now["phase"] == "Pending"
    assert now["message"] == f"Waiting for {lock(ns, 'all')} lock. Lock status: 0/2"
    assert "startedAt" not in now  # Argo starts the clock only past Pending
    assert pods(k8s, ns, third) == []
    assert now["synchronization"] == {"semaphore": {"waiting": [
        {"semaphore": lock(ns, "all"), "holders": [f"{ns}/{first}", f"{ns}/{second}"]}]}}
    labels = k8s.server.get("workflows", ns, third)["metadata"]["labels"]
    assert labels["workflows.argoproj.io/phase"] == "Pending"
    assert labels["workflows.argoproj.io/completed"] == "false"
    assert status(k8s, ns, first)["synchronization"] == {"semaphore": {"holding": [
        {"semaphore": lock(ns, "all"), "holders": [f"{ns}/{first}"]}]}}
    assert waiting["status"]["message"].startswith("Waiting for")

    done = await phase(k8s, ns, first, "Succeeded")
    assert "synchronization" not in done["status"]  # Argo drops it as it releases the locks
    running = await phase(k8s, ns, third, "Running")
    assert "message" not in running["status"]
    assert running["status"]["synchronization"]["semaphore"]["holding"] == [
        {"semaphore": lock(ns, "all"), "holders": [f"{ns}/{third}"]}]
    assert (await phase(k8s, ns, second, "Succeeded"))["status"]["phase"] == "Succeeded"
    assert (await phase(k8s, ns, third, "Succeeded"))["status"]["phase"] == "Succeeded"

    a, c = k8s.controller.run_info(first, ns), k8s.controller.run_info(third, ns)
    assert a is not None and c is not None and a.ended_at and c.started_at
    assert c.waited and not a.waited
    assert c.started_at - a.ended_at >= NOTIFY - 0.05  # Argo requeues waiters after a delay
    assert k8s.controller.max_holders(ns, CM, "all") == 2
    info = k8s.controller.semaphore(ns, CM, "all")
    assert info is not None and info.holders == [] and info.pending == [] and info.limit == 2


async def test_all_semaphores_or_none_and_the_queue_front_holds_back_the_rest(
    cluster: FakeCluster, ns: str
) -> None:
    k8s = cluster
    caps(k8s, ns, all="3", large="1", small="5")
    big1 = submit(k8s, ns, manifest("big1", "all", "large"), seconds=1.0)
    await phase(k8s, ns, big1, "Running")
    big2 = submit(k8s, ns, manifest("big2", "all", "large"))
    await until(lambda: status(k8s, ns, big2).get("phase") == "Pending")
    assert status(k8s, ns, big2)["message"] == (
        f"Waiting for {lock(ns, 'large')} lock. Lock status: 0/1")
    # `all` has room, but big2 is at the front of its queue (Argo's documented warning)
    small = submit(k8s, ns, manifest("small", "all", "small"))
    await until(lambda: status(k8s, ns, small).get("phase") == "Pending")
    assert status(k8s, ns, small)["message"] == (
        f"Waiting for {lock(ns, 'all')} lock. Lock status: 2/3")
    assert pods(k8s, ns, small) == []
    all_info = k8s.controller.semaphore(ns, CM, "all")
    assert all_info is not None
    assert all_info.holders == [f"{ns}/{big1}"]
    assert all_info.pending == [f"{ns}/{big2}", f"{ns}/{small}"]

    await phase(k8s, ns, big1, "Succeeded")
    await phase(k8s, ns, big2, "Running", "Succeeded")
    await phase(k8s, ns, small, "Running", "Succeeded")
    for name in (big2, small):
        await phase(k8s, ns, name, "Succeeded")
    assert k8s.controller.max_holders(ns, CM, "large") == 1
    assert k8s.controller.max_holders(ns, CM, "all") == 2


async def test_waiters_go_by_priority_then_creation(cluster: FakeCluster, ns: str) -> None:
    k8s = cluster
    caps(k8s, ns, one="1")
    holder = submit(k8s, ns, manifest("holder", "one"), seconds=1.0)
    await phase(k8s, ns, holder, "Running")
    names = [
        submit(k8s, ns, manifest("low-a", "one"), seconds=0.2),
        submit(k8s, ns, manifest("low-b", "one", priority=0), seconds=0.2),
        submit(k8s, ns, manifest("high", "one", priority=5), seconds=0.2),
    ]
    for name in names:
        await until(lambda name=name: status(k8s, ns, name).get("phase") == "Pending")
    info = k8s.controller.semaphore(ns, CM, "one")
    assert info is not None and info.pending == [f"{ns}/high", f"{ns}/low-a", f"{ns}/low-b"]
    for name in names:
        await phase(k8s, ns, name, "Succeeded")
    started = {n: (k8s.controller.run_info(n, ns) or pytest.fail(n)).started_at for n in names}
    assert sorted(names, key=lambda n: started[n] or 0) == ["high", "low-a", "low-b"]
    assert k8s.controller.max_holders(ns, CM, "one") == 1


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (None, "all"),  # no ConfigMap
        ({"other": "3"}, "all"),  # no key
        ({"all": "0"}, "all"),
        ({"all": "two"}, "all"),
    ],
    ids=["no-configmap", "no-key", "zero", "not-a-number"],
)
async def test_an_unusable_limit_fails_the_workflow_with_argos_message(
    cluster: FakeCluster, ns: str, data: dict[str, str] | None, key: str
) -> None:
    k8s = cluster
    if data is not None:
        caps(k8s, ns, **data)
    name = submit(k8s, ns, manifest("no-limit", key))
    final = await phase(k8s, ns, name, "Failed", "Error", "Succeeded")
    assert final["status"]["phase"] == "Failed"
    assert final["status"]["message"] == (
        "Failed to acquire the synchronization lock. "
        f"failed to initialize semaphore {lock(ns, key)} with limit")
    assert final["status"]["startedAt"] and final["status"]["finishedAt"]
    assert final["metadata"]["labels"]["workflows.argoproj.io/completed"] == "true"
    assert "synchronization" not in final["status"] and "nodes" not in final["status"]
    assert pods(k8s, ns, name) == []


async def test_configuration_errors_fail_the_workflow(cluster: FakeCluster, ns: str) -> None:
    k8s = cluster
    caps(k8s, ns, all="1")
    twice = submit(k8s, ns, manifest("twice", "all", "all"))
    final = await phase(k8s, ns, twice, "Failed")
    assert final["status"]["message"] == (
        "Failed to acquire the synchronization lock. "
        "requested configuration is invalid: duplicate synchronization item found")
    bare = submit(k8s, ns, manifest("bare", sync={"semaphores": [{}]}))
    final = await phase(k8s, ns, bare, "Failed")
    assert final["status"]["message"].endswith(
        "cannot get LockName for a Semaphore without a ConfigMapRef or Database")
    db = submit(k8s, ns, manifest("db", sync={"semaphores": [{"database": {"key": "k"}}]}))
    final = await phase(k8s, ns, db, "Failed")
    assert final["status"]["message"] == (
        "Failed to acquire the synchronization lock. "
        f"database session is not available for semaphore {ns}/Database/k")


async def test_a_missing_class_key_leaves_a_queue_entry_that_holds_back_the_rest(
    cluster: FakeCluster, ns: str
) -> None:
    """Argo queues a Workflow on each lock before it initializes the next: when a later one
    cannot be initialized, the Workflow fails but stays at the front of the earlier queues until
    it is deleted (and then until something requeues the waiters)."""
    k8s = cluster
    caps(k8s, ns, all="2")  # no key `large`
    broken = submit(k8s, ns, manifest("broken", "all", "large"))
    final = await phase(k8s, ns, broken, "Failed")
    assert final["status"]["message"].endswith(f"semaphore {lock(ns, 'large')} with limit")
    behind = submit(k8s, ns, manifest("behind", "all"))
    await until(lambda: status(k8s, ns, behind).get("phase") == "Pending")
    assert status(k8s, ns, behind)["message"] == (
        f"Waiting for {lock(ns, 'all')} lock. Lock status: 2/2")
    await asyncio.sleep(0.5)
    assert status(k8s, ns, behind)["phase"] == "Pending"

    k8s.server.delete("workflows", ns, broken)
    await until(lambda: (k8s.controller.semaphore(ns, CM, "all") or pytest.fail()).pending
                == [f"{ns}/{behind}"])  # fmt: skip
    await asyncio.sleep(0.3)
    assert status(k8s, ns, behind)["phase"] == "Pending"  # nothing requeued it yet
    caps(k8s, ns, all="2", large="1")  # a ConfigMap event requeues the waiters
    await phase(k8s, ns, behind, "Succeeded")


async def test_a_changed_limit_is_read_again(cluster: FakeCluster, ns: str) -> None:
    k8s = cluster
    caps(k8s, ns, all="1")
    a = submit(k8s, ns, manifest("a", "all"), seconds=2.0)
    await phase(k8s, ns, a, "Running")
    b = submit(k8s, ns, manifest("b", "all"), seconds=3.5)
    await until(lambda: status(k8s, ns, b).get("phase") == "Pending")
    assert status(k8s, ns, b)["message"].endswith("Lock status: 0/1")

    caps(k8s, ns, all="2")  # up: the waiter starts at once, beside the holder
    await phase(k8s, ns, b, "Running")
    assert status(k8s, ns, a)["phase"] == "Running"
    assert k8s.controller.max_holders(ns, CM, "all") == 2

    caps(k8s, ns, all="1")  # down: the holders keep running, a newcomer waits for both
    c = submit(k8s, ns, manifest("c", "all"), seconds=0.2)
    await until(lambda: status(k8s, ns, c).get("phase") == "Pending")
    assert status(k8s, ns, c)["message"].endswith("Lock status: -1/1")  # Argo's arithmetic
    await phase(k8s, ns, a, "Succeeded")
    await asyncio.sleep(NOTIFY + 0.2)
    assert status(k8s, ns, b)["phase"] == "Running"
    assert status(k8s, ns, c)["phase"] == "Pending"  # one holder left = the limit
    await phase(k8s, ns, b, "Succeeded")
    await phase(k8s, ns, c, "Succeeded")

    # a deleted ConfigMap: the semaphore keeps the last limit it read
    k8s.server.delete("configmaps", ns, CM)
    d = submit(k8s, ns, manifest("d", "all"), seconds=0.2)
    await phase(k8s, ns, d, "Succeeded")
    assert k8s.controller.max_holders(ns, CM, "all") == 2


async def test_shutdown_and_deletion_of_waiters_and_holders(
    cluster: FakeCluster, ns: str
) -> None:
    k8s = cluster
    caps(k8s, ns, one="1")
    holder = submit(k8s, ns, manifest("holder", "one"), seconds=20)
    await phase(k8s, ns, holder, "Running")
    terminated = submit(k8s, ns, manifest("terminated", "one"))
    stopped = submit(k8s, ns, manifest("stopped", "one"))
    last = submit(k8s, ns, manifest("last", "one"), seconds=0.2)
    for name in (terminated, stopped, last):
        await until(lambda name=name: status(k8s, ns, name).get("phase") == "Pending")

    # Argo: a Pending Workflow shut down with Terminate is released and marked Succeeded
    k8s.server.patch("workflows", ns, terminated, {"spec": {"shutdown": "Terminate"}})
    final = await phase(k8s, ns, terminated, "Succeeded", "Failed")
    assert final["status"]["phase"] == "Succeeded" and "message" not in final["status"]
    assert "synchronization" not in final["status"] and pods(k8s, ns, terminated) == []
    # Stop: it keeps waiting, and stops once it holds the lock
    k8s.server.patch("workflows", ns, stopped, {"spec": {"shutdown": "Stop"}})
    await asyncio.sleep(0.3)
    assert status(k8s, ns, stopped)["phase"] == "Pending"

    k8s.server.delete("workflows", ns, holder)  # deleting a holder releases its lock
    final = await phase(k8s, ns, stopped, "Failed")
    assert final["status"]["message"] == "Stopped with strategy 'Stop'"
    assert pods(k8s, ns, stopped) == []
    await phase(k8s, ns, last, "Running")
    k8s.server.patch("workflows", ns, last, {"spec": {"shutdown": "Terminate"}})
    final = await phase(k8s, ns, last, "Failed")
    assert final["status"]["message"] == "Stopped with strategy 'Terminate'"
    info = k8s.controller.semaphore(ns, CM, "one")
    assert info is not None and info.holders == [] and info.pending == []
    assert info.max_holders == 1

    # a waiter deleted leaves the queue
    again = submit(k8s, ns, manifest("again", "one"), seconds=20)
    await phase(k8s, ns, again, "Running")
    gone = submit(k8s, ns, manifest("gone", "one"))
    await until(lambda: status(k8s, ns, gone).get("phase") == "Pending")
    k8s.server.delete("workflows", ns, gone)
    await until(lambda: (k8s.controller.semaphore(ns, CM, "one") or pytest.fail()).pending == [])
    k8s.server.delete("workflows", ns, again)


async def test_configmaps_through_the_client_set_the_limit(cluster: FakeCluster, ns: str) -> None:
    k8s = cluster
    async with api_client(k8s.kubeconfig) as api:
        core = client.CoreV1Api(api)
        await core.create_namespaced_config_map(ns, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=CM), data={"all": "1"}))
        not_strings: Any = {"metadata": {"name": "bad"}, "data": {"all": 1}}
        with pytest.raises(ApiException) as bad:
            await core.create_namespaced_config_map(ns, not_strings)
        assert bad.value.status == 400
        first = submit(k8s, ns, manifest("first", "all"), seconds=1.0)
        await phase(k8s, ns, first, "Running")
        second = submit(k8s, ns, manifest("second", "all"), seconds=0.2)
        await until(lambda: status(k8s, ns, second).get("phase") == "Pending")
        # kubernetes_asyncio sends a strategic merge patch for a core type
        await core.patch_namespaced_config_map(CM, ns, {"data": {"all": "2"}})
        await phase(k8s, ns, second, "Running", "Succeeded")
        read = await core.read_namespaced_config_map(CM, ns)
        assert read.data == {"all": "2"}
        listed = await core.list_namespaced_config_map(ns)
        assert [c.metadata.name for c in listed.items] == [CM]
        deleted = await core.delete_namespaced_config_map(CM, ns)
        assert deleted.status == "Success" and deleted.details.name == CM
        assert k8s.server.find("configmaps", ns, CM) is None
    await phase(k8s, ns, first, "Succeeded")
    assert k8s.controller.max_holders(ns, CM, "all") == 2
