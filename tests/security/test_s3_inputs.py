"""Reading other people's data through ``s3://`` inputs, written as the attacks.

The service reads ``s3://`` sources with its own credentials, so a run may read only its own
task's uploads (``tasks/<task_id>/inputs/`` of the service bucket) and the operator's
``S3Settings.input_allow`` locations, and never another task's prefix (``s3.input_allowed``).

Covered:
- the rule itself, as a table: own inputs (prefix, object, nested), another task's inputs and
  outputs, its own outputs, ``..``/``.``/empty segments, prefixes whose listing reaches into
  ``tasks/``, other buckets, an allowed prefix and its sibling ``allowed-other/`` (segment-wise
  match), allow entries without a trailing ``/``, an allow entry naming ``tasks/`` (ignored),
  invalid bucket names and task ids;
- fetching against moto: task A uploaded images; task B's run given A's inputs, A's outputs,
  ``tasks/<A>/../``, another bucket, or an allowed prefix's sibling is refused with a clear
  message before any S3 call, and B's ``images/`` gets nothing of A; an allowed prefix and B's
  own uploads work; an allowed prefix that lists empty brings no image and ends as "No images
  found" (``stages.NO_IMAGES``), not as an S3 failure; a listing of an allowed prefix returning
  keys that are not allowed (``..`` or empty segments) is refused before anything is
  downloaded;
- end to end on the shared stack: task B created with A's input prefix as its zipurl ends
  without any of A's files: refused at submission, or failed with the refusal, and B's output
  prefix holds no object of A.

Left out: Argo runs (the fetch step calls the same ``fetching.fetch_inputs``; the allow list
reaches its pod as ``SCALEODM_S3__INPUT_ALLOW``), the gateway's own submission check.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from scaleodm.common.contracts.ids import run_name
from scaleodm.common.settings import S3Settings, SchedulerSettings
from scaleodm.common.store.s3 import S3, S3Url, input_allowed, parse_s3_url
from scaleodm.run import fetching, stages
from scaleodm.run.fetching import InputError, Limits
from tests.harness import api, data, servers
from tests.harness.stack import Stack

A = "11111111-1111-4111-8111-111111111111"
T = "22222222-2222-4222-8222-222222222222"
BUCKET = "scaleodm"
ALLOW = ["s3://shared-data/allowed", "s3://open-bucket/", "s3://scaleodm/public/",
         f"s3://scaleodm/tasks/{A}/"]

# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        pytest.param(f"s3://scaleodm/tasks/{T}/inputs/", True, id="own-inputs"),
        pytest.param(f"s3://scaleodm/tasks/{T}/inputs/IMG_1.JPG", True, id="own-input-object"),
        pytest.param(f"s3://scaleodm/tasks/{T}/inputs/sub/a.zip", True, id="own-nested"),
        pytest.param(f"s3://scaleodm/tasks/{A}/inputs/", False, id="other-task-inputs"),
        pytest.param(f"s3://scaleodm/tasks/{A}/outputs/", False, id="other-task-outputs"),
        pytest.param(f"s3://scaleodm/tasks/{A}/outputs/all.zip", False, id="other-task-all-zip"),
        pytest.param(f"s3://scaleodm/tasks/{A}/", False, id="other-task-prefix-allowlisted"),
        pytest.param(f"s3://scaleodm/tasks/{T}/outputs/", False, id="own-outputs"),
        pytest.param(f"s3://scaleodm/tasks/{T}/", False, id="own-task-prefix"),
        pytest.param(f"s3://scaleodm/tasks/{T}/inputs", False, id="own-inputs-no-slash"),
        pytest.param(f"s3://scaleodm/tasks/{T}/inputs/../../{A}/inputs/", False,
                     id="dotdot-out-of-own"),
        pytest.param(f"s3://scaleodm/tasks/{A}/../", False, id="other-task-dotdot"),
        pytest.param(f"s3://scaleodm/tasks/{T}/inputs/./x.jpg", False, id="dot-segment"),
        pytest.param(f"s3://scaleodm/tasks/{T}/inputs//x.jpg", False, id="empty-segment"),
        pytest.param(f"s3://scaleodm//tasks/{T}/inputs/", False, id="leading-slash"),
        pytest.param("s3://scaleodm/tasks/", False, id="all-tasks"),
        pytest.param("s3://scaleodm/", False, id="service-bucket-root"),
        pytest.param("s3://scaleodm/public/", True, id="allowed-in-service-bucket"),
        pytest.param("s3://scaleodm/public/../tasks/", False, id="allowed-dotdot"),
        pytest.param("s3://shared-data/allowed/", True, id="allowed-without-slash-entry"),
        pytest.param("s3://shared-data/allowed/f/IMG.JPG", True, id="allowed-object"),
        pytest.param("s3://shared-data/allowed", False, id="allowed-as-object-key"),
        pytest.param("s3://shared-data/allowed-other/", False, id="allowed-sibling"),
        pytest.param("s3://shared-data/", False, id="allowed-parent"),
        pytest.param("s3://open-bucket/", True, id="allowed-whole-bucket"),
        pytest.param("s3://open-bucket/tasks/x/", True, id="tasks-in-other-bucket"),
        pytest.param("s3://other-bucket/data/", False, id="other-bucket"),
        pytest.param("s3://Open-Bucket/", False, id="bucket-uppercase"),
        pytest.param("s3://open..bucket/", False, id="bucket-double-dot"),
        pytest.param("s3://192.168.1.10/x/", False, id="bucket-ip"),
        pytest.param("s3://-open-bucket/", False, id="bucket-leading-dash"),
        pytest.param("s3://open-bucket/a\x00b/", False, id="control-character"),
    ],
)
def test_rule(url: str, ok: bool) -> None:
    assert input_allowed(parse_s3_url(url), task_id=T, bucket=BUCKET, allow=ALLOW) is ok


@pytest.mark.parametrize(
    "task_id",
    [pytest.param("", id="empty"), pytest.param("..", id="dotdot"),
     pytest.param(f"{A}/inputs", id="slash")],
)
def test_rule_odd_task_ids_read_nothing_under_tasks(task_id: str) -> None:
    url = S3Url(BUCKET, f"tasks/{A}/inputs/IMG.JPG")
    assert not input_allowed(url, task_id=task_id, bucket=BUCKET, allow=ALLOW)
    assert not input_allowed(S3Url(BUCKET, "tasks//inputs/"), task_id=task_id, bucket=BUCKET,
                             allow=ALLOW)


@pytest.mark.parametrize(
    "entry",
    [pytest.param("https://open-bucket/", id="not-s3"), pytest.param("s3://ob/", id="short"),
     pytest.param("s3://open-bucket/../", id="dotdot"), pytest.param("", id="empty")],
)
def test_rule_ignores_invalid_allow_entries(entry: str) -> None:
    url = S3Url("open-bucket", "data/IMG.JPG")
    assert not input_allowed(url, task_id=T, bucket=BUCKET, allow=[entry])


def test_rule_nothing_allowed_by_default() -> None:
    assert input_allowed(S3Url(BUCKET, f"tasks/{T}/inputs/"), task_id=T, bucket=BUCKET, allow=[])
    assert not input_allowed(S3Url("open-bucket", ""), task_id=T, bucket=BUCKET, allow=[])
    assert S3Settings().input_allow == []


# --------------------------------------------------------------------------------------------
# Fetching against moto
# --------------------------------------------------------------------------------------------

LIMITS = Limits(download_bytes=1 << 24, expanded_bytes=1 << 24, member_ratio=100.0,
                entries=1000, disk_bytes=1 << 26)


class Buckets:
    def __init__(self, s3: servers.S3Endpoint) -> None:
        self.client: Any = boto3.client(
            "s3", endpoint_url=s3.url, region_name=s3.region,
            aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key,
        )
        suffix = uuid.uuid4().hex[:12]
        self.service = f"svc-{suffix}"
        self.allowed = f"allowed-{suffix}"
        self.other = f"other-{suffix}"
        for name in (self.service, self.allowed, self.other):
            self.client.create_bucket(Bucket=name)

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=body)


@pytest.fixture
def buckets(s3: servers.S3Endpoint) -> Buckets:
    return Buckets(s3)


@pytest.fixture
async def facade(s3: servers.S3Endpoint, buckets: Buckets) -> AsyncIterator[S3]:
    settings = S3Settings(
        endpoint_url=s3.url, region=s3.region, access_key_id=s3.access_key,
        secret_access_key=s3.secret_key, bucket=buckets.service,
        input_allow=[f"s3://{buckets.allowed}/allowed"],
    )
    async with S3.open(settings) as opened:
        yield opened


class Calls:
    """S3 reads the fetch made (the facade's list and get)."""

    def __init__(self, facade: S3, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: list[str] = []
        list_objects, iter_object = facade.list_objects, facade.iter_object

        async def listing(prefix: S3Url) -> list[tuple[str, int]]:
            self.made.append(f"list {prefix}")
            return await list_objects(prefix)

        def reading(url: S3Url, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
            self.made.append(f"get {url}")
            return iter_object(url, chunk_size)

        monkeypatch.setattr(facade, "list_objects", listing)
        monkeypatch.setattr(facade, "iter_object", reading)


@pytest.fixture
def calls(facade: S3, monkeypatch: pytest.MonkeyPatch) -> Calls:
    return Calls(facade, monkeypatch)


def _seed_task_a(buckets: Buckets) -> None:
    for key in ("inputs/IMG_A1.JPG", "inputs/IMG_A2.JPG", "outputs/odm_orthophoto.tif"):
        buckets.put(buckets.service, f"tasks/{A}/{key}", data.JPEG)
    buckets.put(buckets.service, f"tasks/{A}/inputs/a.zip",
                data.zip_bytes({"IMG_A3.JPG": data.JPEG}))
    buckets.put(buckets.other, "data/IMG_OTHER.JPG", data.JPEG)
    buckets.put(buckets.allowed, "allowed-other/IMG_SIB.JPG", data.JPEG)
    buckets.put(buckets.allowed, "allowed/IMG_OK.JPG", data.JPEG)


async def _fetch(facade: S3, sources: list[str], images: Path) -> int:
    return await fetching.fetch_inputs(sources, images, facade, task_id=T, limits=LIMITS,
                                       timeout_s=10)


@pytest.mark.integration
@pytest.mark.parametrize(
    "source",
    [
        pytest.param("s3://{service}/tasks/{a}/inputs/", id="a-inputs"),
        pytest.param("s3://{service}/tasks/{a}/inputs/a.zip", id="a-input-zip"),
        pytest.param("s3://{service}/tasks/{a}/outputs/", id="a-outputs"),
        pytest.param("s3://{service}/tasks/{a}/../", id="a-dotdot"),
        pytest.param("s3://{service}/tasks/{t}/inputs/../../{a}/inputs/", id="own-dotdot-to-a"),
        pytest.param("s3://{service}/tasks/", id="all-tasks"),
        pytest.param("s3://{service}/", id="service-root"),
        pytest.param("s3://{other}/data/", id="other-bucket"),
        pytest.param("s3://{allowed}/allowed-other/", id="allowed-sibling"),
    ],
)
async def test_task_b_cannot_read(
    tmp_path: Path, buckets: Buckets, facade: S3, calls: Calls, source: str
) -> None:
    _seed_task_a(buckets)
    url = source.format(service=buckets.service, other=buckets.other, allowed=buckets.allowed,
                        a=A, t=T)
    images = tmp_path / T / "images"

    with pytest.raises(InputError) as refused:
        await _fetch(facade, [url], images)

    assert str(refused.value) == (
        f"Could not read inputs from {url}: not a permitted location (a task may read its own "
        "uploads and the locations the operator allows)"
    )
    assert calls.made == [], "refused before any S3 call"
    assert not images.exists()


@pytest.mark.integration
async def test_own_uploads_and_allowed_prefix_work(
    tmp_path: Path, buckets: Buckets, facade: S3, calls: Calls
) -> None:
    _seed_task_a(buckets)
    buckets.put(buckets.service, f"tasks/{T}/inputs/IMG_T1.JPG", data.JPEG)
    images = tmp_path / T / "images"

    count = await _fetch(facade, [f"s3://{buckets.service}/tasks/{T}/inputs/",
                                  f"s3://{buckets.allowed}/allowed/"], images)

    assert count == 2
    assert sorted(p.name for p in images.iterdir()) == ["IMG_OK.JPG", "IMG_T1.JPG"]
    assert all(f"/tasks/{A}/" not in c and "allowed-other" not in c for c in calls.made)


@pytest.mark.integration
async def test_permitted_empty_prefix_is_no_images(
    tmp_path: Path, buckets: Buckets, facade: S3, calls: Calls
) -> None:
    """Listed without an error and empty: no images (NodeODM's words), not "not found"."""
    url = f"s3://{buckets.allowed}/allowed/empty-{uuid.uuid4().hex}/"
    images = tmp_path / T / "images"

    assert await _fetch(facade, [url], images) == 0
    assert calls.made == [f"list {url}"]
    assert list(images.iterdir()) == []

    with pytest.raises(InputError) as failed:
        await stages.fetch_images([url], tmp_path / "again", facade, SchedulerSettings(),
                                  task_id=T)
    assert str(failed.value) == stages.NO_IMAGES


@pytest.mark.integration
@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param("allowed/../tasks/{a}/inputs/IMG_A1.JPG", id="dotdot-key"),
        pytest.param("allowed//IMG.JPG", id="empty-segment-key"),
        pytest.param("allowed/./IMG.JPG", id="dot-key"),
    ],
)
async def test_listed_keys_are_checked(
    tmp_path: Path, buckets: Buckets, facade: S3, calls: Calls, monkeypatch: pytest.MonkeyPatch,
    hostile: str,
) -> None:
    """A listing is S3's answer, not the request: every key it returns must pass too."""
    _seed_task_a(buckets)

    async def listing(prefix: S3Url) -> list[tuple[str, int]]:
        calls.made.append(f"list {prefix}")
        return [("allowed/IMG_OK.JPG", len(data.JPEG)), (hostile.format(a=A), len(data.JPEG))]

    monkeypatch.setattr(facade, "list_objects", listing)
    images = tmp_path / T / "images"
    url = f"s3://{buckets.allowed}/allowed/"

    with pytest.raises(InputError, match="not a permitted location"):
        await _fetch(facade, [url], images)

    assert calls.made == [f"list {url}"], "nothing downloaded, not even the good key"
    assert not images.exists()


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


def _objects(stack: Stack, prefix: str) -> dict[str, bytes]:
    client: Any = boto3.client(
        "s3", endpoint_url=stack.s3.url, region_name=stack.s3.region,
        aws_access_key_id=stack.s3.access_key, aws_secret_access_key=stack.s3.secret_key,
    )
    listed = client.list_objects_v2(Bucket=stack.bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=stack.bucket, Key=o["Key"])["Body"].read()
            for o in listed}


@pytest.mark.integration
async def test_task_b_given_task_a_inputs_end_to_end(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    marker = b"\xff\xd8\xff\xe0 task A's private image " + uuid.uuid4().bytes + b"\xff\xd9"
    created = await api.create(client, files=[(f"IMG_{i}.JPG", marker) for i in range(3)],
                               name="A")
    assert "uuid" in created, created
    task_a = created["uuid"]
    await api.poll_until(client, task_a, api.status_is(30, 40, 50))
    assert _objects(stack, f"tasks/{task_a}/inputs/"), "A's uploads are stored"

    zipurl = f"s3://{stack.bucket}/tasks/{task_a}/inputs/"
    resp = await client.post("/task/new", files={"zipurl": (None, zipurl), "name": (None, "B")})
    body = resp.json()
    if "error" in body:  # refused at submission (the gateway applies the same rule)
        assert "uuid" not in body
        return
    task_b = body["uuid"]
    final = await api.poll_until(client, task_b, api.status_is(30, 40, 50))

    assert final["status"]["code"] == 30
    assert final["status"]["errorMessage"].startswith(
        f"Could not read inputs from {zipurl}: not a permitted location"
    )
    leaked = {k: v for k, v in _objects(stack, f"tasks/{task_b}/").items() if marker in v}
    assert leaked == {}
    work = stack.runs_dir / run_name(task_b, 1) / "work"
    assert [p for p in work.rglob("*") if p.is_file()] == []
