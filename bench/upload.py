"""Chunked upload through the gateway, as PyODM does it: throughput, commit latency, gateway RSS.

One gateway process on the bench servers; the client (httpx, this process) runs
``POST /task/new/init``, then ``POST /task/new/upload/{uuid}`` once per file with
``--upload-parallel`` uploads in flight (PyODM's ``parallel_uploads`` default is 10), then
``POST /task/new/commit/{uuid}``. Files are generated on the fly (the client holds one 1 MiB
block), so the client's memory is no factor. Figures:

- ``upload_mb_per_s``: MiB of files / seconds from the first upload to the last response
  (pipe baseline ``s3_put_mb_per_s``: aioboto3 PUTs of large objects on the same moto);
- ``upload_commit_ms``: the commit request;
- ``upload_gateway_idle_rss_mb`` / ``upload_gateway_peak_rss_mb``: the gateway's ``VmRSS`` once
  ready and its ``VmHWM`` (peak) after the commit, from /proc;
- ``upload_errors``: file uploads not answered ``{"success": true}``, a commit not answered
  ``{"uuid": ...}``, or an ``imagesCount`` other than the number of files.

    uv run python -m bench.upload [--quick] [--upload-files 200] [--upload-file-mb 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.common import S3_PUT_MB, BenchEnv, CpuWindow, Figure, standalone, status_kb

NAME = "upload"
MIB = 1024 * 1024

QUICK: dict[str, Any] = {"upload_files": 16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("upload")
    group.add_argument("--upload-files", type=int, default=200,
                       help="files uploaded (default 200)")
    group.add_argument("--upload-file-mb", type=int, default=8,
                       help="MiB per file (default 8)")
    group.add_argument("--upload-parallel", type=int, default=10,
                       help="uploads in flight (default 10, PyODM's parallel_uploads)")


async def _body(boundary: str, name: str, size: int) -> AsyncIterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; "
           f"filename=\"{name}\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
    block = os.urandom(MIB)
    sent = 0
    while sent < size:
        n = min(MIB, size - sent)
        yield block[:n]
        sent += n
    yield f"\r\n--{boundary}--\r\n".encode()


@dataclass
class Upload:
    files: int
    seconds: float = 0.0
    commit_ms: float = float("nan")
    images_count: int | None = None
    errors: Counter[str] = field(default_factory=Counter)


async def chunked_upload(base: str, files: int, file_size: int, parallel: int) -> Upload:
    """init, ``files`` uploads of ``file_size`` bytes (``parallel`` at once), commit."""
    result = Upload(files)
    limits = httpx.Limits(max_connections=parallel + 1, max_keepalive_connections=parallel + 1)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        init = await client.post("/task/new/init", files={"name": (None, "bench upload")})
        task_id = init.json()["uuid"]
        sem = asyncio.Semaphore(parallel)

        async def one(name: str) -> None:
            async with sem:
                boundary = uuid.uuid4().hex
                try:
                    resp = await client.post(
                        f"/task/new/upload/{task_id}", content=_body(boundary, name, file_size),
                        headers={"content-type": f"multipart/form-data; boundary={boundary}"})
                    if resp.status_code != 200 or resp.json() != {"success": True}:
                        result.errors[f"upload: HTTP {resp.status_code} {resp.text[:80]}"] += 1
                except httpx.HTTPError as exc:
                    result.errors[f"upload: {type(exc).__name__}"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(f"IMG_{i:04d}.JPG") for i in range(files)))
        result.seconds = time.perf_counter() - started
        started = time.perf_counter()
        commit = await client.post(f"/task/new/commit/{task_id}")
        result.commit_ms = (time.perf_counter() - started) * 1000
        if commit.status_code != 200 or commit.json() != {"uuid": task_id}:
            result.errors[f"commit: HTTP {commit.status_code} {commit.text[:80]}"] += 1
        info = await client.get(f"/task/{task_id}/info")
        result.images_count = info.json().get("imagesCount") if info.status_code == 200 else None
        if result.images_count != files:
            result.errors[f"imagesCount {result.images_count} != {files}"] += 1
    return result


async def run(env: BenchEnv, bench: str, files: int, file_mb: int, parallel: int,
              database: str) -> list[Figure]:
    """The upload on a fresh gateway (its peak RSS is this upload's) as ``bench``'s figures."""
    stack = env.stack(database)
    try:
        stack.start("gateway")
        pid = stack.procs["gateway"].pid
        idle_kb = status_kb(pid, "VmRSS")
        window = CpuWindow({"gateway": pid, "s3": env.s3.pid, "client": None})
        window.start()
        result = await chunked_upload(stack.gateway_url, files, file_mb * MIB, parallel)
        cpu = window.stop()
        peak_kb = status_kb(pid, "VmHWM")
    finally:
        stack.stop()
    total_mib = files * file_mb
    detail = {"files": files, "file_mib": file_mb, "total_mib": total_mib, "parallel": parallel,
              "seconds": round(result.seconds, 2), "images_count": result.images_count, **cpu,
              "note": "one gateway (uvicorn) process; client (httpx) and moto share the cores"}
    return [
        Figure(bench, "upload_mb_per_s", total_mib / result.seconds, "MiB/s", S3_PUT_MB, detail),
        Figure(bench, "upload_commit_ms", result.commit_ms, "ms", None, detail),
        Figure(bench, "upload_gateway_idle_rss_mb", idle_kb / 1024, "MiB", None,
               {"what": "VmRSS once ready"}),
        Figure(bench, "upload_gateway_peak_rss_mb", peak_kb / 1024, "MiB", None,
               {**detail, "what": "VmHWM after the commit"}),
        Figure(bench, "upload_errors", sum(result.errors.values()), "responses", None,
               {"errors": dict(result.errors)}),
    ]


async def measure(env: BenchEnv, args: argparse.Namespace) -> list[Figure]:
    return await run(env, NAME, args.upload_files, args.upload_file_mb, args.upload_parallel,
                     database="upload")


if __name__ == "__main__":
    sys.exit(standalone(NAME, measure, add_arguments, QUICK))
