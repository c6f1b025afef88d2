"""Chunked upload through the gateway, as PyODM does it: throughput beside raw S3 PUT (and
NodeODM), commit latency, gateway RSS.

One gateway process on the bench servers; the client (httpx, this process) runs
``POST /task/new/init``, then ``POST /task/new/upload/{uuid}`` once per file with
``--upload-parallel`` uploads in flight (PyODM's ``parallel_uploads`` default is 10; each request
one file with its ``Content-Length``, as PyODM sends it), then ``POST /task/new/commit/{uuid}``.
Files are generated on the fly (the client holds one 1 MiB block), so the client's memory is no
factor.

The pipe it runs through is measured in the same run, in alternating rounds: raw S3 PUTs of the
same number and size of objects, as many in flight (aioboto3, this process, on the same moto).
The machine is shared (2 cores: client, gateway and moto compete, and so does any other work),
so a ratio is only read between figures measured side by side: each round measures every target
once, the order reversed every other round, and ratios are taken per round, then their median.
With ``SCALEODM_BENCH_NODEODM_URL`` set (a NodeODM in ``--test`` mode, bench/README.md), the same
upload runs against it in the same rounds. After each round its objects (and NodeODM's task) are
deleted again, so moto's memory stays as it was. Figures:

- ``upload_mb_per_s``: MiB of files / seconds from the first upload to the last response
  (median over rounds); its pipe baseline ``s3_put_mb_per_s@<parallel>`` is the raw PUT measured
  in these rounds, and ``upload_vs_s3_put`` the median of the per-round ratios;
- ``upload_commit_ms``: the commit request (median over rounds);
- ``upload_gateway_idle_rss_mb`` / ``upload_gateway_peak_rss_mb``: the gateway's ``VmRSS`` once
  ready and its ``VmHWM`` (peak) after the last round, from /proc;
- ``upload_errors``: file uploads not answered ``{"success": true}``, a commit not answered
  ``{"uuid": ...}``, or an ``imagesCount`` other than the number of files;
- ``upload_task_new_mb_per_s``: the single-request ``POST /task/new`` with
  ``--upload-task-new-files`` files in one body (as CloudODM sends them), from its first byte to
  the answer, in the same rounds; ``upload_task_new_vs_s3_put`` its per-round ratio to raw S3 PUT
  (which has 10 PUTs in flight where the request is one stream: files one after the other);
- with NodeODM: ``upload_nodeodm_mb_per_s``, ``upload_nodeodm_commit_ms``, and the per-round
  ratios ScaleODM/NodeODM ``upload_vs_nodeodm`` (throughput: above 1 is faster) and
  ``upload_commit_vs_nodeodm`` (latency: below 1 is faster); for ``/task/new``,
  ``upload_task_new_nodeodm_mb_per_s`` and ``upload_task_new_vs_nodeodm``.

    uv run python -m bench.upload [--quick] [--upload-files 200] [--upload-file-mb 8]
                                  [--upload-parallel 10] [--upload-rounds 3]
                                  [--upload-task-new-files 40]
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

from bench.baselines import s3_client
from bench.common import (
    NODEODM_URL_ENV,
    S3_PUT_MB,
    BenchEnv,
    CpuWindow,
    Figure,
    at,
    median,
    node_info,
    nodeodm_pid,
    nodeodm_url,
    standalone,
    status_kb,
)

NAME = "upload"
MIB = 1024 * 1024
S3, SCALEODM, NODEODM = "s3", "scaleodm", "nodeodm"
TASK_NEW = "task_new"  # suffix of a target's single-request measurement: "scaleodm_task_new"

QUICK: dict[str, Any] = {"upload_files": 16, "upload_rounds": 2, "upload_task_new_files": 8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("upload")
    group.add_argument("--upload-files", type=int, default=200,
                       help="files uploaded per round (default 200)")
    group.add_argument("--upload-file-mb", type=int, default=8,
                       help="MiB per file (default 8)")
    group.add_argument("--upload-parallel", type=int, default=10,
                       help="uploads in flight (default 10, PyODM's parallel_uploads)")
    group.add_argument("--upload-rounds", type=int, default=3,
                       help="rounds, each measuring raw S3 PUT, the gateway (and NodeODM with "
                       f"{NODEODM_URL_ENV}) once, alternating (default 3)")
    group.add_argument("--upload-task-new-files", type=int, default=40,
                       help="files in the single-request POST /task/new of each round "
                       "(default 40; 0: not measured)")


def _body(boundary: str, names: list[str], size: int) -> tuple[int, AsyncIterator[bytes]]:
    """A ``multipart/form-data`` body with one ``images`` file of ``size`` random bytes per name:
    its length and its chunks."""
    heads = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; "
              f"filename=\"{name}\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
             for name in names]
    tail = f"--{boundary}--\r\n".encode()

    async def chunks() -> AsyncIterator[bytes]:
        block = os.urandom(MIB)
        for head in heads:
            yield head
            sent = 0
            while sent < size:
                n = min(MIB, size - sent)
                yield block if n == MIB else block[:n]
                sent += n
            yield b"\r\n"
        yield tail

    return sum(len(h) + size + 2 for h in heads) + len(tail), chunks()


def _multipart_headers(boundary: str, length: int) -> dict[str, str]:
    return {"content-type": f"multipart/form-data; boundary={boundary}",
            "content-length": str(length)}


@dataclass
class Upload:
    files: int
    task_id: str | None = None
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
        task_id = result.task_id = init.json()["uuid"]
        sem = asyncio.Semaphore(parallel)

        async def one(name: str) -> None:
            async with sem:
                boundary = uuid.uuid4().hex
                length, content = _body(boundary, [name], file_size)
                try:
                    resp = await client.post(f"/task/new/upload/{task_id}", content=content,
                                             headers=_multipart_headers(boundary, length))
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


async def single_request(base: str, files: int, file_size: int) -> Upload:
    """One ``POST /task/new`` carrying ``files`` files of ``file_size`` bytes; ``seconds`` is the
    request, ``commit_ms`` unset."""
    result = Upload(files)
    boundary = uuid.uuid4().hex
    length, content = _body(boundary, [f"IMG_{i:04d}.JPG" for i in range(files)], file_size)
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        started = time.perf_counter()
        try:
            resp = await client.post("/task/new", content=content,
                                     headers=_multipart_headers(boundary, length))
        except httpx.HTTPError as exc:
            result.errors[f"task/new: {type(exc).__name__}"] += 1
            return result
        result.seconds = time.perf_counter() - started
        answer = resp.json() if resp.status_code == 200 else {}
        result.task_id = answer.get("uuid")
        if result.task_id is None:
            result.errors[f"task/new: HTTP {resp.status_code} {resp.text[:80]}"] += 1
            return result
        info = await client.get(f"/task/{result.task_id}/info")
        result.images_count = info.json().get("imagesCount") if info.status_code == 200 else None
        if result.images_count != files:
            result.errors[f"imagesCount {result.images_count} != {files}"] += 1
    return result


async def _delete_prefix(client: Any, bucket: str, prefix: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            await client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


async def raw_puts(client: Any, bucket: str, prefix: str, files: int, size: int,
                   parallel: int) -> float:
    """Seconds for ``files`` PUTs of ``size`` random bytes, ``parallel`` in flight; the objects
    are deleted afterwards."""
    body = os.urandom(size)
    sem = asyncio.Semaphore(parallel)

    async def one(i: int) -> None:
        async with sem:
            await client.put_object(Bucket=bucket, Key=f"{prefix}{i:06d}", Body=body)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(files)))
    seconds = time.perf_counter() - started
    await _delete_prefix(client, bucket, prefix)
    return seconds


@dataclass
class Rounds:
    """Per target: MiB/s, commit ms and CPU shares of each round."""

    mb_per_s: dict[str, list[float]] = field(default_factory=dict)
    commit_ms: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    errors: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, target: str, mb_per_s: float, cpu: dict[str, float],
            upload: Upload | None = None) -> None:
        self.mb_per_s.setdefault(target, []).append(mb_per_s)
        self.cpu.setdefault(target, []).append(cpu)
        errors = self.errors.setdefault(target, Counter())
        if upload is not None:
            if not target.endswith(TASK_NEW):
                self.commit_ms.setdefault(target, []).append(upload.commit_ms)
            errors.update(upload.errors)

    def ratios(self, num: str, den: str, values: dict[str, list[float]]) -> list[float]:
        return [a / b for a, b in zip(values.get(num, []), values.get(den, []), strict=False)
                if b]


async def run(env: BenchEnv, bench: str, files: int, file_mb: int, parallel: int,
              database: str, rounds: int = 1, task_new_files: int = 0) -> list[Figure]:
    """``rounds`` of raw S3 PUT, the upload (and ``task_new_files`` in one ``/task/new``)
    through a fresh gateway (its peak RSS is these uploads') and, when configured, NodeODM,
    alternating; as ``bench``'s figures."""
    size = file_mb * MIB
    node = nodeodm_url()
    servers = [SCALEODM] + ([NODEODM] if node else [])
    targets = [S3, *servers] + ([f"{t}_{TASK_NEW}" for t in servers] if task_new_files else [])
    node_pid = nodeodm_pid(node) if node else None
    result = Rounds()
    stack = env.stack(database)
    try:
        stack.start("gateway")
        pid = stack.procs["gateway"].pid
        idle_kb = status_kb(pid, "VmRSS")
        if node:
            async with httpx.AsyncClient() as probe:
                await node_info(probe, node)
        async with s3_client(env, max_pool=parallel) as client:
            bucket = f"bench-upload-{uuid.uuid4().hex[:8]}"
            await client.create_bucket(Bucket=bucket)
            for rnd in range(rounds):
                for target in targets if rnd % 2 == 0 else targets[::-1]:
                    window = CpuWindow({"gateway": pid, "s3": env.s3.pid, "client": None,
                                        **({"nodeodm": node_pid} if node else {})})
                    window.start()
                    if target == S3:
                        seconds = await raw_puts(client, bucket, f"r{rnd}/", files, size,
                                                 parallel)
                        result.add(S3, files * file_mb / seconds, window.stop())
                        continue
                    base = stack.gateway_url if target.startswith(SCALEODM) else str(node)
                    if target.endswith(TASK_NEW):
                        upload = await single_request(base, task_new_files, size)
                        count = task_new_files
                    else:
                        upload = await chunked_upload(base, files, size, parallel)
                        count = files
                    cpu = window.stop()
                    result.add(target, count * file_mb / upload.seconds if upload.seconds
                               else float("nan"), cpu, upload)
                    await _forget(client, stack.bucket, target, base, upload)
            await client.delete_bucket(Bucket=bucket)
        peak_kb = status_kb(pid, "VmHWM")
    finally:
        stack.stop()
    return _figures(bench, result, files, file_mb, parallel, idle_kb, peak_kb, node,
                    task_new_files)


async def _forget(client: Any, bucket: str, target: str, base: str, upload: Upload) -> None:
    """Delete what one upload stored: the task's objects in moto, or NodeODM's task."""
    if upload.task_id is None:
        return
    if target.startswith(SCALEODM):  # the task stays queued (no scheduler here): only its files go
        await _delete_prefix(client, bucket, f"tasks/{upload.task_id}/")
    else:
        async with httpx.AsyncClient(timeout=60) as http:
            await http.post(f"{base}/task/remove", data={"uuid": upload.task_id})


def _figures(bench: str, result: Rounds, files: int, file_mb: int, parallel: int,
             idle_kb: int, peak_kb: int, node: str | None, task_new_files: int
             ) -> list[Figure]:
    rates, commits = result.mb_per_s, result.commit_ms
    vs_s3 = result.ratios(SCALEODM, S3, rates)
    baseline = at(S3_PUT_MB, parallel)
    rates_by_round = {t: [round(v, 1) for v in vs] for t, vs in rates.items()}
    commits_by_round = {t: [round(v, 1) for v in vs] for t, vs in commits.items()}
    detail = {"files": files, "file_mib": file_mb, "total_mib": files * file_mb,
              "parallel": parallel, "rounds": len(rates.get(SCALEODM, [])),
              "mb_per_s_by_round": rates_by_round, "commit_ms_by_round": commits_by_round,
              "vs_s3_put_by_round": [round(r, 3) for r in vs_s3],
              "cpu_by_round": result.cpu,
              "note": "one gateway (uvicorn) process; client (httpx, aioboto3) and moto share "
                      "the cores; rounds alternate the targets' order"}
    figures = [
        Figure(bench, baseline, median(rates.get(S3, [])), "MiB/s", None,
               {**detail, "what": f"raw S3 PUT of {files} x {file_mb} MiB, {parallel} in "
                "flight (aioboto3, one client), alternating with the uploads"}),
        Figure(bench, "upload_mb_per_s", median(rates.get(SCALEODM, [])), "MiB/s", baseline,
               detail),
        Figure(bench, "upload_vs_s3_put", median(vs_s3), "× raw S3 PUT", None,
               {"what": "median of the per-round ratios upload / raw S3 PUT"}),
        Figure(bench, "upload_commit_ms", median(commits.get(SCALEODM, [])), "ms", None,
               {"files": files, "by_round": commits_by_round.get(SCALEODM)}),
        Figure(bench, "upload_gateway_idle_rss_mb", idle_kb / 1024, "MiB", None,
               {"what": "VmRSS once ready"}),
        Figure(bench, "upload_gateway_peak_rss_mb", peak_kb / 1024, "MiB", None,
               {**detail, "what": "VmHWM after the last round"}),
    ]
    scaleodm_new, nodeodm_new = f"{SCALEODM}_{TASK_NEW}", f"{NODEODM}_{TASK_NEW}"
    if task_new_files:
        new = {"files": task_new_files, "file_mib": file_mb, "by_round":
               rates_by_round.get(scaleodm_new), "what": "one POST /task/new with every file"}
        figures += [
            Figure(bench, "upload_task_new_mb_per_s", median(rates.get(scaleodm_new, [])),
                   "MiB/s", baseline, new),
            Figure(bench, "upload_task_new_vs_s3_put",
                   median(result.ratios(scaleodm_new, S3, rates)), "× raw S3 PUT", None,
                   {"what": "median of the per-round ratios /task/new / raw S3 PUT"}),
        ]
    errors = result.errors.get(SCALEODM, Counter()) + result.errors.get(scaleodm_new, Counter())
    figures.append(Figure(bench, "upload_errors", sum(errors.values()), "responses", None,
                          {"errors": dict(errors)}))
    if node:
        cmp = {"nodeodm": node, "files": files, "file_mib": file_mb, "parallel": parallel}
        figures += [
            Figure(bench, "upload_nodeodm_mb_per_s", median(rates.get(NODEODM, [])), "MiB/s",
                   None, {**cmp, "by_round": rates_by_round.get(NODEODM)}),
            Figure(bench, "upload_vs_nodeodm",
                   median(result.ratios(SCALEODM, NODEODM, rates)), "× NodeODM", None,
                   {**cmp, "what": "median of the per-round ratios ScaleODM / NodeODM "
                    "(throughput: above 1 is faster)"}),
            Figure(bench, "upload_nodeodm_commit_ms", median(commits.get(NODEODM, [])), "ms",
                   None, {**cmp, "by_round": commits_by_round.get(NODEODM)}),
            Figure(bench, "upload_commit_vs_nodeodm",
                   median(result.ratios(SCALEODM, NODEODM, commits)), "× NodeODM", None,
                   {**cmp, "what": "median of the per-round ratios of the commit's latency "
                    "ScaleODM / NodeODM (below 1 is faster)"}),
        ]
        if task_new_files:
            figures += [
                Figure(bench, "upload_task_new_nodeodm_mb_per_s",
                       median(rates.get(nodeodm_new, [])), "MiB/s", None,
                       {**cmp, "files": task_new_files,
                        "by_round": rates_by_round.get(nodeodm_new)}),
                Figure(bench, "upload_task_new_vs_nodeodm",
                       median(result.ratios(scaleodm_new, nodeodm_new, rates)), "× NodeODM",
                       None, {**cmp, "files": task_new_files,
                              "what": "median of the per-round ratios ScaleODM / NodeODM"}),
            ]
        node_errors = (result.errors.get(NODEODM, Counter())
                       + result.errors.get(nodeodm_new, Counter()))
        figures.append(Figure(bench, "upload_nodeodm_errors", sum(node_errors.values()),
                              "responses", None, {"errors": dict(node_errors)}))
    return figures


async def measure(env: BenchEnv, args: argparse.Namespace) -> list[Figure]:
    return await run(env, NAME, args.upload_files, args.upload_file_mb, args.upload_parallel,
                     database="upload", rounds=args.upload_rounds,
                     task_new_files=args.upload_task_new_files)


if __name__ == "__main__":
    sys.exit(standalone(NAME, measure, add_arguments, QUICK))
