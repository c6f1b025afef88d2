"""Streaming ``multipart/form-data`` parsing: file parts go to sinks as they arrive.

Starlette's ``request.form()`` spools every file to a temporary file before the handler runs; a
1 GB upload would then sit on the gateway's disk (or in RAM on a tmpfs). ``stream_form`` instead
drives ``python_multipart``'s low-level ``MultipartParser`` over the request's chunks. The body's
own limits are not kept here: the gateway passes ``bodies.BodyReader(request.stream(), ...,
max_bytes=...).chunks()``, which enforces the size cap and the idle timeout and lets a
preempted upload be cut off; its errors (``bodies.BodyTooLargeError``, ...) take the clean-up
path below and propagate unchanged:

- the parser is push-based and its callbacks are synchronous, so they do no I/O. While one
  network chunk is parsed they only record events — "file part opened", "file bytes" (slices of
  that chunk), "file part closed" — and collect text fields (small, bounded) directly. Once the
  chunk is parsed the events are replayed with ``await``: the sink for a new file part is opened
  (``open_sink``), its bytes are written (consecutive slices of one chunk coalesced into a single
  write), the sink is completed. The next chunk is read only after that, so what is held is at
  most one network chunk plus the sink's own buffer (for ``S3Writer``: one part), and a slow sink
  back-pressures the client through the ASGI server's flow control;
- a sink may also offer ``complete_soon()`` (``EarlyFileSink``): its completion then runs while
  the next file is read (an ``S3Writer`` sending its last bytes on a spare buffer), and is
  awaited before the next file's completion and before ``stream_form`` returns — at most one
  file of a request is completing at a time, and ``files`` keeps the body's order. A file counts
  as stored (in ``files``) only once its completion succeeded;
- text fields (parts without a ``filename``) may come before or after the files — CloudODM sends
  ``options`` after the images — and are returned in ``StreamedForm.fields``; each is limited to
  ``max_field_bytes`` and there may be at most ``max_fields`` of them;
- a part is a file part when its ``Content-Disposition`` has ``filename`` or ``filename*``
  (RFC 5987, preferred when both are present), even an empty one: browsers send an empty file
  input as ``filename=""``. The filename is returned raw (decoded, not sanitised);
- a body that is not well-formed multipart, or ends before the closing boundary, raises
  ``MultipartError`` with the client-facing text ``Malformed multipart body: ...``; bytes after
  the closing boundary are read (so the reader counts them) and ignored;
- on any error, including the client disconnecting (the stream raises) or the request task
  being cancelled, the sink of a file that is not completed yet is ``abort()``-ed (shielded from
  a further cancellation), and so is a file still completing (its sink cleans up whatever its
  completion left), and the files completed so far are attached to the exception as
  ``exc.completed`` (see ``completed_files``) so that the caller can delete them. Errors raised
  by ``open_sink`` or by a sink (e.g. a ``MultipartError("Unexpected field")`` from the factory,
  or an S3 failure) propagate unchanged, with the same clean-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError

from scaleodm.common.logging import get_logger

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = get_logger(__name__)

MAX_PART_HEADER_BYTES = 16 * 1024  # all header lines of one part together
MAX_BOUNDARY_LENGTH = 256  # RFC 2046 says 70; python_multipart accepts up to 256
_BAD_BOUNDARY = re.compile(r"[^\x21-\x7e ]")  # printable ASCII and space only


class MultipartError(Exception):
    """A refused body; ``str(exc)`` is the NodeODM-style error text for the client.

    ``completed`` lists the files stored before the error, for the caller to delete.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.completed: list[StoredFile] = []


def _malformed(detail: str) -> MultipartError:
    return MultipartError(f"Malformed multipart body: {detail}")


@dataclass
class StoredFile:
    field: str
    filename: str  # raw, as sent by the client: callers sanitise it
    size: int
    result: Any  # whatever the sink's complete() returned


@dataclass
class StreamedForm:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: list[StoredFile] = field(default_factory=list)

    def text(self, name: str) -> str | None:
        """The first value of text field ``name``, or None."""
        values = self.fields.get(name)
        return values[0] if values else None


class FileSink(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def complete(self) -> Any: ...

    async def abort(self) -> None: ...


@runtime_checkable
class EarlyFileSink(FileSink, Protocol):
    """A sink whose completion can run while the next file is read."""

    async def complete_soon(self) -> asyncio.Future[Any]:
        """Start completing; the future gives what ``complete()`` would return."""
        ...


SinkFactory = Callable[[str, str, str | None], Awaitable[FileSink]]
"""``open_sink(field name, filename, content type)``: where one file part's bytes go."""


def completed_files(exc: BaseException) -> list[StoredFile]:
    """Files that ``stream_form`` had stored when ``exc`` interrupted it."""
    found = getattr(exc, "completed", None)
    return list(found) if isinstance(found, list) else []


def is_multipart(content_type: str | None) -> bool:
    """Whether a request's Content-Type is ``multipart/form-data`` (any parameters)."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


# --- header parameters --------------------------------------------------------------------------


def _split_params(value: str) -> tuple[str, list[tuple[str, str]]]:
    """``type; a=1; b="x;y"`` -> ``("type", [("a", "1"), ("b", "x;y")])``; keys lowercased.

    Quoted strings may contain ``;``; inside them a backslash escapes only ``"`` and ``\\`` (so a
    raw Windows path like ``C:\\dir\\a.jpg`` survives).
    """
    out: list[tuple[str, str]] = []
    i, n = 0, len(value)
    end = value.find(";")
    head = (value if end == -1 else value[:end]).strip()
    i = n if end == -1 else end + 1
    while i < n:
        eq = value.find("=", i)
        semi = value.find(";", i)
        if eq == -1 or (semi != -1 and semi < eq):  # a bare token without value
            token = value[i : n if semi == -1 else semi].strip()
            if token:
                out.append((token.lower(), ""))
            i = n if semi == -1 else semi + 1
            continue
        key = value[i:eq].strip().lower()
        j = eq + 1
        while j < n and value[j] in " \t":
            j += 1
        if j < n and value[j] == '"':
            j += 1
            chars: list[str] = []
            while j < n and value[j] != '"':
                if value[j] == "\\" and j + 1 < n and value[j + 1] in '"\\':
                    j += 1
                chars.append(value[j])
                j += 1
            val = "".join(chars)
            semi = value.find(";", j)
            i = n if semi == -1 else semi + 1
        else:
            semi = value.find(";", j)
            val = value[j : n if semi == -1 else semi].strip()
            i = n if semi == -1 else semi + 1
        if key:
            out.append((key, val))
    return head, out


def _decode_ext_value(value: str) -> str | None:
    """RFC 5987 ``charset'lang'pct-encoded`` -> text; None if not in that form."""
    charset, sep1, rest = value.partition("'")
    _lang, sep2, encoded = rest.partition("'")
    if not (sep1 and sep2):
        return None
    raw = urllib.parse.unquote_to_bytes(encoded)
    try:
        return raw.decode(charset.strip() or "utf-8", errors="replace")
    except LookupError:  # unknown charset
        return raw.decode("utf-8", errors="replace")


def _header_text(raw: bytes) -> str:
    """Header bytes as text: clients send UTF-8 file names raw; fall back to latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _boundary(content_type: str) -> bytes:
    media, params = _split_params(content_type or "")
    if media.lower() != "multipart/form-data":
        raise _malformed("Content-Type is not multipart/form-data")
    boundary = dict(params).get("boundary")
    if not boundary:
        raise _malformed("no boundary in Content-Type")
    if len(boundary) > MAX_BOUNDARY_LENGTH or _BAD_BOUNDARY.search(boundary):
        raise _malformed("invalid boundary in Content-Type")
    return boundary.encode("ascii")


# --- parsing ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Open:
    field: str
    filename: str
    content_type: str | None


class _Close:
    pass


_CLOSE = _Close()
_Event = _Open | bytes | _Close


class _Collector:
    """The parser's callbacks: text fields collected in place, file parts recorded as events."""

    def __init__(self, fields: dict[str, list[str]], max_field_bytes: int,
                 max_fields: int, max_text_bytes: int | None = None) -> None:
        self.fields = fields
        self.max_field_bytes = max_field_bytes
        self.max_fields = max_fields
        self.max_text_bytes = max_text_bytes
        self.text_bytes = 0  # all text fields together
        self.events: list[_Event] = []
        self.ended = False
        self.n_fields = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._name = bytearray()
        self._value = bytearray()
        self._header_bytes = 0
        self._kind: str | None = None  # "file" | "text" once the part's headers are in
        self._text_name = ""
        self._text = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._headers = []
        self._name.clear()
        self._value.clear()
        self._header_bytes = 0
        self._kind = None

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise _malformed("part headers too large")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers.append((bytes(self._name).strip().lower(), bytes(self._value).strip()))
        self._name.clear()
        self._value.clear()

    def on_headers_finished(self) -> None:
        headers = dict(self._headers)
        disposition = headers.get(b"content-disposition")
        if disposition is None:
            raise _malformed("part without Content-Disposition")
        _kind, params = _split_params(_header_text(disposition))
        values = dict(params)
        name = values.get("name")
        if name is None:
            raise _malformed("part without a field name")
        filename: str | None = None
        if "filename*" in values:
            filename = _decode_ext_value(values["filename*"])
        if filename is None and "filename" in values:
            filename = values["filename"]
        if filename is None and "filename*" in values:  # not RFC 5987 and no fallback: as is
            filename = values["filename*"]
        if filename is not None:
            ctype = headers.get(b"content-type")
            self._kind = "file"
            self.events.append(_Open(name, filename, _header_text(ctype) if ctype else None))
            return
        self.n_fields += 1
        if self.n_fields > self.max_fields:
            raise MultipartError(f"Too many fields (limit {self.max_fields})")
        self._kind = "text"
        self._text_name = name
        self._text = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if end <= start:
            return
        if self._kind == "file":
            self.events.append(data[start:end])
        elif self._kind == "text":
            if len(self._text) + end - start > self.max_field_bytes:
                raise MultipartError(
                    f"Field {self._text_name[:64]} too large (limit {self.max_field_bytes} bytes)"
                )
            self.text_bytes += end - start
            if self.max_text_bytes is not None and self.text_bytes > self.max_text_bytes:
                raise MultipartError(
                    f"Text fields too large (limit {self.max_text_bytes} bytes in all)"
                )
            self._text += data[start:end]

    def on_part_end(self) -> None:
        if self._kind == "file":
            self.events.append(_CLOSE)
        elif self._kind == "text":
            value = self._text.decode("utf-8", errors="replace")
            self.fields.setdefault(self._text_name, []).append(value)
            self._text = bytearray()
        self._kind = None

    def on_end(self) -> None:
        self.ended = True


@dataclass
class _OpenFile:
    field: str
    filename: str
    sink: FileSink
    size: int = 0


@dataclass
class _Progress:
    files: list[StoredFile] = field(default_factory=list)
    current: _OpenFile | None = None
    completing: tuple[_OpenFile, asyncio.Future[Any]] | None = None  # complete_soon's

    async def settle(self, *, wait: bool = True) -> None:
        """Wait for the file completing, if any (with ``wait=False``: only if it is done): then
        it is stored, or its error raised."""
        if self.completing is None or not (wait or self.completing[1].done()):
            return
        file, result = self.completing
        value = await result
        self.completing = None
        self.files.append(StoredFile(file.field, file.filename, file.size, value))


async def _replay(events: list[_Event], progress: _Progress, open_sink: SinkFactory) -> None:
    """Carry out one chunk's events, in order, with awaits (the sinks' I/O happens here)."""
    pending: list[bytes] = []

    async def flush() -> None:
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        current = progress.current
        assert current is not None  # data only follows an _Open
        await current.sink.write(data)
        current.size += len(data)

    for event in events:
        if isinstance(event, bytes):
            pending.append(event)
            continue
        await flush()
        if isinstance(event, _Open):
            sink = await open_sink(event.field, event.filename, event.content_type)
            progress.current = _OpenFile(event.field, event.filename, sink)
        else:
            current = progress.current
            assert current is not None
            await progress.settle()  # one file completing at a time, in order
            if isinstance(current.sink, EarlyFileSink):
                progress.completing = (current, await current.sink.complete_soon())
            else:
                result = await current.sink.complete()
                progress.files.append(StoredFile(current.field, current.filename, current.size,
                                                 result))
            progress.current = None
    await flush()


_cleanups: set[asyncio.Task[None]] = set()  # aborts still running after a second cancellation


async def _abort(sink: FileSink) -> None:
    """Abort ``sink``; never raises an ``Exception``; survives the caller being cancelled."""

    async def run() -> None:
        try:
            await sink.abort()
        except Exception as exc:
            log.warning("aborting an upload failed", error=repr(exc))

    task = asyncio.ensure_future(run())
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)
    await asyncio.shield(task)


async def stream_form(
    chunks: AsyncIterator[bytes],
    content_type: str,
    open_sink: SinkFactory,
    *,
    max_field_bytes: int = 1 << 20,
    max_fields: int = 1000,
    max_text_bytes: int | None = None,
) -> StreamedForm:
    """Parse a ``multipart/form-data`` body from ``chunks``, streaming file parts to sinks.

    ``chunks`` carries the body's size and idle limits (``bodies.BodyReader``).
    ``max_text_bytes`` bounds all text fields together (None: only ``max_fields`` x
    ``max_field_bytes``)."""
    form = StreamedForm()
    progress = _Progress(files=form.files)
    try:
        collector = _Collector(form.fields, max_field_bytes, max_fields, max_text_bytes)
        try:
            parser = MultipartParser(_boundary(content_type), callbacks=collector.callbacks())
        except FormParserError as exc:
            raise _malformed(str(exc)) from exc
        async for chunk in chunks:
            if not chunk:
                continue
            if collector.ended:
                continue  # epilogue after the closing boundary: ignored (the reader counts it)
            try:
                parser.write(chunk)
            except FormParserError as exc:
                raise _malformed(str(exc)) from exc
            finally:
                events, collector.events = collector.events, []
            del chunk  # only the slices in ``events`` stay alive while the sinks work
            await _replay(events, progress, open_sink)
            events.clear()
            await progress.settle(wait=False)  # a completion that ended counts at once
        if not collector.ended:
            raise _malformed("unexpected end of body")
        parser.finalize()
        await progress.settle()
        return form
    except BaseException as exc:
        with contextlib.suppress(Exception):  # e.g. an exception type with __slots__
            exc.completed = list(progress.files)  # type: ignore[attr-defined]
        current, progress.current = progress.current, None
        if current is not None:
            await _abort(current.sink)
        completing, progress.completing = progress.completing, None
        if completing is not None:
            await _abort(completing[0].sink)
        raise
