"""Polling: ``GET /info`` and ``GET /task/{uuid}/info`` under 1, 10 and 50 concurrent pollers.

1,000 tasks are stored first, written by the store's own API (``TaskStore.create_task`` and
``apply_event``, as the gateway and the watcher write them): NodeODM-shaped documents in every
status (queued, running, completed, failed, canceled) with options, image counts, progress and
console output lines in the event log. Then one gateway process starts on that database and the
pollers (an ``aiohttp.ClientSession`` each, or ``--info-client httpx``) hit it for a fixed time
per level:

- ``info``: ``GET /info`` (``taskQueueCount`` is counted at most once per
  ``SCALEODM_INFO_CACHE_S``, so it is faster than ``store_info_per_s``, the uncached count);
- ``task_info``: ``GET /task/{uuid}/info`` of a random task (what PyODM's ``wait_for_completion``
  polls);
- ``task_info_output``: ``GET /task/{uuid}/info?with_output=N`` with N = the task's line count
  minus 10 (WebODM's incremental console poll: the document plus at most 10 lines).

Every response is checked (200, the expected uuid and status code, the queue count, the number of
lines); anything else counts as an error. Before the polls, at each level, from this process on
the same collections: the pipe baseline ``mongo_find_per_s@<level>`` (``find_one`` by ``_id``,
the ratio in the table), and what the endpoints ask of the store, called directly:
``store_info_per_s@<level>`` (``TaskStore.count_active``) and
``store_task_info_output_per_s@<level>`` (``get_task`` + ``read_output``); a poll figure's
detail has ``vs_store``, its ratio to the latter. On nx-27017 those two are scans (their rate
falls as the collections grow), so they, not the gateway, bound ``/info`` and ``with_output``.
The gateway is one uvicorn process, and this client (aiohttp, and the MongoDB client of the
baselines) and nx-27017 run on the same cores: each figure's detail has the CPU share of the
gateway, nx-27017, the client, the machine and everything else over the measured window.

Why aiohttp by default: httpx costs ~1.5 ms of client CPU per request (about what the gateway
spends answering it), and with 50 clients in one event loop it delivers ~270-370 req/s with a
p99 over 1 s while no process is CPU-bound; aiohttp, on the same gateway, ~460 req/s at a p99 of
~250 ms for ~0.3 ms of client CPU per request. With httpx the figure at 50 pollers is the
client's, not the gateway's.

With ``SCALEODM_BENCH_NODEODM_URL`` (bench/README.md, "Comparing with NodeODM"): that NodeODM is
given ``--info-nodeodm-tasks`` completed tasks before anything is measured, and after the figures
above ``info`` and ``task_info`` are polled in alternating rounds on the gateway
(``scaleodm:*``), on NodeODM (``nodeodm:*``) and, for ``task_info``, on two gateway processes
behind a round-robin client (``scaleodm_2gw:*``); medians of the rounds and ``ratio:*`` =
ScaleODM / NodeODM.

    uv run python -m bench.info_poll [--quick] [--info-tasks 1000] [--info-seconds 5] ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import math
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from pymongo import AsyncMongoClient

from bench.baselines import MONGO_FIND_WHAT, Op, mongo_find, rate
from bench.common import (
    MONGO_FIND,
    NODEODM_URL_ENV,
    BenchEnv,
    CpuWindow,
    Figure,
    at,
    create_zipurl_task,
    images_zip,
    median,
    mongo_pid,
    node_info,
    nodeodm_pid,
    nodeodm_url,
    percentile,
    serve_files,
    standalone,
)
from scaleodm.common.contracts import events
from scaleodm.common.domain import options as odm_options
from scaleodm.common.domain.status import NodeOdmStatus
from scaleodm.common.store import s3 as s3mod
from scaleodm.common.store.tasks import TaskStore
from tests.harness.stack import Stack

NAME = "info_poll"
DATABASE = "info"
BUCKET = "scaleodm"
ENDPOINTS = ("info", "task_info", "task_info_output")
TAIL = 10  # lines a task_info_output poll asks for
STORE_WHAT = {
    "info": "TaskStore.count_active() (what GET /info reads), called in the benchmark process",
    "task_info_output": "TaskStore.get_task() + read_output() of the last 10 lines (what GET "
                        "/task/{uuid}/info?with_output=N reads), called in the benchmark process",
}

QUICK: dict[str, Any] = {"info_tasks": 100, "info_seconds": 1.0, "info_levels": "1,10",
                         "info_nodeodm_tasks": 20}

# status mix of the stored tasks (fractions of --info-tasks)
MIX = (("queued", 0.10), ("running", 0.10), ("completed", 0.55), ("failed", 0.15),
       ("canceled", 0.10))
CODES = {"queued": NodeOdmStatus.QUEUED, "running": NodeOdmStatus.RUNNING,
         "completed": NodeOdmStatus.COMPLETED, "failed": NodeOdmStatus.FAILED,
         "canceled": NodeOdmStatus.CANCELED}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("info_poll")
    group.add_argument("--info-tasks", type=int, default=1000,
                       help="tasks stored before polling (default 1000)")
    group.add_argument("--info-seconds", type=float, default=5.0,
                       help="measured seconds per endpoint and level (default 5)")
    group.add_argument("--info-warmup", type=float, default=0.5,
                       help="unmeasured seconds before each measurement (default 0.5)")
    group.add_argument("--info-levels", default="1,10,50",
                       help="concurrent pollers, comma-separated (default 1,10,50)")
    group.add_argument("--info-endpoints", default=",".join(ENDPOINTS),
                       help=f"which polls, comma-separated (default {','.join(ENDPOINTS)})")
    group.add_argument("--info-lines", type=int, default=400,
                       help="console lines of a finished task (default 400)")
    group.add_argument("--info-client", choices=("aiohttp", "httpx"), default="aiohttp",
                       help="HTTP client of the pollers (default aiohttp: httpx costs the client "
                       "~5x the CPU and is the bottleneck at 50 pollers)")
    group.add_argument("--info-nodeodm-tasks", type=int, default=100,
                       help=f"with {NODEODM_URL_ENV}: completed tasks polled on NodeODM (created "
                       "there when missing; default 100)")
    group.add_argument("--info-nodeodm-rounds", type=int, default=3,
                       help=f"with {NODEODM_URL_ENV}: rounds per target, alternating (default 3)")
    group.add_argument("--info-nodeodm-timeout", type=float, default=1800.0,
                       help=f"with {NODEODM_URL_ENV}: seconds to wait for NodeODM to finish the "
                       "tasks it is given (default 1800)")


# -- the stored tasks -----------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    code: int
    lines: int


def _console(task: str, start: int, count: int) -> list[str]:
    return [f"[INFO]    {task[:8]} stage {(start + i) // 50}: processed {start + i} "
            f"of many (opensfm/mvs/odm_orthophoto ...)" for i in range(count)]


async def _seed_one(store: TaskStore, rng: random.Random, state: str, lines: int) -> tuple[
        str, Stored]:
    task = str(uuid.uuid4())
    user_options = [{"name": "dsm", "value": True},
                    {"name": "orthophoto-resolution", "value": rng.choice([2, 5, 10])},
                    {"name": "feature-quality", "value": rng.choice(["medium", "high"])}]
    options = odm_options.add_post_processing_options(
        odm_options.validate_options(user_options), skip_post_processing=False)
    images = rng.randint(20, 500)
    created = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=rng.randint(1, 10_000))
    doc = {
        "_id": task,
        "name": f"Task of {created.strftime('%Y-%m-%dT%H:%M:%S')}.000Z",
        "date_created_ms": int(created.timestamp() * 1000),
        "options": options,
        "images_count": images,
        "webhook": None,
        "skip_post_processing": False,
        "outputs": None,
        "sources": [str(s3mod.task_inputs(BUCKET, task))],
        "output_prefix": str(s3mod.task_outputs(BUCKET, task)),
    }
    await store.create_task(doc, events.new(events.TaskQueued, task, 1))
    written = 0
    if state in ("running", "completed", "failed") or (state == "canceled" and rng.random() < .5):
        await store.apply_event(events.new(events.TaskRunning, task, 1))
        await store.apply_event(events.new(events.TaskInputsReady, task, 1, images_count=images))
        total = lines if state in ("completed", "failed") else rng.randint(10, lines)
        chunk = 200  # the watcher's output_batch_lines default
        for start in range(0, total, chunk):
            count = min(chunk, total - start)
            await store.apply_event(events.new(
                events.TaskOutput, task, 1, line_start=start, lines=_console(task, start, count)
            ))
            await store.apply_event(
                events.new(
                    events.TaskProgressed,
                    task,
                    1,
                    key=start,
                    progress=round(100 * (start + count) / (lines + 1), 1),
                ))
        written = total
    if state == "completed":
        await store.apply_event(events.new(events.TaskCompleted, task, 1))
    elif state == "failed":
        await store.apply_event(events.new(
            events.TaskFailed, task, 1, error_message="Cannot process dataset"
        ))
    elif state == "canceled":
        await store.apply_event(events.new(events.TaskCanceled, task, 1))
    return task, Stored(int(CODES[state]), written)


async def seed_tasks(client: AsyncMongoClient[dict[str, Any]], database: str, n: int,
                     lines: int, concurrency: int = 16) -> dict[str, Stored]:
    """Store ``n`` tasks in the MIX of states; uuid -> what /task/{uuid}/info must say.

    Each task is written by ``TaskStore`` (``create_task``, ``apply_event``) into a scratch
    database, then its task document and events are copied into ``database`` in bulk, events
    marked published (the watcher's outbox relay would have sent them). Writing straight into
    one database costs O(events) per event on nx-27017 (``_record`` reads the task's last ``seq``
    by a scan), hence quadratic: minutes for 1,000 tasks.
    """
    scratch = TaskStore(client[f"{database}_seed"])
    await scratch.ensure_indexes()
    target = TaskStore(client[database])
    await target.ensure_indexes()
    rng = random.Random(6)
    states = [s for s, frac in MIX for _ in range(round(n * frac))]
    states = (states + ["completed"] * n)[:n]
    rng.shuffle(states)
    sem = asyncio.Semaphore(concurrency)
    docs: list[dict[str, Any]] = []
    logged: list[dict[str, Any]] = []

    async def one(state: str) -> tuple[str, Stored]:
        async with sem:
            task, stored = await _seed_one(scratch, random.Random(rng.random()), state, lines)
            doc = await scratch.tasks.find_one({"_id": task})
            assert doc is not None
            docs.append(doc)
            logged.extend({**ev, "published": True}
                          for ev in await scratch.events.find({"task_id": task}).to_list(None))
            await scratch.events.delete_many({"task_id": task})
            await scratch.tasks.delete_one({"_id": task})
            return task, stored

    tasks = dict(await asyncio.gather(*(one(s) for s in states)))
    await client.drop_database(f"{database}_seed")
    docs.sort(key=lambda d: d["created_at"])
    for i in range(0, len(docs), 500):
        await target.tasks.insert_many(docs[i:i + 500])
    for i in range(0, len(logged), 1000):
        await target.events.insert_many(logged[i:i + 1000])
    return tasks


# -- polling --------------------------------------------------------------------------------


@dataclass
class Level:
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)


def _check(endpoint: str, status: int, body: Any, task: str | None, stored: Stored | None,
           active: int) -> str | None:
    """None when the response is what the stored tasks imply, else what is wrong."""
    if status != 200:
        return f"HTTP {status}"
    if endpoint == "info":
        if body.get("taskQueueCount") != active or "version" not in body:
            return f"/info taskQueueCount {body.get('taskQueueCount')} != {active}"
        return None
    assert stored is not None
    if body.get("uuid") != task or body.get("status", {}).get("code") != stored.code:
        return "wrong task info"
    if endpoint == "task_info" and "output" in body:
        return "unexpected output"
    if endpoint == "task_info_output" and len(body.get("output", ())) != min(TAIL, stored.lines):
        return f"output has {len(body.get('output', ()))} lines, not {min(TAIL, stored.lines)}"
    return None


Get = Callable[[str], Awaitable[tuple[int, Any]]]


@contextlib.asynccontextmanager
async def http_get(base: str, kind: str) -> AsyncIterator[Get]:
    """One poller's connection: ``get(path) -> (status, JSON body)``.

    ``httpx``: an ``httpx.AsyncClient`` of its own (one shared client with 50 connections costs
    the client ~10 ms of CPU per request in its connection pool); ``aiohttp`` (a dependency of
    aiobotocore): a ``ClientSession``, several times cheaper per request than httpx, for a client
    that takes less of the cores from the gateway.
    """
    if kind == "aiohttp":
        import aiohttp

        async with aiohttp.ClientSession(
                base, connector=aiohttp.TCPConnector(limit=1),
                timeout=aiohttp.ClientTimeout(total=30)) as session:
            async def aio_get(path: str) -> tuple[int, Any]:
                async with session.get(path) as resp:
                    return resp.status, await resp.json(content_type=None)
            yield aio_get
        return
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        async def httpx_get(path: str) -> tuple[int, Any]:
            resp = await client.get(path)
            return resp.status_code, resp.json()
        yield httpx_get


async def poll(base: str | Sequence[str], endpoint: str, tasks: dict[str, Stored], active: int,
               level: int, seconds: float, warmup: float, cpu: CpuWindow,
               client: str = "aiohttp") -> Level:
    """``level`` pollers, each on its own connection, back to back for ``warmup`` + ``seconds``;
    what completes in the last ``seconds`` counts. Several ``base`` URLs (gateway replicas): each
    poller has a connection to each and sends its requests to them in turn (round robin)."""
    bases = [base] if isinstance(base, str) else list(base)
    result = Level()
    ids = list(tasks)
    rng = random.Random(level)
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + seconds

    async def window() -> None:
        await asyncio.sleep(warmup)
        cpu.start()
        await asyncio.sleep(seconds)
        result.cpu = cpu.stop()

    async def poller() -> None:
        async with contextlib.AsyncExitStack() as connections:
            gets = [await connections.enter_async_context(http_get(b, client)) for b in bases]
            turn = 0
            while loop.time() < end:
                get = gets[turn % len(gets)]
                turn += 1
                task: str | None = None
                if endpoint == "info":
                    path = "/info"
                else:
                    task = rng.choice(ids)
                    path = f"/task/{task}/info"
                    if endpoint == "task_info_output":
                        path += f"?with_output={max(0, tasks[task].lines - TAIL)}"
                t0 = time.perf_counter()
                try:
                    status, body = await get(path)
                    error = _check(endpoint, status, body, task, tasks.get(task or ""), active)
                except Exception as exc:  # counted: transport, timeout, not JSON
                    error = type(exc).__name__
                latency = time.perf_counter() - t0
                if start <= loop.time() <= end:
                    if error is None:
                        result.latencies.append(latency)
                    else:
                        result.errors[error] += 1

    await asyncio.gather(window(), *(poller() for _ in range(level)))
    return result


# -- the NodeODM comparison -----------------------------------------------------------------

CMP_ENDPOINTS = ("info", "task_info")  # polled on NodeODM too
SCALEODM, NODEODM, SCALEODM_2GW = "scaleodm", "nodeodm", "scaleodm_2gw"
RATIO_UNIT = "× NodeODM"


async def nodeodm_finished_tasks(env: BenchEnv, url: str, count: int,
                                 timeout_s: float) -> dict[str, Stored]:
    """``count`` completed tasks on the NodeODM at ``url``: those it already has (its tasks
    survive a restart in ``data/tasks.json``), else new zipurl tasks created through its API,
    waited for until they finish (NodeODM's test mode holds each for ``--test_seconds``)."""
    done: list[str] = []
    async with httpx.AsyncClient(timeout=30) as client:
        node = await node_info(client, url)
        listed = (await client.get(f"{url}/task/list")).json()
        for item in listed:
            info = (await client.get(f"{url}/task/{item['uuid']}/info")).json()
            if info.get("status", {}).get("code") == int(NodeOdmStatus.COMPLETED):
                done.append(item["uuid"])
                if len(done) == count:
                    return {task: Stored(int(NodeOdmStatus.COMPLETED), 0) for task in done}
        missing = count - len(done)
        sys.stderr.write(f"info_poll: {url} has {len(done)} completed tasks; creating {missing} "
                         f"more and waiting for them to finish (maxParallelTasks "
                         f"{node.get('maxParallelTasks')})\n")
        # NodeODM answers /task/new first and downloads the zip after: served until the end
        with serve_files(env.tmp / "nodeodm-seed", {"seed.zip": images_zip(5)}) as files:
            created = list(await asyncio.gather(*(
                create_zipurl_task(client, url, files.url("seed.zip"), f"bench info_poll {i}")
                for i in range(missing))))
            pending = set(created)
            started = shown = time.perf_counter()
            while pending:
                for task in list(pending):
                    info = (await client.get(f"{url}/task/{task}/info")).json()
                    code = info.get("status", {}).get("code")
                    if code == int(NodeOdmStatus.COMPLETED):
                        pending.discard(task)
                    elif code in (int(NodeOdmStatus.FAILED), int(NodeOdmStatus.CANCELED)):
                        raise RuntimeError(f"{url}: seed task {task} ended {info.get('status')}")
                now = time.perf_counter()
                if now - started > timeout_s:
                    raise TimeoutError(f"{url}: {len(pending)} seed tasks not finished after "
                                       f"{timeout_s:.0f} s")
                if pending and now - shown > 15:
                    sys.stderr.write(f"info_poll: NodeODM: {missing - len(pending)}/{missing} "
                                     f"finished\n")
                    shown = now
                await asyncio.sleep(1)
    return {task: Stored(int(NodeOdmStatus.COMPLETED), 0) for task in done + created}


@dataclass
class Target:
    name: str
    base: str | list[str]
    tasks: dict[str, Stored]
    active: int


# The processes a target's server cost is counted over (CpuWindow names in compare_nodeodm).
SERVER_CPU = {SCALEODM: ("gateway", "mongo"), SCALEODM_2GW: ("gateway", "gateway_2", "mongo"),
              NODEODM: ("nodeodm",)}


def _cpu_ms_per_req(target: str, level: Level, seconds: float) -> float:
    """CPU milliseconds the server spent per answered request (NaN without its CPU share)."""
    shares = [level.cpu.get(f"cpu_pct_{proc}", math.nan) for proc in SERVER_CPU[target]]
    if not level.latencies or any(math.isnan(v) for v in shares):
        return math.nan
    return sum(shares) / 100 * seconds * 1000 / len(level.latencies)


@dataclass
class Summary:
    req_s: float
    p99_ms: float
    cpu_ms: float


def _median_figures(target: str, endpoint: str, level: int, rounds: list[Level],
                    seconds: float, detail: dict[str, Any]) -> tuple[list[Figure], Summary]:
    """The median over rounds of req/s, p50, p99 and server CPU per request of one target."""
    req_s = median([len(r.latencies) / seconds for r in rounds])
    p50 = median([1000 * percentile(r.latencies, 50) for r in rounds])
    p99 = median([1000 * percentile(r.latencies, 99) for r in rounds])
    cpu_ms = median([_cpu_ms_per_req(target, r, seconds) for r in rounds])
    detail = {**detail, "server_cpu": "+".join(SERVER_CPU[target]), "rounds": [
        {"req_per_s": round(len(r.latencies) / seconds, 1),
         "p50_ms": round(1000 * percentile(r.latencies, 50), 2),
         "p99_ms": round(1000 * percentile(r.latencies, 99), 2),
         "cpu_ms_per_req": round(_cpu_ms_per_req(target, r, seconds), 3),
         "errors": sum(r.errors.values()), **r.cpu} for r in rounds]}
    pipe = at(MONGO_FIND, level) if target == SCALEODM else None
    return [
        Figure(NAME, at(f"{target}:{endpoint}_req_per_s", level), req_s, "req/s", pipe, detail),
        Figure(NAME, at(f"{target}:{endpoint}_p50_ms", level), p50, "ms", None, detail),
        Figure(NAME, at(f"{target}:{endpoint}_p99_ms", level), p99, "ms", None, detail),
        Figure(NAME, at(f"{target}:{endpoint}_cpu_ms_per_req", level), cpu_ms, "ms", None,
               detail),
    ], Summary(req_s, p99, cpu_ms)


def _div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


async def compare_nodeodm(url: str, stack: Stack, env: BenchEnv, scaleodm: dict[str, Stored],
                          active: int, nodeodm: dict[str, Stored], endpoints: list[str],
                          levels: list[int], args: argparse.Namespace) -> list[Figure]:
    """The same polls against ScaleODM's gateway, NodeODM, and two gateway replicas behind a
    round-robin client (task_info only), in alternating rounds; medians and ratios."""
    seconds, warmup, rounds = float(args.info_seconds), float(args.info_warmup), \
        int(args.info_nodeodm_rounds)
    stack.start("gateway-2")
    replicas = [stack.gateway_url, f"http://127.0.0.1:{stack.ports['gateway-2']}"]
    async with httpx.AsyncClient(timeout=30) as client:
        node = await node_info(client, url)
    # as many ScaleODM tasks polled as NodeODM ones, completed ones as there
    completed = [t for t, s in scaleodm.items() if s.code == int(NodeOdmStatus.COMPLETED)]
    ours = {t: scaleodm[t] for t in completed[:len(nodeodm)]}
    targets = {SCALEODM: Target(SCALEODM, stack.gateway_url, ours, active),
               NODEODM: Target(NODEODM, url, nodeodm, int(node["taskQueueCount"])),
               SCALEODM_2GW: Target(SCALEODM_2GW, replicas, ours, active)}
    pids: dict[str, int | None] = {"gateway": stack.procs["gateway"].pid,
                                   "gateway_2": stack.procs["gateway-2"].pid,
                                   "mongo": mongo_pid(env), "client": None}
    node_pid = nodeodm_pid(url)
    if node_pid is not None:
        pids["nodeodm"] = node_pid
    cpu = CpuWindow(pids)
    common = {"seconds": seconds, "rounds": rounds, "cpus": os.cpu_count(),
              "nodeodm": {"url": url, "version": node.get("version"),
                          "maxParallelTasks": node.get("maxParallelTasks"),
                          "tasks_polled": len(nodeodm), "pid_found": node_pid is not None},
              "scaleodm": {"tasks_stored": len(scaleodm), "tasks_polled": len(ours),
                           "gateways": "one uvicorn process; scaleodm_2gw: two on the same "
                           "database, each poller alternating between them"},
              "client": f"{args.info_client}, one client and connection per poller (per "
                        "gateway for scaleodm_2gw)",
              "order": "rounds alternate the targets (rotated each round); figures are the "
                       "median of the rounds"}
    figures: list[Figure] = []
    errors: dict[str, dict[str, int]] = {}
    for endpoint in [e for e in CMP_ENDPOINTS if e in endpoints]:
        names = [SCALEODM, NODEODM] + ([SCALEODM_2GW] if endpoint == "task_info" else [])
        for level in levels:
            samples: dict[str, list[Level]] = {name: [] for name in names}
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    t = targets[name]
                    samples[name].append(await poll(t.base, endpoint, t.tasks, t.active, level,
                                                    seconds, warmup, cpu, args.info_client))
            summary: dict[str, Summary] = {}
            for name in names:
                detail = {**common, "concurrency": level, "target": name}
                figs, summary[name] = _median_figures(name, endpoint, level, samples[name],
                                                      seconds, detail)
                figures += figs
                errors[f"{name}:{endpoint}@{level}"] = dict(
                    sum((r.errors for r in samples[name]), Counter()))
            theirs = summary[NODEODM]
            what = {"what": "ScaleODM / NodeODM, medians of the rounds (req/s: above 1 is "
                    "ScaleODM faster; p99 and CPU per request: below 1 is ScaleODM faster or "
                    "cheaper)", "concurrency": level}
            for name, prefix in ((SCALEODM, "ratio"), (SCALEODM_2GW, "ratio_2gw")):
                if name not in summary:
                    continue
                mine = summary[name]
                figures += [
                    Figure(NAME, at(f"{prefix}:{endpoint}_req_per_s", level),
                           _div(mine.req_s, theirs.req_s), RATIO_UNIT, None, what),
                    Figure(NAME, at(f"{prefix}:{endpoint}_p99_ms", level),
                           _div(mine.p99_ms, theirs.p99_ms), RATIO_UNIT, None, what),
                    Figure(NAME, at(f"{prefix}:{endpoint}_cpu_ms_per_req", level),
                           _div(mine.cpu_ms, theirs.cpu_ms), RATIO_UNIT, None, what),
                ]
    figures.append(Figure(NAME, "nodeodm_cmp_errors",
                          sum(sum(e.values()) for e in errors.values()), "responses", None,
                          {"by_target": errors}))
    return figures


# -- the benchmark --------------------------------------------------------------------------


def _store_ops(store: TaskStore, tasks: dict[str, Stored]) -> dict[str, Op]:
    """What each endpoint asks of the store, called directly (no HTTP, no gateway)."""
    ids = list(tasks)

    async def info(_rng: random.Random) -> bool:
        return await store.count_active() >= 0

    async def task_info_output(rng: random.Random) -> bool:
        task = rng.choice(ids)
        doc = await store.get_task(task)
        if doc is None:
            return False
        total = int(doc.get("output_lines", 0))
        start = max(0, tasks[task].lines - TAIL)
        return len(await store.read_output(task, doc["attempt"], start, total)) == min(
            TAIL, tasks[task].lines)

    return {"info": info, "task_info_output": task_info_output}


async def measure(env: BenchEnv, args: argparse.Namespace) -> list[Figure]:
    levels = [int(x) for x in str(args.info_levels).split(",") if x.strip()]
    endpoints = [e.strip() for e in str(args.info_endpoints).split(",") if e.strip()]
    unknown = set(endpoints) - set(ENDPOINTS)
    if unknown:
        raise SystemExit(f"unknown --info-endpoints {sorted(unknown)}; known: {ENDPOINTS}")
    seconds, warmup = float(args.info_seconds), float(args.info_warmup)

    url = nodeodm_url()
    nodeodm: dict[str, Stored] = {}
    if url:  # before anything runs here: the seed tasks are NodeODM's work, not measured
        nodeodm = await nodeodm_finished_tasks(env, url, int(args.info_nodeodm_tasks),
                                               float(args.info_nodeodm_timeout))
    compared: list[Figure] = []

    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(env.mongo_url, tz_aware=True)
    baselines: list[Figure] = []
    store_rates: dict[tuple[str, int], float] = {}
    results: dict[tuple[str, int], Level] = {}
    try:
        t0 = time.perf_counter()
        tasks = await seed_tasks(mongo, DATABASE, args.info_tasks, args.info_lines)
        seed_s = time.perf_counter() - t0
        active = sum(1 for s in tasks.values() if s.code in (10, 20))
        events_count = await mongo[DATABASE]["events"].count_documents({})
        common = {"tasks": len(tasks), "events": events_count, "active_tasks": active,
                  "seconds": seconds, "seed_seconds": round(seed_s, 1), "cpus": os.cpu_count(),
                  "note": "one gateway (uvicorn) process, the MongoDB wire server (nx-27017) and "
                  "this client share the cores"}
        stack = env.stack(DATABASE)
        try:
            stack.start("gateway")
            cpu = CpuWindow({"gateway": stack.procs["gateway"].pid, "mongo": mongo_pid(env),
                             "client": None})
            ops = {MONGO_FIND: mongo_find(mongo, DATABASE, list(tasks))}
            whats = {MONGO_FIND: MONGO_FIND_WHAT}
            for endpoint, op in _store_ops(TaskStore(mongo[DATABASE]), tasks).items():
                if endpoint in endpoints:
                    ops[f"store_{endpoint}_per_s"] = op
                    whats[f"store_{endpoint}_per_s"] = STORE_WHAT[endpoint]
            for level in levels:
                for name, op in ops.items():
                    cpu.start()
                    value, misses = await rate(op, level, seconds, warmup)
                    baselines.append(Figure(NAME, at(name, level), value, "req/s", None, {
                        **common, "concurrency": level, "misses": misses, **cpu.stop(),
                        "what": whats[name]}))
                    store_rates[name, level] = value
            for endpoint in endpoints:
                for level in levels:
                    results[endpoint, level] = await poll(
                        stack.gateway_url, endpoint, tasks, active, level, seconds, warmup, cpu,
                        args.info_client)
            if url:
                compared = await compare_nodeodm(url, stack, env, tasks, active, nodeodm,
                                                 endpoints, levels, args)
        finally:
            stack.stop()
    finally:
        await mongo.close()

    figures = list(baselines)
    best = max((f for f in baselines if f.name.startswith(MONGO_FIND)), key=lambda f: f.value)
    figures.append(Figure(NAME, MONGO_FIND, best.value, "req/s", None,
                          {**best.detail, "what": f"the best level, {best.name}"}))
    for endpoint in endpoints:
        errors: dict[str, dict[str, int]] = {}
        for level in levels:
            res = results[endpoint, level]
            req_s = len(res.latencies) / seconds
            store = store_rates.get((f"store_{endpoint}_per_s", level))
            detail = {**common, "concurrency": level, "ok": len(res.latencies),
                      "errors": sum(res.errors.values()), **res.cpu,
                      "client": f"{args.info_client}, one client and connection per poller"}
            if store:
                detail["vs_store"] = round(req_s / store, 3)
            figures += [
                Figure(NAME, at(f"{endpoint}_req_per_s", level), req_s, "req/s",
                       at(MONGO_FIND, level), detail),
                Figure(NAME, at(f"{endpoint}_p50_ms", level),
                       1000 * percentile(res.latencies, 50), "ms", None, detail),
                Figure(NAME, at(f"{endpoint}_p99_ms", level),
                       1000 * percentile(res.latencies, 99), "ms", None, detail),
            ]
            errors[str(level)] = dict(res.errors)
        figures.append(Figure(NAME, f"{endpoint}_errors",
                              sum(sum(e.values()) for e in errors.values()), "responses", None,
                              {"by_level": errors}))
    return figures + compared


if __name__ == "__main__":
    sys.exit(standalone(NAME, measure, add_arguments, QUICK))
