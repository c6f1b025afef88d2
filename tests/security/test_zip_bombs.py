"""Zip bombs against a run's fetch, written as the attacks (``fetching.Limits``).

The hostile archives are built here, byte by byte where a header has to lie:
- a member of 1 GiB of zeros, raw-deflated to ~1 MB (``_zeros_bomb``);
- 100,000 empty entries, with an honest and with a lying end-of-directory count;
- a member whose declared uncompressed size lies small, and one whose declared compressed size
  lies large (to make its ratio look harmless);
- many members, each within the ratio, together over the expanded-bytes limit;
- a zip inside a zip;
- a central directory of 200,000 (or 20,000) tiny records declared as one entry, with a classic
  and with a zip64 end record;
- a zipurl answering 1 GiB of zeros gzip-encoded (~1 MB on the wire).

Covered (unit level, small limits, extraction must stop early): every refusal names its limit
and value; the limits are enforced on the bytes actually written too (the up-front check on
declared sizes switched off, the same refusal comes while extracting, within one chunk of the
limit); nothing extracted is left behind; peak disk (``DiskBudget.peak``) stays under the limit;
the per-task disk budget spans sources (an http zip plus ``s3://`` images); a nested zip is a
dropped file, never extracted; a lying central directory is refused on its size or its counted
records before ``zipfile`` opens it (traced memory stays under the capped directory); an honest
directory of exactly the limit, with long names, is read; a gzip-encoded download asks for no
encoding, is stored as the raw bytes (then not a zip) and its traced memory stays small. End to
end, on a running stack (default ratio, entries and expanded size set low): tasks whose zipurl
is the 1 GiB bomb, the 100,000 entries, or the sum over the total fail with their limit's
errorMessage within seconds, and one whose second member lies about its size after a good first
one fails as damaged; their run directories hold no input (the extracted image is removed), and
the runner's logged disk peak is the download (plus, for the liar, the bytes claimed).

Left out: Argo runs (same ``stages.fetch_images``; see ``tests/unit/test_stages.py``), memory of
``zipfile`` parsing an honest directory within the limits (at most ``limits.entries`` records in
``entries x 1070`` bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import struct
import time
import tracemalloc
import uuid
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import boto3
import httpx
import pytest

from scaleodm.common import netguard
from scaleodm.common.contracts.ids import run_name
from scaleodm.common.settings import S3Settings, SchedulerSettings
from scaleodm.common.store.s3 import S3
from scaleodm.run import fetching
from scaleodm.run.fetching import DiskBudget, InputError, Limits, extract_zip
from tests.harness import api, data, servers
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import Stack

MiB = 1024 * 1024
GiB = 1024 * MiB
NO_LIMIT = 64 * GiB


# --------------------------------------------------------------------------------------------
# Building hostile archives
# --------------------------------------------------------------------------------------------


@dataclass
class Member:
    name: str
    payload: bytes  # as stored (raw deflate for method 8)
    crc: int
    size: int  # true uncompressed size
    method: int = zipfile.ZIP_DEFLATED
    claim_size: int | None = None  # what the headers say instead of ``size``
    claim_compressed: int | None = None  # ... instead of ``len(payload)``


@functools.cache
def _zeros_crc(mib: int) -> int:
    zeros, crc = bytes(MiB), 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return crc


@functools.cache
def _deflated_zeros(mib: int) -> bytes:
    """Raw deflate of ``mib`` MiB of zeros, ~1 KiB per MiB, built in milliseconds.

    After a full flush the compressor starts afresh, so every further MiB of zeros compresses to
    the very same block: the stream is that block repeated, then the final empty block.
    """
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = z.compress(bytes(MiB)) + z.flush(zlib.Z_FULL_FLUSH)
    return block * mib + z.flush()


def _zeros_member(name: str, mib: int, **claims: Any) -> Member:
    return Member(name, _deflated_zeros(mib), _zeros_crc(mib), mib * MiB, **claims)


def _zeros_bomb(name: str = "IMG_0001.JPG", mib: int = 1024, **claims: Any) -> list[Member]:
    return [_zeros_member(name, mib, **claims)]


_LOCAL = struct.Struct("<4s5H3L2H")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_END = struct.Struct("<4s4H2LH")
_END64 = struct.Struct("<4sQ2H2L4Q")
_END64_LOCATOR = struct.Struct("<4sLQL")


def _write_zip(path: Path, members: list[Member], *, claim_entries: int | None = None) -> Path:
    """An archive whose headers say what the members claim (zip64 end records past 65,535
    entries, as in any archive that large)."""
    central = bytearray()
    with path.open("wb") as fh:
        for m in members:
            name = m.name.encode()
            size = m.size if m.claim_size is None else m.claim_size
            compressed = len(m.payload) if m.claim_compressed is None else m.claim_compressed
            offset = fh.tell()
            fh.write(_LOCAL.pack(b"PK\x03\x04", 20, 0, m.method, 0, 0x21, m.crc, compressed,
                                 size, len(name), 0))
            fh.write(name)
            fh.write(m.payload)
            central += _CENTRAL.pack(b"PK\x01\x02", 20, 20, 0, m.method, 0, 0x21, m.crc,
                                     compressed, size, len(name), 0, 0, 0, 0, 0, offset)
            central += name
        start = fh.tell()
        fh.write(central)
        count = len(members) if claim_entries is None else claim_entries
        if count > 0xFFFF:
            end64 = fh.tell()
            fh.write(_END64.pack(b"PK\x06\x06", _END64.size - 12, 45, 45, 0, 0, count, count,
                                 len(central), start))
            fh.write(_END64_LOCATOR.pack(b"PK\x06\x07", 0, end64, 1))
            count = 0xFFFF
        fh.write(_END.pack(b"PK\x05\x06", 0, 0, count, count, len(central), start, 0))
    return path


def _limits(**kw: Any) -> Limits:
    base: dict[str, Any] = {"download_bytes": NO_LIMIT, "expanded_bytes": NO_LIMIT,
                            "member_ratio": 1e9, "entries": 1_000_000, "disk_bytes": NO_LIMIT}
    return Limits(**{**base, **kw})


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.fixture(params=[pytest.param(True, id="declared-checked"),
                        pytest.param(False, id="declared-trusted")])
def upfront(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a case with the up-front check on declared sizes, and with it switched off, which
    is how an archive that lies about its sizes looks to the streaming check."""
    on = bool(request.param)
    if not on:
        monkeypatch.setattr(fetching, "_check_declared", lambda *_a, **_k: None)
    return on


# --------------------------------------------------------------------------------------------
# One archive
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "message", "bound"),
    [
        pytest.param(_limits(expanded_bytes=8 * MiB),
                     "Input archive refused: it expands to more than the limit of 8 MiB",
                     8 * MiB, id="expanded-bytes"),
        pytest.param(_limits(member_ratio=4.0),
                     "Input archive refused: a file in it expands more than the limit of 4 "
                     "times its compressed size", 5 * MiB, id="member-ratio"),
        pytest.param(_limits(disk_bytes=8 * MiB),
                     "Inputs refused: they take more disk space than the task's limit of 8 MiB",
                     8 * MiB, id="disk-budget"),
    ],
)
def test_one_gib_of_zeros(
    tmp_path: Path, upfront: bool, limits: Limits, message: str, bound: int
) -> None:
    archive = _write_zip(tmp_path / "bomb.zip", _zeros_bomb())
    assert archive.stat().st_size < 1.1 * MiB
    dest = tmp_path / "images"
    dest.mkdir()
    budget = DiskBudget(limits.disk_bytes)

    started = time.monotonic()
    with pytest.raises(InputError) as refused:
        extract_zip(archive, dest, limits, budget)
    elapsed = time.monotonic() - started

    assert str(refused.value) == message
    assert _files(dest) == [], "the partly extracted file is removed"
    assert budget.used == 0
    if upfront:
        assert budget.peak == 0, "refused on the declared size, before writing a byte"
    else:
        assert 0 < budget.peak <= bound, budget.peak
    assert elapsed < 5, elapsed


def test_declared_size_lies_small(tmp_path: Path) -> None:
    """Headers claim 1000 bytes; the data is 1 GiB of zeros. Nothing beyond the claim is
    written: the member ends at its claimed size and fails its CRC."""
    archive = _write_zip(tmp_path / "liar.zip", _zeros_bomb(claim_size=1000))
    with zipfile.ZipFile(archive) as zf:
        assert zf.infolist()[0].file_size == 1000
    dest = tmp_path / "images"
    dest.mkdir()
    budget = DiskBudget(NO_LIMIT)

    with pytest.raises(InputError, match=r"^Could not extract \.zip file: a file in it is damaged"):
        extract_zip(archive, dest, _limits(expanded_bytes=8 * MiB), budget)

    assert budget.peak <= 1000
    assert _files(dest) == []


def test_declared_compressed_size_lies_large(tmp_path: Path) -> None:
    """Claiming 1 GiB of compressed data would make the ratio look like 1:1; the archive is
    1 MB, and a compressed size beyond it is not believed."""
    archive = _write_zip(tmp_path / "liar.zip", _zeros_bomb(claim_compressed=GiB))
    dest = tmp_path / "images"
    dest.mkdir()
    with pytest.raises(InputError, match="expands more than the limit of 100 times"):
        extract_zip(archive, dest, _limits(member_ratio=100.0))
    assert _files(dest) == []


@pytest.mark.parametrize(
    ("claim", "message"),
    [
        pytest.param(None, "Input archive refused: it has 100000 entries, more than the limit "
                     "of 1000", id="honest-count"),
        pytest.param(10, "Input archive refused: it has more entries than the limit of 1000",
                     id="count-lies-small"),
    ],
)
def test_hundred_thousand_entries(tmp_path: Path, claim: int | None, message: str) -> None:
    archive = _many_entries(tmp_path / "many.zip", claim_entries=claim)
    dest = tmp_path / "images"
    dest.mkdir()

    started = time.monotonic()
    with pytest.raises(InputError) as refused:
        extract_zip(archive, dest, _limits(entries=1000))

    assert str(refused.value) == message
    assert _files(dest) == []
    assert time.monotonic() - started < 5


def _lying_directory(path: Path, records: int, *, zip64: bool = False) -> Path:
    """``records`` central-directory records of 47 bytes (a one-letter name, no local data),
    under end records declaring one entry in a directory of their true size: ``zipfile`` would
    read them all and build an object per record before counting anything. With ``zip64`` the
    classic end record also says its directory is one record long; the zip64 record behind its
    locator (which ``zipfile`` believes whatever the classic fields say) gives the true size."""
    one = _CENTRAL.pack(b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0)
    central = (one + b"a") * records
    with path.open("wb") as fh:
        fh.write(central)
        if zip64:
            fh.write(_END64.pack(b"PK\x06\x06", _END64.size - 12, 45, 45, 0, 0, 1, 1,
                                 len(central), 0))
            fh.write(_END64_LOCATOR.pack(b"PK\x06\x07", 0, len(central), 1))
            fh.write(_END.pack(b"PK\x05\x06", 0, 0, 1, 1, len(one) + 1, 0, 0))
        else:
            fh.write(_END.pack(b"PK\x05\x06", 0, 0, 1, 1, len(central), 0, 0))
    return path


@pytest.fixture
def zipfile_unopened(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening an archive with ``zipfile`` fails the test: it parses the whole directory."""

    def opened(*_a: Any, **_k: Any) -> zipfile.ZipFile:
        raise AssertionError("zipfile opened the archive: its directory was parsed")

    monkeypatch.setattr(zipfile, "ZipFile", opened)


@pytest.mark.usefixtures("zipfile_unopened")
@pytest.mark.parametrize(
    ("records", "zip64"),
    [
        # 9.4 MB of directory: over 1000 x (46 + 1024) bytes, refused on its size alone
        pytest.param(200_000, False, id="directory-too-large"),
        pytest.param(200_000, True, id="zip64-directory-too-large"),
        # 940 KB: within that size, but 20,000 records when 1000 are allowed
        pytest.param(20_000, False, id="records-over-the-count"),
    ],
)
def test_declared_count_lies_about_a_huge_directory(
    tmp_path: Path, records: int, zip64: bool
) -> None:
    archive = _lying_directory(tmp_path / "liar.zip", records, zip64=zip64)
    dest = tmp_path / "images"
    dest.mkdir()

    tracemalloc.start()
    try:
        with pytest.raises(InputError) as refused:
            extract_zip(archive, dest, _limits(entries=1000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert str(refused.value) == (
        "Input archive refused: it has more entries than the limit of 1000"
    )
    # The end records, and at most the directory's capped bytes, never an object per record.
    assert peak < 1000 * (46 + 1024) + 256 * 1024, peak
    assert _files(dest) == []


def test_records_within_the_limits_open(tmp_path: Path) -> None:
    """An honest directory of exactly the limit's entries, long names included, is read."""
    archive = tmp_path / "ok.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(999):
            zf.writestr(f"{'d' * 900}/{i}.txt", b"")
        zf.writestr("IMG_0001.JPG", data.JPEG)
    dest = tmp_path / "images"
    dest.mkdir()
    assert extract_zip(archive, dest, _limits(entries=1000)) == 1000


def test_many_members_each_under_the_ratio(tmp_path: Path, upfront: bool) -> None:
    """40 members of 256 KiB (within the small-file allowance, so within the ratio) expand to
    10 MiB together: over the archive's 4 MiB."""
    members = [_zeros_member(f"IMG_{i:04d}.JPG", 1) for i in range(40)]
    for m in members:  # 256 KiB each: a quarter of the 1 MiB stream
        z = zlib.compressobj(9, zlib.DEFLATED, -15)
        m.payload = z.compress(bytes(MiB // 4)) + z.flush()
        m.crc, m.size = zlib.crc32(bytes(MiB // 4)), MiB // 4
    archive = _write_zip(tmp_path / "sum.zip", members)
    dest = tmp_path / "images"
    dest.mkdir()
    budget = DiskBudget(NO_LIMIT)

    with pytest.raises(InputError, match="expands to more than the limit of 4 MiB$"):
        extract_zip(archive, dest, _limits(member_ratio=2.0, expanded_bytes=4 * MiB), budget)

    assert _files(dest) == []
    assert budget.peak <= 4 * MiB
    assert (budget.peak == 0) is upfront


def test_ratio_allowance_lets_small_files_through(tmp_path: Path) -> None:
    """A 512 KiB blank image compresses ~1000:1; it is no bomb and passes a ratio of 2."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    blank = bytes(MiB // 2)
    member = Member("IMG_BLANK.JPG", z.compress(blank) + z.flush(), zlib.crc32(blank), len(blank))
    archive = _write_zip(tmp_path / "blank.zip", [member])
    dest = tmp_path / "images"
    dest.mkdir()
    assert extract_zip(archive, dest, _limits(member_ratio=2.0)) == 1
    assert (dest / "IMG_BLANK.JPG").stat().st_size == MiB // 2


def test_nested_zip_is_dropped_not_extracted(tmp_path: Path) -> None:
    inner = _write_zip(tmp_path / "inner.zip", _zeros_bomb(mib=64))
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_STORED) as zf:
        zf.write(inner, "inner.zip")
        zf.writestr("IMG_0001.JPG", data.JPEG)
    dest = tmp_path / "images"
    dest.mkdir()
    budget = DiskBudget(NO_LIMIT)

    assert extract_zip(outer, dest, _limits(expanded_bytes=MiB), budget) == 1

    assert [p.name for p in _files(dest)] == ["IMG_0001.JPG"]
    assert budget.peak == len(data.JPEG)


# --------------------------------------------------------------------------------------------
# Whole fetches: the per-task disk budget over all sources
# --------------------------------------------------------------------------------------------


@pytest.fixture
async def facade(s3: servers.S3Endpoint) -> AsyncIterator[S3]:
    settings = S3Settings(endpoint_url=s3.url, region=s3.region, access_key_id=s3.access_key,
                          secret_access_key=s3.secret_key, bucket="scaleodm", create_bucket=True)
    async with S3.open(settings) as opened:
        yield opened


@pytest.fixture
def budgets(monkeypatch: pytest.MonkeyPatch) -> list[DiskBudget]:
    """Every ``DiskBudget`` a fetch makes, to read its peak afterwards."""
    made: list[DiskBudget] = []

    class Recorded(DiskBudget):
        def __init__(self, limit: int) -> None:
            super().__init__(limit)
            made.append(self)

    monkeypatch.setattr(fetching, "DiskBudget", Recorded)
    return made


def _boto(s3: servers.S3Endpoint) -> Any:
    return boto3.client("s3", endpoint_url=s3.url, region_name=s3.region,
                        aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key)


@pytest.mark.integration
async def test_disk_budget_spans_sources(
    tmp_path: Path, http_fixture: HttpFixture, s3: servers.S3Endpoint, facade: S3,
    budgets: list[DiskBudget],
) -> None:
    """An http zip expanding to 3 MiB, then the task's own upload of two 1 MiB images: each
    source is fine alone, together they pass the task's 4.5 MiB."""
    task_id = str(uuid.uuid4())
    name = f"three-{uuid.uuid4().hex}.zip"
    _write_zip(http_fixture.root / name, [_zeros_member("IMG_ZIP.JPG", 3)])
    client = _boto(s3)
    for i in (1, 2):
        client.put_object(Bucket="scaleodm", Key=f"tasks/{task_id}/inputs/IMG_{i}.JPG",
                          Body=bytes(MiB))
    images = tmp_path / task_id / "images"

    with pytest.raises(InputError) as refused:
        await fetching.fetch_inputs(
            [http_fixture.url(name), f"s3://scaleodm/tasks/{task_id}/inputs/"], images, facade,
            task_id=task_id, limits=_limits(disk_bytes=4 * MiB + MiB // 2), timeout_s=10,
            outbound=netguard.OutboundPolicy(["127.0.0.0/8"]),
        )

    assert str(refused.value) == (
        "Inputs refused: they take more disk space than the task's limit of 4608 KiB"
    )
    assert not images.exists(), "what the fetch wrote is removed"
    assert not (tmp_path / task_id / ".downloads").exists()
    (budget,) = budgets
    assert 4 * MiB <= budget.peak <= 4 * MiB + MiB // 2


@pytest.mark.integration
async def test_s3_zip_bomb(
    tmp_path: Path, s3: servers.S3Endpoint, facade: S3, budgets: list[DiskBudget]
) -> None:
    """The same bomb as the task's own upload: the S3 path extracts within the same limits."""
    task_id = str(uuid.uuid4())
    bomb = _write_zip(tmp_path / "bomb.zip", _zeros_bomb())
    _boto(s3).put_object(Bucket="scaleodm", Key=f"tasks/{task_id}/inputs/bomb.zip",
                         Body=bomb.read_bytes())
    images = tmp_path / task_id / "images"
    with pytest.raises(InputError, match="expands to more than the limit of 8 MiB$"):
        await fetching.fetch_inputs(
            [f"s3://scaleodm/tasks/{task_id}/inputs/"], images, facade, task_id=task_id,
            limits=_limits(expanded_bytes=8 * MiB), timeout_s=10,
        )
    assert not images.exists()
    (budget,) = budgets
    assert budget.peak <= bomb.stat().st_size + 1024  # the download only: refused up front


# --------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------


def _gzip_zeros(mib: int) -> bytes:
    """A gzip body of ``mib`` MiB of zeros (RFC 1952: header, raw deflate, CRC and size)."""
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = struct.pack("<2L", _zeros_crc(mib), (mib * MiB) & 0xFFFFFFFF)
    return header + _deflated_zeros(mib) + trailer


@contextlib.asynccontextmanager
async def _gzip_server(body: bytes) -> AsyncIterator[tuple[str, list[bytes]]]:
    """Answers every GET with ``body`` as ``Content-Encoding: gzip``, whatever was asked:
    (the URL, each request head)."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\n"
                     b"Content-Encoding: gzip\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % len(body))
        writer.write(body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/bomb.zip", heads


async def test_gzip_encoded_download_is_stored_raw(
    tmp_path: Path, budgets: list[DiskBudget]
) -> None:
    """A zipurl answering 1 GiB of zeros gzip-encoded (~1 MB on the wire). Inflating it as it
    comes would turn one 64 KiB network read into 64 MiB of memory; the fetch asks for no
    encoding, keeps the bytes as sent (counted against the download limit and the disk budget),
    and refuses them as not a zip."""
    body = _gzip_zeros(1024)
    images = tmp_path / "task" / "images"

    async with _gzip_server(body) as (url, heads):
        tracemalloc.start()
        try:
            with pytest.raises(InputError) as refused:
                await fetching.fetch_inputs(
                    [url], images, cast(S3, None), task_id=str(uuid.uuid4()),
                    limits=_limits(download_bytes=8 * MiB), timeout_s=10,
                    outbound=netguard.OutboundPolicy(["127.0.0.0/8"]),
                )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    assert str(refused.value) == "Could not extract .zip file: not a valid zip archive"
    (head,) = heads
    assert b"\r\naccept-encoding: identity\r\n" in head.lower(), head
    assert peak < 16 * MiB, peak
    (budget,) = budgets
    assert budget.peak == len(body), "the raw bytes, as sent"
    assert not images.exists()


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _served(http_fixture: HttpFixture, path: Path) -> Iterator[str]:
    target = http_fixture.root / f"{uuid.uuid4().hex}-{path.name}"
    path.rename(target)
    try:
        yield http_fixture.url(target.name)
    finally:
        target.unlink(missing_ok=True)


def _peak(runner_log: str) -> int:
    peaks = [int(m) for m in re.findall(r'"disk_peak_bytes": (\d+)', runner_log)]
    assert peaks, runner_log
    return max(peaks)


def _sum_over_total(path: Path) -> Path:
    """40 members of 256 KiB of zeros (each within the small-file allowance): 10 MiB in all."""
    quarter = bytes(MiB // 4)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = z.compress(quarter) + z.flush()
    members = [Member(f"IMG_{i:04d}.JPG", payload, zlib.crc32(quarter), len(quarter))
               for i in range(40)]
    return _write_zip(path, members)


def _many_entries(path: Path, *, claim_entries: int | None = None) -> Path:
    """100,000 empty images (~10 MB of headers)."""
    members = [Member(f"IMG_{i:06d}.JPG", b"", 0, 0, method=zipfile.ZIP_STORED)
               for i in range(100_000)]
    return _write_zip(path, members, claim_entries=claim_entries)


@pytest.mark.integration
async def test_bomb_tasks_fail_fast_and_leave_nothing(
    tmp_path: Path, fresh_stack: tuple[Stack, servers.Nats], http_fixture: HttpFixture
) -> None:
    """Three hostile zipurls on one stack, default ratio, entries and expanded size set low."""
    stack, _ = fresh_stack
    stack.extra_env = {"SCALEODM_ZIP_MAX_EXPANDED_BYTES": str(8 * MiB),
                       "SCALEODM_ZIP_MAX_ENTRIES": "1000"}
    stack.start_all("gateway", "scheduler", "watcher")
    cases = {
        "gib-of-zeros": (_write_zip(tmp_path / "bomb.zip", _zeros_bomb()),
                         "Input archive refused: a file in it expands more than the limit of "
                         "100 times its compressed size"),
        "sum-over-total": (_sum_over_total(tmp_path / "sum.zip"),
                           "Input archive refused: it expands to more than the limit of 8 MiB"),
        "100k-entries": (_many_entries(tmp_path / "many.zip"),
                         "Input archive refused: it has 100000 entries, more than the limit of "
                         "1000"),
        # A good image is extracted first, then a member claiming 1000 bytes turns out longer.
        "size-lies": (_write_zip(tmp_path / "liar.zip", [
                          Member("IMG_0001.JPG", data.JPEG, zlib.crc32(data.JPEG),
                                 len(data.JPEG), method=zipfile.ZIP_STORED),
                          *_zeros_bomb("IMG_0002.JPG", claim_size=1000)]),
                      "Could not extract .zip file: a file in it is damaged, encrypted or uses "
                      "an unsupported compression method"),
    }
    extracted = {"size-lies": len(data.JPEG) + 1000}
    sizes = {name: path.stat().st_size for name, (path, _) in cases.items()}
    with contextlib.ExitStack() as serving:
        urls = {name: serving.enter_context(_served(http_fixture, path))
                for name, (path, _) in cases.items()}
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
            started = time.monotonic()
            tasks = {name: (await api.create(client, zipurl=url, name=name))["uuid"]
                     for name, url in urls.items()}
            finals = {name: await api.poll_until(client, task_id, api.status_is(30, 40, 50),
                                                 timeout_s=60)
                      for name, task_id in tasks.items()}
            elapsed = time.monotonic() - started

    assert elapsed < 30, elapsed
    for name, (_, message) in cases.items():
        assert finals[name]["status"] == {"code": 30, "errorMessage": message}, name
        rd = stack.runs_dir / run_name(tasks[name], 1)
        assert json.loads((rd / "result.json").read_text())["outcome"] == "failed"
        leftovers = [p for p in _files(rd) if p.parent != rd]  # bookkeeping sits at the top
        assert leftovers == [], (name, leftovers)
        # Refused on what the archive declares: on disk there only ever was the download
        # (and, for the liar, the good image and the 1000 bytes claimed).
        peak = _peak((rd / "runner.log").read_text())
        assert sizes[name] <= peak <= sizes[name] + extracted.get(name, 0), (name, peak)


def test_many_members_of_one_name_and_hostile_names_extract(tmp_path: Path) -> None:
    """300 members named ``a.jpg`` in as many folders, one with NUL, one of 400 characters: no
    name grows past the file system's limit (before: ``a___…_.jpg`` until ENAMETOOLONG, an
    internal error), every image is kept, and nothing lands outside the images folder."""
    archive = tmp_path / "same-names.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(300):
            zf.writestr(f"d{i}/a.jpg", data.JPEG)
        zf.writestr("x/evil\x00name.jpg", data.JPEG)
        zf.writestr("b" * 400 + ".jpg", data.JPEG)
        zf.writestr("../../..jpg", data.JPEG)
    dest = tmp_path / "images"
    dest.mkdir()
    written = extract_zip(archive, dest, Limits.from_settings(SchedulerSettings()))
    names = sorted(p.name for p in dest.iterdir())
    # zipfile cuts a name at NUL ("x/evil": no image) and "..jpg" has no extension: dropped
    assert written == len(names) == 301
    assert max(len(n.encode()) for n in names) <= 255
    assert not [n for n in names if "\x00" in n or n.startswith(".")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "same-names.zip"]
