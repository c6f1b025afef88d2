"""1 GB chunked upload through the gateway: throughput and the gateway's peak RSS.

Starts its own nats-server, MongoDB wire server (nx-27017), moto S3 and one gateway process, then
does what PyODM does — ``init``, ``upload`` per file, ``commit`` — with files generated on the fly
(the client holds one chunk at a time). Peak RSS is the gateway's ``VmHWM`` from /proc, read after
the upload. Prints a table and writes ``bench/results/upload_rss.json``.

    uv run python -m bench.upload_rss [--total-mb 1024] [--file-mb 64] [--parallel 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import servers  # noqa: E402
from tests.harness.stack import Stack  # noqa: E402

CHUNK = 1024 * 1024


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


async def _body(boundary: str, name: str, size: int) -> AsyncIterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; "
           f"filename=\"{name}\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
    block = os.urandom(CHUNK)
    sent = 0
    while sent < size:
        n = min(CHUNK, size - sent)
        yield block[:n]
        sent += n
    yield f"\r\n--{boundary}--\r\n".encode()


async def upload(base: str, total: int, file_size: int, parallel: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        task_id = (await client.post("/task/new/init", files={"name": (None, "bench")})).json()[
            "uuid"]
        names = [f"IMG_{i:04d}.JPG" for i in range(total // file_size)]
        sem = asyncio.Semaphore(parallel)

        async def one(name: str) -> None:
            async with sem:
                boundary = uuid.uuid4().hex
                resp = await client.post(
                    f"/task/new/upload/{task_id}", content=_body(boundary, name, file_size),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"},
                )
                assert resp.json() == {"success": True}, resp.text

        started = time.perf_counter()
        await asyncio.gather(*(one(n) for n in names))
        elapsed = time.perf_counter() - started
        commit_started = time.perf_counter()
        committed = (await client.post(f"/task/new/commit/{task_id}")).json()
        commit_s = time.perf_counter() - commit_started
        assert committed == {"uuid": task_id}, committed
        info = (await client.get(f"/task/{task_id}/info")).json()
        return {"seconds": elapsed, "files": len(names), "images_count": info["imagesCount"],
                "commit_ms": commit_s * 1000}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--total-mb", type=int, default=1024)
    parser.add_argument("--file-mb", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=10)  # PyODM's parallel_uploads
    args = parser.parse_args()
    total, file_size = args.total_mb * CHUNK, args.file_mb * CHUNK
    with tempfile.TemporaryDirectory() as tmp, servers.nats_server(Path(tmp) / "nats") as nats, \
            servers.mongo_server("nx", Path(tmp) / "mongo") as mongo, \
            servers.s3_server() as s3:
        stack = Stack(tmp=Path(tmp), nats_url=nats.url, mongo_url=mongo, s3=s3,
                      database="bench", extra_env={
                          "SCALEODM_LOG_LEVEL": "WARNING",
                          **{k: v for k, v in os.environ.items() if k.startswith("SCALEODM_")},
                      })
        try:
            stack.start("gateway")
            pid = stack.procs["gateway"].pid
            idle_kb = _status_kb(pid, "VmRSS")
            figures = asyncio.run(upload(stack.gateway_url, total, file_size, args.parallel))
            peak_kb = _status_kb(pid, "VmHWM")
        finally:
            stack.stop()
    mb = total / CHUNK
    result = {
        "uploaded_mb": mb, "files": figures["files"], "parallel": args.parallel,
        "seconds": round(figures["seconds"], 2), "mb_per_s": round(mb / figures["seconds"], 1),
        "gateway_idle_rss_mb": round(idle_kb / 1024, 1),
        "gateway_peak_rss_mb": round(peak_kb / 1024, 1),
        "commit_ms": round(figures["commit_ms"], 1), "images_count": figures["images_count"],
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "upload_rss.json").write_text(json.dumps(result, indent=2))
    width = max(len(k) for k in result)
    sys.stdout.write("".join(f"{k:<{width}}  {v}\n" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
