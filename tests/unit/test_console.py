"""Console text -> output events, bounded (``scaleodm.watcher.console``): fast, no servers.

Covered:
- ``cap_line``: a line within ``MAX_LINE_BYTES`` is kept whole; a longer one keeps its first bytes
  and ends with ``TRUNCATED``, never over the cap, never with half a character;
- ``LineSplitter``: the same lines whatever the chunking of the bytes (a re-read numbers and cuts
  them the same way); a line longer than its cap keeps its head with the marker, the next line
  is intact, and the splitter never holds more than the cap; ``flush`` reports an unfinished
  last line;
- ``ConsoleReporter``: an output event closes at ``batch_lines`` lines or before the next line
  would pass ``MAX_BATCH_BYTES`` (as JSON, escapes included), with contiguous ``line_start``s and
  no line lost; a ``\\r`` progress bar of megabytes and lines of control characters (escaped six
  times over in JSON) still make events far below NATS's 1 MiB; progress marks follow the batch
  holding their line.

Left out: the sources' file and pod-log reading around the splitter (``test_local_source.py``,
``test_argo.py``) and publishing (``test_gateway_actions.py`` covers a refused oversize message).
"""

from __future__ import annotations

import pytest

from scaleodm.common.contracts import events
from scaleodm.common.store.tasks import ApplyResult, Outcome
from scaleodm.watcher import console
from scaleodm.watcher.console import TRUNCATED, ConsoleReporter, LineSplitter

NATS_MAX_PAYLOAD = 1024 * 1024


class FakeEmitter:
    """What the reporter calls of ``Emitter``."""

    def __init__(self) -> None:
        self.emitted: list[events.TaskEvent] = []

    async def emit(self, ev: events.TaskEvent) -> ApplyResult:
        self.emitted.append(ev)
        return ApplyResult(Outcome.APPLIED, len(self.emitted), changed=True)

    def outputs(self) -> list[events.TaskOutput]:
        return [e for e in self.emitted if isinstance(e, events.TaskOutput)]


def _reporter(batch_lines: int = 200) -> tuple[ConsoleReporter, FakeEmitter]:
    emitter = FakeEmitter()
    reporter = ConsoleReporter(emitter, "t", 1, skip=0, progress=0.0,  # type: ignore[arg-type]
                               batch_lines=batch_lines)
    return reporter, emitter


# -- cap_line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("x" * console.MAX_LINE_BYTES, id="at-the-cap"),
        pytest.param("é" * (console.MAX_LINE_BYTES // 2), id="multibyte-at-the-cap"),
        pytest.param("short", id="short"),
    ],
)
def test_a_line_within_the_cap_is_kept(line: str) -> None:
    assert console.cap_line(line) == line


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("x" * (console.MAX_LINE_BYTES + 1), id="one-byte-over"),
        pytest.param("é" * console.MAX_LINE_BYTES, id="multibyte"),
        pytest.param("€" * 10_000, id="three-byte-chars"),
        pytest.param("10%\r20%\r" * 200_000, id="progress-bar"),
    ],
)
def test_a_longer_line_keeps_its_head_and_the_marker(line: str) -> None:
    capped = console.cap_line(line)
    assert capped.endswith(TRUNCATED)
    assert line.startswith(capped.removesuffix(TRUNCATED))  # no half character, no replacement
    size = len(capped.encode())
    assert console.MAX_LINE_BYTES - 4 < size <= console.MAX_LINE_BYTES


# -- LineSplitter -----------------------------------------------------------------------------


def _split(data: bytes, chunk: int, max_bytes: int) -> list[str]:
    splitter = LineSplitter(max_bytes)
    lines: list[str] = []
    for i in range(0, len(data), chunk):
        lines += splitter.feed(data[i:i + chunk])
        assert len(splitter._partial) <= max_bytes  # bounded whatever the line
    return lines + splitter.flush()


TEXT = ("short\n" + "a" * 50 + "\n\n" + "b" * 1000 + "\r" + "c" * 10 + "\nnext\nlast").encode()


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 999, len(TEXT)])
def test_the_split_does_not_depend_on_the_chunks(chunk: int) -> None:
    assert _split(TEXT, chunk, max_bytes=100) == [
        "short", "a" * 50, "", "b" * 100 + TRUNCATED, "next", "last",
    ]


def test_a_line_at_the_cap_is_not_marked_and_flush_reports_an_unfinished_one() -> None:
    splitter = LineSplitter(4)
    assert splitter.feed(b"abcd\nab") == ["abcd"]
    assert splitter.pending
    assert splitter.flush() == ["ab"]
    assert not splitter.pending and splitter.flush() == []
    assert splitter.feed(b"abcdef") == [] and splitter.pending  # a cut line is still pending
    assert splitter.flush() == ["abcd" + TRUNCATED]


def test_invalid_utf8_is_replaced() -> None:
    assert LineSplitter().feed(b"caf\xc3\n\xff\n") == ["caf\ufffd", "\ufffd"]


# -- ConsoleReporter batching -----------------------------------------------------------------


def _check_events(emitter: FakeEmitter, lines: int) -> list[events.TaskOutput]:
    """Contiguous and complete; every event within the batch cap and NATS's payload."""
    outputs = emitter.outputs()
    assert [o.line_start for o in outputs] == [
        sum(len(p.lines) for p in outputs[:i]) for i in range(len(outputs))
    ]
    assert sum(len(o.lines) for o in outputs) == lines
    for o in outputs:
        assert sum(console.line_weight(line) for line in o.lines) <= console.MAX_BATCH_BYTES
        assert len(o.model_dump_json().encode()) < console.MAX_BATCH_BYTES + 1024
        assert len(o.model_dump_json().encode()) < NATS_MAX_PAYLOAD
    return outputs


async def test_short_lines_close_a_batch_at_batch_lines() -> None:
    reporter, emitter = _reporter(batch_lines=200)
    await reporter.feed([f"line {i}" for i in range(500)])
    outputs = _check_events(emitter, 500)
    assert [len(o.lines) for o in outputs] == [200, 200, 100]


@pytest.mark.parametrize(
    ("line", "per_event"),
    [
        # 8 KiB lines: 31 of them (+ quotes and commas) fit in 256 KiB.
        pytest.param("x" * console.MAX_LINE_BYTES, 31, id="lines-at-the-cap"),
        pytest.param("y" * 50_000, 31, id="long-lines-capped"),
        # Control characters are escaped as \\u00XX in JSON: six bytes each.
        pytest.param("a\x01" * 20_000, 9, id="control-characters"),
    ],
)
async def test_long_lines_close_a_batch_at_max_batch_bytes(line: str, per_event: int) -> None:
    reporter, emitter = _reporter()
    await reporter.feed([line] * 200)
    outputs = _check_events(emitter, 200)
    assert {len(o.lines) for o in outputs[:-1]} == {per_event}
    assert len(outputs[0].lines) == per_event < 200


async def test_a_progress_bar_of_megabytes_makes_one_small_event() -> None:
    reporter, emitter = _reporter()
    splitter = LineSplitter()
    bar = b"".join(f"{i % 100}% |####|\r".encode() for i in range(300_000))  # ~4 MB, one line
    lines = [line for i in range(0, len(bar), 65536) for line in splitter.feed(bar[i:i + 65536])]
    assert lines == []
    lines += splitter.feed(b"\nafter\n")
    await reporter.feed(lines)
    [output] = _check_events(emitter, 2)
    assert output.lines[0].endswith(TRUNCATED)
    assert len(output.lines[0].encode()) <= console.MAX_LINE_BYTES
    assert output.lines[1] == "after"


async def test_progress_follows_the_batch_holding_its_line() -> None:
    reporter, emitter = _reporter()
    big = "z" * console.MAX_LINE_BYTES
    await reporter.feed([big] * 40 + ["[INFO]    Finished dataset stage"] + [big] * 10)
    kinds = [(e.kind, getattr(e, "line_start", None)) for e in emitter.emitted]
    outputs = _check_events(emitter, 51)
    assert len(outputs) == 2 and outputs[1].line_start == 31  # the marker is line 40
    assert kinds == [("output", 0), ("output", 31), ("progress", None)]
