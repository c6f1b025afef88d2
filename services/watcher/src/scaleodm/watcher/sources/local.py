"""Following local runs: status, console and result files -> task events.

Every event id is derived from the run (``output:<first line>``, ``progress:<line>``,
``running``, ``completed``...), so a watcher restarted mid-run re-derives the same ids: it
resumes at the last recorded console line (read from the event log) and emits neither a gap nor
a duplicate. The run directory is only read, never written.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from scaleodm.common import localruns, tracing
from scaleodm.common.contracts import events
from scaleodm.common.domain.progress import PACKAGING_PROGRESS, UPLOADING_PROGRESS
from scaleodm.common.domain.status import TaskState
from scaleodm.common.emitting import Emitter
from scaleodm.common.logging import bind_task, get_logger
from scaleodm.common.store.tasks import TaskStore
from scaleodm.watcher.console import ConsoleReporter, LineSplitter

log = get_logger(__name__)
# One poll of one run reads at most this much console, and runs are stepped concurrently, so a
# run printing a burst of output never holds up the events of the others; a run with more to
# read is polled again at once.
READ_CHUNK = 512 * 1024
MAX_CONCURRENT_STEPS = 32
PHASE_PROGRESS = {"packaging": PACKAGING_PROGRESS, "uploading": UPLOADING_PROGRESS}


@dataclass
class Follower:
    rd: localruns.RunDir
    task_id: str
    attempt: int
    console: ConsoleReporter
    running_sent: bool
    offset: int = 0
    lines: LineSplitter = field(default_factory=LineSplitter)  # the console file's
    inputs_sent: bool = False
    backlog: bool = False  # console left unread by the last step
    traceparent: str | None = None  # the run's trace (tracing.py), its events join it


class LocalRunSource:
    def __init__(
        self,
        runs_dir: Path,
        store: TaskStore,
        emitter: Emitter,
        *,
        poll_interval_s: float,
        batch_lines: int,
        start_grace_s: float,
    ) -> None:
        self.runs_dir = runs_dir
        self.store = store
        self.emitter = emitter
        self.poll_interval_s = poll_interval_s
        self.batch_lines = batch_lines
        self.start_grace_s = start_grace_s
        self.followers: dict[str, Follower] = {}
        self.finished: set[str] = set()

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:
                log.exception("local run poll failed")
            backlog = any(f.backlog for f in self.followers.values())
            await asyncio.sleep(0 if backlog else self.poll_interval_s)

    async def poll_once(self) -> None:
        for rd in localruns.runs(self.runs_dir):
            name = rd.path.name
            if name in self.finished or name in self.followers:
                continue
            follower = await self._attach(rd)
            if follower is not None:
                self.followers[name] = follower
        limit = asyncio.Semaphore(MAX_CONCURRENT_STEPS)

        async def step(name: str, follower: Follower) -> None:
            async with limit:
                with bind_task(follower.task_id, attempt=follower.attempt, run=name), \
                        tracing.continued(follower.traceparent):
                    try:
                        over = await self._step(follower)
                    except Exception:
                        log.exception("local run step failed")
                        return
                if over:
                    self.finished.add(name)
                    self.followers.pop(name, None)

        await asyncio.gather(*(step(n, f) for n, f in list(self.followers.items())))

    async def _attach(self, rd: localruns.RunDir) -> Follower | None:
        run = rd.run
        if run is None:
            if self._age(rd) > self.start_grace_s:
                self.finished.add(rd.path.name)  # a bare claim (e.g. cancel before create)
            return None
        task_id, attempt = run["spec"]["task_id"], int(run["spec"]["attempt"])
        doc = await self.store.get_task(task_id)
        if doc is None or doc["attempt"] != attempt:
            self.finished.add(rd.path.name)
            return None
        recorded = await self.store.output_end(task_id, attempt)
        state = TaskState(doc["state"])
        console = ConsoleReporter(
            self.emitter, task_id, attempt, skip=recorded,
            progress=float(doc.get("progress", 0.0)), batch_lines=self.batch_lines,
        )
        return Follower(rd=rd, task_id=task_id, attempt=attempt, console=console,
                        running_sent=state is not TaskState.QUEUED,
                        traceparent=run.get(localruns.TRACEPARENT))

    @staticmethod
    def _age(rd: localruns.RunDir) -> float:
        try:
            return time.time() - rd.path.stat().st_mtime
        except OSError:
            return 0.0

    async def _step(self, f: Follower) -> bool:
        """One poll of one run; True when the run is over and fully reported."""
        alive = f.rd.runner_alive()  # before reading the result: a runner writes it, then exits
        result = f.rd.result
        if not f.running_sent and f.rd.runner_started:
            await self.emitter.emit(events.new(events.TaskRunning, f.task_id, f.attempt))
            f.running_sent = True
        if not f.inputs_sent and (images := f.rd.images) is not None:
            await self.emitter.emit(events.new(
                events.TaskInputsReady, f.task_id, f.attempt, images_count=images
            ))
            f.inputs_sent = True
        if not await self._read_console(f, final=result is not None):
            return False  # more console to read first: the next poll comes at once
        phase = f.rd.phase
        if phase in PHASE_PROGRESS and result is None:
            await f.console.phase_progress(PHASE_PROGRESS[phase], phase)
        if result is not None:
            await self._finish(f, result)
            return True
        if f.rd.runner_started and not alive:
            if f.rd.result is None:  # re-check: it may have finished meanwhile
                await self.emitter.emit(events.new(
                    events.TaskFailed, f.task_id, f.attempt,
                    error_message="The run's process ended without a result",
                ))
                return True
        elif not f.rd.runner_started and self._age(f.rd) > self.start_grace_s:
            if f.rd.cancel_requested:
                await self.emitter.emit(events.new(events.TaskCanceled, f.task_id, f.attempt))
            else:
                await self.emitter.emit(events.new(
                    events.TaskFailed, f.task_id, f.attempt, error_message="The run did not start"
                ))
            return True
        return False

    async def _finish(self, f: Follower, result: dict[str, object]) -> None:
        outcome = result.get("outcome")
        if outcome == "completed":
            await self.emitter.emit(events.new(events.TaskCompleted, f.task_id, f.attempt))
        elif outcome == "canceled":
            await self.emitter.emit(events.new(events.TaskCanceled, f.task_id, f.attempt))
        else:
            message = str(result.get("error_message") or "Processing failed")
            await self.emitter.emit(events.new(
                events.TaskFailed, f.task_id, f.attempt, error_message=message
            ))
        log.info("run over", outcome=outcome)

    async def _read_console(self, f: Follower, *, final: bool) -> bool:
        """Report at most one chunk of new console lines; True when the file is drained."""
        f.backlog = False
        path = f.rd.file(localruns.CONSOLE_FILE)
        try:
            with path.open("rb") as fh:
                fh.seek(f.offset)
                data = fh.read(READ_CHUNK)
        except FileNotFoundError:
            return True
        if not data and not (final and f.lines.pending):
            return True
        f.offset += len(data)
        lines = f.lines.feed(data)
        drained = len(data) < READ_CHUNK
        if final and drained:
            lines += f.lines.flush()
        await f.console.feed(lines)
        f.backlog = not drained
        return drained
