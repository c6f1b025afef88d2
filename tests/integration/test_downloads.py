"""``all.zip`` downloads (``scaleodm.gateway.downloads``) against a real moto S3 server.

Covered: a stored ``all.zip`` streamed byte-identical with NodeODM's headers (§3.8) and no
``Accept-Ranges``; the on-the-fly archive when ``all.zip`` is missing (opens with ``zipfile``,
exactly the expected relative names, no top-level folder, identical contents by sha256,
``Content-Length`` equal to the body, stored entries, bounded chunk sizes); directory markers;
downloads closed or cancelled part-way (a client gone); ``None`` for an empty prefix;
``streaming_response`` served by a tiny Starlette app through ``httpx.ASGITransport``; and
memory: streaming a ~60 MiB archive (on the fly, and stored) keeps the tracemalloc peak far
below the archive size.

The memory test uses its own moto server in a subprocess: the session one runs in this process,
and moto's own copies of the objects it serves would be counted by tracemalloc.

Left out: the NodeODM route around it (task lookup, "Asset not ready"), ZIP64 archives (> 4 GiB,
too big for a test; zipstream-ng's own tests cover them), objects vanishing mid-stream, and a
proof that an abandoned stream closes its S3 response itself rather than through garbage
collection (not observable without botocore internals).
"""

from __future__ import annotations

import gc
import hashlib
import io
import os
import subprocess
import tempfile
import tracemalloc
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from scaleodm.common.settings import S3Settings
from scaleodm.common.store.s3 import S3, S3Url
from scaleodm.gateway.downloads import CHUNK_SIZE, Download, all_zip, streaming_response
from tests.harness import servers

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
MEMORY_LIMIT = 16 * MiB

SMALL: dict[str, bytes] = {
    "odm_orthophoto/odm_orthophoto.tif": os.urandom(3000),
    "odm_orthophoto/odm_orthophoto.tfw": b"0.05\n0\n0\n-0.05\n500000\n4000000\n",
    "odm_dem/dsm.tif": os.urandom(2048),
    "odm_georeferencing/odm_georeferenced_model.laz": os.urandom(5000),
    "odm_texturing/textures/deep/texture_0.png": os.urandom(700),
    "odm_report/shots.geojson": b'{"type": "FeatureCollection", "features": []}',
    "odm_report/all.zip": b"only the top-level all.zip is the archive",
    "3d_tiles/pointcloud/tileset.json": b'{"asset": {"version": "1.0"}}',
    "cameras.json": b"{}",
    "task_output.txt": b"ODM app finished\n",
    "log.json": b"",
}
BIG_NAME = "entwine_pointcloud/ept-data/0-0-0-0.laz"


@pytest.fixture(scope="module")
def big() -> bytes:
    """~12 MiB of random bytes: more than PyODM's 10 MB threshold for parallel downloads."""
    return os.urandom(12 * MiB)


def _settings(endpoint: str, bucket: str) -> S3Settings:
    return S3Settings(endpoint_url=endpoint, access_key_id="testing",
                      secret_access_key=SecretStr("testing"), bucket=bucket, create_bucket=True)


@pytest.fixture
async def facade(s3: servers.S3Endpoint) -> AsyncIterator[S3]:
    async with S3.open(_settings(s3.url, f"dl-{uuid.uuid4().hex[:12]}")) as opened:
        yield opened


def _prefix(facade: S3) -> S3Url:
    return S3Url(facade.settings.bucket, f"tasks/{uuid.uuid4()}/outputs/")


async def _put_all(facade: S3, prefix: S3Url, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        await facade.put_bytes(S3Url(prefix.bucket, prefix.key + rel), data)


async def _read(download: Download) -> tuple[bytes, list[int]]:
    chunks = [chunk async for chunk in download.body]
    return b"".join(chunks), [len(c) for c in chunks]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _assert_zip_headers(headers: dict[str, str], length: int) -> None:
    assert headers["Content-Type"] == "application/zip"
    assert headers["Content-Disposition"] == "attachment; filename=all.zip"
    assert headers["Content-Length"] == str(length)
    assert "accept-ranges" not in {k.lower() for k in headers}


async def test_stored_all_zip_is_streamed_byte_identical(facade: S3, big: bytes) -> None:
    prefix = _prefix(facade)
    files = {**SMALL, BIG_NAME: big}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
    archive = buf.getvalue()
    assert len(archive) > 10 * MiB  # PyODM would go parallel if Accept-Ranges were sent
    await _put_all(facade, prefix, {**files, "all.zip": archive})

    download = await all_zip(facade, prefix)

    assert download is not None
    assert download.headers == {
        "Content-Type": "application/zip",
        "Content-Disposition": "attachment; filename=all.zip",
        "Content-Length": str(len(archive)),
    }
    body, sizes = await _read(download)
    assert body == archive
    assert max(sizes) <= CHUNK_SIZE


async def test_missing_all_zip_is_built_on_the_fly(facade: S3, big: bytes) -> None:
    prefix = _prefix(facade)
    files = {**SMALL, BIG_NAME: big}
    await _put_all(facade, prefix, files)

    download = await all_zip(facade, prefix)

    assert download is not None
    body, sizes = await _read(download)
    _assert_zip_headers(download.headers, len(body))
    assert max(sizes) <= CHUNK_SIZE
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        assert sorted(names) == sorted(files)
        assert len({name.split("/")[0] for name in names}) > 1  # no top-level folder
        assert not any(name.startswith(("tasks/", "/")) for name in names)
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            assert _sha(zf.read(info)) == _sha(files[info.filename]), info.filename


async def test_prefix_without_trailing_slash_and_directory_markers(facade: S3) -> None:
    prefix = _prefix(facade)
    await _put_all(facade, prefix, {"a/b.txt": b"b", "odm_texturing/empty/": b""})

    download = await all_zip(facade, S3Url(prefix.bucket, prefix.key.rstrip("/")))

    assert download is not None
    body, _ = await _read(download)
    assert download.headers["Content-Length"] == str(len(body))
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert sorted(zf.namelist()) == ["a/b.txt", "odm_texturing/empty/"]
        assert zf.getinfo("odm_texturing/empty/").is_dir()
        assert zf.read("a/b.txt") == b"b"


async def test_abandoned_downloads_leave_nothing_wedged(facade: S3, big: bytes) -> None:
    """Closed or cancelled part-way (a client gone), more times than the S3 connection pool
    holds (10): no error on the way out, and the next download still completes."""
    prefix = _prefix(facade)
    await _put_all(facade, prefix, {"a.txt": b"a", BIG_NAME: big, "z.txt": b"z"})

    for i in range(12):
        download = await all_zip(facade, prefix)
        assert download is not None
        if i % 2:
            stream = download.body
            for _ in range(3):
                await anext(stream)
            await stream.aclose()  # type: ignore[attr-defined]
        else:
            with anyio.CancelScope() as scope:
                seen = 0
                async for _chunk in download.body:
                    seen += 1
                    if seen == 3:
                        scope.cancel()
                    await anyio.sleep(0)
            assert scope.cancelled_caught

    with anyio.fail_after(30):
        download = await all_zip(facade, prefix)
        assert download is not None
        body, _ = await _read(download)
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert zf.read(BIG_NAME) == big


async def test_empty_prefix_gives_none(facade: S3) -> None:
    prefix = _prefix(facade)
    await facade.put_bytes(S3Url(prefix.bucket, prefix.key.replace("/outputs/", "/inputs/")
                                 + "img.jpg"), b"not an output")

    assert await all_zip(facade, prefix) is None


async def test_streaming_response_through_starlette(facade: S3, big: bytes) -> None:
    prefix = _prefix(facade)
    files = {**SMALL, BIG_NAME: big}
    await _put_all(facade, prefix, files)

    async def endpoint(request: Request) -> Response:  # noqa: ARG001
        found = await all_zip(facade, prefix)
        assert found is not None
        return streaming_response(found)

    app = Starlette(routes=[Route("/task/x/download/all.zip", endpoint)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        resp = await client.get("/task/x/download/all.zip")

    assert resp.status_code == 200
    assert "accept-ranges" not in resp.headers
    assert resp.headers["content-type"] == "application/zip"
    assert "json" not in resp.headers["content-type"]
    assert resp.headers["content-disposition"] == "attachment; filename=all.zip"
    assert int(resp.headers["content-length"]) == len(resp.content) > 10 * MiB
    with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
        assert sorted(zf.namelist()) == sorted(files)
        assert zf.read(BIG_NAME) == big


async def test_streaming_response_strips_accept_ranges() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"PK"

    response = streaming_response(Download(
        {"Content-Type": "application/zip", "Accept-Ranges": "bytes", "Content-Length": "2"},
        body(),
    ))

    assert "accept-ranges" not in response.headers
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["content-length"] == "2"


# -- memory ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_subprocess(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server in its own process, so that its memory is not traced here."""
    port = servers.free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("ab")
    proc = subprocess.Popen(
        [str(servers.BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        servers.wait_http(url, proc=proc)
        yield url
    finally:
        servers.stop_process(proc)
        log.close()


async def _stream_to_file(download: Download, path: Path) -> tuple[int, int]:
    """Stream the body to disk under tracemalloc; (bytes, peak traced bytes)."""
    gc.collect()
    tracemalloc.start()
    try:
        total = 0
        with path.open("wb") as fh:
            async for chunk in download.body:
                fh.write(chunk)
                total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return total, peak


async def test_memory_stays_bounded_for_a_60_mib_archive(
    moto_subprocess: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = _settings(moto_subprocess, f"mem-{uuid.uuid4().hex[:12]}")
    async with S3.open(settings) as facade:
        prefix = _prefix(facade)
        digests: dict[str, str] = {}
        for i in range(5):
            data = os.urandom(12 * MiB)
            rel = f"odm_dem/part_{i}/tile_{i}.tif"
            digests[rel] = _sha(data)
            await facade.put_bytes(S3Url(prefix.bucket, prefix.key + rel), data)
            del data
        for rel, data in SMALL.items():
            digests[rel] = _sha(data)
            await facade.put_bytes(S3Url(prefix.bucket, prefix.key + rel), data)

        with tempfile.TemporaryDirectory() as tmp:
            built = Path(tmp) / "built.zip"
            download = await all_zip(facade, prefix)
            assert download is not None
            size, fly_peak = await _stream_to_file(download, built)
            assert download.headers["Content-Length"] == str(size)
            assert size > 60 * MiB
            with zipfile.ZipFile(built) as zf:
                assert sorted(zf.namelist()) == sorted(digests)
                for name in zf.namelist():
                    digest = hashlib.sha256()
                    with zf.open(name) as member:
                        while block := member.read(MiB):
                            digest.update(block)
                    assert digest.hexdigest() == digests[name], name

            # The same archive stored as all.zip: the pass-through path.
            await facade.upload_file(built, S3Url(prefix.bucket, prefix.key + "all.zip"))
            download = await all_zip(facade, prefix)
            assert download is not None
            copied = Path(tmp) / "copied.zip"
            copied_size, stored_peak = await _stream_to_file(download, copied)
            assert copied_size == size
            assert copied.read_bytes() == built.read_bytes()

    with capsys.disabled():
        print(  # noqa: T201
            f"\n[all.zip memory] archive {size / MiB:.1f} MiB: tracemalloc peak "
            f"on the fly {fly_peak / MiB:.2f} MiB, stored all.zip {stored_peak / MiB:.2f} MiB"
        )
    assert fly_peak < MEMORY_LIMIT
    assert stored_peak < MEMORY_LIMIT
