"""What a failed run tells its user: errorMessages without paths, exception text or S3 oracles.

Every failure text of a run (``fetching.InputError``, ``packaging.UploadError``, the fetch and
upload steps' last line, the runner's ``result.json``) is shown to whoever can read the task.

Covered:
- ``s3://`` reads: a missing bucket, a missing key, and a read S3 refuses (``AccessDenied``) all
  give the very same text (the URL aside), without S3's error code or botocore's message (a
  permitted prefix that lists empty is no S3 failure: "No images found", in
  ``test_s3_inputs.py``);
- http(s) downloads: HTTP 404, a connection refused, an address the outbound guard refuses (by
  IP and by a host name resolving to it: the resolved address is not shown), a non-zip, a zip
  with a damaged member;
- the runner: an unexpected exception carrying a path ends as the generic internal error, an
  engine that cannot be started as a generic message; an upload to a missing bucket as "Could not
  store the task's outputs"; the fetch step's last stderr line for an unexpected exception;
- end to end on the shared stack: tasks failing on a missing own upload (``set-uuid``), a 404, a
  non-zip, and a refused address end with such texts (or are refused at submission with one).

Every text is checked for: the test's temporary directories and ``/tmp``, the runs directory,
``/workspace``, exception class names (``...Error``, ``...Exception``), ``Errno``, ``Traceback``,
``botocore``, S3 error codes, and loopback addresses the user did not write.

Left out: Argo's own messages (pod scheduling, OOM; the watcher's ``argo.py``) and the
scheduler's "Could not start the run" after ``max_deliver`` (``handlers.py``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from scaleodm.common import localruns, netguard
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.settings import EngineKind, S3Settings, SchedulerSettings
from scaleodm.common.store.s3 import S3, S3Url
from scaleodm.run import fetching, packaging, runner, stages
from scaleodm.run.fetching import InputError, Limits
from tests.harness import api, data, servers
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import Stack

T = "33333333-3333-4333-8333-333333333333"
LIMITS = Limits(download_bytes=1 << 24, expanded_bytes=1 << 24, member_ratio=100.0,
                entries=1000, disk_bytes=1 << 26)
UNREADABLE = "Could not read inputs from <url> (not found or not permitted)"
LEAKS = re.compile(
    r"/tmp|/workspace|/var/|pytest-|\bruns\b|[A-Za-z]+(Error|Exception)\b|Errno|Traceback|"
    r"botocore|NoSuchBucket|NoSuchKey|AccessDenied|Forbidden|403|resolves|127\.0\.0\.1"
)


def assert_clean(message: str, *paths: Path) -> None:
    """No local path, exception text or S3 answer in ``message``."""
    found = LEAKS.search(message)
    assert found is None, f"{found.group(0)!r} in {message!r}"
    for path in paths:
        assert str(path) not in message


# --------------------------------------------------------------------------------------------
# s3:// reads
# --------------------------------------------------------------------------------------------


@pytest.fixture
def names(s3: servers.S3Endpoint) -> dict[str, str]:
    client: Any = boto3.client(
        "s3", endpoint_url=s3.url, region_name=s3.region,
        aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key,
    )
    suffix = uuid.uuid4().hex[:12]
    found = {"service": f"svc-{suffix}", "existing": f"exists-{suffix}",
             "missing": f"missing-{suffix}"}
    client.create_bucket(Bucket=found["service"])
    client.create_bucket(Bucket=found["existing"])
    client.put_object(Bucket=found["existing"], Key="data/IMG_1.JPG", Body=data.JPEG)
    return found


@pytest.fixture
async def facade(s3: servers.S3Endpoint, names: dict[str, str]) -> AsyncIterator[S3]:
    settings = S3Settings(
        endpoint_url=s3.url, region=s3.region, access_key_id=s3.access_key,
        secret_access_key=s3.secret_key, bucket=names["service"],
        input_allow=[f"s3://{names['existing']}/data/", f"s3://{names['missing']}/data/"],
    )
    async with S3.open(settings) as opened:
        yield opened


def _denied(operation: str) -> ClientError:
    return ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}},
                       operation)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("source", "forbidden"),
    [
        pytest.param("s3://{missing}/data/IMG_1.zip", False, id="missing-bucket-object"),
        pytest.param("s3://{missing}/data/", False, id="missing-bucket-prefix"),
        pytest.param("s3://{existing}/data/IMG_9.zip", False, id="missing-key"),
        pytest.param("s3://{existing}/data/IMG_9.JPG", False, id="missing-image-key"),
        pytest.param("s3://{service}/tasks/{t}/inputs/missing.zip", False, id="own-missing-key"),
        pytest.param("s3://{existing}/data/IMG_1.JPG", True, id="forbidden-object"),
        pytest.param("s3://{existing}/data/", True, id="forbidden-prefix"),
    ],
)
async def test_s3_failures_read_the_same(
    tmp_path: Path, names: dict[str, str], facade: S3, monkeypatch: pytest.MonkeyPatch,
    source: str, forbidden: bool,
) -> None:
    if forbidden:
        async def list_denied(_prefix: S3Url) -> list[tuple[str, int]]:
            raise _denied("ListObjectsV2")

        async def get_denied(_url: S3Url, _chunk: int = 0) -> AsyncIterator[bytes]:
            raise _denied("GetObject")
            yield b""  # an async generator, as the real one

        monkeypatch.setattr(facade, "list_objects", list_denied)
        monkeypatch.setattr(facade, "iter_object", get_denied)
    url = source.format(t=T, **names)
    images = tmp_path / T / "images"

    with pytest.raises(InputError) as failed:
        await fetching.fetch_inputs([url], images, facade, task_id=T, limits=LIMITS,
                                    timeout_s=10)

    message = str(failed.value)
    assert message.replace(url, "<url>") == UNREADABLE
    assert_clean(message.replace(url, ""), tmp_path)
    assert not images.exists()


# --------------------------------------------------------------------------------------------
# http(s) downloads and archives
# --------------------------------------------------------------------------------------------


def _damaged_zip() -> bytes:
    raw = bytearray(data.zip_bytes({"IMG_1.JPG": b"A" * 64}))
    raw[raw.index(b"A" * 64)] = ord("B")  # bad CRC, directory intact
    return bytes(raw)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("served", "url", "allow", "message"),
    [
        pytest.param(None, "{base}/nope.zip", True, "Could not download zipurl: HTTP 404",
                     id="http-404"),
        pytest.param(None, "http://127.0.0.1:1/x.zip", True,
                     "Could not download zipurl: could not connect", id="connection-refused"),
        pytest.param(None, "{base}/x.zip", False,
                     "Could not download zipurl: the address is not permitted",
                     id="refused-address"),
        pytest.param(None, "{localhost}/x.zip", False,
                     "Could not download zipurl: the address is not permitted",
                     id="refused-host-name"),
        pytest.param(b"<html>not a zip</html>", "{base}/{name}", True,
                     "Could not extract .zip file: not a valid zip archive", id="not-a-zip"),
        pytest.param(_damaged_zip(), "{base}/{name}", True,
                     "Could not extract .zip file: a file in it is damaged, encrypted or uses "
                     "an unsupported compression method", id="damaged-member"),
    ],
)
async def test_download_failures(
    tmp_path: Path, http_fixture: HttpFixture, facade: S3, served: bytes | None, url: str,
    allow: bool, message: str,
) -> None:
    name = f"{uuid.uuid4().hex}.zip"
    if served is not None:
        data.write(http_fixture.root / name, served)
    base = http_fixture.base_url
    target = url.format(base=base, name=name, localhost=base.replace("127.0.0.1", "localhost"))
    outbound = netguard.OutboundPolicy(["127.0.0.0/8"] if allow else [])
    images = tmp_path / T / "images"

    with pytest.raises(InputError) as failed:
        await fetching.fetch_inputs([target], images, facade, task_id=T, limits=LIMITS,
                                    timeout_s=10, outbound=outbound)

    assert str(failed.value) == message
    assert_clean(str(failed.value), tmp_path, http_fixture.root)
    assert not images.exists()


# --------------------------------------------------------------------------------------------
# Runner, packaging and the steps
# --------------------------------------------------------------------------------------------


def _run_dir(tmp_path: Path, engine: EngineKind = EngineKind.TEST) -> localruns.RunDir:
    spec = RunSpec(task_id=T, attempt=1, name="leak", options=[],
                   sources=[f"s3://scaleodm/tasks/{T}/inputs/"],
                   output_prefix=f"s3://scaleodm/tasks/{T}/outputs/", outputs=None,
                   images_count=None)
    rd = localruns.RunDir(tmp_path / "runs" / f"odm-{T}-1")
    rd.path.mkdir(parents=True)
    localruns.write_json_atomic(rd.file(localruns.RUN_FILE),
                                {"spec": spec.model_dump(mode="json"), "engine": engine.value})
    return rd


def _result(rd: localruns.RunDir) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(rd.file("result.json").read_text())
    return result


async def test_runner_unexpected_exception(tmp_path: Path) -> None:
    rd = _run_dir(tmp_path)
    run = runner.Runner(rd, SchedulerSettings())
    secret = tmp_path / "runs" / "work" / "project" / "images"

    async def boom() -> None:
        raise OSError(2, "No such file or directory", str(secret))

    run._stages = boom  # type: ignore[method-assign]
    await run.execute()

    assert _result(rd) == {"outcome": "failed", "error_message": stages.INTERNAL_ERROR,
                           "exit_code": None}
    assert_clean(stages.INTERNAL_ERROR, tmp_path)


async def test_engine_that_cannot_start(tmp_path: Path) -> None:
    missing = tmp_path / "opt" / "odm" / "run.sh"
    rd = _run_dir(tmp_path, EngineKind.COMMAND)
    settings = SchedulerSettings(engine=EngineKind.COMMAND,
                                 engine_command=f"{missing} {{options}} {{project_name}}")
    run = runner.Runner(rd, settings)
    with pytest.raises(InputError) as failed:
        await run._run_engine([])
    assert str(failed.value) == "Could not start the processing engine"


@pytest.mark.integration
async def test_upload_to_a_missing_bucket(
    tmp_path: Path, facade: S3, names: dict[str, str]
) -> None:
    project = tmp_path / T
    project.mkdir()
    (project / "task_output.txt").write_text("done")
    files = packaging.collect(project, None)
    archive = tmp_path / "all.zip"
    packaging.build_zip(project, files, archive)
    prefix = S3Url(names["missing"], f"tasks/{T}/outputs/")

    with pytest.raises(packaging.UploadError) as failed:
        await packaging.upload_outputs(facade, prefix, project, files, archive)

    assert str(failed.value) == "Could not store the task's outputs"


def test_step_unexpected_exception_last_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def boom(*_args: Any, **_kwargs: Any) -> int:
        raise RuntimeError(f"cannot write {tmp_path}/workspace/{T}/images")

    monkeypatch.setattr(stages, "run_fetch", boom)
    rd = _run_dir(tmp_path)
    spec = json.dumps(json.loads(rd.file(localruns.RUN_FILE).read_text())["spec"])

    assert stages.main(["fetch", "--spec", spec, "--workspace", str(tmp_path)]) == 1

    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == stages.INTERNAL_ERROR


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_failed_tasks_on_the_stack(
    stack: Stack, client: httpx.AsyncClient, http_fixture: HttpFixture, tmp_path: Path
) -> None:
    own = str(uuid.uuid4())
    plain = f"{uuid.uuid4().hex}.zip"
    data.write(http_fixture.root / plain, b"just text")
    cases: dict[str, tuple[dict[str, str], dict[str, str]]] = {
        "own-missing-object": ({"zipurl": f"s3://{stack.bucket}/tasks/{own}/inputs/gone.zip"},
                               {"set-uuid": own}),
        "http-404": ({"zipurl": http_fixture.url(f"{uuid.uuid4().hex}.zip")}, {}),
        "not-a-zip": ({"zipurl": http_fixture.url(plain)}, {}),
        "refused-address": ({"zipurl": "http://169.254.169.254/latest/x.zip"}, {}),
    }
    created: dict[str, str] = {}
    for name, (fields, headers) in cases.items():
        resp = await client.post("/task/new", files=api.form(**fields), headers=headers)
        body = resp.json()
        if "error" in body:  # refused at submission: that text is shown too
            assert_clean(body["error"], stack.tmp, tmp_path)
            continue
        created[name] = body["uuid"]

    for name, task_id in created.items():
        final = await api.poll_until(client, task_id, api.status_is(30, 40, 50))
        assert final["status"]["code"] == 30, (name, final)
        message = final["status"]["errorMessage"]
        assert_clean(message.replace(cases[name][0]["zipurl"], ""), stack.tmp, stack.runs_dir,
                     tmp_path)
    if "own-missing-object" in created:
        final = await api.info(client, created["own-missing-object"])
        url = cases["own-missing-object"][0]["zipurl"]
        assert final["status"]["errorMessage"].replace(url, "<url>") == UNREADABLE
