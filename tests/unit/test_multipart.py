"""``scaleodm.gateway.multipart.stream_form``: streaming multipart parsing into sinks.

Everything runs in memory against a fake sink that records what it receives (number of writes,
largest single write, total bytes, sha256, the bytes themselves for small files) and whether it
was completed or aborted.

Covered: text fields before and after files; many files; empty files (zero bytes, and
``filename=""``); ``filename``/``filename*`` decoding (RFC 5987 preferred, raw UTF-8, escapes,
paths returned unsanitised); the same body split at every position, into 1-byte, 7-byte and
random-size chunks, giving identical results; malformed bodies (bad Content-Type, no boundary,
garbage, truncated at every position, bad part headers) with the open sink aborted and completed
files reported; field limits; the body's own limits as the gateway reads it
(``bodies.BodyReader``: size cap, epilogue included, declared length, idle timeout), whose errors
pass through with the same clean-up; a stream that raises mid-file, a cancelled parse, errors
from ``open_sink`` and from a sink; and bounded buffering — a 50 MB file fed in 64 KiB chunks is
written as it arrives, never in writes larger than about one chunk, with a tracemalloc peak
under 10 MB.

Left out: S3 (``tests/integration/test_s3_writer.py``) and the HTTP routes that use the parser.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import tracemalloc
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from scaleodm.gateway import bodies
from scaleodm.gateway.multipart import (
    FileSink,
    MultipartError,
    StoredFile,
    StreamedForm,
    completed_files,
    is_multipart,
    stream_form,
)

BOUNDARY = "----scaleodmTestBoundary7MA4YWxk"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"
IDLE_S = 60.0  # never reached: the fake streams do not stall


# --- fakes and builders -------------------------------------------------------------------------


@dataclass
class FakeSink:
    field_name: str
    filename: str
    content_type: str | None
    keep: bool = True
    writes: int = 0
    max_write: int = 0
    total: int = 0
    data: bytearray = field(default_factory=bytearray)
    sha: Any = field(default_factory=hashlib.sha256)
    completed: int = 0
    aborted: int = 0
    fail_complete: bool = False

    async def write(self, data: bytes) -> None:
        assert not self.completed and not self.aborted
        self.writes += 1
        self.max_write = max(self.max_write, len(data))
        self.total += len(data)
        self.sha.update(data)
        if self.keep:
            self.data += data

    async def complete(self) -> Any:
        if self.fail_complete:
            raise OSError("S3 is down")
        self.completed += 1
        return f"stored:{self.filename}"

    async def abort(self) -> None:
        self.aborted += 1


@dataclass
class Sinks:
    """The sink factory: keeps every sink it opened."""

    keep: bool = True
    opened: list[FakeSink] = field(default_factory=list)
    refuse_field: str | None = None
    fail_complete_on: str | None = None

    async def __call__(self, field_name: str, filename: str, content_type: str | None
                       ) -> FileSink:
        if field_name == self.refuse_field:
            raise MultipartError("Unexpected field")
        sink = FakeSink(field_name, filename, content_type, keep=self.keep,
                        fail_complete=filename == self.fail_complete_on)
        self.opened.append(sink)
        return sink


@dataclass
class Part:
    name: str
    content: bytes = b""
    filename: str | None = None
    content_type: str | None = None
    disposition: str | None = None  # overrides the generated Content-Disposition value


def build(parts: Iterable[Part], boundary: str = BOUNDARY) -> bytes:
    out = bytearray()
    for p in parts:
        out += f"--{boundary}\r\n".encode()
        disp = p.disposition
        if disp is None:
            disp = f'form-data; name="{p.name}"'
            if p.filename is not None:
                disp += f'; filename="{p.filename}"'
        out += b"Content-Disposition: " + disp.encode() + b"\r\n"
        if p.content_type:
            out += f"Content-Type: {p.content_type}\r\n".encode()
        out += b"\r\n" + p.content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


async def feed(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


def split(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def random_split(body: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(body):
        n = rng.randint(1, 40)
        out.append(body[i : i + n])
        i += n
    return out


async def parse(chunks: Iterable[bytes], sinks: Sinks | None = None, *, ctype: str = CTYPE,
                max_body_bytes: int | None = None, **limits: int) -> tuple[StreamedForm, Sinks]:
    """``stream_form`` over ``chunks`` read as the gateway reads them (``bodies.BodyReader``)."""
    sinks = sinks if sinks is not None else Sinks()
    body = bodies.BodyReader(feed(chunks), IDLE_S, max_bytes=max_body_bytes)
    form = await stream_form(body.chunks(), ctype, sinks, **limits)
    return form, sinks


def summary(form: StreamedForm, sinks: Sinks) -> Any:
    files = [(f.field, f.filename, f.size, f.result) for f in form.files]
    contents = [(s.field_name, s.filename, s.content_type, bytes(s.data), s.completed, s.aborted)
                for s in sinks.opened]
    return form.fields, files, contents


SMALL_PARTS = [
    Part("name", b"My task"),
    Part("images", b"\xff\xd8JPEG\r\n--not-a-boundary\r\n\x00" * 3, "a.jpg", "image/jpeg"),
    Part("images", b"", "empty.jpg", "image/jpeg"),
    Part("images", b"GCP\nlist\r\n", "gcp_list.txt", "text/plain"),
    Part("options", b'[{"name":"fast-orthophoto","value":true}]'),
    Part("skipPostProcessing", b"true"),
]
SMALL_BODY = build(SMALL_PARTS)


# --- well-formed bodies -------------------------------------------------------------------------


async def test_fields_before_and_after_files() -> None:
    form, sinks = await parse([SMALL_BODY])
    assert form.fields == {
        "name": ["My task"],
        "options": ['[{"name":"fast-orthophoto","value":true}]'],
        "skipPostProcessing": ["true"],
    }
    assert form.text("options") == '[{"name":"fast-orthophoto","value":true}]'
    assert form.text("zipurl") is None
    assert [(f.field, f.filename, f.size, f.result) for f in form.files] == [
        ("images", "a.jpg", len(SMALL_PARTS[1].content), "stored:a.jpg"),
        ("images", "empty.jpg", 0, "stored:empty.jpg"),
        ("images", "gcp_list.txt", len(SMALL_PARTS[3].content), "stored:gcp_list.txt"),
    ]
    assert [bytes(s.data) for s in sinks.opened] == [SMALL_PARTS[i].content for i in (1, 2, 3)]
    assert [s.content_type for s in sinks.opened] == ["image/jpeg", "image/jpeg", "text/plain"]
    assert all(s.completed == 1 and s.aborted == 0 for s in sinks.opened)


async def test_only_fields_and_repeated_fields() -> None:
    body = build([Part("a", b"1"), Part("a", "ü".encode()), Part("b", b"")])
    form, sinks = await parse([body])
    assert form.fields == {"a": ["1", "ü"], "b": [""]}
    assert form.text("a") == "1"
    assert form.files == [] and sinks.opened == []


async def test_no_parts_at_all() -> None:
    form, _ = await parse([f"--{BOUNDARY}--\r\n".encode()])
    assert form.fields == {} and form.files == []


async def test_many_files_keep_their_order() -> None:
    parts = [Part("images", f"image {i}".encode() * (i + 1), f"IMG_{i:04d}.JPG", "image/jpeg")
             for i in range(300)]
    body = build([*parts, Part("options", b"[]")])
    form, sinks = await parse(split(body, 4096))
    assert [f.filename for f in form.files] == [p.filename for p in parts]
    assert [bytes(s.data) for s in sinks.opened] == [p.content for p in parts]
    assert [f.size for f in form.files] == [len(p.content) for p in parts]
    assert form.fields == {"options": ["[]"]}


async def test_empty_files() -> None:
    body = build([Part("images", b"", "zero.bin"), Part("images", b"", ""),
                  Part("images", b"x", "one.bin")])
    form, sinks = await parse([body])
    assert [(f.filename, f.size) for f in form.files] == [("zero.bin", 0), ("", 0),
                                                          ("one.bin", 1)]
    assert [s.writes for s in sinks.opened] == [0, 0, 1]
    assert all(s.completed == 1 for s in sinks.opened)
    assert form.fields == {}


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        ("form-data; name=\"images\"; filename=\"plain.jpg\"", "plain.jpg"),
        ("form-data; name=\"images\"; filename=\"fallback.jpg\"; "
         "filename*=UTF-8''%C3%A9t%C3%A9%20photo.jpg", "été photo.jpg"),
        ("form-data; name=\"images\"; filename*=utf-8''na%C3%AFve.jpg; filename=\"x.jpg\"",
         "naïve.jpg"),
        ("form-data; name=\"images\"; filename*=UTF-8'en'only%2Bstar.jpg", "only+star.jpg"),
        ("form-data; name=\"images\"; filename*=iso-8859-1''%E9t%E9.jpg", "été.jpg"),
        ("form-data; name=\"images\"; filename*=not-rfc5987.jpg; filename=\"fb.jpg\"", "fb.jpg"),
        ("form-data; name=\"images\"; filename*=not-rfc5987.jpg", "not-rfc5987.jpg"),
        ("form-data; name=\"images\"; filename=\"été.jpg\"", "été.jpg"),  # raw UTF-8
        ("form-data; name=\"images\"; filename=\"a \\\"quoted\\\"; name.jpg\"",
         'a "quoted"; name.jpg'),
        ("form-data; name=\"images\"; filename=\"C:\\dir\\photo.jpg\"", "C:\\dir\\photo.jpg"),
        ("form-data; name=\"images\"; filename=\"../../etc/passwd\"", "../../etc/passwd"),
        ("form-data; name=images; filename=unquoted.jpg", "unquoted.jpg"),
        ("FORM-DATA;NAME=\"images\";FILENAME=\"caps.jpg\"", "caps.jpg"),
    ],
)
async def test_filenames(disposition: str, expected: str) -> None:
    body = build([Part("images", b"data", disposition=disposition)])
    form, sinks = await parse([body])
    assert [(f.field, f.filename, f.size) for f in form.files] == [("images", expected, 4)]
    assert sinks.opened[0].filename == expected


async def test_preamble_newlines_and_epilogue_are_ignored() -> None:
    body = b"\r\n" + SMALL_BODY + b"epilogue, ignored\r\n"
    assert summary(*await parse([body])) == summary(*await parse([SMALL_BODY]))


async def test_every_chunking_gives_the_same_result() -> None:
    reference = summary(*await parse([SMALL_BODY]))
    assert reference[1]  # files were stored
    chunkings: list[list[bytes]] = [split(SMALL_BODY, 1), split(SMALL_BODY, 7)]
    chunkings += [random_split(SMALL_BODY, seed) for seed in range(20)]
    chunkings += [[SMALL_BODY[:i], SMALL_BODY[i:]] for i in range(1, len(SMALL_BODY))]
    for chunks in chunkings:
        assert b"".join(chunks) == SMALL_BODY
        assert summary(*await parse(chunks)) == reference, [len(c) for c in chunks]


async def test_empty_chunks_are_skipped() -> None:
    chunks = [b""] + [c for piece in split(SMALL_BODY, 5) for c in (piece, b"")]
    assert summary(*await parse(chunks)) == summary(*await parse([SMALL_BODY]))


def test_helpers() -> None:
    assert is_multipart("multipart/form-data; boundary=x")
    assert is_multipart("Multipart/Form-Data")
    assert not is_multipart("application/x-www-form-urlencoded")
    assert not is_multipart(None)
    err = MultipartError("x")
    err.completed = [StoredFile("images", "a", 1, None)]
    assert completed_files(err) == err.completed
    assert completed_files(ValueError()) == []


# --- malformed bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ctype", "detail"),
    [
        ("multipart/form-data", "no boundary"),
        ("multipart/form-data; boundary=", "no boundary"),
        ('multipart/form-data; boundary=""', "no boundary"),
        ("multipart/form-data; charset=utf-8", "no boundary"),
        ("multipart/form-data; boundary=" + "x" * 300, "invalid boundary"),
        ("multipart/form-data; boundary=\"a\x01b\"", "invalid boundary"),
        ("application/json", "not multipart/form-data"),
        ("", "not multipart/form-data"),
    ],
)
async def test_bad_content_type(ctype: str, detail: str) -> None:
    with pytest.raises(MultipartError) as info:
        await parse([SMALL_BODY], ctype=ctype)
    assert str(info.value).startswith("Malformed multipart body: ")
    assert detail in str(info.value)


async def test_quoted_boundary() -> None:
    form, _ = await parse([SMALL_BODY], ctype=f'multipart/form-data; boundary="{BOUNDARY}"')
    assert len(form.files) == 3


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"garbage, not multipart at all",
        b"--wrong-boundary\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n",
        f"--{BOUNDARY}\r\nContent-Disposition form-data\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),
        f"--{BOUNDARY}\r\nBad Header: x\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),
        f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; filename=\"a\"\r\n\r\nx\r\n"
        f"--{BOUNDARY}--\r\n".encode(),
        f"--{BOUNDARY}XX\r\n".encode(),
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"a\"\r\nX-Pad: ".encode()
        + b"p" * 20_000 + b"\r\n\r\nx\r\n" + f"--{BOUNDARY}--\r\n".encode(),
    ],
)
async def test_garbage_and_bad_headers(body: bytes) -> None:
    with pytest.raises(MultipartError) as info:
        await parse(split(body, 3) if body else [])
    assert str(info.value).startswith("Malformed multipart body: ")
    assert not isinstance(info.value, bodies.BodyTooLargeError)


async def test_truncated_at_every_position() -> None:
    # The closing "--" ends the message: only its trailing CRLF may go missing.
    for cut in range(len(SMALL_BODY) - 2):
        sinks = Sinks()
        with pytest.raises(MultipartError) as info:
            await parse(split(SMALL_BODY[:cut], 11), sinks)
        assert str(info.value).startswith("Malformed multipart body: "), cut
        done = info.value.completed
        assert [f.filename for f in done] == [s.filename for s in sinks.opened if s.completed]
        for sink in sinks.opened:  # every sink is either completed or aborted, once
            assert (sink.completed, sink.aborted) in ((1, 0), (0, 1)), cut


async def test_truncated_mid_file_aborts_it_and_reports_completed() -> None:
    body = build([Part("images", b"first", "1.jpg"), Part("images", b"x" * 1000, "2.jpg")])
    sinks = Sinks()
    with pytest.raises(MultipartError, match="unexpected end of body") as info:
        await parse([body[: body.index(b"x" * 500)]], sinks)
    assert [(f.filename, f.size, f.result) for f in info.value.completed] == [
        ("1.jpg", 5, "stored:1.jpg")
    ]
    assert [(s.completed, s.aborted) for s in sinks.opened] == [(1, 0), (0, 1)]


# --- limits -------------------------------------------------------------------------------------


async def test_body_too_large_aborts_the_open_sink() -> None:
    body = build([Part("images", b"small", "1.jpg"), Part("images", b"y" * 100_000, "2.jpg")])
    sinks = Sinks()
    with pytest.raises(bodies.BodyTooLargeError) as info:  # the reader's, passed through
        await parse(split(body, 1000), sinks, max_body_bytes=50_000)
    assert str(info.value) == "Request too large (limit 50000 bytes)"
    assert [f.filename for f in completed_files(info.value)] == ["1.jpg"]
    assert [(s.completed, s.aborted) for s in sinks.opened] == [(1, 0), (0, 1)]
    assert sinks.opened[1].total <= 50_000


async def test_body_exactly_at_the_limit_is_accepted() -> None:
    form, _ = await parse(split(SMALL_BODY, 10), max_body_bytes=len(SMALL_BODY))
    assert len(form.files) == 3
    with pytest.raises(bodies.BodyTooLargeError):
        await parse(split(SMALL_BODY, 10), max_body_bytes=len(SMALL_BODY) - 1)


async def test_an_epilogue_counts_against_the_limit() -> None:
    body = SMALL_BODY + b"epilogue"  # ignored by the parser, but it is still body
    form, _ = await parse(split(body, 10), max_body_bytes=len(body))
    assert len(form.files) == 3
    with pytest.raises(bodies.BodyTooLargeError):
        await parse(split(body, 10), max_body_bytes=len(SMALL_BODY))


@pytest.mark.parametrize(
    ("declared", "refused"),
    [
        pytest.param(None, False, id="absent"),
        pytest.param("", False, id="empty"),
        pytest.param("100", False, id="at-the-limit"),
        pytest.param(" 101 ", True, id="over-with-spaces"),
        pytest.param("1" + "0" * 30, True, id="huge"),
        pytest.param("\u00b2\u00b3\u00b9", False, id="non-ascii-digits-left-to-the-reader"),
        pytest.param("-5", False, id="not-a-length"),
    ],
)
def test_declared_length_check(declared: str | None, refused: bool) -> None:
    if not refused:
        bodies.check_declared(declared, 100)
        return
    with pytest.raises(bodies.BodyTooLargeError, match=r"^Request too large \(limit 100 bytes\)$"):
        bodies.check_declared(declared, 100)


async def test_a_stalled_body_aborts_the_open_sink() -> None:
    body = build([Part("images", b"first", "1.jpg"), Part("images", b"s" * 1000, "2.jpg")])
    gone_quiet = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield body[: body.index(b"s" * 500)]
        gone_quiet.set()
        await asyncio.Event().wait()  # the client sends nothing more
        yield b""  # pragma: no cover

    sinks = Sinks()
    reader = bodies.BodyReader(stalls(), 0.01)
    with pytest.raises(bodies.BodyStalledError, match="nothing received for 0.01 s") as info:
        await stream_form(reader.chunks(), CTYPE, sinks)
    assert gone_quiet.is_set()
    assert [f.filename for f in completed_files(info.value)] == ["1.jpg"]
    assert [(s.completed, s.aborted) for s in sinks.opened] == [(1, 0), (0, 1)]


async def test_field_too_large() -> None:
    body = build([Part("images", b"img", "1.jpg"), Part("options", b"o" * 2000)])
    with pytest.raises(MultipartError, match="Field options too large") as info:
        await parse(split(body, 100), max_field_bytes=1000)
    assert [f.filename for f in info.value.completed] == ["1.jpg"]
    form, _ = await parse([body], max_field_bytes=2000)
    assert form.text("options") == "o" * 2000


async def test_too_many_fields() -> None:
    body = build([Part(f"f{i}", b"v") for i in range(11)])
    with pytest.raises(MultipartError, match=r"Too many fields \(limit 10\)"):
        await parse([body], max_fields=10)
    form, _ = await parse([body], max_fields=11)
    assert len(form.fields) == 11


# --- failures from the stream and the sinks -----------------------------------------------------


class ClientGone(Exception):
    """Stands in for Starlette's ClientDisconnect."""


async def test_stream_raising_mid_file() -> None:
    body = build([Part("images", b"a" * 3000, "1.jpg"), Part("images", b"b" * 3000, "2.jpg"),
                  Part("options", b"[]")])

    async def chunks() -> AsyncIterator[bytes]:
        for chunk in split(body[: body.index(b"b" * 1000)], 512):
            yield chunk
        raise ClientGone("client disconnected")

    sinks = Sinks()
    with pytest.raises(ClientGone) as info:
        await stream_form(chunks(), CTYPE, sinks)
    assert [(f.filename, f.size) for f in completed_files(info.value)] == [("1.jpg", 3000)]
    assert [(s.completed, s.aborted) for s in sinks.opened] == [(1, 0), (0, 1)]
    assert bytes(sinks.opened[1].data) == b"b" * sinks.opened[1].total


async def test_cancelled_while_a_sink_writes() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    class SlowSink(FakeSink):
        async def write(self, data: bytes) -> None:
            started.set()
            await release.wait()
            await super().write(data)

    opened: list[FakeSink] = []

    async def open_sink(field_name: str, filename: str, ctype: str | None) -> FileSink:
        sink = SlowSink(field_name, filename, ctype)
        opened.append(sink)
        return sink

    body = build([Part("images", b"z" * 10_000, "slow.jpg")])
    task = asyncio.create_task(stream_form(feed(split(body, 1024)), CTYPE, open_sink))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [(s.completed, s.aborted) for s in opened] == [(0, 1)]


async def test_open_sink_refusing_a_field() -> None:
    body = build([Part("images", b"ok", "1.jpg"), Part("other", b"no", "2.jpg")])
    sinks = Sinks(refuse_field="other")
    with pytest.raises(MultipartError) as info:
        await parse([body], sinks)
    assert str(info.value) == "Unexpected field"  # the factory's message, unchanged
    assert [f.filename for f in info.value.completed] == ["1.jpg"]
    assert [(s.completed, s.aborted) for s in sinks.opened] == [(1, 0)]


async def test_sink_failing_to_complete_is_aborted() -> None:
    body = build([Part("images", b"ok", "1.jpg"), Part("images", b"bad", "2.jpg")])
    sinks = Sinks(fail_complete_on="2.jpg")
    with pytest.raises(OSError, match="S3 is down") as info:
        await parse([body], sinks)
    assert [f.filename for f in completed_files(info.value)] == ["1.jpg"]
    assert [(s.completed, s.aborted) for s in sinks.opened] == [(1, 0), (0, 1)]


async def test_abort_failure_does_not_mask_the_error() -> None:
    class BadAbort(FakeSink):
        async def abort(self) -> None:
            await super().abort()
            raise OSError("abort failed too")

    opened: list[FakeSink] = []

    async def open_sink(field_name: str, filename: str, ctype: str | None) -> FileSink:
        opened.append(BadAbort(field_name, filename, ctype))
        return opened[-1]

    body = build([Part("images", b"q" * 100, "1.jpg")])
    with pytest.raises(MultipartError, match="unexpected end of body"):
        await stream_form(feed([body[:-40]]), CTYPE, open_sink)
    assert opened[0].aborted == 1


# --- bounded buffering --------------------------------------------------------------------------


async def test_large_file_streams_with_bounded_memory() -> None:
    chunk_size = 64 * 1024
    n_chunks = 50 * 1024 * 1024 // chunk_size  # 50 MiB of file data
    pattern = random.Random(1).randbytes(chunk_size + 64)
    head = build([Part("name", b"big")]).removesuffix(f"--{BOUNDARY}--\r\n".encode())
    head += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"; "
             f"filename=\"big.tif\"\r\nContent-Type: image/tiff\r\n\r\n").encode()
    tail = f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"options\"\r\n\r\n[]" \
           f"\r\n--{BOUNDARY}--\r\n".encode()
    expected = hashlib.sha256()
    for i in range(n_chunks):
        expected.update(pattern[i % 64 : i % 64 + chunk_size])
    produced = 0
    lag = 0  # most bytes read from the network but not yet written to the sink

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal produced
        yield head
        for i in range(n_chunks):
            produced += chunk_size
            yield pattern[i % 64 : i % 64 + chunk_size]
        yield tail

    class WatchingSink(FakeSink):
        async def write(self, data: bytes) -> None:
            nonlocal lag
            await super().write(data)
            lag = max(lag, produced - self.total)

    sinks: list[FakeSink] = []

    async def open_sink(field_name: str, filename: str, ctype: str | None) -> FileSink:
        sinks.append(WatchingSink(field_name, filename, ctype, keep=False))
        return sinks[-1]

    tracemalloc.start()
    try:
        form = await stream_form(chunks(), CTYPE, open_sink)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    (sink,) = sinks
    assert sink.total == n_chunks * chunk_size and sink.sha.digest() == expected.digest()
    assert form.files[0].size == sink.total and sink.completed == 1
    assert form.fields == {"name": ["big"], "options": ["[]"]}
    assert sink.writes >= n_chunks - 1  # written chunk by chunk, as the bytes arrived
    assert sink.max_write <= chunk_size + len(BOUNDARY) + 8
    assert lag <= chunk_size + len(BOUNDARY) + 8  # never more than one chunk behind
    assert peak < 10 * 1024 * 1024, f"tracemalloc peak {peak} bytes"
    print(f"\n50 MiB upload: {sink.writes} writes, largest {sink.max_write} B, "  # noqa: T201
          f"tracemalloc peak {peak / 1024:.0f} KiB")
