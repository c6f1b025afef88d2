"""Split-merge of the ODM test double (``--split N --sm-cluster URL``) against a fake NodeODM.

The engine runs as a subprocess (``python -m odm_test_engine``) and talks, through PyODM, to a
small NodeODM imitation served in-process on 127.0.0.1: just the routes PyODM's client calls
(``/info``, chunked ``/task/new/{init,upload,commit}``, ``/task/<uuid>/{info,output}``,
``/task/<uuid>/download/all.zip``, ``/task/remove``), each refusing a missing ``?token=``.

Covered: the submodel layout, the split between local and remote processing, what the node
receives (images, ``seed.zip`` contents, the rewritten options, ``skipPostProcessing``,
``outputs``), the download and merge of the outputs, the removal of every remote task; a task the
node queues (removed and re-queued, then success), a child that fails (run fails with exit 1), and
SIGTERM mid-run (remote tasks removed before the exit).

Not covered here: ScaleODM as the cluster node (the lead's end-to-end tests), retries after
connection errors, the node's task-limit estimate with several running tasks, and the realism of
the placeholder outputs (tests/unit/test_odm_test_engine.py checks those for a normal run).
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from tests.harness.data import exif_block, jpeg
from tests.unit.test_odm_test_engine import ENGINE_SRC

pytestmark = pytest.mark.integration

PROJECT = "task-1"
TOKEN = "s3cret"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SEED_NAMES = {
    "opensfm/camera_models.json",
    "opensfm/reference_lla.json",
    "opensfm/reconstruction.json",
    "opensfm/tracks.csv",
    "opensfm/features/empty",
    "opensfm/matches/empty",
    "opensfm/exif/empty",
}
TOOLCHAIN_OUTPUTS = [
    "odm_orthophoto/cutline.gpkg",
    "odm_orthophoto/odm_orthophoto_cut.tif",
    "odm_orthophoto/odm_orthophoto_feathered.tif",
    "odm_dem",
    "odm_report",
    "odm_georeferencing",
]
QUEUED, RUNNING, FAILED, COMPLETED = 10, 20, 30, 40


# ------------------------------------------------------------------------------- fake NodeODM


@dataclass
class FakeTask:
    uuid: str
    fields: dict[str, str]
    files: dict[str, bytes] = field(default_factory=dict)
    committed: bool = False
    statuses: list[int] = field(default_factory=list)  # answered in turn; the last one repeats
    downloaded: bool = False
    removed: bool = False

    def status(self) -> int:
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


class FakeNode:
    """The state of the fake node; ``script(n)`` gives the statuses of the n-th task (0-based)."""

    def __init__(self, script: Callable[[int], list[int]]) -> None:
        self.script = script
        self.tasks: dict[str, FakeTask] = {}
        self.order: list[str] = []
        self.lock = threading.Lock()
        self.unauthorised = 0

    def new_task(self, fields: dict[str, str]) -> FakeTask:
        with self.lock:
            task = FakeTask(str(uuid.uuid4()), fields, statuses=self.script(len(self.order)))
            self.tasks[task.uuid] = task
            self.order.append(task.uuid)
            return task

    def committed(self) -> list[FakeTask]:
        return [t for t in self.tasks.values() if t.committed]


def _all_zip(task: FakeTask) -> bytes:
    """The outputs a child would return (a DSM when asked), at the paths the merge expects."""
    options = {o["name"]: o["value"] for o in json.loads(task.fields["options"])}
    names = [
        "odm_orthophoto/cutline.gpkg",
        "odm_orthophoto/odm_orthophoto_cut.tif",
        "odm_orthophoto/odm_orthophoto_feathered.tif",
        "odm_georeferencing/odm_georeferenced_model.laz",
        "odm_report/shots.geojson",
    ]
    if options.get("dsm") is True:
        names += ["odm_dem/dsm.tif", "odm_dem/dsm.euclideand.tif"]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            archive.writestr(name, f"fake output of {task.uuid}")
    return buffer.getvalue()


def _multipart(content_type: str, body: bytes) -> list[tuple[str, str | None, bytes]]:
    """``(field name, file name, payload)`` of each part of a multipart/form-data body."""
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    message = parser.parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(name, str) and isinstance(payload, bytes)
        parts.append((name, part.get_filename(), payload))
    return parts


def _handler(node: FakeNode) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
            pass

        def _reply(self, payload: object, status: int = 200) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> str | None:
            url = urlparse(self.path)
            if parse_qs(url.query).get("token") != [TOKEN]:
                node.unauthorised += 1
                self._reply({"error": "Unauthorized"}, 401)
                return None
            return url.path

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def do_GET(self) -> None:
            path = self._route()
            if path is None:
                return
            if path == "/info":
                self._reply(
                    {
                        "version": "2.2.1",
                        "taskQueueCount": 0,
                        "maxParallelTasks": 2,
                        "engine": "odm",
                        "engineVersion": "3.6.0",
                    }
                )
                return
            match = re.fullmatch(r"/task/([^/]+)/(info|output|download/all\.zip)", path)
            task = node.tasks.get(match.group(1)) if match else None
            if match is None or task is None:
                self._reply({"error": "Invalid route"}, 404)
            elif match.group(2) == "info":
                self._reply(
                    {
                        "uuid": task.uuid,
                        "name": task.fields.get("name", ""),
                        "dateCreated": int(time.time() * 1000),
                        "processingTime": 1000,
                        "status": {"code": task.status()},
                        "options": [],
                        "imagesCount": len(task.files),
                        "progress": 50,
                    }
                )
            elif match.group(2) == "output":
                self._reply(["child console line", "[ERROR]   the child failed"])
            else:
                data = _all_zip(task)
                task.downloaded = True
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        def do_POST(self) -> None:
            path = self._route()
            if path is None:
                return
            body = self._body()
            content_type = self.headers.get("Content-Type", "")
            if path == "/task/new/init":
                fields = {n: v.decode() for n, _, v in _multipart(content_type, body)}
                self._reply({"uuid": node.new_task(fields).uuid})
            elif path.startswith("/task/new/upload/"):
                task = node.tasks[path.rsplit("/", 1)[1]]
                for _, filename, payload in _multipart(content_type, body):
                    assert filename is not None
                    task.files[filename] = payload
                self._reply({"success": True})
            elif path.startswith("/task/new/commit/"):
                task = node.tasks[path.rsplit("/", 1)[1]]
                task.committed = True
                self._reply({"uuid": task.uuid})
            elif path == "/task/remove":
                task_uuid = parse_qs(body.decode())["uuid"][0]
                node.tasks[task_uuid].removed = True
                self._reply({"success": True})
            else:
                self._reply({"error": "Invalid route"}, 404)

    return Handler


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[int], list[int]]], tuple[FakeNode, str]]]:
    """Start a fake node with a status script; returns it and its URL (with the token)."""
    servers: list[ThreadingHTTPServer] = []

    def start(script: Callable[[int], list[int]]) -> tuple[FakeNode, str]:
        node = FakeNode(script)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(node))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return node, f"http://127.0.0.1:{server.server_address[1]}/?token={TOKEN}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture
def project_path(tmp_path: Path) -> Path:
    """Nine geotagged images (ODM splits only datasets with GPS)."""
    images = tmp_path / PROJECT / "images"
    images.mkdir(parents=True)
    for n in range(9):
        exif = exif_block("DJI", "FC6310", 46.5 + n * 0.0002, 7.25 + n * 0.0003, 612.5)
        (images / f"DJI_{n:04d}.JPG").write_bytes(jpeg(640, 480, exif))
    return tmp_path


def _command(project_path: Path, url: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "odm_test_engine",
        "--split", "3", "--split-overlap", "50", "--sm-cluster", url,
        "--dsm", "--orthophoto-resolution", "2", "--crop", "0", "--pc-las", "--tiles",
        *extra,
        "--project-path", str(project_path), PROJECT,
    ]  # fmt: skip


def _env(seconds: float) -> dict[str, str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:  # PGUP never to 6367
        sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODM_TEST_ENGINE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ENGINE_SRC), env.get("PYTHONPATH")) if p)
    env.update(
        no_ansiesc="1",
        ODM_TEST_ENGINE_SECONDS=str(seconds),
        ODM_TEST_ENGINE_RETRY_S="0.1",
        ODM_TEST_ENGINE_POLL_S="0.1",
        ODM_TEST_ENGINE_PROGRESS_PORT=str(port),
    )
    return env


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return ANSI.sub("", self.stdout).splitlines()

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))


def run_engine(project_path: Path, url: str, seconds: float = 2.0) -> Run:
    done = subprocess.run(
        _command(project_path, url),
        env=_env(seconds),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def _completed(_n: int) -> list[int]:
    return [RUNNING, COMPLETED]


# --------------------------------------------------------------------------------------- tests


def test_split_merge_processes_submodels_locally_and_remotely(
    project_path: Path, serve: Callable[[Callable[[int], list[int]]], tuple[FakeNode, str]]
) -> None:
    node, url = serve(_completed)
    result = run_engine(project_path, url)
    assert result.code == 0, result.stdout + result.stderr
    project = project_path / PROJECT
    lines = result.lines

    markers = [
        line for line in lines if re.fullmatch(r"\[INFO\]    (Running|Finished) \w+ stage", line)
    ]
    stages = [m.split()[2] for m in markers[::2]]
    assert stages == ["dataset", "split", "merge", "odm_postprocess"]
    assert (
        "[INFO]    Dataset has been split into 3 submodels. Reconstructing each submodel..."
        in lines
    )
    assert "[INFO]    LRE: Node is online and running odm version 3.6.0" in lines
    assert any(
        re.fullmatch(r"\[INFO\]    LRE: Initializing using cluster node 127\.0\.0\.1:\d+", line)
        for line in lines
    )

    submodels = sorted(p.name for p in (project / "submodels").iterdir())
    assert submodels == ["submodel_0000", "submodel_0001", "submodel_0002"]
    for name in submodels:
        images = sorted((project / "submodels" / name / "images").iterdir())
        assert len(images) == 3 and all(p.is_symlink() and p.is_file() for p in images)
        assert not (project / "submodels" / name / "seed.zip").exists()
        assert (project / "submodels" / name / "toolchain_completed.txt").is_file()

    local = result.count(r"^\[INFO\]    Local Toolchain submodel_\d{4}$")
    remote = [t for t in node.committed() if t.downloaded]
    assert local >= 1 and len(remote) >= 1, result.stdout
    assert local + len(remote) == 3
    assert result.count(r"LRE: submodel_\d{4} finished successfully$") == 3
    assert result.count(r"LRE: Upload of submodel_\d{4} at \[100%\]") == len(remote)

    for task in remote:
        names = set(task.files)
        assert "seed.zip" in names and len(names) == 4
        with zipfile.ZipFile(io.BytesIO(task.files["seed.zip"])) as seed:
            assert set(seed.namelist()) == SEED_NAMES
            assert seed.read("opensfm/features/empty") == b""
        options = {o["name"]: o["value"] for o in json.loads(task.fields["options"])}
        assert options == {
            "dsm": True,
            "orthophoto-resolution": "2",
            "crop": "0.015625",
            "orthophoto-cutline": True,
            "dem-euclidean-map": True,
            "skip-3dmodel": True,
            "skip-report": True,
        }
        assert task.fields["skipPostProcessing"] == "true"
        assert json.loads(task.fields["outputs"]) == TOOLCHAIN_OUTPUTS
        assert task.removed
        submodel = next(
            p
            for p in (project / "submodels").iterdir()
            if (p / "images" / sorted(names)[0]).exists()
        )
        laz = submodel / "odm_georeferencing" / "odm_georeferenced_model.laz"
        assert laz.read_text() == f"fake output of {task.uuid}"
    assert node.unauthorised == 0

    local_dirs = [
        p
        for p in (project / "submodels").iterdir()
        if (p / "odm_orthophoto" / "cutline.gpkg").read_bytes().startswith(b"SQLite format 3")
    ]
    assert len(local_dirs) == local
    for submodel in local_dirs:
        assert (submodel / "odm_orthophoto" / "odm_orthophoto_feathered.tif").is_file()
        assert (submodel / "odm_dem" / "dsm.euclideand.tif").is_file()
        assert not (submodel / "odm_report" / "report.pdf").exists()

    for merged in (
        "odm_orthophoto/odm_orthophoto.tif",
        "odm_dem/dsm.tif",
        "odm_georeferencing/odm_georeferenced_model.laz",
        "odm_report/shots.geojson",
        "cameras.json",
        "log.json",
    ):
        assert (project / merged).is_file(), merged
    assert not (project / "odm_dem" / "dtm.tif").exists()
    assert "[INFO]    Merging point clouds" in lines
    assert "[INFO]    Merging DSMs" in lines
    assert "[INFO]    LRE: No remote tasks left to cleanup" in lines
    assert json.loads((project / "log.json").read_text())["success"] is True


def test_queued_task_is_removed_and_requeued(
    project_path: Path, serve: Callable[[Callable[[int], list[int]]], tuple[FakeNode, str]]
) -> None:
    node, url = serve(lambda n: [QUEUED] if n == 0 else [RUNNING, COMPLETED])
    result = run_engine(project_path, url)
    assert result.code == 0, result.stdout + result.stderr
    first = node.tasks[node.order[0]]
    assert first.removed and not first.downloaded
    assert result.count(r"LRE: submodel_\d{4} failed with: Task limit reached$") == 1
    assert result.count(r"LRE: Node task limit reached\. Setting max remote tasks to 0$") == 1
    assert result.count(r"LRE: Re-queueing submodel_\d{4} \(retries: 0\)$") == 1
    assert result.count(rf"LRE: Cleaning up remote task \({first.uuid}\)\.\.\. OK$") == 1
    assert result.count(r"LRE: submodel_\d{4} finished successfully$") == 3
    assert all(task.removed for task in node.tasks.values())
    assert (project_path / PROJECT / "odm_orthophoto" / "odm_orthophoto.tif").is_file()


def test_failed_child_fails_the_run(
    project_path: Path, serve: Callable[[Callable[[int], list[int]]], tuple[FakeNode, str]]
) -> None:
    node, url = serve(lambda _n: [RUNNING, FAILED])
    result = run_engine(project_path, url)
    assert result.code == 1, result.stdout + result.stderr
    assert node.committed()
    assert result.count(r"LRE: submodel_\d{4} failed with: \(.+\) failed with task output: ") >= 1
    assert "pyodm.exceptions.TaskFailedError: (" in result.stderr
    assert "[ERROR]   the child failed" in result.stderr
    assert all(task.removed for task in node.tasks.values())
    assert result.count(r"Re-queueing") == 0
    assert "[INFO]    Running merge stage" not in result.lines
    log = json.loads((project_path / PROJECT / "log.json").read_text())
    assert log["success"] is False and log["error"]["code"] == 1
    error_logs = list((project_path / PROJECT / "submodels").glob("*/error.log"))
    assert error_logs and "the child failed" in error_logs[0].read_text()


def test_sigterm_removes_remote_tasks_before_exiting(
    project_path: Path, serve: Callable[[Callable[[int], list[int]]], tuple[FakeNode, str]]
) -> None:
    node, url = serve(lambda _n: [RUNNING])  # the node never finishes
    process = subprocess.Popen(
        _command(project_path, url),
        env=_env(30.0),  # the local submodel takes 7 s: the node gets the other two
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while len(node.committed()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(node.committed()) == 2
        time.sleep(0.2)  # let the uploads register their tasks for cleanup
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, stdout + stderr
    lines = ANSI.sub("", stdout).splitlines()
    assert "[WARNING] Caught TERM/INT signal, attempting to exit gracefully..." in lines
    for task in node.committed():
        assert task.removed
        assert f"[INFO]    LRE: Removing remote task {task.uuid}... OK" in lines
    assert not (project_path / PROJECT / "log.json").exists()
