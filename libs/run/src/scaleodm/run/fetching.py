"""Bringing a run's inputs into its project: ``images/`` flattened, plus GCP/geo text files and
the split-merge ``seed.zip``.

Sources are http(s) URLs of zips, ``s3://`` zip objects, or ``s3://bucket/prefix/`` folders of
images and/or zips. Archives are extracted flattened (no paths, so no traversal), non-images are
dropped except ``.txt`` control files (GCP, geo, image groups; a zip inside a zip is dropped too,
never extracted), and name clashes get NodeODM's ``_`` suffix. http(s) downloads go through the
outbound guard (``netguard``): every connection, redirects included, is checked on the address
it connects to.

One upload is not an input but a piece of project: ODM's split-merge client sends each submodel
with a file named exactly ``seed.zip`` (``opendm/remote.py``, ``create_seed_payload``) holding
OpenSfM state under project-relative paths, and NodeODM extracts it into the project root with
its paths kept (``taskNew.js``, ``handleSeed``). ``extract_seed`` does the same for an object
named ``seed.zip`` directly in the task's own upload prefix (a zipurl's archive, an operator's
bucket or a zip inside a zip never holds a seed: NodeODM renames those). Keeping paths is what
the flattening above exists to avoid, so every entry is checked before anything is written: no
absolute path, drive letter, backslash, ``..`` or control character, no symbolic link, nothing
that resolves outside the project, nothing in ``images/`` (a seed adds no image) or in the
fetch's scratch folder; one bad entry refuses the whole seed, and the fetch with it.

Hostile inputs are bounded by ``Limits`` (``SchedulerSettings``), each checked twice: up front on
what the archive declares (entry count, member sizes), and again on the bytes actually written,
chunk by chunk, because declared sizes are the attacker's to choose. The first limit passed stops
the fetch at once: per archive its entries and expanded bytes, per member its expansion ratio
(bytes written / compressed size, with ``RATIO_ALLOWANCE_BYTES`` so tiny files never trip it),
per download its size, and per task a ``DiskBudget`` over everything the fetch holds on disk
(downloads, extracted files, ``s3://`` objects). A failed fetch removes what it wrote.

Memory is bounded as well as disk. ``zipfile`` holds an archive's whole central directory in
memory and builds an object per record, so the entries are checked before it opens the archive:
the count the end records declare, the directory's size, and the records counted in it
(``_check_directory``). Downloads ask for no content encoding and keep the bytes as sent: an
inflated body has no bound on what one network read becomes.

``s3://`` sources are read with the service's credentials, so each one, and every key a prefix
listing returns, must pass ``s3.input_allowed`` (the rule the gateway applies at submission)
before any S3 call for it.

Messages of ``InputError`` become the task's ``errorMessage``: they name the limit and its value
or the user's own ``s3://`` URL, never a local path, an exception's text, or whether a bucket
exists (every S3 failure reads the same); the details go to the service log. A permitted prefix
that lists empty is no failure here: it adds no image, and the caller reports that as NodeODM
does ("No images found", ``stages.NO_IMAGES``).
"""

from __future__ import annotations

import contextlib
import posixpath
import re
import shutil
import stat
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, NamedTuple
from urllib.parse import urlsplit

import httpx

from scaleodm.common import netguard, splitmerge
from scaleodm.common.domain.text import shown
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import SchedulerSettings
from scaleodm.common.store import s3 as s3mod
from scaleodm.common.store.s3 import S3, S3Url

log = get_logger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".tif", ".tiff", ".png", ".dng"})
CONTROL_EXTS = frozenset({".txt"})
CHUNK_BYTES: Final = 1024 * 1024
# Every member may expand to this much whatever its ratio: a small text file or a tiny blank image
# compresses far beyond any sane ratio, and this little cannot hurt.
RATIO_ALLOWANCE_BYTES: Final = 1024 * 1024
_ZIP_READ_ERRORS = (
    zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError,
    struct.error,
)
_NOT_A_ZIP: Final = "Could not extract .zip file: not a valid zip archive"
_DAMAGED: Final = (
    "Could not extract .zip file: a file in it is damaged, encrypted or uses an unsupported "
    "compression method"
)
_SHOWN_MAX: Final = 200
SEED_NAME: Final = splitmerge.SEED_NAME
SCRATCH_DIR: Final = ".downloads"  # in the project: the fetch's downloads, removed at its end
_DRIVE = re.compile(r"[A-Za-z]:")


class InputError(Exception):
    """The inputs cannot be used; the message is shown to the user as errorMessage."""


def _size(n: int | float) -> str:
    """A byte count as users read it: exact, in the largest binary unit that divides it."""
    n = int(n)
    for unit, name in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


@dataclass(frozen=True)
class Limits:
    """Bounds of one run's fetch; every refusal says which one it hit and its value."""

    download_bytes: int  # one downloaded archive (zip_max_bytes)
    expanded_bytes: int  # all files extracted from one archive (zip_max_expanded_bytes)
    member_ratio: float  # bytes written / compressed size of one member (zip_max_ratio)
    entries: int  # entries of one archive, directories and dropped files included
    disk_bytes: int  # everything the fetch holds on disk at once (task_disk_budget_bytes)

    @classmethod
    def from_settings(cls, settings: SchedulerSettings) -> Limits:
        return cls(
            download_bytes=settings.zip_max_bytes,
            expanded_bytes=settings.zip_max_expanded_bytes,
            member_ratio=settings.zip_max_ratio,
            entries=settings.zip_max_entries,
            disk_bytes=settings.task_disk_budget_bytes,
        )

    def too_many_entries(self, count: int | None = None) -> InputError:
        """``count`` when the archive says it honestly; without it when its directory lies."""
        if count is None:
            return InputError(
                f"Input archive refused: it has more entries than the limit of {self.entries}"
            )
        return InputError(
            f"Input archive refused: it has {count} entries, more than the limit of "
            f"{self.entries}"
        )

    def too_large_expanded(self) -> InputError:
        return InputError(
            "Input archive refused: it expands to more than the limit of "
            f"{_size(self.expanded_bytes)}"
        )

    def too_high_ratio(self) -> InputError:
        return InputError(
            "Input archive refused: a file in it expands more than the limit of "
            f"{self.member_ratio:g} times its compressed size"
        )

    def too_large_download(self) -> InputError:
        return InputError(
            f"Input archive refused: it is larger than the limit of {_size(self.download_bytes)}"
        )


class DiskBudget:
    """Bytes the fetch holds on disk, charged before they are written; over the limit it stops.

    ``peak`` is the most ever held (what the refusal tests report).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def refusal(self) -> InputError:
        return InputError(
            f"Inputs refused: they take more disk space than the task's limit of "
            f"{_size(self.limit)}"
        )

    def check(self, more: int) -> None:
        """Refuse now if ``more`` bytes (declared, not yet written) would not fit."""
        if self.used + more > self.limit:
            raise self.refusal()

    def charge(self, n: int) -> None:
        if self.used + n > self.limit:
            raise self.refusal()
        self.used += n
        self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


def _ext(name: str) -> str:
    return posixpath.splitext(name)[1].lower()


def _wanted(name: str) -> bool:
    return _ext(name) in IMAGE_EXTS or _ext(name) in CONTROL_EXTS


_NAME_BYTES = 200  # a stored name's most bytes: room for duplicate suffixes below 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_suffixes: dict[Path, int] = {}  # base path -> duplicates stored so far (per process: one run)


def _target(dest: Path, name: str) -> Path:
    """Where an input named ``name`` (a zip member or S3 key) is stored in ``dest``: flattened,
    control characters replaced, cut to ``_NAME_BYTES``; a clash gets NodeODM's ``_`` suffix,
    then a number (a thousand ``a.jpg`` in one zip must not make a name too long, nor cost a
    thousand lookups each)."""
    base = _CONTROL.sub("_", posixpath.basename(name.replace("\\", "/")))
    stem, ext = posixpath.splitext(base)
    ext = ext[:16]
    stem = stem.lstrip(".") or "file"
    budget = _NAME_BYTES - len(ext.encode())
    stem = stem.encode()[:budget].decode(errors="ignore") or "file"
    def nth(n: int) -> Path:
        return dest / (f"{stem}{'_' * n}{ext}" if n <= 3 else f"{stem}_{n}{ext}")

    first = nth(0)
    n = _suffixes.get(first, 0)
    while nth(n).exists():
        n += 1
    _suffixes[first] = n + 1
    return nth(n)


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # one central directory record, before its names
# What one entry's record may take on average beyond its fixed part: its name, extra fields and
# comment. Real archives stay far below (a name, a zip64 extra of 28 bytes, a timestamp extra
# of ~36), and every field may reach 65,535 bytes, so a bound from the format would let one
# entry weigh 196 KiB. ``zipfile`` reads the whole directory into memory and builds an object
# per record, so the directory it may read is capped at ``entries`` times this plus the fixed
# part: 53.5 MB at the default 50,000 entries. Records are then counted within that cap.
_RECORD_ALLOWANCE_BYTES: Final = 1024


class _Directory(NamedTuple):
    """An archive's central directory as its end records declare it, and as ``zipfile`` will
    look for it."""

    entries: int
    size: int  # bytes
    start: int  # offset in the file


def _directory(archive: Path) -> _Directory | None:
    """The central directory the end records declare, read before ``zipfile`` parses it.

    Found the way ``zipfile`` finds it (``_EndRecData``, ``_EndRecData64``, ``_RealGetContents``),
    so the bounds hold for the directory it would read: the end record at the very end or the
    last one in the final 64 KiB, and the zip64 end record just before its locator whenever the
    locator precedes the end record, whatever the classic fields say. A zip64 record at the
    locator's stated offset (where other readers look) counts too: the larger claims win. None
    when there is no end record (``zipfile`` refuses such a file).
    """
    size = archive.stat().st_size
    with archive.open("rb") as fh:
        base = max(0, size - _EOCD.size - 0xFFFF)  # the record, then a comment of <= 64 KiB
        fh.seek(base)
        tail = fh.read()
        at = len(tail) - _EOCD.size
        if at < 0 or tail[at : at + 4] != b"PK\x05\x06" or tail[-2:] != b"\0\0":
            at = tail.rfind(b"PK\x05\x06")
            if at < 0 or at + _EOCD.size > len(tail):
                return None
        _, _, _, _, entries, cd_size, _, _ = _EOCD.unpack_from(tail, at)
        end = base + at
        found = _Directory(int(entries), int(cd_size), end - int(cd_size))
        if end < _ZIP64_LOCATOR.size:
            return found
        fh.seek(end - _ZIP64_LOCATOR.size)
        locator = fh.read(_ZIP64_LOCATOR.size)
        if locator[:4] != b"PK\x06\x07":
            return found
        behind = end - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
        stated = int(_ZIP64_LOCATOR.unpack(locator)[2])
        # zipfile's view: the record behind the locator if there is one, else the classic fields.
        seen = _zip64_record(fh, behind, end) or found
        other = _zip64_record(fh, stated, end) if stated != behind else None
        if other is None:
            return seen
        return _Directory(max(seen.entries, other.entries), max(seen.size, other.size), seen.start)


def _zip64_record(fh: IO[bytes], offset: int, end: int) -> _Directory | None:
    """The zip64 end record at ``offset`` (for the end record at ``end``), if one is there."""
    if offset < 0:
        return None
    fh.seek(offset)
    record = fh.read(_ZIP64_EOCD.size)
    if len(record) != _ZIP64_EOCD.size or record[:4] != b"PK\x06\x06":
        return None
    fields = _ZIP64_EOCD.unpack(record)
    cd_size = int(fields[8])
    return _Directory(int(fields[7]), cd_size,
                      end - cd_size - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size)


def _count_records(archive: Path, directory: _Directory, limit: int) -> int:
    """Records in the directory as ``zipfile`` will walk it, up to ``limit + 1``.

    Reads ``directory.size`` bytes (already bounded by the caller) and unpacks the fixed part of
    each record, building nothing per record. Counting stops where ``zipfile`` would refuse the
    directory (a truncated or foreign record): what lies beyond is never parsed.
    """
    if directory.start < 0:
        return 0
    with archive.open("rb") as fh:
        fh.seek(directory.start)
        data = fh.read(directory.size)
    count = pos = 0
    while pos < directory.size and count <= limit:
        if pos + _CENTRAL.size > len(data) or data[pos : pos + 4] != b"PK\x01\x02":
            break
        record = _CENTRAL.unpack_from(data, pos)
        pos += _CENTRAL.size + record[10] + record[11] + record[12]  # name, extra, comment
        count += 1
    return count


def _check_directory(archive: Path, limits: Limits) -> None:
    """Refuse an archive with more entries than ``limits.entries`` before ``zipfile`` opens it.

    The declared count is the attacker's to choose, so the directory's size is bounded too, and
    the records in it are counted; only then is it parsed into objects.
    """
    try:
        directory = _directory(archive)
    except (OSError, struct.error) as exc:
        log.warning("zip end record unreadable", error=repr(exc))
        return  # zipfile cannot read it either and refuses it as not a zip
    if directory is None:
        return
    if directory.entries > limits.entries:
        raise limits.too_many_entries(directory.entries)
    if directory.size > limits.entries * (_CENTRAL.size + _RECORD_ALLOWANCE_BYTES):
        log.warning("zip directory too large", declared_entries=directory.entries,
                    directory_bytes=directory.size)
        raise limits.too_many_entries()
    try:
        counted = _count_records(archive, directory, limits.entries)
    except OSError as exc:
        log.warning("zip directory unreadable", error=repr(exc))
        return
    if counted > limits.entries:
        log.warning("zip entry count lies", declared_entries=directory.entries)
        raise limits.too_many_entries()


def _open_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> IO[bytes]:
    try:
        return zf.open(info)
    except _ZIP_READ_ERRORS as exc:
        log.warning("zip member unreadable", error=repr(exc))
        raise InputError(_DAMAGED) from exc


def _read(src: IO[bytes]) -> bytes:
    try:
        return src.read(CHUNK_BYTES)
    except _ZIP_READ_ERRORS as exc:  # damaged data, a bad CRC, a size that lied
        log.warning("zip member unreadable", error=repr(exc))
        raise InputError(_DAMAGED) from exc


def _check_declared(
    wanted: list[zipfile.ZipInfo], limits: Limits, budget: DiskBudget, archive_size: int
) -> None:
    """Refuse before writing anything when the declared sizes already pass a limit."""
    total = 0
    for info in wanted:
        if info.file_size > _member_cap(info, limits, archive_size):
            raise limits.too_high_ratio()
        total += info.file_size
    if total > limits.expanded_bytes:
        raise limits.too_large_expanded()
    budget.check(total)


def _member_cap(info: zipfile.ZipInfo, limits: Limits, archive_size: int) -> int:
    # A declared compressed size beyond the archive's own size is a lie: never a reason for more.
    compressed = min(info.compress_size, archive_size)
    return max(RATIO_ALLOWANCE_BYTES, int(compressed * limits.member_ratio))


@dataclass
class _Writing:
    """One archive's members being written (``extract_zip``, ``extract_seed``): the running
    totals its limits are checked on, chunk by chunk, whatever the archive declares."""

    limits: Limits
    budget: DiskBudget
    archive_size: int
    expanded: int = 0  # bytes written from the archive (``limits.expanded_bytes``)
    charged: int = 0  # bytes charged to ``budget`` (released by the caller on failure)

    def member(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path,
               written: list[Path]) -> None:
        """Write ``info`` to ``target`` (added to ``written`` once opened: a file cut short
        is the caller's to remove)."""
        cap = _member_cap(info, self.limits, self.archive_size)
        with _open_member(zf, info) as src, target.open("wb") as out:
            written.append(target)
            size = 0
            while chunk := _read(src):
                size += len(chunk)
                self.expanded += len(chunk)
                if self.expanded > self.limits.expanded_bytes:
                    raise self.limits.too_large_expanded()
                if size > cap:
                    raise self.limits.too_high_ratio()
                self.budget.charge(len(chunk))
                self.charged += len(chunk)
                out.write(chunk)


def extract_zip(
    archive: Path, dest: Path, limits: Limits, budget: DiskBudget | None = None
) -> int:
    """Extract wanted files flattened within ``limits``; returns how many were written.

    On any refusal or error the files this call wrote are removed and their bytes released from
    ``budget`` (a budget of its own, ``limits.disk_bytes``, when none is given).
    """
    budget = budget or DiskBudget(limits.disk_bytes)
    archive_size = archive.stat().st_size
    _check_directory(archive, limits)
    try:
        zf = zipfile.ZipFile(archive)
    except (*_ZIP_READ_ERRORS, OSError) as exc:
        log.warning("not a zip archive", error=repr(exc))
        raise InputError(_NOT_A_ZIP) from exc
    created: list[Path] = []
    writing = _Writing(limits, budget, archive_size)
    try:
        with zf:
            members = zf.infolist()
            if len(members) > limits.entries:
                raise limits.too_many_entries(len(members))
            wanted = [i for i in members if not i.is_dir() and _wanted(i.filename)]
            _check_declared(wanted, limits, budget, archive_size)
            for info in wanted:
                writing.member(zf, info, _target(dest, info.filename), created)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        budget.release(writing.charged)
        raise
    return len(created)


def _seed_refused(name: str, why: str) -> InputError:
    return InputError(f"seed.zip refused: entry '{shown(name, _SHOWN_MAX)}' {why}")


_OUTSIDE: Final = "would land outside the project"


def _escapes(name: str) -> bool:
    """A name that means a place outside any folder it is extracted into, on any system."""
    return (
        name.startswith("/")
        or _DRIVE.match(name) is not None
        or ".." in name.split("/")
    )


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    # Unix mode bits live in the high half of the external attributes; a zip made elsewhere
    # leaves them 0, which is no link either.
    return stat.S_ISLNK(info.external_attr >> 16)


def _seed_target(root: Path, info: zipfile.ZipInfo) -> Path | None:
    """Where entry ``info`` of a seed lands under ``root`` (resolved), or None for the root
    itself; ``InputError`` naming the entry when it may not land anywhere."""
    name = info.filename
    if _is_symlink(info):
        raise _seed_refused(name, "is a symbolic link")
    if _CONTROL.search(name):
        raise _seed_refused(name, "has a control character in its name")
    if "\\" in name:
        # Windows reads a backslash as a separator; whatever it means here, no ODM seed has one.
        if _escapes(name.replace("\\", "/")):
            raise _seed_refused(name, _OUTSIDE)
        raise _seed_refused(name, "has a backslash in its name")
    if _escapes(name):
        raise _seed_refused(name, _OUTSIDE)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts:
        return None
    # Case-insensitively: on a case-insensitive disk ``Images/`` is ``images/``.
    if parts[0].lower() == "images":
        raise _seed_refused(name, "is in images/ (a seed must not add images)")
    if parts[0] == SCRATCH_DIR:
        raise _seed_refused(name, "is in a folder the service reserves")
    target = root.joinpath(*parts)
    # A folder already in the project may be a link elsewhere: judge where bytes would go.
    if not target.resolve().is_relative_to(root):
        raise _seed_refused(name, _OUTSIDE)
    return target


def _seed_dirs(root: Path, folder: Path, name: str, written: list[Path]) -> None:
    """Create ``folder`` (under ``root``) one level at a time, recording the levels made."""
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        if current.is_dir():
            continue
        if current.exists() or current.is_symlink():
            raise _seed_refused(name, "conflicts with a file of the same name")
        current.mkdir()
        written.append(current)


def extract_seed(
    archive: Path, project: Path, limits: Limits, budget: DiskBudget | None = None
) -> list[Path]:
    """Extract ODM's ``seed.zip`` into ``project`` with its paths kept, within ``limits``.

    Every entry is checked (``_seed_target``) and the declared sizes are bounded before anything
    is written; files are then written as ``extract_zip`` writes them (``_Writing``). Returns the
    files and folders it created, parents before children (the caller removes them if the fetch
    fails later). On any refusal or error they are removed here and their bytes released
    from ``budget`` (a budget of its own, ``limits.disk_bytes``, when none is given). An entry
    naming an existing file overwrites it, as NodeODM's unzip does.
    """
    budget = budget or DiskBudget(limits.disk_bytes)
    archive_size = archive.stat().st_size
    _check_directory(archive, limits)
    try:
        zf = zipfile.ZipFile(archive)
    except (*_ZIP_READ_ERRORS, OSError) as exc:
        log.warning("seed is not a zip archive", error=repr(exc))
        raise InputError("Could not extract seed.zip: not a valid zip archive") from exc
    root = project.resolve()
    written: list[Path] = []
    writing = _Writing(limits, budget, archive_size)
    try:
        with zf:
            members = zf.infolist()
            if len(members) > limits.entries:
                raise limits.too_many_entries(len(members))
            plan = [(info, _seed_target(root, info)) for info in members]
            _check_declared([i for i in members if not i.is_dir()], limits, budget, archive_size)
            for info, target in plan:
                if target is None:
                    continue
                if info.is_dir():
                    _seed_dirs(root, target, info.filename, written)
                    continue
                _seed_dirs(root, target.parent, info.filename, written)
                if target.is_dir() or target.is_symlink():
                    raise _seed_refused(info.filename, "conflicts with a folder of the same name")
                writing.member(zf, info, target, written)
    except BaseException:
        remove_written(written)
        budget.release(writing.charged)
        raise
    log.info("seed extracted", files=sum(1 for p in written if not p.is_dir()))
    return written


def remove_written(paths: list[Path]) -> None:
    """Remove files and folders an extraction created, children first; a folder something else
    has put a file in since stays."""
    for path in reversed(paths):
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.rmdir()
        else:
            path.unlink(missing_ok=True)


async def _download_http(
    url: str, path: Path, limits: Limits, budget: DiskBudget, timeout_s: float,
    outbound: netguard.OutboundPolicy,
) -> None:
    timeout = httpx.Timeout(connect=15.0, read=timeout_s, write=30.0, pool=15.0)
    transport = netguard.GuardedTransport(outbound)
    try:
        async with httpx.AsyncClient(
            transport=transport, timeout=timeout, follow_redirects=True
        ) as client:
            # The archive as sent: httpx would inflate a gzip or deflate body with no bound on
            # what one network read becomes, so none is asked for, and a body encoded anyway is
            # stored raw (then refused as not a zip), counted in the bytes that came.
            async with client.stream(
                "GET", url, headers={"Accept-Encoding": "identity"}
            ) as resp:
                if resp.status_code != 200:
                    raise InputError(f"Could not download zipurl: HTTP {resp.status_code}")
                declared = resp.headers.get("content-length", "")
                if declared.isdigit():
                    if int(declared) > limits.download_bytes:
                        raise limits.too_large_download()
                    budget.check(int(declared))
                await _write_capped(resp.aiter_raw(CHUNK_BYTES), path, budget, limits)
    except httpx.HTTPError as exc:
        log.warning("zipurl download failed", host=_host(url), error=repr(exc))
        raise InputError(f"Could not download zipurl: {_http_reason(exc)}") from exc


def _host(url: str) -> str:
    """The URL's host for the log (never the whole URL: it may be presigned)."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def _http_reason(exc: httpx.HTTPError) -> str:
    """Why a download failed, in words that reveal nothing of the network (logged in full)."""
    if netguard.refusal_of(exc) is not None:
        return "the address is not permitted"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.TooManyRedirects):
        return "too many redirects"
    if isinstance(exc, httpx.ConnectError):
        return "could not connect"
    return "the transfer failed"


async def fetch_inputs(
    sources: list[str], images: Path, s3: S3, *, task_id: str, limits: Limits,
    timeout_s: float, outbound: netguard.OutboundPolicy | None = None,
) -> int:
    """Fill ``images`` from every source; returns the number of images it holds.

    ``task_id`` is the run's task (whose own uploads it may read from S3; a ``seed.zip`` among
    them is extracted into the project, ``images.parent``); ``outbound`` says which non-public
    addresses http(s) sources may use (default: none). On failure everything this call wrote
    into ``images`` and the project is removed.
    """
    outbound = outbound or netguard.OutboundPolicy()
    created = not images.exists()
    images.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in images.iterdir()}
    scratch = images.parent / SCRATCH_DIR
    scratch.mkdir(exist_ok=True)
    budget = DiskBudget(limits.disk_bytes)
    seeded: list[Path] = []
    try:
        for n, source in enumerate(sources):
            if source.startswith(("http://", "https://")):
                archive = scratch / f"{n}.zip"
                await _download_http(source, archive, limits, budget, timeout_s, outbound)
                _extract_and_drop(archive, images, limits, budget)
            elif source.startswith("s3://"):
                await _fetch_s3(
                    _parse_s3(source), images, scratch, s3, task_id, limits, budget, seeded
                )
            else:
                raise InputError("Unsupported input URL (expected http://, https:// or s3://)")
    except BaseException as exc:
        log.warning("inputs not fetched", error=repr(exc), disk_peak_bytes=budget.peak)
        remove_written(seeded)
        if created:
            shutil.rmtree(images, ignore_errors=True)
        else:
            for path in images.iterdir():
                if path.name not in before:
                    path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("inputs on disk", disk_peak_bytes=budget.peak)
    return sum(1 for p in images.iterdir() if _ext(p.name) in IMAGE_EXTS)


def _extract_and_drop(archive: Path, images: Path, limits: Limits, budget: DiskBudget) -> None:
    """Extract a downloaded archive, then delete it and give its bytes back to the budget."""
    try:
        extract_zip(archive, images, limits, budget)
    finally:
        size = archive.stat().st_size if archive.exists() else 0
        archive.unlink(missing_ok=True)
        budget.release(size)


def _seed_and_drop(
    archive: Path, project: Path, limits: Limits, budget: DiskBudget, seeded: list[Path]
) -> None:
    """``extract_seed`` into the project, then delete the archive as ``_extract_and_drop``."""
    try:
        seeded += extract_seed(archive, project, limits, budget)
    finally:
        size = archive.stat().st_size if archive.exists() else 0
        archive.unlink(missing_ok=True)
        budget.release(size)


def _parse_s3(source: str) -> S3Url:
    try:
        return s3mod.parse_s3_url(source)
    except ValueError as exc:
        raise InputError(f"Invalid s3:// URL: {shown(source, _SHOWN_MAX)}") from exc


def _not_permitted(url: S3Url) -> InputError:
    return InputError(
        f"Could not read inputs from {shown(str(url), _SHOWN_MAX)}: not a permitted location "
        "(a task may read its own uploads and the locations the operator allows)"
    )


def _unreadable(url: S3Url) -> InputError:
    # Same words for a missing bucket, a missing key and a refused read: S3's answers would
    # otherwise tell who owns which bucket.
    return InputError(
        f"Could not read inputs from {shown(str(url), _SHOWN_MAX)} (not found or not permitted)"
    )


def _is_seed(obj: S3Url, task_id: str, bucket: str) -> bool:
    """ODM's ``seed.zip`` as uploaded to this task: straight under its own upload prefix, the
    name exact (NodeODM looks for ``images/seed.zip``, nothing else)."""
    own = s3mod.task_inputs(bucket, task_id)
    return obj.bucket == own.bucket and obj.key == own.key + SEED_NAME


async def _fetch_s3(
    url: S3Url, images: Path, scratch: Path, s3: S3, task_id: str, limits: Limits,
    budget: DiskBudget, seeded: list[Path],
) -> None:
    """One ``s3://`` source into ``images``; a seed goes to the project, its paths in ``seeded``."""

    def allowed(target: S3Url) -> bool:
        return s3mod.input_allowed(
            target, task_id=task_id, bucket=s3.settings.bucket, allow=s3.settings.input_allow
        )

    if not allowed(url):
        log.warning("s3 input refused by policy", source=str(url))
        raise _not_permitted(url)
    keys: list[tuple[str, int | None]]
    if url.is_prefix:
        try:
            keys = [(k, size) for k, size in await s3.list_objects(url)]
        except Exception as exc:
            log.warning("s3 input not listed", source=str(url), error=repr(exc))
            raise _unreadable(url) from exc
        if not keys:  # a permitted, empty prefix: no images, which the caller reports
            log.info("s3 input prefix empty", source=str(url))
    else:
        keys = [(url.key, None)]
    for key, _ in keys:
        if not allowed(S3Url(url.bucket, key)):
            log.warning("s3 input key refused by policy", source=str(url), key=key)
            raise _not_permitted(url)
    for key, size in keys:
        name = posixpath.basename(key)
        obj = S3Url(url.bucket, key)
        if _ext(name) == ".zip":
            if size is not None and size > limits.download_bytes:
                raise limits.too_large_download()
            archive = scratch / "s3.zip"
            await _download_s3(s3, obj, url, archive, budget, limits)
            if _is_seed(obj, task_id, s3.settings.bucket):
                _seed_and_drop(archive, images.parent, limits, budget, seeded)
            else:
                _extract_and_drop(archive, images, limits, budget)
        elif _wanted(name):
            if size is not None:
                budget.check(size)
            await _download_s3(s3, obj, url, _target(images, name), budget, None)


async def _download_s3(
    s3: S3, obj: S3Url, source: S3Url, path: Path, budget: DiskBudget, limits: Limits | None
) -> None:
    """One object to ``path``, charged to ``budget``; ``limits`` bound it as an archive."""
    try:
        await _write_capped(s3.iter_object(obj), path, budget, limits)
    except InputError:
        raise
    except Exception as exc:
        log.warning("s3 input not read", source=str(source), key=obj.key, error=repr(exc))
        raise _unreadable(source) from exc


async def _write_capped(
    chunks: AsyncIterator[bytes], path: Path, budget: DiskBudget, limits: Limits | None
) -> None:
    """A download to ``path``, every byte charged to ``budget`` before it is written;
    ``limits`` bound it as an archive download. On any failure the partial file is removed and
    its bytes given back."""
    size = 0
    try:
        with path.open("wb") as fh:
            async for chunk in chunks:
                if limits is not None and size + len(chunk) > limits.download_bytes:
                    raise limits.too_large_download()
                budget.charge(len(chunk))
                size += len(chunk)
                fh.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        budget.release(size)
        raise


def control_file_args(images: Path, project: Path) -> list[str]:
    """Move .txt control files out of images/ and map them to ODM flags (NodeODM §6)."""
    args: list[str] = []
    gcp_dir = project / "gcp"
    gcp_seen = False
    for path in sorted(images.iterdir()):
        if _ext(path.name) not in CONTROL_EXTS:
            continue
        gcp_dir.mkdir(exist_ok=True)
        target = gcp_dir / path.name
        path.rename(target)
        lower = path.name.lower()
        if lower == "geo.txt":
            args += ["--geo", str(target)]
        elif lower == "image_groups.txt":
            args += ["--split-image-groups", str(target)]
        elif not gcp_seen:
            args += ["--gcp", str(target)]
            gcp_seen = True
    return args
