"""Local executor: each attempt is a detached runner process (``scaleodm.run.runner``, the run
package) and a run directory.

Runners are forked from the run package's fork server (``scaleodm.run.forking``, driven by
``RunnerForker``), started with the executor and warm before the scheduler says it is ready: a
runner then starts in milliseconds instead of the 1-2 s of a fresh interpreter importing the run
package, and the first task after a start is as quick as any other. Without the server (it did
not start, or died: it is started again, ``FORK_SERVER_RETRY_S`` apart) a runner is spawned as
``python -m scaleodm.run.runner <run dir>``; either way it is the same process in its own session.

Idempotency mirrors Argo's deterministic names: the run directory is named after uuid + attempt
and created with ``mkdir`` (the claim), so a redelivered create finds it and changes nothing. A
claim whose runner never started (the scheduler died between the two) is started again. Runs must
share a host with the watcher (``SCALEODM_LOCAL__RUNS_DIR``); any scheduler on that host can
cancel any run, since the runner's pid is in its directory.

A run that cannot be prepared raises ``RunNotStartedError``, whose text may reach the task's
errorMessage: it never carries the run directory's path or the OS error (both are logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from scaleodm.common import localruns, splitmerge, tracing
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.contracts.ids import run_name
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import EngineKind, SplitSettings
from scaleodm.run import forking, runner
from scaleodm.scheduler.executors.base import StartOutcome

log = get_logger(__name__)
# The runner's and the fork server's modules, run with ``python -m`` (named from the modules, so
# they follow them).
RUNNER_MODULE = runner.__name__
FORK_SERVER_MODULE = forking.__name__
FORK_SERVER_READY_TIMEOUT_S = 30.0  # imports and warm-up; beyond, runners are spawned
FORK_REPLY_TIMEOUT_S = 10.0  # one fork; a server that does not answer is replaced
FORK_SERVER_RETRY_S = 30.0  # between two starts of the server
FORK_SERVER_STOP_TIMEOUT_S = 2.0


class RunNotStartedError(RuntimeError):
    """The run directory or the runner process could not be created (details in the log)."""


class RunnerForker:
    """The scheduler's end of the runner fork server (``scaleodm.run.forking``, its protocol).

    ``start`` starts the server and waits (bounded) for its ``ready``; ``fork`` asks it for one
    runner. A server that exits, fails a request or does not answer in time is stopped and never
    asked again (a late answer could be taken for the next request's); ``fork`` then answers
    None, the caller spawns the runner itself, and a new server is started in the background at
    most every ``FORK_SERVER_RETRY_S``. A fork whose answer was lost may have happened: the
    spawned runner then finds the run's lock taken and exits, so one runner runs either way.
    """

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._starting: asyncio.Task[bool] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._last_start = -math.inf

    @property
    def ready(self) -> bool:
        """A server is there to fork runners."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self, timeout_s: float = FORK_SERVER_READY_TIMEOUT_S) -> bool:
        """Start the server; True once it said ``ready`` within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        self._last_start = loop.time()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", FORK_SERVER_MODULE,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                # its log lines are the scheduler's
            )
        except OSError as exc:
            log.warning("runner fork server not started; runners are spawned",
                        error=repr(exc))
            return False
        try:
            ready = await _wait_ready(proc, timeout_s)
        except BaseException:  # cancelled (a stop during the start): no server left behind
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        if not ready:
            log.warning("runner fork server not ready; runners are spawned",
                        timeout_s=timeout_s, exit_code=proc.returncode)
            await _stop_server(proc)
            return False
        async with self._lock:
            old, self._proc = self._proc, proc
        if old is not None:
            await _stop_server(old)
        log.info("runner fork server ready", pid=proc.pid,
                 start_s=round(loop.time() - self._last_start, 3))
        return True

    async def fork(self, path: Path) -> int | None:
        """The pid of the runner forked for the run directory ``path``; None without a server."""
        async with self._lock:
            proc = self._proc
            if proc is None or proc.returncode is not None:
                self._proc = None
                self._restart_later()
                return None
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(os.fsencode(path) + b"\n")
                await proc.stdin.drain()
                line = await asyncio.wait_for(proc.stdout.readline(), FORK_REPLY_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                line, error = b"", repr(exc)
            except asyncio.CancelledError:  # its answer is still to come: never ask it again
                self._proc = None
                stopping = asyncio.get_running_loop().create_task(_stop_server(proc))
                self._stopping.add(stopping)
                stopping.add_done_callback(self._stopping.discard)
                raise
            else:
                error = "closed" if not line else ""
            answer = line.strip()
            if answer.isdigit():
                return int(answer)
            if answer == forking.ERROR:  # one fork failed (the server logged why); it goes on
                return None
            log.warning("runner fork server lost; runners are spawned until it is back",
                        error=error or repr(answer[:80]), exit_code=proc.returncode)
            self._proc = None
        await _stop_server(proc)
        self._restart_later()
        return None

    def _restart_later(self) -> None:
        loop = asyncio.get_running_loop()
        if self._starting is not None and not self._starting.done():
            return
        if loop.time() - self._last_start < FORK_SERVER_RETRY_S:
            return
        self._starting = loop.create_task(self.start(), name="runner-fork-server")

    async def close(self) -> None:
        """Stop the server (runs it forked go on) and a start in flight."""
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        async with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            await _stop_server(proc)
        await asyncio.gather(*self._stopping)


async def _wait_ready(proc: asyncio.subprocess.Process, timeout_s: float) -> bool:
    """True once the server said ``ready`` (whatever an import printed before is skipped);
    False when it exited or took longer than ``timeout_s``."""
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout_s):
            while line := await proc.stdout.readline():
                if line.strip() == forking.READY:
                    return True
    except TimeoutError:
        pass
    return False


async def _stop_server(proc: asyncio.subprocess.Process) -> None:
    """End of input (the server exits at once), then SIGKILL if it lingers."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), FORK_SERVER_STOP_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


class LocalExecutor:
    def __init__(self, runs_dir: Path, engine: EngineKind,
                 split: SplitSettings | None = None) -> None:
        self.runs_dir = runs_dir
        self.engine = engine
        self.split = split or SplitSettings()
        self.forker = RunnerForker()
        self._children: list[subprocess.Popen[bytes]] = []
        runs_dir.mkdir(parents=True, exist_ok=True)
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def prepare(self) -> None:
        """Start the runner fork server and wait until it is warm (bounded): runners started
        from then on, the first one included, skip the interpreter's start and imports."""
        await self.forker.start()

    def _dir(self, task_id: str, attempt: int) -> localruns.RunDir:
        return localruns.RunDir(self.runs_dir / run_name(task_id, attempt))

    async def start(self, spec: RunSpec) -> StartOutcome:
        rd = self._dir(spec.task_id, spec.attempt)
        try:
            if not self._claim(rd, spec):
                return StartOutcome.EXISTS
            await self._launch(rd)
        except OSError as exc:
            log.error("run not started", run=str(rd.path), error=repr(exc))
            raise RunNotStartedError("the local run could not be prepared") from exc
        return StartOutcome.STARTED

    def _claim(self, rd: localruns.RunDir, spec: RunSpec) -> bool:
        """The run directory with its ``run.json``; False when the run exists already."""
        try:
            rd.path.mkdir()
        except FileExistsError:
            if rd.runner_started or rd.result is not None or rd.cancel_requested:
                return False
            log.warning("claimed run never started; starting it", run=rd.path.name)
        if rd.run is None:
            run: dict[str, object] = {"spec": spec.model_dump(mode="json"),
                                      "engine": self.engine.value}
            url = self._sm_cluster(spec)
            if url is not None:
                run[localruns.SM_CLUSTER] = url
            traceparent = tracing.current_traceparent()
            if traceparent is not None:  # the watcher continues it while it follows the run
                run[localruns.TRACEPARENT] = traceparent
            localruns.write_json_atomic(rd.file(localruns.RUN_FILE), run)
        return True

    def _sm_cluster(self, spec: RunSpec) -> str | None:
        """ODM's ``--sm-cluster`` for a run that splits (``splitmerge``): the gateway with a
        token scoped to the task. It goes into ``run.json`` (the run's own directory), never
        into a command or an event."""
        split = self.split
        if not (split.enabled and splitmerge.splits(spec.options)):
            return None
        assert split.token_key is not None and split.cluster_url is not None
        return splitmerge.cluster_url(split.cluster_url,
                                      splitmerge.scoped_token(split.token_key, spec.task_id))

    async def _launch(self, rd: localruns.RunDir) -> None:
        pid = await self.forker.fork(rd.path.resolve())
        if pid is not None:
            log.info("runner forked", run=rd.path.name, pid=pid)
            return
        self._spawn(rd)

    def _spawn(self, rd: localruns.RunDir) -> None:
        with rd.file(localruns.RUNNER_LOG).open("ab") as log_fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", RUNNER_MODULE, str(rd.path)],
                stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )
        self._children.append(proc)
        log.info("runner spawned", run=rd.path.name, pid=proc.pid)

    async def cancel(self, task_id: str, attempt: int) -> bool:
        """The ``cancel`` marker, then SIGTERM to a live runner. For a run not started (yet)
        the marker makes a bare claim: a start arriving later, on any replica, finds it and
        starts nothing; the watcher sets it aside after ``run_start_grace_s``, and ``remove``
        deletes it with the task's other runs."""
        rd = self._dir(task_id, attempt)
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.file(localruns.CANCEL_FILE).touch()
        pid = localruns.read_pid(rd.file(localruns.RUNNER_PID))
        if pid is None or not rd.runner_alive():
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            return True
        return False

    async def remove(self, task_id: str, attempt: int) -> None:
        for n in range(1, attempt + 1):
            await self.cancel(task_id, n)
        for n in range(1, attempt + 1):
            rd = self._dir(task_id, n)
            for _ in range(100):  # let a canceled runner finish before deleting its files
                if not rd.runner_alive():
                    break
                await asyncio.sleep(0.1)
            # In a thread: a run removed while running may hold a large project.
            await asyncio.to_thread(shutil.rmtree, rd.path, ignore_errors=True)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._children = [p for p in self._children if p.poll() is None]

    async def close(self) -> None:
        await self.forker.close()
        self._reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reaper
