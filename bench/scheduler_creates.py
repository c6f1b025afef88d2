"""Scheduler: Argo Workflow creates per second against the Kubernetes API double.

The API double (``tests/k8s/apiserver.py``) runs in a process of its own
(``bench/engines/k8s_apiserver.py``) so it does not share a GIL with anything measured; the Argo
controller double does **not** run (Workflows are only stored, no pods), so nothing else takes CPU.
Creation times are taken inside the double when a create is applied.

1. **Backlog**: ``--sched-tasks`` tasks are queued while no scheduler runs, as the gateway does
   (``scaleodm.gateway.actions.TaskActions.create``: the ``queued`` event and the task document
   in MongoDB, then the event on JetStream through the outbox's delivery, ``Emitter.deliver``),
   with ``s3://`` prefix inputs (the Argo executor does not fetch inputs; it puts them into the
   Workflow). Then the scheduler (``SCALEODM_EXECUTOR=argo``, a capacity above the backlog)
   starts, admits the tasks (``admission.py``: each admission an event carrying the create
   command, published and consumed like any command) and drains the queue: creates/s =
   (N - 1) / (last create - first create), as seen by the double; the admission log gives
   admissions/s.
2. **Latency** (scheduler idle and running): ``--sched-latency-tasks`` tasks queued at
   ``--sched-latency-rate`` per second; p50/p95 of task recorded -> Workflow created
   (admission included).
3. **Baseline** ``k8s_create_per_s``: the same number of Workflows created straight from the
   bench with the scheduler's client (``kubernetes_asyncio`` ``CustomObjectsApi`` through
   ``scaleodm.common.argoruns.api_client``, asyncio), bodies built beforehand by the same
   Hera builder (``scaleodm.scheduler.workflows.build_workflow``), at the scheduler's maximum
   concurrency (its pull consumer fetches batches of ``SCHEDULER_BATCH`` and runs a batch's
   handlers concurrently), against the same double, in another namespace.

    uv run python -m bench.scheduler_creates [--quick] [--sched-tasks 1000] ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faststream.nats import NatsBroker
from kubernetes_asyncio import client as k8s_client

from bench.common import K8S_CREATE, ROOT, BenchEnv, Figure, percentile, standalone
from scaleodm.common import argoruns
from scaleodm.common.contracts import commands, events, streams
from scaleodm.common.contracts.ids import run_name
from scaleodm.common.domain import options as odm_options
from scaleodm.common.emitting import Emitter, Outbound
from scaleodm.common.settings import ArgoSettings, MongoSettings
from scaleodm.common.store import s3 as s3mod
from scaleodm.common.store.tasks import TaskStore, open_store, run_command
from scaleodm.scheduler import workflows
from tests.harness.stack import Stack

NAME = "scheduler_creates"
DATABASE = "bench_sched"
NAMESPACE = "scaleodm"
RAW_NAMESPACE = "bench-raw"
LAUNCHER = ROOT / "bench" / "engines" / "k8s_apiserver.py"
# services/scheduler/src/scaleodm/scheduler/app.py: PullSub(batch_size=8); FastStream runs the
# handlers of one fetched batch concurrently and fetches the next batch when all are done.
SCHEDULER_BATCH = 8
OPTIONS = '[{"name": "dsm", "value": true}, {"name": "orthophoto-resolution", "value": 2}]'
STALL_S = 60.0


# Sizes: full, and with --quick (a smoke run) where the option was not given explicitly.
DEFAULTS: dict[str, int] = {"sched_tasks": 1000, "sched_latency_tasks": 200}
QUICK: dict[str, int] = {"sched_tasks": 50, "sched_latency_tasks": 20}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scheduler_creates")
    group.add_argument("--sched-tasks", type=int, default=DEFAULTS["sched_tasks"],
                       help="tasks queued before the scheduler starts")
    group.add_argument("--sched-latency-tasks", type=int, default=DEFAULTS["sched_latency_tasks"],
                       help="commands published one by one to a running scheduler")
    group.add_argument("--sched-latency-rate", type=float, default=20.0,
                       help="commands per second in the latency run")
    group.add_argument("--sched-raw-concurrency", type=int, default=SCHEDULER_BATCH,
                       help="concurrent creates of the raw-client baseline")


def _standalone_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    if "--quick" not in parser._option_string_actions:
        parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")


def size(args: argparse.Namespace, dest: str) -> int:
    """An option's value; with ``--quick``, the quick size unless the option was given."""
    value = int(getattr(args, dest))
    if getattr(args, "quick", False) and value == DEFAULTS[dest]:
        return QUICK[dest]
    return value


# -- the API double in its own process ------------------------------------------------------------


@dataclass
class ApiDouble:
    proc: asyncio.subprocess.Process
    url: str
    kubeconfig: Path

    async def ask(self, command: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{command}\n".encode())
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the API double exited")
        return json.loads(line)

    async def created(self, namespace: str) -> dict[str, float]:
        return dict(await self.ask(f"created {namespace}"))


@contextlib.asynccontextmanager
async def api_double(tmp: Path) -> AsyncIterator[ApiDouble]:
    log = (tmp / "k8s-apiserver.log").open("ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(LAUNCHER), str(tmp / "kubeconfig"), NAMESPACE,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
        limit=64 * 1024 * 1024,  # one answer line lists every created Workflow
    )
    log.close()
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not first:
            raise RuntimeError(f"the API double did not start (see {tmp / 'k8s-apiserver.log'})")
        hello = json.loads(first)
        yield ApiDouble(proc, hello["url"], Path(hello["kubeconfig"]))
    finally:
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.write(b"quit\n")
                await proc.stdin.drain()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# -- queueing tasks as the gateway does ----------------------------------------------------------


@dataclass
class Submitter:
    store: TaskStore
    broker: NatsBroker
    emitter: Emitter
    bucket: str
    mongo_pid_file: Path
    nats_pid: int
    timeout_s: float = 5.0


def new_task(bucket: str) -> tuple[dict[str, Any], commands.CreateTask]:
    """A task document, field for field as ``actions.TaskActions``, and the create command its
    admission will carry."""
    task_id = str(uuid.uuid4())
    opts = odm_options.add_post_processing_options(
        odm_options.validate_options(OPTIONS), skip_post_processing=False)
    sources = [f"s3://{bucket}/bench-inputs/{task_id}/"]
    doc = {
        "_id": task_id, "name": f"bench {task_id[:8]}", "date_created_ms": int(time.time() * 1000),
        "options": opts, "images_count": 0, "webhook": None, "skip_post_processing": False,
        "outputs": None, "sources": sources,
        "output_prefix": str(s3mod.task_outputs(bucket, task_id)),
    }
    cmd = run_command({**doc, "attempt": 1})
    assert isinstance(cmd, commands.CreateTask)
    return doc, cmd


async def record_task(b: Submitter, doc: dict[str, Any]) -> int | None:
    created = await b.store.create_task(doc, events.new(events.TaskQueued, doc["_id"], 1))
    return created.seq


async def publish_task(b: Submitter, cmd: commands.CreateTask, seq: int | None) -> float:
    """Publish the queued event (the outbox's delivery; admission follows); the time the
    publish started."""
    at = time.time()
    queued = events.new(events.TaskQueued, cmd.task_id, 1).model_copy(update={"seq": seq})
    assert await b.emitter.deliver(Outbound(queued))
    return at


async def queue_backlog(b: Submitter, count: int, concurrency: int = 16) -> list[str]:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> str:
        async with sem:
            doc, cmd = new_task(b.bucket)
            seq = await record_task(b, doc)
            await publish_task(b, cmd, seq)
            return cmd.task_id

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def wait_count(double: ApiDouble, namespace: str, target: int,
                     interval_s: float = 0.05) -> int:
    """Poll the double until ``target`` Workflows exist in ``namespace`` (or none come for
    ``STALL_S``); the count reached."""
    last, last_change = -1, time.monotonic()
    while True:
        count = int(await double.ask(f"count {namespace}"))
        if count >= target:
            return count
        if count != last:
            last, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > STALL_S:
            return count
        await asyncio.sleep(interval_s)


def _rate(times: list[float]) -> float:
    if len(times) < 2 or max(times) <= min(times):
        return float("nan")
    return (len(times) - 1) / (max(times) - min(times))


def _round(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()}


async def pending_commands(js: Any) -> int | None:
    """Commands already waiting in the TASKS stream (another bench's leftovers), if any."""
    try:
        info = await js.stream_info(streams.TASKS_STREAM)
        return int(info.state.messages)
    except Exception:
        return None


# -- the phases ----------------------------------------------------------------------------------


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (Linux /proc); NaN when unknown or gone."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


async def backlog_phase(b: Submitter, stack: Stack, double: ApiDouble, tasks: int) -> Figure:
    started = time.perf_counter()
    task_ids = await queue_backlog(b, tasks)
    queue_s = time.perf_counter() - started
    spawned = time.time()
    stack.spawn("scheduler")
    pids = {"scheduler": stack.procs["scheduler"].pid, "double": double.proc.pid,
            "mongodb": _pid_file(b.mongo_pid_file), "nats": b.nats_pid}
    first = await wait_count(double, NAMESPACE, 1, interval_s=0.01)
    cpu0 = {name: cpu_s(pid) for name, pid in pids.items()}
    reached = await wait_count(double, NAMESPACE, tasks)
    cpu1 = {name: cpu_s(pid) for name, pid in pids.items()}
    await asyncio.to_thread(stack.wait_ready, "scheduler")
    created = await double.created(NAMESPACE)
    times = [created[run_name(t, 1)] for t in task_ids if run_name(t, 1) in created]
    stats = await double.ask(f"requests {NAMESPACE}")
    rate = _rate(times)
    measured = max(reached - first, 1)
    return Figure(NAME, "creates_per_s", rate, "creates/s", K8S_CREATE, {
        "tasks": tasks, "workflows_created": len(times), "reached": reached,
        "bench_queue_s": round(queue_s, 2),
        "spawn_to_first_create_s": round(min(times) - spawned, 2) if times else None,
        "spawn_to_last_create_s": round(max(times) - spawned, 2) if times else None,
        "scheduler_batch_size": SCHEDULER_BATCH, "scheduler_requests": _round(stats),
        "cpu_ms_per_create": {name: round((cpu1[name] - cpu0[name]) / measured * 1000, 2)
                              for name in pids},
        "cpu_window_creates": measured,
        "measured": "(N-1)/(last create - first create), create times taken in the double",
    })


async def latency_phase(b: Submitter, double: ApiDouble, tasks: int, rate: float,
                        already: int) -> list[Figure]:
    # Admission reads the task documents: a task is measured from its recording on (the
    # gateway's write), not from its event's publish, which admission may precede.
    published: dict[str, float] = {}
    start = time.monotonic()
    for i in range(tasks):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        doc, cmd = new_task(b.bucket)
        at = time.time()
        await publish_task(b, cmd, await record_task(b, doc))
        published[run_name(cmd.task_id, 1)] = at
    await wait_count(double, NAMESPACE, already + tasks)
    created = await double.created(NAMESPACE)
    lat = [(created[name] - at) * 1000 for name, at in published.items() if name in created]
    detail = {"tasks": tasks, "rate_per_s": rate, "created": len(lat),
              "mean_ms": round(sum(lat) / len(lat), 1) if lat else None,
              "max_ms": round(max(lat), 1) if lat else None,
              "measured": "task recorded (bench, as the gateway) -> create applied (double)"}
    return [Figure(NAME, "create_latency_p50_ms", percentile(lat, 50), "ms", None, detail),
            Figure(NAME, "create_latency_p95_ms", percentile(lat, 95), "ms", None,
                   {"tasks": tasks})]


async def baseline_phase(double: ApiDouble, env: BenchEnv, tasks: int,
                         concurrency: int) -> Figure:
    settings = ArgoSettings(namespace=RAW_NAMESPACE)
    step_env = {"SCALEODM_S3__REGION": env.s3.region, "SCALEODM_S3__BUCKET": "scaleodm",
                "SCALEODM_S3__ENDPOINT_URL": env.s3.url}  # S3's part of argo.step_env
    specs = [new_task("scaleodm")[1] for _ in range(tasks)]
    started = time.perf_counter()
    bodies = [workflows.build_workflow(
        s, settings, shard=argoruns.shard_of(s.task_id, settings.shards), step_env=step_env)
        for s in specs]
    build_us = (time.perf_counter() - started) / max(tasks, 1) * 1e6
    api = await argoruns.api_client(double.kubeconfig)
    custom = k8s_client.CustomObjectsApi(api)
    sem = asyncio.Semaphore(concurrency)

    async def create(body: dict[str, Any]) -> None:
        async with sem:
            await custom.create_namespaced_custom_object(
                argoruns.GROUP, argoruns.VERSION, RAW_NAMESPACE, argoruns.PLURAL, body,
                _request_timeout=settings.request_timeout_s)

    cpu0 = (time.process_time(), cpu_s(double.proc.pid))
    try:
        await asyncio.gather(*(create(body) for body in bodies))
    finally:
        cpu1 = (time.process_time(), cpu_s(double.proc.pid))
        await api.close()
    created = await double.created(RAW_NAMESPACE)
    stats = await double.ask(f"requests {RAW_NAMESPACE}")
    return Figure(NAME, K8S_CREATE, _rate(list(created.values())), "creates/s", None, {
        "tasks": tasks, "workflows_created": len(created), "concurrency": concurrency,
        "client": "kubernetes_asyncio CustomObjectsApi (asyncio), scheduler's api_client()",
        "body_bytes": len(json.dumps(bodies[0])) if bodies else 0,
        "build_workflow_us_mean": round(build_us, 1), "requests": _round(stats),
        "cpu_ms_per_create": {
            "client": round((cpu1[0] - cpu0[0]) / max(tasks, 1) * 1000, 2),
            "double": round((cpu1[1] - cpu0[1]) / max(tasks, 1) * 1000, 2)},
    })


async def measure(env: BenchEnv, args: argparse.Namespace) -> list[Figure]:
    tasks = size(args, "sched_tasks")
    latency_tasks = size(args, "sched_latency_tasks")
    figures: list[Figure] = []
    tmp = env.tmp / DATABASE
    tmp.mkdir(parents=True, exist_ok=True)
    async with api_double(tmp) as double:
        stack = env.stack(DATABASE, {
            "SCALEODM_EXECUTOR": "argo",
            "SCALEODM_ARGO__KUBECONFIG": str(double.kubeconfig),
            "SCALEODM_ARGO__NAMESPACE": NAMESPACE,
            # Room for every task: this measures creating runs, not waiting for slots.
            "SCALEODM_CAPACITY__MAX_ACTIVE": str(10 * (tasks + latency_tasks) + 100),
            "SCALEODM_CAPACITY__CLASSES": json.dumps([{
                "name": "any", "max_images": None, "slots": 10 * (tasks + latency_tasks) + 100}]),
        })
        broker = NatsBroker(env.nats.url)
        handle = await open_store(MongoSettings(url=env.mongo_url, database=DATABASE), "bench")
        try:
            js = (await broker.connect()).jetstream()
            await streams.ensure_streams(js)
            pending = await pending_commands(js)
            b = Submitter(handle.store, broker, Emitter(handle.store, broker, 5.0), stack.bucket,
                    env.tmp / "mongo" / "nx.pid", env.nats.proc.pid)
            backlog = await backlog_phase(b, stack, double, tasks)
            backlog.detail["commands_pending_before"] = pending
            backlog.detail["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
            figures.append(backlog)
            figures += await latency_phase(b, double, latency_tasks, args.sched_latency_rate,
                                           already=tasks)
        finally:
            await asyncio.to_thread(stack.stop)
            await broker.stop()
            await handle.close()
        figures.append(await baseline_phase(double, env, tasks, args.sched_raw_concurrency))
    return figures


if __name__ == "__main__":
    sys.exit(standalone(NAME, measure, _standalone_arguments))
