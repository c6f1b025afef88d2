"""Console lines of one attempt -> ``output`` and ``progress`` events, resumable and exact.

Lines are numbered from the start of the attempt's console. A follower that restarts (or a log
stream that reconnects) re-reads from the beginning and passes ``skip`` = lines already recorded:
those lines are counted but not re-emitted, so the log has neither a gap nor a duplicate. Event
ids derive from line numbers (``output:<first line>``, ``progress:<line>``), so a batch emitted
twice is recognised by the event log.

Sizes are bounded, so that every output event fits in a NATS message (``max_payload``, 1 MiB by
default) with room to spare, whatever the engine prints (a progress bar redrawn with carriage
returns is one line, as long as the run): a longer console line keeps its first
``MAX_LINE_BYTES`` (UTF-8) and ends with ``TRUNCATED``; an output event holds at most
``batch_lines`` lines and ``MAX_BATCH_BYTES`` of them (as JSON strings), a batch closing early
when the next line would pass it. The sources split the
log with ``LineSplitter``, which keeps at most ``MAX_RAW_LINE_BYTES`` of a line that has not ended
yet and drops the rest up to its newline. Both cuts depend on the text alone, never on how it
arrived in chunks, so a re-read numbers and cuts every line the same way.
"""

from __future__ import annotations

import json

from scaleodm.common import metrics
from scaleodm.common.contracts import events
from scaleodm.common.domain.progress import ProgressTracker, clean_line
from scaleodm.common.emitting import Emitter
from scaleodm.common.store.tasks import Outcome

# An event of 200 full lines would pass NATS's 1 MiB; a quarter of it leaves room for the
# event's other fields, headers and a server configured lower (NodeODM keeps lines whole).
MAX_LINE_BYTES = 8 * 1024
MAX_BATCH_BYTES = 256 * 1024
# Raw lines still hold ANSI codes, which ``clean_line`` removes: kept up to four times the cap.
MAX_RAW_LINE_BYTES = 4 * MAX_LINE_BYTES
TRUNCATED = " … [truncated]"
_TRUNCATED_BYTES = TRUNCATED.encode()


def cap_line(line: str, max_bytes: int = MAX_LINE_BYTES) -> str:
    """``line``, or its first bytes + ``TRUNCATED`` when its UTF-8 passes ``max_bytes`` (the
    result never does; a character cut in two is dropped)."""
    encoded = line.encode()
    if len(encoded) <= max_bytes:
        return line
    keep = encoded[: max_bytes - len(_TRUNCATED_BYTES)]
    return keep.decode("utf-8", errors="ignore") + TRUNCATED


def line_weight(line: str) -> int:
    """Bytes ``line`` takes in an output event's JSON (quotes, escapes and a comma included)."""
    return len(json.dumps(line, ensure_ascii=False).encode()) + 1


class LineSplitter:
    """A console byte stream -> lines (newline-separated, decoded as UTF-8 with replacement).

    Memory stays bounded: of a line longer than ``max_bytes`` the first ``max_bytes`` are kept
    and the rest is dropped up to its newline; it is reported with ``TRUNCATED`` appended.
    """

    def __init__(self, max_bytes: int = MAX_RAW_LINE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._partial = bytearray()
        self._cut = False

    @property
    def pending(self) -> bool:
        """A line has begun and not ended (``flush`` reports it)."""
        return bool(self._partial) or self._cut

    def feed(self, data: bytes) -> list[str]:
        """The lines that ``data`` ends."""
        *ended, rest = data.split(b"\n")
        lines = []
        for piece in ended:
            self._append(piece)
            lines.append(self._take())
        self._append(rest)
        return lines

    def flush(self) -> list[str]:
        """The last line when the stream ended without a newline after it."""
        return [self._take()] if self.pending else []

    def _append(self, piece: bytes) -> None:
        room = self.max_bytes - len(self._partial)
        if len(piece) > room:
            piece, self._cut = piece[:max(room, 0)], True
        self._partial += piece

    def _take(self) -> str:
        line = self._partial.decode("utf-8", errors="replace")
        if self._cut:
            line += TRUNCATED
        self._partial, self._cut = bytearray(), False
        return line


class ConsoleReporter:
    def __init__(
        self, emitter: Emitter, task_id: str, attempt: int, *, skip: int, progress: float,
        batch_lines: int, max_line_bytes: int = MAX_LINE_BYTES,
        max_batch_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        self.emitter = emitter
        self.task_id = task_id
        self.attempt = attempt
        self.skip = skip
        self.tracker = ProgressTracker(progress)
        self.batch_lines = batch_lines
        self.max_line_bytes = max_line_bytes
        self.max_batch_bytes = max_batch_bytes
        self.next_line = 0

    def rewind(self) -> None:
        """The source starts over from the first line (a reconnect re-reading the whole log)."""
        self.skip = max(self.skip, self.next_line)
        self.next_line = 0

    async def feed(self, raw_lines: list[str]) -> None:
        batch: list[str] = []
        batch_bytes = 0
        start = self.next_line
        marks: list[tuple[int, float]] = []
        for raw in raw_lines:
            line = cap_line(clean_line(raw), self.max_line_bytes)
            if not line:
                continue
            index = self.next_line
            self.next_line += 1
            value = self.tracker.feed(line)
            if index < self.skip:  # recorded before; its progress may not have been
                if value is not None:
                    await self._progress(value, index)
                continue
            weight = line_weight(line)
            if batch and batch_bytes + weight > self.max_batch_bytes:
                await self._flush(start, batch, marks)
                batch, batch_bytes, marks = [], 0, []
            if not batch:
                start = index
            batch.append(line)
            batch_bytes += weight
            if value is not None:
                marks.append((index, value))
            if len(batch) >= self.batch_lines:
                await self._flush(start, batch, marks)
                batch, batch_bytes, marks = [], 0, []
        if batch:
            await self._flush(start, batch, marks)

    async def phase_progress(self, value: float, key: str) -> None:
        """Progress outside the engine's markers (packaging, uploading); only ever rises."""
        if value > self.tracker.current:
            self.tracker.current = value
            await self._progress(value, key)

    async def _flush(self, start: int, lines: list[str], marks: list[tuple[int, float]]) -> None:
        result = await self.emitter.emit(events.new(
            events.TaskOutput, self.task_id, self.attempt, line_start=start, lines=list(lines)
        ))
        if result.outcome is Outcome.APPLIED:  # recorded now: lines count once
            metrics.CONSOLE_LINES.inc(len(lines))
        for index, value in marks:
            await self._progress(value, index)

    async def _progress(self, value: float, key: str | int) -> None:
        await self.emitter.emit(events.new(
            events.TaskProgressed, self.task_id, self.attempt, key=key, progress=value
        ))
