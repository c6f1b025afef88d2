"""Console lines of one attempt -> ``output`` and ``progress`` events, resumable and exact.

Lines are numbered from the start of the attempt's console. A follower that restarts (or a log
stream that reconnects) re-reads from the beginning and passes ``skip`` = lines already recorded:
those lines are counted but not re-emitted, so the log has neither a gap nor a duplicate. Event
ids derive from line numbers (``output:<first line>``, ``progress:<line>``), so a batch emitted
twice is recognised by the event log.
"""

from __future__ import annotations

from scaleodm.common.contracts import events
from scaleodm.common.domain.progress import ProgressTracker, clean_line
from scaleodm.common.emitting import Emitter


class ConsoleReporter:
    def __init__(
        self, emitter: Emitter, task_id: str, attempt: int, *, skip: int, progress: float,
        batch_lines: int,
    ) -> None:
        self.emitter = emitter
        self.task_id = task_id
        self.attempt = attempt
        self.skip = skip
        self.tracker = ProgressTracker(progress)
        self.batch_lines = batch_lines
        self.next_line = 0

    def rewind(self) -> None:
        """The source starts over from the first line (a reconnect re-reading the whole log)."""
        self.skip = max(self.skip, self.next_line)
        self.next_line = 0

    async def feed(self, raw_lines: list[str]) -> None:
        batch: list[str] = []
        start = self.next_line
        marks: list[tuple[int, float]] = []
        for raw in raw_lines:
            line = clean_line(raw)
            if not line:
                continue
            index = self.next_line
            self.next_line += 1
            value = self.tracker.feed(line)
            if index < self.skip:  # recorded before; its progress may not have been
                if value is not None:
                    await self._progress(value, index)
                continue
            if not batch:
                start = index
            batch.append(line)
            if value is not None:
                marks.append((index, value))
            if len(batch) >= self.batch_lines:
                await self._flush(start, batch, marks)
                batch, marks = [], []
        if batch:
            await self._flush(start, batch, marks)

    async def phase_progress(self, value: float, key: str) -> None:
        """Progress outside the engine's markers (packaging, uploading); only ever rises."""
        if value > self.tracker.current:
            self.tracker.current = value
            await self._progress(value, key)

    async def _flush(self, start: int, lines: list[str], marks: list[tuple[int, float]]) -> None:
        await self.emitter.emit(events.new(
            events.TaskOutput, self.task_id, self.attempt, line_start=start, lines=list(lines)
        ))
        for index, value in marks:
            await self._progress(value, index)

    async def _progress(self, value: float, key: str | int) -> None:
        await self.emitter.emit(events.new(
            events.TaskProgressed, self.task_id, self.attempt, key=key, progress=value
        ))
