"""PyODM 1.5.13, unmodified, end to end against the session stack's gateway (nodeodm-api §12.1).

Covered: ``Node.info()`` (x.y.z version >= 1.5.1, so PyODM takes the chunked init -> upload ->
commit path and WebODM uses ``with_output``; ``maxImages`` None; integer queue count),
``Node.options()`` (80 ``NodeOption`` objects), ``create_task`` with 12 JPEGs uploaded in
parallel through the chunked flow (``skip_post_processing`` is only sent by that flow, so the
task's options prove it was used), ``wait_for_completion`` to COMPLETED with monotonic progress,
``Task.info(with_output=...)``, ``Task.output(line)`` with positive and negative lines,
``download_zip`` and ``download_assets``, ``cancel`` of a running task (CANCELED,
``TaskFailedError``, stays canceled), ``restart`` of canceled and completed tasks with new options
(same uuid, options replaced, runs to COMPLETED), ``remove`` (later calls raise
``NodeResponseError``), and error paths mapped to ``NodeResponseError`` (unknown task, invalid
options, bad or taken ``task_uuid``, restart of a running task).

Left out: ranged parallel downloads (the gateway does not advertise ``Accept-Ranges``; see
``tests/integration/test_downloads.py``), tokens (``test_token.py``), connection-error retries,
and the < 1.4.0 single-request fallback (this node is newer).

PyODM is synchronous: every call runs in a worker thread (``asyncio.to_thread``). Runs are the
ODM test double's 2 s runs.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pyodm import Node
from pyodm.api import Task
from pyodm.exceptions import NodeResponseError, TaskFailedError
from pyodm.types import NodeOption, TaskInfo, TaskStatus

from tests.harness import data
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration

N_IMAGES = 12
MAIN_OPTIONS = {"orthophoto-resolution": 4, "dsm": True, "feature-quality": "medium"}
THREE_ERRORS = (
    '[{"name":"feature-quality","error":"Invalid value super (not in enum)"},'
    '{"name":"fast-orthophoto","error":"Cannot convert maybe to boolean"},'
    '{"name":"orthophoto-resolution","error":"Invalid value -5 (out of range)"}]'
)
AUTO = [{"name": "pc-ept", "value": True}, {"name": "cog", "value": True},
        {"name": "gltf", "value": True}]
POLL_S = 0.3


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


def images(directory: Path, n: int) -> list[str]:
    return [str(data.write(directory / name, data.JPEG)) for name in data.image_names(n)]


async def wait_until(task: Task, done: Callable[[TaskInfo], bool], timeout_s: float = 30) -> (
    TaskInfo
):
    deadline = time.monotonic() + timeout_s
    while True:
        info: TaskInfo = await call(task.info)
        if done(info) or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.05)


async def holds(task: Task, status: TaskStatus, seconds: float) -> None:
    """The status stays put for ``seconds`` (a late run must not overwrite it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        info: TaskInfo = await call(task.info)
        assert info.status == status, info
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def node(stack: Stack) -> Node:
    return Node("127.0.0.1", stack.ports["gateway"])


class Completed:
    def __init__(self, task: Task, seen: list[TaskInfo], upload: list[float]) -> None:
        self.task = task
        self.seen = seen
        self.upload = upload


@pytest.fixture(scope="module")
async def completed(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Completed:
    """The main task: 12 images, chunked parallel upload, run to COMPLETED."""
    files = images(tmp_path_factory.mktemp("pyodm-images"), N_IMAGES)
    upload: list[float] = []
    task: Task = await call(node.create_task, files, options=MAIN_OPTIONS, name="pyodm-e2e",
                            progress_callback=upload.append, skip_post_processing=True)
    seen: list[TaskInfo] = []
    await call(task.wait_for_completion, status_callback=seen.append, interval=POLL_S)
    return Completed(task, seen, upload)


async def test_info(node: Node) -> None:
    info = await call(node.info)
    assert re.fullmatch(r"\d+\.\d+\.\d+", info.version), info.version
    assert Node.compare_version(info.version, "1.5.1") >= 0, info.version
    assert await call(node.version_greater_or_equal_than, "1.5.1")
    assert info.max_images is None
    assert isinstance(info.task_queue_count, int) and info.task_queue_count >= 0
    assert isinstance(info.max_parallel_tasks, int) and info.max_parallel_tasks >= 1
    assert isinstance(info.total_memory, int) and isinstance(info.available_memory, int)
    assert isinstance(info.cpu_cores, int) and info.cpu_cores >= 1
    assert info.engine == "odm"
    assert isinstance(info.engine_version, str) and len(info.engine_version) <= 32


async def test_options(node: Node) -> None:
    options = await call(node.options)
    assert len(options) == 80
    assert all(isinstance(o, NodeOption) for o in options)
    assert len({o.name for o in options}) == 80
    assert {o.type for o in options} <= {"int", "float", "bool", "string", "enum"}
    assert all(isinstance(o.value, str) and isinstance(o.help, str) for o in options)
    by_name = {o.name: o for o in options}
    assert by_name["dsm"].type == "bool" and by_name["dsm"].domain == ""
    assert isinstance(by_name["feature-quality"].domain, list)


async def test_create_task_chunked_to_completed(completed: Completed) -> None:
    info: TaskInfo = await call(completed.task.info)
    assert info.status == TaskStatus.COMPLETED
    assert info.uuid == completed.task.uuid
    assert info.name == "pyodm-e2e"
    assert info.images_count == N_IMAGES
    assert info.progress == 100
    assert info.processing_time > 0
    assert info.last_error == ""
    # skip_post_processing only travels with the chunked flow: no auto options prove it was used
    assert info.options == [
        {"name": "feature-quality", "value": "medium"}, {"name": "dsm", "value": True},
        {"name": "orthophoto-resolution", "value": 4},
    ]
    assert completed.upload and completed.upload[-1] == pytest.approx(100)
    progress = [i.progress for i in completed.seen]
    assert progress == sorted(progress), progress
    assert completed.seen[-1].status == TaskStatus.COMPLETED


async def test_task_info_with_output(completed: Completed) -> None:
    task = completed.task
    full: TaskInfo = await call(task.info, with_output=0)
    assert full.output and all(isinstance(line, str) for line in full.output)
    assert full.output == await call(task.output)
    tail: TaskInfo = await call(task.info, with_output=-3)
    assert tail.output == full.output[-3:]
    plain: TaskInfo = await call(task.info)
    assert plain.output == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(0, lambda full: full, id="all"),
        pytest.param(-3, lambda full: full[-3:], id="last-3"),
        pytest.param(5, lambda full: full[5:], id="from-5"),
        pytest.param(100_000, lambda full: [], id="past-end"),
    ],
)
async def test_output(
    completed: Completed, line: int, expected: Callable[[list[str]], list[str]]
) -> None:
    full = await call(completed.task.output)
    assert len(full) > 5
    assert await call(completed.task.output, line) == expected(full)


async def test_download_zip(completed: Completed, tmp_path: Path) -> None:
    path = Path(await call(completed.task.download_zip, str(tmp_path)))
    assert path.parent == tmp_path and path.name.endswith("_all.zip")
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
    assert "odm_orthophoto/odm_orthophoto.tif" in names
    assert "odm_dem/dsm.tif" in names  # dsm was asked for
    assert "task_output.txt" in names
    assert len({n.split("/", 1)[0] for n in names}) > 1, "no single top-level folder"


async def test_download_assets(completed: Completed, tmp_path: Path) -> None:
    dest = tmp_path / "assets"
    got = await call(completed.task.download_assets, str(dest))
    assert Path(got) == dest
    assert (dest / "odm_orthophoto" / "odm_orthophoto.tif").is_file()
    assert (dest / "odm_dem" / "dsm.tif").is_file()
    assert not list(dest.glob("*.zip")), "the archive is removed after extraction"


async def test_cancel_restart_remove(node: Node, tmp_path: Path) -> None:
    task: Task = await call(node.create_task, images(tmp_path, 3), options={"dsm": True},
                            name="pyodm-cancel")
    running = await wait_until(task, lambda i: i.status != TaskStatus.QUEUED and (
        i.status != TaskStatus.RUNNING or i.progress > 0))
    assert running.status == TaskStatus.RUNNING, running
    with pytest.raises(NodeResponseError, match="^Task cannot be restarted$"):
        await call(task.restart)

    assert await call(task.cancel) is True
    with pytest.raises(TaskFailedError):
        await call(task.wait_for_completion, interval=POLL_S)
    canceled: TaskInfo = await call(task.info)
    assert canceled.status == TaskStatus.CANCELED
    assert canceled.processing_time == -1
    await holds(task, TaskStatus.CANCELED, 2.5)  # the killed run must not flip it to 40
    assert await call(task.cancel) is True  # cancelling a canceled task is a no-op success

    assert await call(task.restart, {"orthophoto-resolution": 7}) is True
    restarted: TaskInfo = await call(task.info)
    assert restarted.uuid == task.uuid
    assert restarted.status in (TaskStatus.QUEUED, TaskStatus.RUNNING)
    await call(task.wait_for_completion, interval=POLL_S)
    final: TaskInfo = await call(task.info)
    assert final.status == TaskStatus.COMPLETED
    assert final.uuid == task.uuid
    assert final.options == [{"name": "orthophoto-resolution", "value": 7}, *AUTO]

    assert await call(task.remove) is True
    for method in (task.info, task.output, task.remove, task.cancel, task.restart):
        with pytest.raises(NodeResponseError, match=f"^{task.uuid} not found$"):
            await call(method)
    listed = {t["uuid"] for t in await call(node.get, "/task/list")}
    assert task.uuid not in listed


async def test_restart_completed_with_new_options(completed: Completed) -> None:
    task = completed.task
    before: TaskInfo = await call(task.info)
    assert before.status == TaskStatus.COMPLETED
    assert await call(task.restart, {"dsm": False, "orthophoto-resolution": 3}) is True
    after: TaskInfo = await call(task.info)
    assert after.uuid == task.uuid
    assert after.status in (TaskStatus.QUEUED, TaskStatus.RUNNING)
    assert after.date_created >= before.date_created
    assert after.processing_time == -1 or after.status == TaskStatus.RUNNING
    await call(task.wait_for_completion, interval=POLL_S)
    final: TaskInfo = await call(task.info)
    assert final.status == TaskStatus.COMPLETED
    # replaced wholesale, typed; no auto options (the task skips post-processing)
    assert final.options == [{"name": "dsm", "value": False},
                             {"name": "orthophoto-resolution", "value": 3}]
    assert final.images_count == N_IMAGES


UNKNOWN = str(uuid.uuid4())


@pytest.mark.parametrize(
    "action",
    [
        pytest.param(lambda t, _d: t.info(), id="info"),
        pytest.param(lambda t, _d: t.info(with_output=0), id="info-with-output"),
        pytest.param(lambda t, _d: t.output(), id="output"),
        pytest.param(lambda t, _d: t.output(-3), id="output-tail"),
        pytest.param(lambda t, _d: t.cancel(), id="cancel"),
        pytest.param(lambda t, _d: t.remove(), id="remove"),
        pytest.param(lambda t, _d: t.restart(), id="restart"),
        pytest.param(lambda t, _d: t.restart({"dsm": True}), id="restart-options"),
        pytest.param(lambda t, d: t.download_zip(str(d)), id="download-zip"),
        pytest.param(lambda t, _d: t.wait_for_completion(interval=POLL_S),
                     id="wait-for-completion"),
    ],
)
async def test_unknown_task_raises_node_response_error(
    node: Node, tmp_path: Path, action: Callable[[Task, Path], Any]
) -> None:
    task = node.get_task(UNKNOWN)
    with pytest.raises(NodeResponseError, match=f"^{UNKNOWN} not found$"):
        await call(action, task, tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"options": {"orthophoto-resolution": -5, "feature-quality": "super",
                                  "fast-orthophoto": "maybe"}},
                     f"^{re.escape(THREE_ERRORS)}$", id="invalid-options"),
        pytest.param({"task_uuid": "not-a-uuid"}, "^Invalid set-uuid: not-a-uuid$",
                     id="bad-task-uuid"),
        pytest.param({"task_uuid": "existing"}, "^Invalid set-uuid: ", id="taken-task-uuid"),
    ],
)
async def test_create_task_errors(
    node: Node, completed: Completed, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    if kwargs.get("task_uuid") == "existing":
        kwargs = {"task_uuid": completed.task.uuid}
        message += re.escape(completed.task.uuid) + "$"
    before = {t["uuid"] for t in await call(node.get, "/task/list")}
    with pytest.raises(NodeResponseError, match=message):
        await call(node.create_task, images(tmp_path, 2), **kwargs)
    assert {t["uuid"] for t in await call(node.get, "/task/list")} == before
