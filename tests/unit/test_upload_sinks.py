"""``scaleodm.gateway.uploads.s3_sinks``: the bookkeeping around each file a request stores.

In memory: a fake S3 facade (writers that record their bytes, deletes) and a fake upload store,
driven by ``multipart.stream_form`` as the routes drive it.

Covered: a stored file is recorded with its size and reported completed; a file whose object
reached S3 but whose record failed (the store went away) has its object deleted and its name
given back as never stored, the request failing with the store's error; a file cut off before
its end is aborted (no object) and its name given back; a duplicate name is renamed. Early
completion (``complete_soon``): the next file is read while one completes, files stay in order
and count only once completed; a completion that fails fails the request, its object deleted and
its name given back; an error while a file is completing deletes that file's object too and
gives its name back with its recorded size.

Left out: S3 itself (``tests/unit/test_s3_parts.py``, ``tests/integration/test_s3_writer.py``)
and the routes (``tests/conformance``, ``tests/security/test_dos_uploads.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from scaleodm.common.store.s3 import S3Url
from scaleodm.gateway import multipart, uploads

BOUNDARY = "b0undary"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"
PREFIX = S3Url("bucket", "tasks/t1/inputs/")


@dataclass
class FakeWriter:
    """``gate``: early completions wait for it; ``fail``: completing raises."""

    url: S3Url
    gate: asyncio.Event
    fail: bool = False
    data: bytearray = field(default_factory=bytearray)
    completed: bool = False
    completing: bool = False
    aborted: bool = False

    async def write(self, data: bytes) -> None:
        self.data += data

    async def complete(self) -> int:
        self.completing = True
        if self.fail:
            raise ConnectionResetError("S3 went away")
        self.completed = True
        return len(self.data)

    async def complete_soon(self) -> asyncio.Future[int]:
        async def later() -> int:
            await self.gate.wait()
            return await self.complete()

        self.completing = True
        return asyncio.ensure_future(later())

    async def abort(self) -> None:
        if not self.completed:
            self.aborted = True


@dataclass
class FakeS3:
    writers: list[FakeWriter] = field(default_factory=list)
    deleted: list[S3Url] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    fail: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.gate.set()

    def writer(self, url: S3Url, content_type: str | None = None) -> FakeWriter:
        del content_type
        out = FakeWriter(url, self.gate, fail=url.key.rsplit("/", 1)[1] in self.fail)
        self.writers.append(out)
        return out

    async def delete(self, url: S3Url) -> None:
        self.deleted.append(url)


@dataclass
class FakeUploads:
    """The upload store's name calls; ``fail_store`` makes ``mark_stored`` fail."""

    names: set[str] = field(default_factory=set)
    stored: dict[str, int] = field(default_factory=dict)
    released: list[tuple[str, int | None]] = field(default_factory=list)
    fail_store: bool = False

    async def claim_name(self, upload_id: str, name: str, next_name: Callable[[str], str]
                         ) -> str:
        del upload_id
        while name in self.names:
            name = next_name(name)
        self.names.add(name)
        return name

    async def mark_stored(self, upload_id: str, name: str, size: int) -> None:
        del upload_id
        if self.fail_store:
            raise ConnectionError("store unavailable")
        self.stored[name] = size

    async def release_name(self, upload_id: str, name: str, *, stored_size: int | None = None
                           ) -> None:
        del upload_id
        self.names.discard(name)
        self.released.append((name, stored_size))


def body(*files: tuple[str, bytes], end: bool = True) -> bytes:
    out = b"".join(
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"; "
        f"filename=\"{name}\"\r\n\r\n".encode() + content + b"\r\n"
        for name, content in files)
    return out + (f"--{BOUNDARY}--\r\n".encode() if end else b"")


async def chunks(data: bytes, seen: list[int] | None = None) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 7):
        await asyncio.sleep(0)
        if seen is not None:
            seen.append(i)
        yield data[i : i + 7]


async def parse(data: bytes, s3: FakeS3, store: FakeUploads, seen: list[int] | None = None
                ) -> multipart.StreamedForm:
    registry = uploads.NameRegistry(upload_id="t1", uploads=store)  # type: ignore[arg-type]
    sinks = uploads.s3_sinks(s3, PREFIX, registry, max_files=10)  # type: ignore[arg-type]
    return await multipart.stream_form(chunks(data, seen), CTYPE, sinks)


async def test_stored_files_are_recorded_and_duplicates_renamed() -> None:
    s3, store = FakeS3(), FakeUploads()
    form = await parse(body(("a.jpg", b"x" * 30), ("a.jpg", b"y" * 20)), s3, store)
    assert [(f.result, f.size) for f in form.files] == [("a.jpg", 30), ("a_.jpg", 20)]
    assert store.stored == {"a.jpg": 30, "a_.jpg": 20}
    assert [w.url.key for w in s3.writers] == ["tasks/t1/inputs/a.jpg", "tasks/t1/inputs/a_.jpg"]
    assert s3.deleted == [] and store.released == []


async def test_an_object_whose_record_failed_is_deleted_and_its_name_given_back() -> None:
    s3, store = FakeS3(), FakeUploads(fail_store=True)
    with pytest.raises(ConnectionError) as caught:
        await parse(body(("a.jpg", b"x" * 30)), s3, store)
    assert multipart.completed_files(caught.value) == []
    assert s3.writers[0].completed and s3.deleted == [S3Url("bucket", "tasks/t1/inputs/a.jpg")]
    assert store.released == [("a.jpg", None)] and store.names == set()


async def test_a_file_cut_off_is_aborted_and_its_name_given_back() -> None:
    s3, store = FakeS3(), FakeUploads()
    with pytest.raises(multipart.MultipartError) as caught:
        await parse(body(("a.jpg", b"x" * 30), ("b.jpg", b"y" * 20), end=False)[:-10], s3,
                    store)
    assert [f.result for f in multipart.completed_files(caught.value)] == ["a.jpg"]
    assert s3.writers[1].aborted and not s3.writers[1].completed and s3.deleted == []
    assert store.released == [("b.jpg", None)] and store.stored == {"a.jpg": 30}


async def test_the_next_file_is_read_while_one_completes() -> None:
    s3, store = FakeS3(), FakeUploads()
    s3.gate.clear()
    data = body(("a.jpg", b"x" * 30), ("b.jpg", b"y" * 40))
    seen: list[int] = []
    parsing = asyncio.create_task(parse(data, s3, store, seen))
    async with asyncio.timeout(30):
        while not s3.writers or len(s3.writers) < 2 or len(s3.writers[1].data) < 40:
            await asyncio.sleep(0.001)  # b.jpg read in full while a.jpg is completing
    assert not s3.writers[0].completed and store.stored == {}
    assert not parsing.done()  # b.jpg waits for a.jpg: one completing at a time
    s3.gate.set()
    form = await asyncio.wait_for(parsing, 30)
    assert [(f.result, f.size) for f in form.files] == [("a.jpg", 30), ("b.jpg", 40)]
    assert store.stored == {"a.jpg": 30, "b.jpg": 40}


async def test_a_completion_that_fails_fails_the_request_and_cleans_up() -> None:
    s3, store = FakeS3(fail={"b.jpg"}), FakeUploads()
    with pytest.raises(ConnectionResetError) as caught:
        await parse(body(("a.jpg", b"x" * 30), ("b.jpg", b"y" * 40), ("c.jpg", b"z")), s3,
                    store)
    assert [f.result for f in multipart.completed_files(caught.value)] == ["a.jpg"]
    assert S3Url("bucket", "tasks/t1/inputs/b.jpg") in s3.deleted
    assert ("b.jpg", None) in store.released and "b.jpg" not in store.stored


async def test_an_error_while_a_file_completes_deletes_it_too() -> None:
    s3, store = FakeS3(), FakeUploads()
    s3.gate.clear()  # a.jpg's completion waits: the body ends too early meanwhile
    data = body(("a.jpg", b"x" * 30), ("b.jpg", b"y" * 400), end=False)[:-100]
    parsing = asyncio.create_task(parse(data, s3, store))
    async with asyncio.timeout(30):
        while ("b.jpg", None) not in store.released:  # b.jpg aborted: a.jpg's turn
            await asyncio.sleep(0.001)
    s3.gate.set()  # a.jpg reaches S3 and is recorded, then deleted again
    with pytest.raises(multipart.MultipartError) as caught:
        await asyncio.wait_for(parsing, 30)
    assert multipart.completed_files(caught.value) == []
    assert s3.deleted == [S3Url("bucket", "tasks/t1/inputs/a.jpg")]
    assert ("a.jpg", 30) in store.released and store.names == set()
