"""The Kubernetes API double and the Argo controller double, driven by the real
``kubernetes_asyncio`` client through a generated kubeconfig.

Covers: custom-object create/get/list/merge-patch/delete and their error statuses (409, 404, 422,
400, 401), label and field selectors, list + watch with bookmarks and resume from
``Watch.resource_version``, selector transitions on watches, 410 after ``compact()`` (ERROR event
and HTTP status), pod list/get, pod logs (plain, ``timestamps``, ``tailLines``, ``sinceSeconds``,
``follow`` until termination via ``Watch().stream`` and ``_preload_content=False``, the container
requirement and "waiting to start"), and the controller double: phases, nodes, pod naming, engine
logs and options, exit failures, retries, image-pull failure, Terminate, held workflows, paused
logs. Not covered here: the ScaleODM executor/watcher themselves (their own tests use this double).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from tests.k8s.apiserver import PODS, FakeApiServer, merge_patch, parse_label_selector
from tests.k8s.controller import FakeCluster, engine_options, fnv1a_32, node_id, pod_name

# A server on loopback and a controller running engines in real time (runs of 2 s): the
# integration layer, not ``task test:fast``.
pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "argoproj.io", "v1alpha1", "workflows"
MERGE = "application/merge-patch+json"
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")


def workflow(
    name: str,
    *,
    labels: dict[str, str] | None = None,
    containers: list[dict[str, Any]] | None = None,
    retry: dict[str, Any] | None = None,
    managed: bool = True,
    fallback_logs: bool = False,
) -> dict[str, Any]:
    """A Workflow manifest shaped like ScaleODM's (containerSet fetch → main → upload)."""
    own = {"app.kubernetes.io/managed-by": "scaleodm"} if managed else {}
    template: dict[str, Any] = {
        "name": "main",
        "containerSet": {
            "containers": containers
            or [
                {"name": "fetch", "image": "rclone/rclone:1.69", "command": ["sh", "-c", "true"]},
                {
                    "name": "main",
                    "image": "ghcr.io/hotosm/odm:3.6.1",
                    "command": ["/bin/bash", "-c"],
                    "args": [
                        "set -e; python3 -u run.py --fast-orthophoto --dsm "
                        "--project-path /workspace {{workflow.name}} && echo done"
                    ],
                    "dependencies": ["fetch"],
                },
                {"name": "upload", "image": "rclone/rclone:1.69", "dependencies": ["main"]},
            ]
        },
    }
    if retry is not None:
        template["retryStrategy"] = retry
    if fallback_logs:
        for container in template["containerSet"]["containers"]:
            container["terminationMessagePolicy"] = "FallbackToLogsOnError"
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Workflow",
        "metadata": {"name": name, "labels": {**own, **(labels or {})}},
        "spec": {
            "entrypoint": "main",
            "podMetadata": {"labels": {"scaleodm.test/task": name}},
            "templates": [template],
        },
    }


def co(api: ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


async def create(api: ApiClient, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = await co(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )
    return result


def pod(name: str, containers: list[str], states: dict[str, str] | None = None) -> dict[str, Any]:
    """An in-process pod; ``states`` maps a container to waiting/running/terminated."""
    states = states or {}

    def state(c: str) -> dict[str, Any]:
        kind = states.get(c, "running")
        if kind == "waiting":
            return {"waiting": {"reason": "ContainerCreating"}}
        if kind == "terminated":
            return {"terminated": {"exitCode": 0, "reason": "Completed"}}
        return {"running": {"startedAt": "2026-11-22T05:00:00Z"}}

    return {
        "metadata": {"name": name, "labels": {"app": "demo"}},
        "spec": {"containers": [{"name": c, "image": "busybox"} for c in containers]},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": c,
                    "image": "busybox",
                    "imageID": "",
                    "ready": True,
                    "restartCount": 0,
                    "state": state(c),
                }
                for c in containers
            ],
        },
    }


def terminate(server: FakeApiServer, namespace: str, name: str, container: str) -> None:
    current = server.get("pods", namespace, name)
    statuses = current["status"]["containerStatuses"]
    for item in statuses:
        if item["name"] == container:
            item["state"] = {"terminated": {"exitCode": 0, "reason": "Completed"}}
    server.call(
        server.store.patch, PODS, namespace, name, {"status": {"containerStatuses": statuses}}
    )


# --------------------------------------------------------------------------- pure helpers


def test_fnv_vectors_and_argo_names() -> None:
    assert fnv1a_32("hello") == 1335831723
    assert fnv1a_32("world") == 933488787
    assert node_id("wf", "wf") == "wf"
    assert node_id("wf", "wf(0)") == f"wf-{fnv1a_32('wf(0)')}"
    assert pod_name("wf", "wf", "main") == "wf"
    assert pod_name("wf", "wf(1)", "main") == f"wf-main-{fnv1a_32('wf(1)')}"


def test_merge_patch_rfc7386() -> None:
    target = {"a": "b", "c": {"d": "e", "f": "g"}}
    assert merge_patch(target, {"a": "z", "c": {"f": None}}) == {"a": "z", "c": {"d": "e"}}
    assert merge_patch({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}


def test_engine_options_from_container_specs() -> None:
    shell = {
        "command": ["/bin/bash", "-c"],
        "args": [
            "python3 -u run.py --fast-orthophoto --dem-resolution 2 "
            "--project-path /workspace wf-1 && echo ok"
        ],
    }
    assert engine_options(shell) == ["--fast-orthophoto", "--dem-resolution=2"]
    direct = {
        "command": ["python3", "/code/run.py"],
        "args": ["--dsm", "--project-path=/workspace", "wf-1"],
    }
    assert engine_options(direct) == ["--dsm"]
    args_only = {"args": ["--end-with", "odm_dem", "--project-path", "/w", "x"]}
    assert engine_options(args_only) == ["--end-with=odm_dem"]


def test_label_selector_parsing_errors() -> None:
    assert len(parse_label_selector("a=b,c in (d,e),!f,g")) == 4
    with pytest.raises(Exception, match="unable to parse requirement"):
        parse_label_selector("a in (")


# ----------------------------------------------------------------------------- custom objects


async def test_create_get_list_patch_delete(api: ApiClient, namespace: str) -> None:
    created = await create(api, namespace, workflow("crud-a", managed=False))
    meta = created["metadata"]
    assert meta["namespace"] == namespace and meta["uid"] and meta["creationTimestamp"]
    assert int(meta["resourceVersion"]) > 0

    got = await co(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "crud-a")
    assert got == created

    second = await create(api, namespace, workflow("crud-b", managed=False))
    assert int(second["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    listing = await co(api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    assert [i["metadata"]["name"] for i in listing["items"]] == ["crud-a", "crud-b"]
    assert listing["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]

    patched = await co(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "crud-a",
        {"spec": {"shutdown": "Terminate", "podMetadata": None}}, _content_type=MERGE,
    )  # fmt: skip
    assert patched["spec"]["shutdown"] == "Terminate" and "podMetadata" not in patched["spec"]
    assert patched["spec"]["entrypoint"] == "main"
    assert int(patched["metadata"]["resourceVersion"]) > int(second["metadata"]["resourceVersion"])
    assert patched["metadata"]["generation"] == 2

    again = await co(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "crud-a", {"spec": {"shutdown": "Terminate"}},
        _content_type=MERGE,
    )  # fmt: skip
    assert again["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]

    deleted = await co(api).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "crud-a", propagation_policy="Background"
    )
    assert deleted["metadata"]["name"] == "crud-a"
    with pytest.raises(ApiException) as missing:
        await co(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "crud-a")
    assert missing.value.status == 404
    assert json.loads(missing.value.body)["reason"] == "NotFound"
    with pytest.raises(ApiException) as gone:
        await co(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "crud-a")
    assert gone.value.status == 404


async def test_create_twice_is_409_and_recorded(
    api: ApiClient, namespace: str, k8s: FakeCluster
) -> None:
    body = workflow("twice", managed=False)
    await create(api, namespace, body)
    with pytest.raises(ApiException) as conflict:
        await create(api, namespace, body)
    assert conflict.value.status == 409
    status = json.loads(conflict.value.body)
    assert status["reason"] == "AlreadyExists" and status["details"]["name"] == "twice"
    posts = k8s.server.find_requests(
        "POST", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    )
    assert [r.status for r in posts] == [201, 409]
    assert all(r.body["metadata"]["name"] == "twice" for r in posts)


async def test_error_statuses(api: ApiClient, namespace: str, k8s: FakeCluster) -> None:
    with pytest.raises(ApiException) as bad_name:
        await create(api, namespace, workflow("Bad_Name", managed=False))
    assert bad_name.value.status == 422
    assert json.loads(bad_name.value.body)["reason"] == "Invalid"
    with pytest.raises(ApiException) as bad_label:
        await create(api, namespace, workflow("ok", labels={"x": "a b"}, managed=False))
    assert bad_label.value.status == 422

    await create(api, namespace, workflow("jp", managed=False))
    with pytest.raises(ApiException) as json_patch:  # the kubernetes_asyncio default content type
        await co(api).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "jp", {"spec": {"shutdown": "Stop"}}
        )
    assert json_patch.value.status == 400
    with pytest.raises(ApiException) as stale:
        await co(api).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "jp", {"metadata": {"resourceVersion": "1"}},
            _content_type=MERGE,
        )  # fmt: skip
    assert stale.value.status == 409

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{k8s.server.url}/version") as anonymous:
            assert anonymous.status == 401
            assert (await anonymous.json())["reason"] == "Unauthorized"


async def test_label_and_field_selectors(api: ApiClient, namespace: str) -> None:
    for name, labels in {
        "s1": {"tier": "a", "shard": "0"},
        "s2": {"tier": "b", "shard": "1"},
        "s3": {"tier": "c"},
        "s4": {},
    }.items():
        await create(api, namespace, workflow(name, labels=labels, managed=False))

    async def names(**kwargs: str) -> list[str]:
        listing = await co(api).list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, **kwargs
        )
        return [i["metadata"]["name"] for i in listing["items"]]

    assert await names(label_selector="tier=a") == ["s1"]
    assert await names(label_selector="tier==b") == ["s2"]
    assert await names(label_selector="tier!=a") == ["s2", "s3", "s4"]
    assert await names(label_selector="tier in (a,c)") == ["s1", "s3"]
    assert await names(label_selector="tier notin (a)") == ["s2", "s3", "s4"]
    assert await names(label_selector="shard") == ["s1", "s2"]
    assert await names(label_selector="!shard") == ["s3", "s4"]
    assert await names(label_selector="tier in (a,b),shard=1") == ["s2"]
    assert await names(field_selector="metadata.name=s3") == ["s3"]
    with pytest.raises(ApiException) as bad:
        await names(label_selector="tier in (a")
    assert bad.value.status == 400


# ------------------------------------------------------------------------------------ watches


async def test_list_then_watch_with_bookmarks_and_resume(
    api: ApiClient, namespace: str, k8s: FakeCluster
) -> None:
    server = k8s.server
    await create(api, namespace, workflow("w1", managed=False))
    listing = await co(api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    since = listing["metadata"]["resourceVersion"]

    async def mutate() -> None:
        await asyncio.sleep(0.2)
        server.create("workflows", namespace, workflow("w2", managed=False))
        server.patch("workflows", namespace, "w1", {"metadata": {"labels": {"x": "1"}}})
        server.delete("workflows", namespace, "w2")

    old_interval, server.bookmark_interval = server.bookmark_interval, 0.3
    try:
        task = asyncio.create_task(mutate())
        w = watch.Watch()
        seen: list[tuple[str, str]] = []
        async with w:
            async for event in w.stream(
                co(api).list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                resource_version=since, allow_watch_bookmarks=True, timeout_seconds=1,
            ):  # fmt: skip
                name = event["raw_object"]["metadata"].get("name", "")
                seen.append((event["type"], name))
        await task
    finally:
        server.bookmark_interval = old_interval
    changes = [s for s in seen if s[0] != "BOOKMARK"]
    assert changes == [("ADDED", "w2"), ("MODIFIED", "w1"), ("DELETED", "w2")]
    assert ("BOOKMARK", "") in seen and seen[-1][0] == "BOOKMARK"
    assert w.resource_version == server.resource_version()

    resume_from = w.resource_version
    server.patch("workflows", namespace, "w1", {"metadata": {"labels": {"x": "2"}}})
    resumed = []
    async for event in watch.Watch().stream(
        co(api).list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
        resource_version=resume_from, timeout_seconds=0.3,
    ):  # fmt: skip
        resumed.append((event["type"], event["object"]["metadata"]["labels"].get("x")))
    assert resumed == [("MODIFIED", "2")]


async def test_watch_from_nothing_sends_current_objects_then_live(
    api: ApiClient, namespace: str, k8s: FakeCluster
) -> None:
    await create(api, namespace, workflow("now-1", managed=False))
    asyncio.get_running_loop().call_later(
        0.2, lambda: k8s.server.create("workflows", namespace, workflow("now-2", managed=False))
    )
    seen = []
    async for event in watch.Watch().stream(
        co(api).list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
        timeout_seconds=0.6,
    ):  # fmt: skip
        seen.append((event["type"], event["object"]["metadata"]["name"]))
    assert seen == [("ADDED", "now-1"), ("ADDED", "now-2")]


async def test_watch_selector_transitions(api: ApiClient, namespace: str, k8s: FakeCluster) -> None:
    server = k8s.server
    await create(api, namespace, workflow("tr", labels={"done": "false"}, managed=False))
    since = server.resource_version()
    server.patch(
        "workflows",
        namespace,
        "tr",
        {"metadata": {"labels": {"done": "true"}}, "status": {"phase": "Succeeded"}},
    )
    server.patch("workflows", namespace, "tr", {"metadata": {"labels": {"done": "false"}}})
    seen = []
    async for event in watch.Watch().stream(
        co(api).list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
        label_selector="done!=true", resource_version=since, timeout_seconds=0.3,
    ):  # fmt: skip
        obj = event["object"]
        seen.append((event["type"], (obj.get("status") or {}).get("phase")))
    # leaving the selector: DELETED with the *previous* state (the final phase is lost)
    assert seen == [("DELETED", None), ("ADDED", "Succeeded")]


@pytest.mark.parametrize("expired_as", ["event", "status"])
async def test_watch_after_compact_is_410(
    api: ApiClient, namespace: str, k8s: FakeCluster, expired_as: Any
) -> None:
    server = k8s.server
    await create(api, namespace, workflow("old", managed=False))
    stale = server.resource_version()
    server.patch("workflows", namespace, "old", {"metadata": {"labels": {"v": "2"}}})
    server.compact()
    server.expired_as = expired_as
    try:
        with pytest.raises(ApiException) as expired:
            async for _ in watch.Watch().stream(
                co(api).list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                resource_version=stale, timeout_seconds=1,
            ):  # fmt: skip
                pass
    finally:
        server.expired_as = "event"
    assert expired.value.status == 410
    assert "too old resource version" in str(expired.value.reason)
    # relist → watch from the fresh version works
    listing = await co(api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    events = [
        e async for e in watch.Watch().stream(
            co(api).list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
            resource_version=listing["metadata"]["resourceVersion"], timeout_seconds=0.2,
        )
    ]  # fmt: skip
    assert events == []


# --------------------------------------------------------------------------------------- pods


async def test_pod_get_list_and_plain_logs(
    api: ApiClient, namespace: str, k8s: FakeCluster
) -> None:
    server = k8s.server
    server.create("pods", namespace, pod("solo", ["main"]))
    server.create("pods", namespace, pod("multi", ["wait", "main"], {"wait": "terminated"}))
    now = time.time()
    server.append_log(namespace, "solo", "main", "old line", at=now - 120)
    for i in range(5):
        server.append_log(namespace, "solo", "main", f"line {i}")

    core = client.CoreV1Api(api)
    pods = await core.list_namespaced_pod(namespace, label_selector="app=demo")
    assert sorted(p.metadata.name for p in pods.items) == ["multi", "solo"]
    one = await core.read_namespaced_pod("solo", namespace)
    assert one.status.container_statuses[0].state.running is not None

    text = await core.read_namespaced_pod_log("solo", namespace, container="main")
    assert text.splitlines() == ["old line"] + [f"line {i}" for i in range(5)]
    assert (await core.read_namespaced_pod_log("solo", namespace)).startswith("old line")
    tail = await core.read_namespaced_pod_log("solo", namespace, tail_lines=2, timestamps=True)
    lines = tail.splitlines()
    assert len(lines) == 2 and all(STAMP.match(line) for line in lines)
    assert lines[-1].endswith(" line 4")
    recent = await core.read_namespaced_pod_log("solo", namespace, since_seconds=60)
    assert "old line" not in recent and "line 0" in recent

    with pytest.raises(ApiException) as no_container:
        await core.read_namespaced_pod_log("multi", namespace)
    assert no_container.value.status == 400
    assert "a container name must be specified" in json.loads(no_container.value.body)["message"]
    with pytest.raises(ApiException) as unknown:
        await core.read_namespaced_pod_log("multi", namespace, container="nope")
    assert unknown.value.status == 400
    with pytest.raises(ApiException) as missing:
        await core.read_namespaced_pod_log("ghost", namespace, container="main")
    assert missing.value.status == 404

    server.create("pods", namespace, pod("starting", ["main"], {"main": "waiting"}))
    with pytest.raises(ApiException) as waiting:
        await core.read_namespaced_pod_log("starting", namespace, container="main")
    assert waiting.value.status == 400
    assert "is waiting to start: ContainerCreating" in json.loads(waiting.value.body)["message"]


async def test_log_follow_streams_until_the_container_terminates(
    api: ApiClient, namespace: str, k8s: FakeCluster
) -> None:
    server = k8s.server
    server.create("pods", namespace, pod("follow", ["wait", "main"]))
    server.append_log(namespace, "follow", "main", "before")

    async def produce() -> None:
        for i in range(3):
            await asyncio.sleep(0.1)
            server.append_log(namespace, "follow", "main", f"live {i}")
        await asyncio.sleep(0.1)
        terminate(server, namespace, "follow", "main")

    core = client.CoreV1Api(api)
    producer = asyncio.create_task(produce())
    got = []
    async for line in watch.Watch().stream(
        core.read_namespaced_pod_log, name="follow", namespace=namespace, container="main",
        timestamps=True,
    ):  # fmt: skip
        got.append(line)
    await producer
    assert all(STAMP.match(line) and line.endswith("\n") for line in got)
    assert [line.split(" ", 1)[1].rstrip("\n") for line in got] == [
        "before",
        "live 0",
        "live 1",
        "live 2",
    ]

    # raw stream: the same lines, then EOF (the container is terminated now)
    response = await core.read_namespaced_pod_log(
        "follow", namespace, container="main", follow=True, _preload_content=False
    )
    assert response.status == 200
    raw = [line.decode() async for line in response.content]
    response.release()
    assert raw == ["before\n", "live 0\n", "live 1\n", "live 2\n"]


async def test_log_follow_ends_when_the_pod_is_deleted(
    api: ApiClient, namespace: str, k8s: FakeCluster
) -> None:
    server = k8s.server
    server.create("pods", namespace, pod("doomed", ["main"]))
    server.append_log(namespace, "doomed", "main", "first")
    asyncio.get_running_loop().call_later(0.3, server.delete, "pods", namespace, "doomed")
    core = client.CoreV1Api(api)
    lines = [
        line async for line in watch.Watch().stream(
            core.read_namespaced_pod_log, name="doomed", namespace=namespace, container="main"
        )
    ]  # fmt: skip
    assert lines == ["first\n"]


# --------------------------------------------------------------------------------- controller


async def test_controller_runs_a_containerset_workflow(
    api: ApiClient, namespace: str, k8s: FakeCluster
) -> None:
    name = "odm-ok"
    created = await create(api, namespace, workflow(name, labels={"scaleodm.test/shard": "0"}))
    core = client.CoreV1Api(api)

    phases: list[str] = [(created.get("status") or {}).get("phase", "")]

    async def watch_phases() -> None:
        async with watch.Watch() as w:
            async for event in w.stream(
                co(api).list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                label_selector="app.kubernetes.io/managed-by=scaleodm", timeout_seconds=15,
                resource_version=created["metadata"]["resourceVersion"],
            ):  # fmt: skip
                phase = (event["object"].get("status") or {}).get("phase", "")
                if phases[-1] != phase:
                    phases.append(phase)
                if phase == "Succeeded":
                    return

    watcher = asyncio.create_task(watch_phases())
    running = await k8s.controller.wait_phase_async(namespace, name, "Running")
    assert running["status"]["startedAt"]

    # follow the engine's log live, like the watcher service does
    pods = await core.list_namespaced_pod(
        namespace, label_selector=f"workflows.argoproj.io/workflow={name}"
    )
    assert [p.metadata.name for p in pods.items] == [name]
    # follow only once the pod runs: before that the apiserver answers 400 "waiting to start",
    # which Watch().stream() would hand back as one "line" (see the image-pull test)
    while (await core.read_namespaced_pod(name, namespace)).status.phase == "Pending":
        await asyncio.sleep(0.02)
    live = [
        line async for line in watch.Watch().stream(
            core.read_namespaced_pod_log, name=name, namespace=namespace, container="main",
            timestamps=True,
        )
    ]  # fmt: skip
    await asyncio.wait_for(watcher, 15)
    assert phases == ["", "Pending", "Running", "Succeeded"]

    text = "".join(live)
    assert "Running opensfm stage" in text and "ODM app finished" in text
    assert "Running openmvs stage" not in text  # --fast-orthophoto came through
    assert all(STAMP.match(line) for line in live)

    final = await co(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    status = final["status"]
    assert status["phase"] == "Succeeded" and status["finishedAt"] and status["progress"] == "1/1"
    assert final["metadata"]["labels"]["workflows.argoproj.io/completed"] == "true"
    root = status["nodes"][name]
    assert root["type"] == "Pod" and root["phase"] == "Succeeded"
    children = [status["nodes"][c] for c in root["children"]]
    assert [(c["type"], c["displayName"], c["phase"]) for c in children] == [
        ("Container", "fetch", "Succeeded"),
        ("Container", "main", "Succeeded"),
        ("Container", "upload", "Succeeded"),
    ]

    the_pod = await core.read_namespaced_pod(name, namespace)
    assert the_pod.status.phase == "Succeeded"
    assert the_pod.metadata.labels["scaleodm.test/task"] == name
    assert the_pod.metadata.annotations["workflows.argoproj.io/node-id"] == name
    assert [c.name for c in the_pod.spec.containers] == ["wait", "fetch", "main", "upload"]
    info = k8s.controller.run_info(name, namespace)
    assert info is not None and info.engine_returncodes == [0]
    assert "--fast-orthophoto" in info.engine_args[0] and "--dsm" in info.engine_args[0]
    upload_log = await core.read_namespaced_pod_log(name, namespace, container="upload")
    assert "[upload] finished" in upload_log


async def test_controller_terminate_mid_run(
    api: ApiClient, namespace: str, k8s: FakeCluster
) -> None:
    name = "odm-terminate"
    k8s.controller.set_engine_seconds(name, 20)
    await create(api, namespace, workflow(name))
    await k8s.controller.wait_phase_async(namespace, name, "Running")
    await wait_for(lambda: "Running dataset stage" in k8s.server.log_text(namespace, name, "main"))
    info = k8s.controller.run_info(name, namespace)
    assert info is not None and info.engine_returncodes == [None]
    pid = info.engine_pids[0]

    await co(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"shutdown": "Terminate"}},
        _content_type=MERGE,
    )  # fmt: skip
    final = await k8s.controller.wait_phase_async(namespace, name, "Failed", timeout=10)
    assert final["status"]["message"] == "Stopped with strategy 'Terminate'"
    # Argo's wording for a node whose pod it terminates has two spaces
    assert (
        final["status"]["nodes"][name]["message"] == "workflow shutdown with strategy:  Terminate"
    )
    info = k8s.controller.run_info(name, namespace)
    assert info is not None and info.engine_returncodes == [143]  # the engine traps SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    the_pod = k8s.server.get("pods", namespace, name)
    assert the_pod["status"]["phase"] == "Failed"
    main = next(s for s in the_pod["status"]["containerStatuses"] if s["name"] == "main")
    assert main["state"]["terminated"]["exitCode"] == 143


async def test_controller_exit_failure_and_retries(
    api: ApiClient, namespace: str, k8s: FakeCluster
) -> None:
    plain, retried = "odm-exit", "odm-retry"
    for name in (plain, retried):
        k8s.controller.fail_with_exit(name, 137)
        k8s.controller.set_engine_seconds(name, 0.3)
    await create(api, namespace, workflow(plain))
    await create(
        api,
        namespace,
        workflow(retried, retry={"limit": 1, "retryPolicy": "OnFailure"}, fallback_logs=True),
    )

    failed = await k8s.controller.wait_phase_async(namespace, plain, "Failed")
    assert failed["status"]["message"] == "main: Error (exit code 137)"  # Argo's inferFailedReason
    main_node = next(n for n in failed["status"]["nodes"].values() if n["displayName"] == "main")
    assert main_node["phase"] == "Failed" and main_node["message"] == "Error (exit code 137)"
    upload = next(n for n in failed["status"]["nodes"].values() if n["displayName"] == "upload")
    assert upload["phase"] == "Omitted"
    assert "Dumping Info for Geeks" in k8s.server.log_text(namespace, plain, "main")

    final = await k8s.controller.wait_phase_async(namespace, retried, "Failed")
    assert final["status"]["message"] == "No more retries left"
    nodes = final["status"]["nodes"]
    assert nodes[retried]["type"] == "Retry" and len(nodes[retried]["children"]) == 2
    attempt = nodes[nodes[retried]["children"][-1]]
    assert attempt["type"] == "Pod" and attempt["phase"] == "Failed"
    # FallbackToLogsOnError: the log tail becomes the termination message, appended by Argo
    assert attempt["message"].startswith("main: Error (exit code 137): ")
    assert "[ERROR]" in attempt["message"]
    expected = [pod_name(retried, f"{retried}({i})", "main") for i in range(2)]
    pods = k8s.server.list_objects("pods", namespace, f"workflows.argoproj.io/workflow={retried}")
    assert sorted(p["metadata"]["name"] for p in pods) == sorted(expected)
    for i, pname in enumerate(expected):
        annotations = k8s.server.get("pods", namespace, pname)["metadata"]["annotations"]
        assert annotations["workflows.argoproj.io/node-name"] == f"{retried}({i})"
        assert annotations["workflows.argoproj.io/node-id"] == node_id(retried, f"{retried}({i})")


async def test_controller_image_pull_failure_then_terminate(
    api: ApiClient, namespace: str, k8s: FakeCluster
) -> None:
    name = "odm-pull"
    k8s.controller.fail_with_image_pull(name)
    await create(api, namespace, workflow(name))
    await wait_for(lambda: "ImagePullBackOff" in str(k8s.server.find("workflows", namespace, name)))
    wf = k8s.server.get("workflows", namespace, name)
    assert wf["status"]["phase"] == "Running"
    assert wf["status"]["nodes"][name]["phase"] == "Pending"
    assert wf["status"]["nodes"][name]["message"].startswith("ImagePullBackOff: Back-off pulling")
    core = client.CoreV1Api(api)
    the_pod = await core.read_namespaced_pod(name, namespace)
    assert the_pod.status.phase == "Pending"
    with pytest.raises(ApiException) as waiting:
        await core.read_namespaced_pod_log(name, namespace, container="main")
    assert "is waiting to start: ImagePullBackOff" in json.loads(waiting.value.body)["message"]
    # gotcha: Watch().stream() on the log does not raise; the Status body comes back as a line
    lines = [
        line async for line in watch.Watch().stream(
            core.read_namespaced_pod_log, name=name, namespace=namespace, container="main"
        )
    ]  # fmt: skip
    assert len(lines) == 1 and json.loads(lines[0])["code"] == 400
    # ... and a raw stream (_preload_content=False) does not raise either: check .status
    raw = await core.read_namespaced_pod_log(
        name, namespace, container="main", follow=True, _preload_content=False
    )
    assert raw.status == 400
    raw.release()

    k8s.server.patch("workflows", namespace, name, {"spec": {"shutdown": "Stop"}})
    final = await k8s.controller.wait_phase_async(namespace, name, "Failed")
    assert final["status"]["message"] == "Stopped with strategy 'Stop'"


async def test_controller_hold_pause_and_delete(
    api: ApiClient, namespace: str, k8s: FakeCluster
) -> None:
    name = "odm-held"
    k8s.controller.hold(name)
    k8s.controller.set_engine_seconds(name, 1.0)
    await create(api, namespace, workflow(name))
    unmanaged = await create(api, namespace, workflow("not-ours", managed=False))
    await asyncio.sleep(0.3)
    assert "status" not in k8s.server.get("workflows", namespace, name)  # queued, phase-less
    assert "status" not in unmanaged

    k8s.controller.pause_logs(name)
    k8s.controller.release(name)
    await k8s.controller.wait_phase_async(namespace, name, "Running")
    await wait_for(lambda: bool(k8s.server.find("pods", namespace, name)))
    await asyncio.sleep(0.8)
    assert k8s.server.log_text(namespace, name, "main") == ""  # the engine runs, lines held back
    k8s.controller.resume_logs(name)
    await k8s.controller.wait_phase_async(namespace, name, "Succeeded")
    assert "ODM app finished" in k8s.server.log_text(namespace, name, "main")

    await co(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    await wait_for(lambda: k8s.server.find("pods", namespace, name) is None)


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)
