"""Local executor: each attempt is a detached runner process (``python -m scaleodm.run.runner``,
the run package) and a run directory.

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
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from scaleodm.common import localruns
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.contracts.ids import run_name
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import EngineKind
from scaleodm.run import runner
from scaleodm.scheduler.executors.base import StartOutcome

log = get_logger(__name__)
# The runner's module, run with ``python -m`` (named from the module, so it follows it).
RUNNER_MODULE = runner.__name__


class RunNotStartedError(RuntimeError):
    """The run directory or the runner process could not be created (details in the log)."""


class LocalExecutor:
    def __init__(self, runs_dir: Path, engine: EngineKind) -> None:
        self.runs_dir = runs_dir
        self.engine = engine
        self._children: list[subprocess.Popen[bytes]] = []
        runs_dir.mkdir(parents=True, exist_ok=True)
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    def _dir(self, task_id: str, attempt: int) -> localruns.RunDir:
        return localruns.RunDir(self.runs_dir / run_name(task_id, attempt))

    async def start(self, spec: RunSpec) -> StartOutcome:
        rd = self._dir(spec.task_id, spec.attempt)
        try:
            return self._start(rd, spec)
        except OSError as exc:
            log.error("run not started", run=str(rd.path), error=repr(exc))
            raise RunNotStartedError("the local run could not be prepared") from exc

    def _start(self, rd: localruns.RunDir, spec: RunSpec) -> StartOutcome:
        try:
            rd.path.mkdir()
        except FileExistsError:
            if rd.runner_started or rd.result is not None or rd.cancel_requested:
                return StartOutcome.EXISTS
            log.warning("claimed run never started; starting it", run=rd.path.name)
        if rd.run is None:
            localruns.write_json_atomic(
                rd.file(localruns.RUN_FILE),
                {"spec": spec.model_dump(mode="json"), "engine": self.engine.value},
            )
        self._spawn(rd)
        return StartOutcome.STARTED

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
        self._reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reaper
