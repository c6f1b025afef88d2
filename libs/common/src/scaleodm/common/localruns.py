"""The local run directory: how the scheduler's runner and the watcher meet without Kubernetes.

One directory per attempt, named like the Argo Workflow would be (``run_name(task, attempt)``):

- ``run.json``     what to run (written by the scheduler before the runner starts, atomically)
- ``runner.lock``  held (flock) by the live runner for its whole life; free = no runner
- ``runner.pid``   the runner's pid (its own process group); present once the runner started
- ``engine.pid``   the engine's pid while it runs (its own process group)
- ``status.json``  the runner's phase: fetching | processing | packaging | uploading
- ``console.log``  the engine's stdout and stderr, appended as produced
- ``result.json``  the outcome, written last: completed | failed | canceled (+ error message)
- ``cancel``       marker: a cancel was requested
- ``work/``        the ODM project directory

Directory creation is the claim (``mkdir`` is atomic), the lock tells a live runner from a dead
one, and ``result.json`` is written with a rename, so a reader never sees half a result.

Once a run has its result, its outputs are in S3 (or it has none): the runner empties the
directory (``discard_work``) down to the small files above, which the watcher reads until it has
recorded the run's end. Removing the task deletes the directory itself (the executor's
``remove``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
LOCK_FILE = "runner.lock"
RUNNER_PID = "runner.pid"
ENGINE_PID = "engine.pid"
STATUS_FILE = "status.json"
CONSOLE_FILE = "console.log"
RESULT_FILE = "result.json"
CANCEL_FILE = "cancel"
WORK_DIR = "work"
RUNNER_LOG = "runner.log"
# The key of ``run.json`` holding ODM's ``--sm-cluster`` URL (with its token) for a run that
# splits (``splitmerge``); absent otherwise.
SM_CLUSTER = "sm_cluster"
# The key of ``run.json`` holding the trace the run belongs to (tracing.py), when traces are on.
TRACEPARENT = "traceparent"
# What ``discard_work`` keeps: the watcher's inputs (a few KiB, the console aside) and the log.
KEPT_FILES = frozenset({RUN_FILE, LOCK_FILE, RUNNER_PID, ENGINE_PID, STATUS_FILE, CONSOLE_FILE,
                        RESULT_FILE, CANCEL_FILE, RUNNER_LOG})


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class RunDir:
    path: Path

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def run(self) -> dict[str, Any] | None:
        data = read_json(self.file(RUN_FILE))
        return data if isinstance(data, dict) else None

    @property
    def result(self) -> dict[str, Any] | None:
        data = read_json(self.file(RESULT_FILE))
        return data if isinstance(data, dict) else None

    @property
    def phase(self) -> str | None:
        data = read_json(self.file(STATUS_FILE))
        return data.get("phase") if isinstance(data, dict) else None

    @property
    def runner_started(self) -> bool:
        return self.file(RUNNER_PID).exists()

    @property
    def cancel_requested(self) -> bool:
        return self.file(CANCEL_FILE).exists()

    def runner_alive(self) -> bool:
        """True while a runner holds the lock (checked by trying to take it)."""
        try:  # read-only: a reader must never create the lock file a runner will open
            fd = os.open(self.file(LOCK_FILE), os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    @property
    def images(self) -> int | None:
        """Images the run fetched (known from the ``processing`` phase on)."""
        data = read_json(self.file(STATUS_FILE))
        value = data.get("images") if isinstance(data, dict) else None
        return value if isinstance(value, int) else None

    def set_phase(self, phase: str, **extra: object) -> None:
        status = read_json(self.file(STATUS_FILE))
        kept = {k: v for k, v in status.items() if k != "phase"} if isinstance(status, dict) else {}
        write_json_atomic(self.file(STATUS_FILE), {**kept, **extra, "phase": phase})

    def write_result(self, outcome: str, error_message: str | None = None,
                     exit_code: int | None = None) -> None:
        write_json_atomic(
            self.file(RESULT_FILE),
            {"outcome": outcome, "error_message": error_message, "exit_code": exit_code},
        )

    def discard_work(self) -> int:
        """Delete everything but ``KEPT_FILES`` (the project, ``all.zip``, downloads); returns
        the entries deleted. Best effort: what cannot be deleted goes with the task."""
        deleted = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in self.path.iterdir():
                if entry.name in KEPT_FILES:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()
                deleted += 1
        return deleted


def runs(root: Path) -> list[RunDir]:
    with contextlib.suppress(FileNotFoundError):
        return [RunDir(p) for p in sorted(root.iterdir()) if p.is_dir()]
    return []
