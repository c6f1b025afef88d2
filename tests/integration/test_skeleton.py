"""The walking skeleton: one task through gateway -> JetStream -> scheduler -> local run ->
watcher -> MongoDB -> notifier, on real servers, with the ODM test double as the engine.

Covers: zipurl and uploaded images reaching 40 with stage progress and console output, outputs in
S3, the webhook; a failing run (30 + errorMessage); cancel mid-run (50, processes gone); remove
(objects, documents and run gone; the uuid refused as a ``set-uuid`` afterwards).
Leaves out: the rest of the NodeODM API (its own issue), Argo runs.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import boto3
import httpx
import pytest
from pymongo import MongoClient

from tests.harness import api, data
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import S3_INPUT_PREFIX, Stack

pytestmark = pytest.mark.integration


def _s3_keys(stack: Stack, task_id: str) -> set[str]:
    s3 = boto3.client("s3", endpoint_url=stack.s3.url, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=stack.bucket, Prefix=f"tasks/{task_id}/outputs/"
    )
    return {o["Key"].split("/outputs/", 1)[1] for p in pages for o in p.get("Contents", [])}


async def test_zipurl_task_reaches_40_with_stage_progress_and_webhook(
    client: httpx.AsyncClient, stack: Stack, http_fixture: HttpFixture
) -> None:
    data.write(http_fixture.root / "flight5.zip", data.images_zip(5))
    hook = f"/hooks/{uuid.uuid4()}"
    created = await api.create(
        client, zipurl=http_fixture.url("flight5.zip"), name="skeleton",
        options='[{"name": "dsm", "value": true}]', webhook=http_fixture.url(hook),
    )
    task_id = created["uuid"]
    first = await api.info(client, task_id)
    assert first["status"]["code"] in (10, 20)
    assert first["name"] == "skeleton"

    seen: list[dict[str, Any]] = []
    final = await api.poll_until(client, task_id, api.status_is(30, 40, 50), seen=seen)
    assert final["status"] == {"code": 40}, final
    assert final["progress"] == 100
    assert final["processingTime"] > 0

    progress = [i["progress"] for i in seen]
    assert progress == sorted(progress), "progress moved backwards"
    assert len(set(progress)) >= 4, f"progress did not step through stages: {sorted(set(progress))}"
    assert 20 in {i["status"]["code"] for i in seen}

    full = await api.info(client, task_id, with_output=0)
    lines = full["output"]
    assert any("Running opensfm stage" in line for line in lines)
    assert any("ODM app finished" in line for line in lines)
    assert not any("\x1b[" in line for line in lines), "ANSI codes must be stripped"
    tail = await api.info(client, task_id, with_output=-3)
    assert tail["output"] == lines[-3:]

    keys = _s3_keys(stack, task_id)
    assert {"all.zip", "odm_orthophoto/odm_orthophoto.tif", "odm_dem/dsm.tif",
            "task_output.txt"} <= keys

    posts = http_fixture.wait_posts(hook)
    body = posts[0].json()
    assert body["uuid"] == task_id
    assert body["status"]["code"] == 40
    assert body["progress"] == 100
    assert isinstance(body["images"], list) and len(body["images"]) == 5
    assert posts[0].headers["Content-Type"] == "application/json"


async def test_s3_prefix_with_images_and_zips(client: httpx.AsyncClient, stack: Stack) -> None:
    s3 = boto3.client("s3", endpoint_url=stack.s3.url, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    prefix = f"{S3_INPUT_PREFIX}{uuid.uuid4()}/"  # allowed by the harness (input_allow)
    for name in data.image_names(2):
        s3.put_object(Bucket=stack.bucket, Key=prefix + name, Body=data.JPEG)
    s3.put_object(Bucket=stack.bucket, Key=prefix + "more.zip", Body=data.zip_bytes(
        {f"sub/EXTRA_{i}.JPG": data.JPEG for i in range(3)} | {"notes.pdf": b"%PDF"}))
    s3.put_object(Bucket=stack.bucket, Key=prefix + "readme.md", Body=b"not an image")
    created = await api.create(client, zipurl=f"s3://{stack.bucket}/{prefix}")
    final = await api.poll_until(client, created["uuid"], api.status_is(30, 40, 50))
    assert final["status"] == {"code": 40}, final
    out = await api.info(client, created["uuid"], with_output=0)
    assert any("Found 5 usable images" in line for line in out["output"]), out["output"][:20]
    assert final["imagesCount"] == 5, "imagesCount is the images the run fetched"


async def test_uploaded_images_task_completes(client: httpx.AsyncClient) -> None:
    files = [(name, data.JPEG) for name in data.image_names(3)] + [("DJI_0001.JPG", data.JPEG)]
    created = await api.create(client, files=files, name="upload")
    task_id = created["uuid"]
    assert (await api.info(client, task_id))["imagesCount"] == 4
    final = await api.poll_until(client, task_id, api.status_is(30, 40, 50))
    assert final["status"]["code"] == 40, final


async def test_failing_run_ends_30_with_error_message(
    client: httpx.AsyncClient, http_fixture: HttpFixture
) -> None:
    # The ODM test double fails when told by an input file name (its documented trigger).
    data.write(http_fixture.root / "fail.zip", data.images_zip(
        3, extra={"flight/odm-test-engine-fail-137.jpg": data.JPEG}))
    hook = f"/hooks/{uuid.uuid4()}"
    created = await api.create(client, zipurl=http_fixture.url("fail.zip"),
                               webhook=http_fixture.url(hook))
    final = await api.poll_until(client, created["uuid"], api.status_is(30, 40, 50))
    assert final["status"] == {"code": 30, "errorMessage": "Not enough memory"}
    out = await api.info(client, created["uuid"], with_output=0)
    assert any("Dumping Info for Geeks" in line for line in out["output"])
    assert http_fixture.wait_posts(hook)[0].json()["status"]["code"] == 30


async def test_cancel_mid_run_ends_50_and_stops_processes(
    client: httpx.AsyncClient, stack: Stack, http_fixture: HttpFixture
) -> None:
    data.write(http_fixture.root / "long.zip", data.images_zip(3))
    created = await api.create(client, zipurl=http_fixture.url("long.zip"),
                               options='[{"name": "end-with", "value": "odm_postprocess"}]')
    task_id = created["uuid"]
    await api.poll_until(client, task_id, lambda i: i["progress"] > 0)
    run = stack.runs_dir / f"odm-{task_id}-1"
    engine_pid = int((run / "engine.pid").read_text())
    runner_pid = int((run / "runner.pid").read_text())

    resp = await client.post("/task/cancel", data={"uuid": task_id})
    assert resp.json() == {"success": True}
    assert (await api.info(client, task_id))["status"]["code"] == 50  # read-your-writes

    final = await api.poll_until(client, task_id, lambda _: (run / "result.json").exists())
    assert final["status"]["code"] == 50
    for pid in (engine_pid, runner_pid):
        await api.poll_until(client, task_id, lambda _, p=pid: not _alive(p), timeout_s=15)
    assert (await api.info(client, task_id))["status"]["code"] == 50


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


async def test_remove_deletes_objects_and_documents(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    """... and the uuid, given as ``set-uuid``, is not taken again once the task is deleted."""
    task_id = str(uuid.uuid4())
    created = await api.create(client, files=[(n, data.JPEG) for n in data.image_names(2)],
                               headers={"set-uuid": task_id})
    assert created == {"uuid": task_id}
    await api.poll_until(client, task_id, api.status_is(40))
    assert _s3_keys(stack, task_id), "outputs exist before the remove"
    resp = await client.post("/task/remove", json={"uuid": task_id})
    assert resp.json() == {"success": True}
    gone = await client.get(f"/task/{task_id}/info")
    assert gone.json() == {"error": f"{task_id} not found"}  # read-your-writes
    s3 = boto3.client("s3", endpoint_url=stack.s3.url, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    mongo = MongoClient(stack.mongo_url)
    try:
        for _ in range(200):
            keys = s3.list_objects_v2(Bucket=stack.bucket, Prefix=f"tasks/{task_id}/")
            docs = mongo[stack.database]["tasks"].count_documents({"_id": task_id})
            events = mongo[stack.database]["events"].count_documents({"task_id": task_id})
            if not keys.get("Contents") and docs == 0 and events == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"left behind: {keys.get('KeyCount')} objects, {docs} task, "
                                 f"{events} events")
    finally:
        mongo.close()
    assert not (stack.runs_dir / f"odm-{task_id}-1").exists()
    assert task_id not in {t["uuid"] for t in (await client.get("/task/list")).json()}
    # Re-created within JetStream's duplicate window, its create would be dropped as the old
    # task's (same Nats-Msg-Id): refused as an existing task's uuid (docs/security.md).
    refused = {"error": f"Invalid set-uuid: {task_id}"}
    again = await client.post("/task/new", headers={"set-uuid": task_id},
                              files=[("images", ("a.jpg", data.JPEG, "image/jpeg"))])
    assert again.json() == refused
    init = await client.post("/task/new/init", headers={"set-uuid": task_id},
                             files=[("name", (None, "again"))])
    assert init.json() == refused
