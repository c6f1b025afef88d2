"""The fetch and upload steps of an Argo run (``python -m scaleodm.run.stages``).

Covered without servers: control files moved to ODM's default names at the project root
(``gcp_list.txt`` from any other ``.txt``, ``geo.txt``, ``image_groups.txt``; extra ``.txt``
files left in ``gcp/``), the fetched tree left group-writable with setgid directories (ODM runs
as root without capabilities and writes through the pod's fsGroup), and command-line errors
(exit 2).

Covered against a real moto S3 (integration), running the CLI as a process with exactly the
``command``/``args`` and the env of the containers ``workflows.build_workflow`` emits (only the
workspace path and the Secret's values substituted; the spec JSON carries an escaped ``{{``):
- fetch: an ``s3://`` prefix holding images, a zip (nested paths, an image and a GCP file) and
  non-images → ``<workspace>/<task_id>/images`` flattened, control files at the project root;
- fetch with no image → exit 1, last stderr line = the "No images found" reason; a source the
  task may not read → exit 1 with "Could not read inputs" (more in ``tests/security/``);
- upload after a stand-in for ODM: the collected outputs, ``task_output.txt`` (cleaned console)
  and ``all.zip`` holding exactly them under the output prefix; without a console file no
  ``task_output.txt``; ``outputs`` limiting what is shipped; a missing project → exit 1, and no
  reason names the workspace's path.

Left out: http(s) zip sources and zip edge cases (``tests/unit/test_fetching.py``,
``tests/integration/test_bad_input.py``), running inside Kubernetes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.settings import ArgoSettings, SchedulerSettings
from scaleodm.run import stages
from scaleodm.scheduler import workflows
from tests.harness import servers

# --------------------------------------------------------------------------------------------
# Without servers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "at_root", "left_in_gcp"),
    [
        pytest.param(
            ["my_gcps.txt", "geo.txt", "image_groups.txt"],
            {
                "gcp_list.txt": "my_gcps.txt",
                "geo.txt": "geo.txt",
                "image_groups.txt": "image_groups.txt",
            },
            set(),
            id="all-three",
        ),
        pytest.param(
            ["a.txt", "b.txt"],
            {"gcp_list.txt": "a.txt"},
            {"b.txt"},
            id="first-other-is-gcp",
        ),
        pytest.param(["GEO.TXT"], {"geo.txt": "GEO.TXT"}, set(), id="case-insensitive"),
        pytest.param([], {}, set(), id="none"),
    ],
)
def test_place_control_files(
    tmp_path: Path, names: list[str], at_root: dict[str, str], left_in_gcp: set[str]
) -> None:
    project = tmp_path / "task"
    images = project / "images"
    images.mkdir(parents=True)
    (images / "IMG_1.JPG").write_bytes(b"jpg")
    for name in names:
        (images / name).write_text(f"content of {name}")
    placed = stages.place_control_files(images, project)
    assert sorted(p.name for p in images.iterdir()) == ["IMG_1.JPG"]
    for target, source in at_root.items():
        assert (project / target).read_text() == f"content of {source}"
    assert {p.name for p in placed.values()} == set(at_root)
    gcp_dir = project / "gcp"
    left = {p.name for p in gcp_dir.iterdir()} if gcp_dir.exists() else set()
    assert left == left_in_gcp


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["fetch", "--spec", "{not json", "--workspace", "/tmp/x"], id="bad-json"),
        pytest.param(["fetch", "--spec", '{"task_id": "x"}'], id="not-a-run-spec"),
        pytest.param(["upload"], id="no-spec"),
        pytest.param(["push", "--spec", "{}"], id="unknown-step"),
    ],
)
def test_bad_command_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        stages.main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


class _NoS3:
    @staticmethod
    @contextlib.asynccontextmanager
    async def open(_settings: object) -> Any:
        yield None


async def test_fetched_tree_is_group_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever modes the download used (0700 dirs, 0600 files), fetch leaves every directory
    g+rwx with setgid and every file g+rw, so a member of the pod's fsGroup can write."""

    async def download(_sources: list[str], images: Path, *_args: Any, **_kwargs: Any) -> int:
        (images / "deep").mkdir(parents=True, mode=0o700)
        for path in (images / "IMG_1.JPG", images / "deep" / "IMG_2.JPG", images / "g.txt"):
            path.write_bytes(b"x")
            path.chmod(0o600)
        images.chmod(0o700)
        return 2

    monkeypatch.setattr(stages, "fetch_images", download)
    monkeypatch.setattr(stages, "S3", _NoS3)
    spec = _spec("bucket")
    assert await stages.run_fetch(spec, tmp_path, SchedulerSettings()) == 2
    project = tmp_path / spec.task_id
    tree = [project, *project.rglob("*")]
    assert {p.relative_to(project).as_posix() for p in tree} == {
        ".", "images", "images/deep", "images/IMG_1.JPG", "images/deep/IMG_2.JPG", "gcp",
        "gcp_list.txt",
    }
    for path in tree:
        mode = path.stat().st_mode
        if path.is_dir():
            assert mode & stat.S_ISGID and mode & stat.S_IRWXG == stat.S_IRWXG, path
        else:
            assert mode & (stat.S_IRGRP | stat.S_IWGRP) == stat.S_IRGRP | stat.S_IWGRP, path
        assert path.stat().st_gid == os.getgid(), path


# --------------------------------------------------------------------------------------------
# Against moto S3, through the manifest's own command lines
# --------------------------------------------------------------------------------------------


@pytest.fixture
def bucket(s3: servers.S3Endpoint) -> Iterator[tuple[Any, str]]:
    client = boto3.client(
        "s3",
        endpoint_url=s3.url,
        region_name=s3.region,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
    )
    name = f"stages-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    yield client, name
    client.close()


def _spec(
    bucket: str, *, sources: list[str] | None = None, outputs: list[str] | None = None
) -> RunSpec:
    task_id = str(uuid.uuid4())
    return RunSpec(
        task_id=task_id,
        attempt=1,
        name="Stages {{workflow.name}} $(id)",
        options=[{"name": "dsm", "value": True}],
        sources=sources or [f"s3://{bucket}/tasks/{task_id}/inputs/"],
        output_prefix=f"s3://{bucket}/tasks/{task_id}/outputs/",
        outputs=outputs,
        images_count=None,
    )


def _run(
    step: str, spec: RunSpec, workspace: Path, s3: servers.S3Endpoint, bucket: str
) -> subprocess.CompletedProcess[str]:
    """Run the ``step`` container of the spec's workflow as a local process."""
    manifest = workflows.build_workflow(
        spec,
        ArgoSettings(),
        shard=0,
        step_env={
            "SCALEODM_S3__ENDPOINT_URL": s3.url,
            "SCALEODM_S3__REGION": s3.region,
            "SCALEODM_S3__BUCKET": bucket,
        },
    )
    (template,) = manifest["spec"]["templates"]
    (container,) = [c for c in template["containerSet"]["containers"] if c["name"] == step]
    secrets = {"access_key_id": s3.access_key, "secret_access_key": s3.secret_key}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEODM_")}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = secrets[var["valueFrom"]["secretKeyRef"]["key"]]
    # What the kubelet passes on: the builder doubles every `$` (workflows.kubernetes_literal).
    command, args = container["command"], [a.replace("$$", "$") for a in container["args"]]
    assert command[0] == "python" and args[-2:] == ["--workspace", "/workspace"]
    args[-1] = str(workspace)
    return subprocess.run(
        [sys.executable, *command[1:], *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _keys(client: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        o["Key"][len(prefix) :]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in listed
    }


@pytest.mark.integration
def test_fetch_then_upload(tmp_path: Path, s3: servers.S3Endpoint, bucket: tuple[Any, str]) -> None:
    client, name = bucket
    spec = _spec(name)
    inputs = f"tasks/{spec.task_id}/inputs/"
    for key, body in {
        "IMG_1.JPG": b"one",
        "IMG_2.jpg": b"two",
        "readme.md": b"dropped",
        "more.zip": _zip(
            {
                "deep/dir/IMG_3.tif": b"three",
                "control/my_gcps.txt": b"EPSG:4326",
                "notes.pdf": b"dropped",
            }
        ),
        "geo.txt": b"EPSG:4326\nIMG_1.JPG 1 2 3",
    }.items():
        client.put_object(Bucket=name, Key=inputs + key, Body=body)
    workspace = tmp_path / "workspace"
    workspace.mkdir()

    fetched = _run("fetch", spec, workspace, s3, name)
    assert fetched.returncode == 0, fetched.stderr
    project = workspace / spec.task_id
    assert sorted(p.name for p in (project / "images").iterdir()) == [
        "IMG_1.JPG",
        "IMG_2.jpg",
        "IMG_3.tif",
    ]
    assert (project / "gcp_list.txt").read_bytes() == b"EPSG:4326"
    assert (project / "geo.txt").read_bytes() == b"EPSG:4326\nIMG_1.JPG 1 2 3"

    # A stand-in for ODM's products and the console capture.
    (project / "odm_orthophoto").mkdir()
    (project / "odm_orthophoto" / "odm_orthophoto.tif").write_bytes(b"ortho")
    (project / "odm_report").mkdir()
    (project / "odm_report" / "report.pdf").write_bytes(b"report")
    (project / "images.json").write_text("[]")
    (workspace / stages.CONSOLE_FILE).write_text(
        "\x1b[39m[INFO]    Running dataset stage\x1b[0m\n  [INFO]    ODM app finished  \n"
    )

    uploaded = _run("upload", spec, workspace, s3, name)
    assert uploaded.returncode == 0, uploaded.stderr
    outputs = _keys(client, name, f"tasks/{spec.task_id}/outputs/")
    expected = {
        "odm_orthophoto/odm_orthophoto.tif": b"ortho",
        "odm_report/report.pdf": b"report",
        "images.json": b"[]",
        "task_output.txt": b"[INFO]    Running dataset stage\n[INFO]    ODM app finished",
    }
    archive = outputs.pop("all.zip")
    # The results step's Item: the stand-in orthophoto is no raster, so none is described.
    item = json.loads(outputs.pop("stac.json"))
    assert item["id"] == spec.task_id and item["geometry"] is None
    assert set(item["assets"]) == {"archive"}
    assert outputs == expected
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        assert {n: zf.read(n) for n in zf.namelist() if n != "stac.json"} == expected


@pytest.mark.integration
def test_upload_without_console_and_with_outputs(
    tmp_path: Path, s3: servers.S3Endpoint, bucket: tuple[Any, str]
) -> None:
    client, name = bucket
    spec = _spec(name, outputs=["odm_orthophoto/odm_orthophoto.tif"])
    project = tmp_path / spec.task_id
    (project / "odm_orthophoto").mkdir(parents=True)
    (project / "odm_orthophoto" / "odm_orthophoto.tif").write_bytes(b"ortho")
    (project / "odm_report").mkdir()
    (project / "odm_report" / "report.pdf").write_bytes(b"not shipped")

    uploaded = _run("upload", spec, tmp_path, s3, name)
    assert uploaded.returncode == 0, uploaded.stderr
    outputs = _keys(client, name, f"tasks/{spec.task_id}/outputs/")
    assert sorted(outputs) == ["all.zip", "odm_orthophoto/odm_orthophoto.tif"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("step", "inputs", "sources", "reason"),
    [
        pytest.param(
            "fetch", {"notes.txt": b"x", "readme.md": b"y"}, None, stages.NO_IMAGES, id="no-images"
        ),
        pytest.param(
            "fetch",
            {},
            ["s3://no-such-bucket-{uuid}/in/"],
            "Could not read inputs",
            id="unreadable-source",
        ),
        pytest.param("upload", {}, None, "Nothing to upload", id="no-project"),
    ],
)
def test_step_failures(
    tmp_path: Path,
    s3: servers.S3Endpoint,
    bucket: tuple[Any, str],
    step: str,
    inputs: dict[str, bytes],
    sources: list[str] | None,
    reason: str,
) -> None:
    client, name = bucket
    spec = _spec(name, sources=[s.format(uuid=uuid.uuid4().hex) for s in sources or []])
    for key, body in inputs.items():
        client.put_object(Bucket=name, Key=f"tasks/{spec.task_id}/inputs/{key}", Body=body)
    result = _run(step, spec, tmp_path, s3, name)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(reason), result.stderr
    assert str(tmp_path) not in last
