"""Split-merge with a remote cluster node (``--split N --sm-cluster URL``), as ODM's client does it.

This imitates ODM 3.x's ``stages/splitmerge.py`` and ``opendm/remote.py`` (``LocalRemoteExecutor``,
``ToolchainTask``) closely enough that the node at ``--sm-cluster`` sees exactly what real ODM would
send it, through the same client library (PyODM): the submodel's images plus a ``seed.zip``, the
parent's options as ODM's ``get_submodel_args_dict`` rewrites them, ``skipPostProcessing`` and
ODM's list of toolchain ``outputs``; then polling, ``all.zip`` download and task removal.

Simplifications, on purpose:

* ODM runs the executor twice: first ``ReconstructionTask`` (OpenSfM on each submodel), then, after
  aligning the submodels, ``ToolchainTask`` (the rest of the pipeline). The double runs **only the
  toolchain phase**; its seed files (``opensfm/reconstruction.json``...) are placeholders written by
  the split itself. ``image_groups.txt`` and local split-merge (``--split`` alone) are not imitated.
* The local worker does not start a child ``run.py``: it logs the command ODM would run, waits its
  share of the run time and writes the child's placeholder outputs itself, in-process.
* A local submodel holding a failure-marker image fails the run at once (ODM would retry the local
  child like any non-TaskFailedError).

The thread layout, log lines, retry and "task limit" rules follow ODM: a queue of submodels, one
local worker processing one submodel at a time, one remote worker that sends the next submodel to
the node only while the local worker is busy, and one monitor thread per remote task.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from pyodm import Node  # type: ignore[import-untyped]
from pyodm import exceptions as odm_errors
from pyodm.types import TaskStatus  # type: ignore[import-untyped]

from . import artifacts
from .artifacts import Scene
from .cli import BOOLEAN_OPTIONS, Invocation, parse
from .failures import InjectedFailure, failure_marker
from .images import ImageInfo
from .stages import Context as StageContext
from .stages import Log, Step, Write, executed_stages, plan

SUBMODELS_DIR = "submodels"

#: Stages of a split-merge parent: ODM's merge jumps straight to the last stage afterwards.
PARENT_STAGES: tuple[str, ...] = ("dataset", "split", "merge", "odm_postprocess")

#: Cumulative progress at the end of split and merge when they do work (scaleodm.md §11).
END_PROGRESS: dict[str, float] = {"split": 75.0, "merge": 100.0}

#: Share of the run time per parent stage: their progress increments.
TIME_WEIGHT: dict[str, float] = {
    "dataset": 5.0,
    "split": 70.0,
    "merge": 25.0,
    "odm_postprocess": 0.0,
}

#: ToolchainTask's seed files, relative to the submodel root (sent in ``seed.zip`` when present).
SEED_FILES: tuple[str, ...] = (
    "opensfm/camera_models.json",
    "opensfm/reference_lla.json",
    "opensfm/reconstruction.json",
    "opensfm/tracks.csv",
)
#: Empty files ODM adds to ``seed.zip``; the child detects a submodel run by ``features/empty``.
SEED_TOUCH_FILES: tuple[str, ...] = (
    "opensfm/features/empty",
    "opensfm/matches/empty",
    "opensfm/exif/empty",
)
#: What ToolchainTask asks the node to put in ``all.zip`` (NodeODM ``outputs``).
TOOLCHAIN_OUTPUTS: tuple[str, ...] = (
    "odm_orthophoto/cutline.gpkg",
    "odm_orthophoto/odm_orthophoto_cut.tif",
    "odm_orthophoto/odm_orthophoto_feathered.tif",
    "odm_dem",
    "odm_report",
    "odm_georeferencing",
)

#: ``get_submodel_argv``'s ``remove_always`` (ODM also lists ``copy-to``, but spelled so that it
#: never matches: real ODM forwards ``copy-to``, and so does the double).
REMOVED_OPTIONS = frozenset(
    {
        "split", "split-overlap", "rerun-from", "rerun", "gcp", "end-with", "sm-cluster",
        "rerun-all", "pc-csv", "pc-las", "pc-ept", "tiles", "cog",
    }
)  # fmt: skip
#: ``get_submodel_argv``'s ``assure_always``: booleans every submodel gets.
ASSURED_OPTIONS: tuple[str, ...] = (
    "orthophoto-cutline",
    "dem-euclidean-map",
    "skip-3dmodel",
    "skip-report",
)
#: ``read_json_always``: a path or JSON string, forwarded as a JSON string.
JSON_OPTIONS = frozenset({"cameras", "boundary"})

MAX_RETRIES = 5  # ODM's Task(max_retries=5)
#: Longest wait for the removal of remote tasks when the run is interrupted (best effort, bounded
#: so that SIGTERM still ends the process well inside Kubernetes' default 30 s grace period).
CLEANUP_BUDGET_S = 10.0
_YIELD_S = 0.05  # ODM's remote worker: pause after handing a task back to the local worker
_LIMIT_WAIT_S = 2.0  # ODM's remote worker: pause while the node's task limit is reached
_MAIN_POLL_S = 0.05  # main thread: how often to look at the counters (ODM: 0.5)


class SplitMergeError(Exception):
    """A split-merge problem ODM reports as ``ExitException``: an ``[ERROR]`` line and exit 1."""


class ToolchainFailed(Exception):
    """A submodel could not be processed (ODM raises the executor's error out of the split stage).

    ``kind`` is the qualified name of the original error, for the traceback-like report.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class NodeTaskLimitReached(Exception):
    """The node queued the task instead of running it (ODM: NodeTaskLimitReachedException)."""


# ------------------------------------------------------------------------------ PyODM surface


class RemoteTaskInfo(Protocol):
    """The fields of ``pyodm.types.TaskInfo`` the executor reads."""

    status: Any  # pyodm.types.TaskStatus
    processing_time: int
    output: list[str]


class RemoteTask(Protocol):
    """The part of ``pyodm.api.Task`` ODM's client uses."""

    uuid: str

    def info(self, with_output: int | None = None) -> RemoteTaskInfo: ...
    def output(self, line: int = 0) -> list[str]: ...
    def remove(self) -> bool: ...
    def wait_for_completion(
        self, status_callback: Callable[[RemoteTaskInfo], None] | None = None, interval: float = 3
    ) -> None: ...
    def download_assets(
        self, destination: str, progress_callback: Callable[[float], None] | None = None
    ) -> str: ...


class ClusterNode(Protocol):
    """The part of ``pyodm.api.Node`` ODM's client uses."""

    host: str
    port: int

    def info(self) -> Any: ...
    def create_task(
        self,
        files: list[str],
        options: dict[str, str | bool],
        *,
        progress_callback: Callable[[float], None] | None = None,
        skip_post_processing: bool = False,
        outputs: list[str] | None = None,
    ) -> RemoteTask: ...


# ------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Submodel:
    """One submodel: ``<project>/submodels/submodel_NNNN`` and its images (sorted by name)."""

    index: int
    root: Path
    images: tuple[ImageInfo, ...]

    @property
    def name(self) -> str:
        return self.root.name

    def __str__(self) -> str:  # ODM logs tasks by the submodel directory name
        return self.name


def layout(project_dir: Path, images: Sequence[ImageInfo], size: int) -> list[Submodel]:
    """Cut the images (sorted by name) into ``ceil(count / size)`` submodels of about ``size``.

    ODM's OpenSfM clusters by position with an overlap; consecutive names stand in for that.
    """
    ordered = sorted(images, key=lambda image: image.filename)
    count = math.ceil(len(ordered) / size)
    per = math.ceil(len(ordered) / count)
    return [
        Submodel(
            n,
            project_dir / SUBMODELS_DIR / f"submodel_{n:04d}",
            tuple(ordered[n * per : (n + 1) * per]),
        )
        for n in range(count)
    ]


def seed_steps(submodel: Submodel) -> list[Write]:
    """The submodel's seed inputs (placeholders), relative to the *parent* project directory."""
    scene = Scene.from_images(submodel.images)
    prefix = f"{SUBMODELS_DIR}/{submodel.name}"
    return [
        Write(f"{prefix}/opensfm/camera_models.json", artifacts.cameras_json(scene)),
        Write(f"{prefix}/opensfm/reference_lla.json", artifacts.reference_lla_json(scene)),
        Write(f"{prefix}/opensfm/reconstruction.json", artifacts.reconstruction_json(scene)),
        Write(f"{prefix}/opensfm/tracks.csv", artifacts.tracks_csv(scene)),
    ]


def link_images(submodel: Submodel, images_dir: Path) -> None:
    """Link the submodel's images to the parent's, relatively (OpenSfM's create_submodels links)."""
    target_dir = submodel.root / "images"
    target_dir.mkdir(parents=True, exist_ok=True)
    for image in submodel.images:
        link = target_dir / image.filename
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(images_dir / image.filename, target_dir))


# -------------------------------------------------------------------------------- child options


def submodel_options(invocation: Invocation) -> dict[str, str | bool]:
    """The options of a submodel run, as ODM's ``get_submodel_args_dict``.

    Only options given on the parent's command line are forwarded (ODM looks at the ``*_is_set``
    markers), minus :data:`REMOVED_OPTIONS`, plus :data:`ASSURED_OPTIONS`. Values stay the strings
    of the command line; booleans are ``True``. ``--crop 0`` becomes ``0.015625`` (DEM merging
    needs cropped DEMs).
    """
    result: dict[str, str | bool] = {}
    for name, value in invocation.options.items():
        if name in REMOVED_OPTIONS or name in ("project-path", "name"):
            continue
        if name in BOOLEAN_OPTIONS or isinstance(value, bool):
            if invocation.flag(name):
                result[name] = True
            continue
        if name == "crop" and _is_zero(value):
            value = str(0.015625)
        elif name in JSON_OPTIONS:
            value = _json_string(value)
        result[name] = value
    for name in ASSURED_OPTIONS:
        result[name] = True
    return result


def submodel_argv(options: dict[str, str | bool], submodels_path: Path, name: str) -> list[str]:
    """The command line of a local submodel run (ODM's ``get_submodel_argv`` with a path)."""
    argv: list[str] = []
    for option, value in options.items():
        argv.append(f"--{option}")
        if value is not True:
            argv.append(str(value))
    return [*argv, "--project-path", str(submodels_path), name]


def _is_zero(value: str) -> bool:
    try:
        return float(value) == 0.0
    except ValueError:
        return False


def _json_string(value: str) -> str:
    """A path to a JSON file or a JSON string, as one JSON string (ODM: path_or_json_string...)."""
    try:
        path = Path(value)
        text = path.read_text() if path.is_file() else value
        return json.dumps(json.loads(text))
    except (OSError, ValueError):
        return value


# ----------------------------------------------------------------------------- the executor


@dataclass
class _Job:
    """ODM's ``ToolchainTask``: a submodel with its retry state and current remote task."""

    submodel: Submodel
    retries: int = 0
    wait_until: float = 0.0  # time.monotonic()
    remote: RemoteTask | None = None

    def __str__(self) -> str:
        return str(self.submodel)


@dataclass
class ExecutorSettings:
    """What the executor needs from the engine (all times in seconds)."""

    url: str
    options: dict[str, str | bool]
    local_seconds: float  # how long one local submodel takes, its images aside
    retry_s: float  # ODM's Task(retry_timeout=10): backoff unit
    poll_s: float  # PyODM's wait_for_completion(interval=3)
    started: datetime
    log: Callable[[str, str], None]
    write: Callable[[Path, bytes], None]
    on_finished: Callable[[int, int], None] = field(default=lambda _done, _total: None)
    per_image_s: float = 0.0  # and per image of it (ODM_TEST_ENGINE_SECONDS_PER_IMAGE)


class LocalRemoteExecutor:
    """ODM's ``LocalRemoteExecutor.run(ToolchainTask)`` for a list of submodels (one phase).

    :meth:`run` blocks until every submodel is processed (locally or on the node) or one has failed
    for good, then raises that failure. :meth:`exit_gracefully` is the SIGTERM path: remove the
    remote tasks still known, within :data:`CLEANUP_BUDGET_S`.
    """

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        self.node: ClusterNode = Node.from_url(settings.url)
        self.node_online = True
        self.started = False
        self.tasks: list[RemoteTask] = []  # every remote task not removed yet (cleanup list)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._local_processing = False
        self._max_remote_tasks: int | None = None
        self._finished = 0
        self._remote_running = 0
        self._total = 0
        self._threads: list[threading.Thread] = []

    def _log(self, level: str, message: str) -> None:
        self.settings.log(level, message)

    def connect(self) -> None:
        """Greet the node as ODM does; an offline node means "all local", not a failure."""
        self._log("INFO", f"LRE: Initializing using cluster node {self.node.host}:{self.node.port}")
        try:
            info = self.node.info()
        except odm_errors.NodeConnectionError:
            self._log(
                "WARNING",
                "LRE: The node seems to be offline! We'll still process the dataset, but it's "
                "going to run entirely locally.",
            )
            self.node_online = False
            return
        except Exception as error:
            raise SplitMergeError(
                f"LRE: An unexpected problem happened while opening the node connection: {error}"
            ) from None
        self._log(
            "INFO", f"LRE: Node is online and running {info.engine} version {info.engine_version}"
        )

    # ----------------------------------------------------------------------------------- run

    def run(self, submodels: Sequence[Submodel]) -> None:
        """Process every submodel; raise the first final error (after cleaning up, as ODM)."""
        self._total = len(submodels)
        for submodel in submodels:
            self._log("INFO", f"LRE: Adding to queue {submodel.root}")
            self._queue.put(_Job(submodel))
        workers = [threading.Thread(target=self._local_worker, daemon=True)]
        if self.node_online:
            workers.append(threading.Thread(target=self._remote_worker, daemon=True))
        self.started = True
        for worker in workers:
            worker.start()
        while self._finished < self._total and self._error is None:
            time.sleep(_MAIN_POLL_S)
        for _ in workers:
            self._queue.put(None)
        for worker in workers:
            worker.join()
        for monitor in list(self._threads):
            monitor.join()
        self._cleanup_remote_tasks()
        self.started = False
        error = self._error
        if error is None:
            return
        if isinstance(error, odm_errors.NodeConnectionError):
            # ODM: "Try not to leak access token" (the URL in the message carries it)
            raise ToolchainFailed(
                "pyodm.exceptions.NodeConnectionError",
                "A connection error happened. Check the connection to the processing node and "
                "try again.",
            )
        if isinstance(error, ToolchainFailed | SplitMergeError | InjectedFailure):
            raise error
        raise ToolchainFailed(f"{type(error).__module__}.{type(error).__qualname__}", str(error))

    def exit_gracefully(self) -> None:
        """SIGTERM/SIGINT: remove every remote task still known, bounded in time (best effort)."""
        self._log("WARNING", "Caught TERM/INT signal, attempting to exit gracefully...")
        cleaner = threading.Thread(target=self._cleanup_remote_tasks, daemon=True)
        cleaner.start()
        cleaner.join(CLEANUP_BUDGET_S)
        if cleaner.is_alive():
            self._log("WARNING", "LRE: Gave up waiting for the removal of remote tasks")

    def _cleanup_remote_tasks(self) -> None:
        tasks = list(self.tasks)
        if tasks:
            self._log("WARNING", "LRE: Attempting to cleanup remote tasks")
        else:
            self._log("INFO", "LRE: No remote tasks left to cleanup")
        for task in tasks:
            removed = _remove_safely(task)
            self._log(
                "INFO", f"LRE: Removing remote task {task.uuid}... {'OK' if removed else 'NO'}"
            )

    # ------------------------------------------------------------------------------- workers

    def _local_worker(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._error is not None:
                self._queue.task_done()
                return
            try:
                self._local_processing = True
                self._log("INFO", f"LRE: About to process {job} locally")
                self._process_local(job)
                self._handle_result(job, local=True)
            except BaseException as error:  # a worker must never die silently
                self._handle_result(job, local=True, error=error)
            finally:
                self._local_processing = False

    def _remote_worker(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._error is not None:
                self._queue.task_done()
                return
            if not self._local_processing:
                self._log(
                    "INFO", f"LRE: Yielding to local processing, sending {job} back to the queue"
                )
                self._queue.put(job)
                self._queue.task_done()
                time.sleep(_YIELD_S)
                continue
            limit = self._max_remote_tasks
            if limit is not None and self._remote_running >= limit:
                self._queue.put(job)
                self._queue.task_done()
                time.sleep(_LIMIT_WAIT_S)
                continue
            try:
                with self._lock:
                    self._remote_running += 1
                self._process_remote(job)
            except BaseException as error:  # reported through handle_result
                self._handle_result(job, local=False, error=error)

    # ------------------------------------------------------------------------------ local

    def _process_local(self, job: _Job) -> None:
        submodel = job.submodel
        completed = submodel.root / "toolchain_completed.txt"
        if completed.exists():
            self._log("INFO", f"Already processed toolchain for {submodel}")
            return
        self._log("INFO", "=============================")
        self._log("INFO", f"Local Toolchain {submodel}")
        self._log("INFO", "=============================")
        argv = submodel_argv(self.settings.options, submodel.root.parent, submodel.name)
        shown = " ".join(f'"{a}"' if "/" in a else a for a in ["python3", "/code/run.py", *argv])
        self._log("INFO", f"running {shown}")
        marked = failure_marker([submodel.root / "images" / i.filename for i in submodel.images])
        time.sleep(self.settings.local_seconds + self.settings.per_image_s * len(submodel.images))
        if marked is not None:
            raise InjectedFailure(marked, "split")
        child = parse(argv)
        context = StageContext(
            child, submodel.root, Scene.from_images(submodel.images), self.settings.started
        )
        for stage in executed_stages(child):
            for step in plan(stage, context):
                if isinstance(step, Write):
                    self.settings.write(submodel.root / step.path, step.data)
        self.settings.write(completed, b"Done!\n")

    # ----------------------------------------------------------------------------- remote

    def _process_remote(self, job: _Job) -> None:
        """Upload one submodel; a monitor thread then waits for it (ODM: execute_remote_task)."""
        self._log("INFO", f"LRE: About to process {job} remotely")
        remaining = job.wait_until - time.monotonic()
        if remaining > 0:
            self._log(
                "INFO", f"LRE: Waiting {math.ceil(remaining)} seconds before processing {job}"
            )
            time.sleep(remaining)
        root = job.submodel.root
        seed = self._seed_payload(root)
        files = sorted(str(p) for p in (root / "images").iterdir())
        files += [
            str(root / extra) for extra in ("gcp_list.txt", "geo.txt") if (root / extra).exists()
        ]
        files.append(str(seed))
        last_update = [0.0]

        def upload_progress(percentage: float) -> None:
            if time.monotonic() - last_update[0] >= 2 or int(percentage) == 100:
                self._log("INFO", f"LRE: Upload of {job} at [{int(percentage)}%]")
                last_update[0] = time.monotonic()

        try:
            task = self.node.create_task(
                files,
                self.settings.options,
                progress_callback=upload_progress,
                skip_post_processing=True,
                outputs=list(TOOLCHAIN_OUTPUTS),
            )
        finally:
            seed.unlink(missing_ok=True)
        job.remote = task
        self.tasks.append(task)
        info = task.info()
        if info.status in (TaskStatus.RUNNING, TaskStatus.COMPLETED):
            monitor = threading.Thread(target=self._monitor, args=(job, task), daemon=True)
            self._threads.append(monitor)
            monitor.start()
        elif info.status == TaskStatus.QUEUED:
            raise NodeTaskLimitReached("Task limit reached")
        else:
            raise RuntimeError(f"Could not send task to node, task status is {info.status}")
        # the upload is done, the processing is not (ODM's "partial" result): the monitor reports

    def _seed_payload(self, root: Path) -> Path:
        seed = root / "seed.zip"
        with zipfile.ZipFile(seed, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for relative in SEED_FILES:
                path = root / relative
                if path.is_dir():
                    for inner in sorted(p for p in path.rglob("*") if p.is_file()):
                        archive.write(inner, inner.relative_to(root).as_posix())
                elif path.is_file():
                    archive.write(path, relative)
            for relative in SEED_TOUCH_FILES:
                archive.writestr(relative, "")
        return seed

    def _monitor(self, job: _Job, task: RemoteTask) -> None:
        calls = [0]
        last_update = [0.0]

        def status_callback(info: RemoteTaskInfo) -> None:
            if info.status == TaskStatus.QUEUED:
                self._log(
                    "WARNING",
                    f"LRE: {job} ({task.uuid}) turned from RUNNING to QUEUED. Re-adding to back "
                    "of the queue.",
                )
                raise NodeTaskLimitReached("Delayed task limit reached")
            if info.status == TaskStatus.RUNNING:
                calls[0] += 1
                if calls[0] > 30:
                    self._log("INFO", f"LRE: {job} ({task.uuid}) is still running")
                    calls[0] = 0

        def download_progress(percentage: float) -> None:
            if time.monotonic() - last_update[0] >= 2 or int(percentage) == 100:
                self._log("INFO", f"LRE: Download of {job} at [{int(percentage)}%]")
                last_update[0] = time.monotonic()

        try:
            task.wait_for_completion(status_callback=status_callback, interval=self.settings.poll_s)
            self._log("INFO", f"LRE: Downloading assets for {job}")
            task.download_assets(str(job.submodel.root), progress_callback=download_progress)
            self._log("INFO", f"LRE: Downloaded and extracted assets for {job}")
            self.settings.write(job.submodel.root / "toolchain_completed.txt", b"Done!\n")
        except odm_errors.TaskFailedError as failed:
            self._handle_result(
                job, local=False, error=self._failure_with_output(job, task, failed)
            )
            return
        except BaseException as error:  # reported through handle_result
            self._handle_result(job, local=False, error=error)
            return
        self._handle_result(job, local=False)

    def _failure_with_output(
        self, job: _Job, task: RemoteTask, failed: BaseException
    ) -> BaseException:
        """ODM keeps the child's console in ``error.log`` and quotes its last ten lines."""
        try:
            lines = task.output()
            error_log = job.submodel.root / "error.log"
            self.settings.write(error_log, ("\n".join(lines) + "\n").encode())
        except Exception:  # ODM falls back to the bare error
            self._log("WARNING", f"LRE: Could not retrieve task output for {job} ({task.uuid})")
            return failed
        tail = "\n".join(lines[-10:])
        failure: BaseException = odm_errors.TaskFailedError(
            f"({task.uuid}) failed with task output: {tail}\nFull log saved at {error_log}"
        )
        return failure

    # ------------------------------------------------------------------------------ results

    def _handle_result(self, job: _Job, *, local: bool, error: BaseException | None = None) -> None:
        """ODM's ``handle_result`` (the final one; the partial one is the upload's task_done)."""
        if error is not None:
            self._log("WARNING", f"LRE: {job} failed with: {error}")
            limit_reached = isinstance(error, NodeTaskLimitReached)
            if limit_reached:
                self._estimate_task_limit()
            retryable = not isinstance(error, odm_errors.TaskFailedError | InjectedFailure)
            if job.retries < MAX_RETRIES and retryable:
                if not limit_reached:  # a full node is no fault of the task
                    job.retries += 1
                job.wait_until = time.monotonic() + job.retries * self.settings.retry_s
                self._cleanup_remote(job)
                self._queue.task_done()
                self._log("INFO", f"LRE: Re-queueing {job} (retries: {job.retries})")
                self._queue.put(job)
                if not local:
                    with self._lock:
                        self._remote_running -= 1
                return
            with self._lock:
                if self._error is None:
                    self._error = error
                self._finished += 1
                if not local:
                    self._remote_running -= 1
        else:
            self._log("INFO", f"LRE: {job} finished successfully")
            with self._lock:
                self._finished += 1
                if not local:
                    self._remote_running -= 1
                done = self._finished
            self.settings.on_finished(done, self._total)
        self._cleanup_remote(job)
        self._queue.task_done()

    def _cleanup_remote(self, job: _Job) -> None:
        task = job.remote
        if task is None:
            return
        removed = _remove_safely(task)
        self._log(
            "INFO", f"LRE: Cleaning up remote task ({task.uuid})... {'OK' if removed else 'NO'}"
        )
        if task in self.tasks:
            self.tasks.remove(task)
        job.remote = None

    def _estimate_task_limit(self) -> None:
        """ODM: count the node's tasks that really run; that many may run at once from now on."""
        with self._lock:
            if self._max_remote_tasks is not None:
                return
            running = 0
            for task in list(self.tasks):
                try:
                    info = task.info(with_output=-3)
                except odm_errors.OdmError:
                    continue
                if (
                    info.status == TaskStatus.RUNNING
                    and info.processing_time >= 0
                    and len(info.output) >= 3
                ):
                    running += 1
            self._max_remote_tasks = max(1, running)
        self._log("INFO", f"LRE: Node task limit reached. Setting max remote tasks to {running}")


def _remove_safely(task: RemoteTask) -> bool:
    try:
        return bool(task.remove())
    except odm_errors.OdmError:
        return False


# ----------------------------------------------------------------------------------- merge


def required_outputs(invocation: Invocation) -> list[str]:
    """What every submodel must hand back for the merge these options ask for."""
    merge = invocation.value("merge") or "all"
    required: list[str] = []
    if merge in ("all", "pointcloud"):
        required.append("odm_georeferencing/odm_georeferenced_model.laz")
    if merge in ("all", "orthophoto") and not invocation.flag("skip-orthophoto"):
        required += [
            "odm_orthophoto/odm_orthophoto_feathered.tif",
            "odm_orthophoto/odm_orthophoto_cut.tif",
        ]
    if merge in ("all", "dem"):
        required += [f"odm_dem/{p}.tif" for p in ("dsm", "dtm") if invocation.flag(p)]
    return required


def merge_plan(ctx: StageContext, submodels: Sequence[Submodel]) -> list[Step]:
    """ODM's merge stage over the submodels' outputs; a missing output is a SplitMergeError."""
    invocation = ctx.invocation
    submodels_path = ctx.project_dir / SUBMODELS_DIR
    if not submodels_path.is_dir():
        raise SplitMergeError(
            f"We reached the merge stage, but {submodels_path} folder does not exist. Something "
            "must have gone wrong at an earlier stage. Check the log and fix possible problem "
            "before restarting?"
        )
    for submodel in submodels:
        for relative in required_outputs(invocation):
            if not (submodel.root / relative).is_file():
                raise SplitMergeError(
                    f"Cannot merge: {submodel.root / relative} does not exist. Something must "
                    "have gone wrong at an earlier stage. Check the log and fix possible problem "
                    "before restarting?"
                )
    merge = invocation.value("merge") or "all"
    scene = ctx.scene
    paths = [str(s.root) for s in submodels]
    steps: list[Step] = []
    if merge in ("all", "pointcloud"):
        laz = "odm_georeferencing/odm_georeferenced_model.laz"
        inputs = " ".join(f'"{p}/{laz}"' for p in paths)
        steps += [
            Log("INFO", "Merging point clouds"),
            Log("INFO", f'running lasmerge -i {inputs} -o "{ctx.path(laz)}"'),
            Write(laz, artifacts.las(scene, ctx.started)),
        ]
        if invocation.flag("pc-ept"):
            steps.append(Log("INFO", "Creating Entwine Point Tile output"))
            for name, data in artifacts.ept_files(scene, ctx.started).items():
                steps.append(Write(f"entwine_pointcloud/{name}", data))
    bounds = [f"{p}/odm_georeferencing/odm_georeferenced_model.bounds.gpkg" for p in paths]
    steps.append(Log("INFO", f"Merging all crop bounds: {bounds}"))
    if merge in ("all", "orthophoto") and not invocation.flag("skip-orthophoto"):
        tif = "odm_orthophoto/odm_orthophoto.tif"
        steps += [
            Log("INFO", "Merging orthophotos"),
            Log("INFO", f"Found {len(submodels)} submodels with valid orthophotos and cutlines"),
            Log("INFO", f"{len(submodels)} valid orthophoto rasters to merge"),
            Write(tif, artifacts.orthophoto_tiff(scene)),
            Log("INFO", f"Wrote {ctx.path(tif)}"),
        ]
    if merge in ("all", "dem"):
        for product in ("dsm", "dtm"):
            if invocation.flag(product):
                dem = f"odm_dem/{product}.tif"
                steps += [
                    Log("INFO", f"Merging {product.upper()}s"),
                    Write(dem, artifacts.dem_tiff(scene, surface=product == "dsm")),
                    Log("INFO", f"Created {ctx.path(dem)}"),
                ]
    shots = [s for s in submodels if (s.root / "odm_report" / "shots.geojson").is_file()]
    cameras = [s for s in submodels if (s.root / "cameras.json").is_file()]
    steps += [
        Log("INFO", f"Merging {len(shots)} shots.geojson files"),
        Write("odm_report/shots.geojson", artifacts.shots_geojson(scene)),
        Log("INFO", f"Merging {len(cameras)} cameras.json files"),
        Write("cameras.json", artifacts.cameras_json(scene)),
    ]
    return steps
