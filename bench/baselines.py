"""Pipe baselines: what the servers do for a bare client, before any ScaleODM code runs.

Every ScaleODM figure is read beside the pipe it goes through, measured here on the same servers
by the same (one-process, asyncio) client:

- ``jetstream_msgs_per_s`` (JETSTREAM): nats-py directly on a throwaway file-storage stream like
  the product's: one publisher awaiting each ack while a pull consumer fetches and acks, messages
  from the first publish to the last ack. Also the publish rate alone (awaited acks, and
  pipelined with a window of acks in flight) and the consume rate alone (a backlog drained).
- ``s3_put_per_s`` (S3_PUT): aioboto3 ``put_object`` of small objects at some concurrency;
  ``s3_put_mb_per_s`` (S3_PUT_MB): the same with large objects, MiB/s.
- ``mongo_find_per_s`` (MONGO_FIND): ``find_one({"_id": ...})`` on a tasks collection with
  ``AsyncMongoClient`` — measured by ``bench.info_poll`` on its own 1,000 tasks at each of its
  concurrency levels (:func:`mongo_find` and :func:`rate` are here), since that is the
  collection it reads.

    uv run python -m bench.baselines [--quick] [--js-msgs N] [--s3-small N] ...
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aioboto3
import nats
from botocore.config import Config
from nats.js.api import StorageType, StreamConfig
from pymongo import AsyncMongoClient

from bench.common import (
    JETSTREAM,
    S3_PUT,
    S3_PUT_MB,
    BenchEnv,
    Figure,
    standalone,
)

NAME = "baselines"
MIB = 1024 * 1024

# Small sizes for a smoke run (``--quick``).
QUICK: dict[str, Any] = {
    "js_msgs": 500, "s3_small": 200, "s3_large": 4,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("baselines")
    group.add_argument("--js-msgs", type=int, default=20_000,
                       help="JetStream messages per measurement (default 20000)")
    group.add_argument("--js-payload", type=int, default=300,
                       help="JetStream message size in bytes (default 300, about a task event)")
    group.add_argument("--js-window", type=int, default=256,
                       help="acks in flight for the pipelined publish (default 256)")
    group.add_argument("--js-batch", type=int, default=100,
                       help="pull consumer fetch batch (default 100)")
    group.add_argument("--s3-small", type=int, default=2000,
                       help="small objects PUT (default 2000)")
    group.add_argument("--s3-small-kb", type=int, default=4, help="small object KiB (default 4)")
    group.add_argument("--s3-large", type=int, default=40,
                       help="large objects PUT (default 40)")
    group.add_argument("--s3-large-mb", type=int, default=8, help="large object MiB (default 8)")
    group.add_argument("--s3-concurrency", type=int, default=10,
                       help="PUTs in flight (default 10, PyODM's parallel uploads)")


# -- JetStream ------------------------------------------------------------------------------


async def _jetstream(url: str, args: argparse.Namespace) -> list[Figure]:
    n, payload = args.js_msgs, os.urandom(args.js_payload)
    nc = await nats.connect(url)
    js = nc.jetstream()
    tag = uuid.uuid4().hex[:8]
    stream, subject = f"BENCH_{tag}", f"bench.{tag}"
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{subject}.>"],
                                     storage=StorageType.FILE, duplicate_window=120.0))
    try:
        async def publish(i: int, phase: str) -> None:
            await js.publish(f"{subject}.{phase}", payload,
                             headers={"Nats-Msg-Id": f"{tag}:{phase}:{i}"})

        async def drain(phase: str, durable: str) -> float:
            """Fetch+ack ``n`` messages of ``phase``; the time of the last ack."""
            sub = await js.pull_subscribe(f"{subject}.{phase}", durable=durable, stream=stream)
            got = 0
            while got < n:
                try:
                    msgs = await sub.fetch(args.js_batch, timeout=5)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    await msg.ack()
                got += len(msgs)
            await nc.flush()
            await sub.unsubscribe()
            return time.perf_counter()

        # 1. publish alone, one ack awaited at a time (what an event emitter does)
        started = time.perf_counter()
        for i in range(n):
            await publish(i, "a")
        publish_s = time.perf_counter() - started
        # 2. consume the backlog alone
        started = time.perf_counter()
        consume_s = await drain("a", "drain") - started
        # 3. publish pipelined: a window of acks in flight
        window = asyncio.Semaphore(args.js_window)

        async def windowed(i: int) -> None:
            async with window:
                await publish(i, "b")

        started = time.perf_counter()
        await asyncio.gather(*(windowed(i) for i in range(n)))
        pipelined_s = time.perf_counter() - started
        # 4. the pipe: awaited publishes while a pull consumer fetches and acks
        consumer = asyncio.create_task(drain("c", "pipe"))
        await asyncio.sleep(0.05)  # the consumer is bound
        started = time.perf_counter()
        for i in range(n):
            await publish(i, "c")
        pipe_s = await consumer - started
    finally:
        await js.delete_stream(stream)
        await nc.drain()

    detail = {"messages": n, "payload_bytes": args.js_payload, "storage": "file",
              "client": "nats-py, one connection"}
    return [
        Figure(NAME, JETSTREAM, n / pipe_s, "msg/s", None,
               {**detail, "what": "awaited publishes with a pull consumer (fetch "
                f"{args.js_batch}, ack each) running alongside; first publish to last ack",
                "seconds": pipe_s}),
        Figure(NAME, "jetstream_publish_per_s", n / publish_s, "msg/s", JETSTREAM,
               {**detail, "what": "js.publish, each ack awaited", "seconds": publish_s}),
        Figure(NAME, "jetstream_publish_pipelined_per_s", n / pipelined_s, "msg/s", JETSTREAM,
               {**detail, "what": f"js.publish, {args.js_window} acks in flight",
                "seconds": pipelined_s}),
        Figure(NAME, "jetstream_consume_per_s", n / consume_s, "msg/s", JETSTREAM,
               {**detail, "what": f"pull consumer draining a backlog, fetch {args.js_batch}, "
                "ack each", "seconds": consume_s}),
    ]


# -- S3 -------------------------------------------------------------------------------------


def s3_client(env: BenchEnv, max_pool: int = 10) -> Any:
    """An aioboto3 S3 client context configured like the services' (path style, SigV4)."""
    config = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                    retries={"max_attempts": 3, "mode": "standard"},
                    max_pool_connections=max_pool)
    return aioboto3.Session().client(
        "s3", endpoint_url=env.s3.url, region_name=env.s3.region,
        aws_access_key_id=env.s3.access_key, aws_secret_access_key=env.s3.secret_key,
        config=config)


async def _puts(client: Any, bucket: str, prefix: str, count: int, size: int,
                concurrency: int) -> float:
    body = os.urandom(size)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await client.put_object(Bucket=bucket, Key=f"{prefix}/{i:06d}", Body=body)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return time.perf_counter() - started


async def _s3(env: BenchEnv, args: argparse.Namespace) -> list[Figure]:
    conc = args.s3_concurrency
    small, large = args.s3_small_kb * 1024, args.s3_large_mb * MIB
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    async with s3_client(env, max_pool=conc) as client:
        await client.create_bucket(Bucket=bucket)
        await _puts(client, bucket, "warm", min(20, args.s3_small), small, conc)
        small_s = await _puts(client, bucket, "small", args.s3_small, small, conc)
        large_s = await _puts(client, bucket, "large", args.s3_large, large, conc)
        # leave moto's memory as it was: the upload benchmark runs on the same server
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                await client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        await client.delete_bucket(Bucket=bucket)
    detail = {"concurrency": conc, "server": "moto_server (own process) on loopback",
              "client": "aioboto3 put_object, one client"}
    return [
        Figure(NAME, S3_PUT, args.s3_small / small_s, "req/s", None,
               {**detail, "objects": args.s3_small, "object_bytes": small, "seconds": small_s}),
        Figure(NAME, S3_PUT_MB, args.s3_large * large / MIB / large_s, "MiB/s", None,
               {**detail, "objects": args.s3_large, "object_bytes": large, "seconds": large_s}),
    ]


# -- MongoDB (used by bench.info_poll) ------------------------------------------------------

Op = Callable[[random.Random], Awaitable[bool]]


async def rate(op: Op, concurrency: int, seconds: float,
               warmup_s: float = 0.5) -> tuple[float, int]:
    """``op`` run back to back by ``concurrency`` coroutines for ``seconds`` (after
    ``warmup_s``): (completed ops/s in the window, how many returned False)."""
    rng = random.Random(concurrency)
    counted = 0
    misses = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup_s
    end = start + seconds

    async def worker() -> None:
        nonlocal counted, misses
        while loop.time() < end:
            ok = await op(rng)
            if start <= loop.time() <= end:
                counted += 1
                misses += not ok
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counted / seconds, misses


def mongo_find(client: AsyncMongoClient[dict[str, Any]], database: str, ids: list[str]) -> Op:
    """The MONGO_FIND operation: ``find_one({"_id": random task})`` on ``database.tasks``."""
    tasks = client[database]["tasks"]

    async def op(rng: random.Random) -> bool:
        return await tasks.find_one({"_id": rng.choice(ids)}) is not None
    return op


MONGO_FIND_WHAT = ("find_one({'_id': random task}) on the tasks collection, AsyncMongoClient "
                   "in the benchmark process")


# -- all ------------------------------------------------------------------------------------


async def measure(env: BenchEnv, args: argparse.Namespace) -> list[Figure]:
    figures = await _jetstream(env.nats.url, args)
    figures += await _s3(env, args)
    return figures


if __name__ == "__main__":
    sys.exit(standalone(NAME, measure, add_arguments, QUICK))
