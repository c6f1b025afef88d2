"""The event pipeline: console lines through the watcher into MongoDB, JetStream and to clients.

Real services on the bench servers: gateway, scheduler (local executor) and watcher, with the
engine replaced by a benchmark double (``bench/engines/log_burst.py``, ``SCALEODM_ENGINE=command``)
that prints numbered lines stamped with the wall-clock time they were written. Tasks are submitted
through the gateway (``POST /task/new`` with two small uploaded JPEGs; one's name tells the double
what to print).

1. **Burst** (throughput): the double writes ``--pipeline-lines`` lines as fast as it can (far
   faster than the pipeline takes them). lines/s = lines / (time the last line is in MongoDB —
   the task's ``output_lines``, what ``/info?with_output`` serves — minus the time the first line
   was written); the same against the time the last line was delivered on JetStream (an ordered
   consumer on ``events.task.<uuid>.>``, i.e. what the EVENTS stream holds), and output events/s
   on the bus. These are bounded by JetStream (baseline ``jetstream_msgs_per_s``, measured by
   ``bench/baselines.py``); lines travel ``SCALEODM_OUTPUT_BATCH_LINES`` to an event.
2. **Paced** (latency): ``--pipeline-paced-lines`` lines at ``--pipeline-paced-rate`` lines/s.
   Per line: time it appears in ``GET /task/{uuid}/info?with_output=N`` (polled every
   ``--pipeline-poll-ms``, N = lines already seen), on the SSE stream ``GET /task/{uuid}/events``,
   and on JetStream, minus the time it was written. p50/p95 in ms.

Every path is checked for each line arriving exactly once and in order; mismatches (missing,
duplicated, out of order, foreign lines) are figures, never assertions.

    uv run python -m bench.pipeline [--quick] [--pipeline-lines 50000] ...
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
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
from pymongo import AsyncMongoClient

from bench.common import JETSTREAM, ROOT, BenchEnv, Figure, percentile, standalone
from bench.engines.log_burst import parse_line, trigger_name
from scaleodm.common.settings import WatcherSettings
from tests.harness import data, sse
from tests.harness.stack import Stack

NAME = "pipeline"
ENGINE = ROOT / "bench" / "engines" / "log_burst.py"
TERMINAL_KINDS = ("completed", "failed", "canceled")
TERMINAL_CODES = (30, 40, 50)
DATABASE = "bench_pipeline"


# Sizes: full, and with --quick (a smoke run) where the option was not given explicitly.
DEFAULTS: dict[str, int] = {"pipeline_lines": 50_000, "pipeline_paced_lines": 1000,
                            "pipeline_paced_rate": 200}
QUICK: dict[str, int] = {"pipeline_lines": 2000, "pipeline_paced_lines": 200,
                         "pipeline_paced_rate": 100}
PACED_LEAD_MS = 1500  # the double waits this long before its first paced line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pipeline")
    group.add_argument("--pipeline-lines", type=int, default=DEFAULTS["pipeline_lines"],
                       help="burst: console lines written as fast as possible")
    group.add_argument("--pipeline-paced-lines", type=int,
                       default=DEFAULTS["pipeline_paced_lines"],
                       help="paced: console lines of the latency run")
    group.add_argument("--pipeline-paced-rate", type=int, default=DEFAULTS["pipeline_paced_rate"],
                       help="paced: lines per second")
    group.add_argument("--pipeline-batch-lines", type=int, default=None,
                       help="SCALEODM_OUTPUT_BATCH_LINES for the watcher (default: the product's)")
    group.add_argument("--pipeline-watch-poll-s", type=float, default=None,
                       help="SCALEODM_POLL_INTERVAL_S for the watcher (default: the product's)")
    group.add_argument("--pipeline-poll-ms", type=float, default=20.0,
                       help="how often the bench polls /info and MongoDB")


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


# -- processes -----------------------------------------------------------------------------------


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (Linux /proc); NaN when unknown or gone."""
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


@dataclass
class CpuShare:
    """CPU of named processes between ``start()`` and ``stop()``, as % of one core."""

    pids: dict[str, int | None]
    begin: dict[str, float] = field(default_factory=dict)
    started: float = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self.begin = {name: cpu_s(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.started
        if not self.begin or wall <= 0:
            return {}
        return {name: round(100 * (cpu_s(pid) - self.begin[name]) / wall, 1)
                for name, pid in self.pids.items()}


# -- lines as seen by one observer --------------------------------------------------------------


@dataclass
class Arrivals:
    """Lines of the double as one path delivered them: (index, written_ns, seen_ns), in order."""

    path: str
    lines: list[tuple[int, int, int]] = field(default_factory=list)
    foreign: int = 0  # lines that are not the double's
    last_ns: int = 0

    def add(self, raw: list[str], seen_ns: int) -> None:
        for line in raw:
            parsed = parse_line(line)
            if parsed is None:
                self.foreign += 1
            else:
                self.lines.append((parsed[0], parsed[1], seen_ns))
        if raw:
            self.last_ns = seen_ns

    def check(self, expected: int) -> dict[str, int]:
        """Missing, duplicated and out-of-order lines (a first arrival below an earlier one)."""
        seen: set[int] = set()
        duplicated = out_of_order = 0
        highest = -1
        for index, _, _ in self.lines:
            if index in seen:
                duplicated += 1
                continue
            seen.add(index)
            if index < highest:
                out_of_order += 1
            highest = max(highest, index)
        missing = sum(1 for i in range(expected) if i not in seen)
        extra = sum(1 for i in seen if i >= expected)
        return {"received": len(self.lines), "missing": missing, "duplicated": duplicated,
                "out_of_order": out_of_order, "foreign": self.foreign, "unexpected": extra}

    def mismatches(self, expected: int) -> int:
        c = self.check(expected)
        return (c["missing"] + c["duplicated"] + c["out_of_order"] + c["foreign"]
                + c["unexpected"])

    def latencies_ms(self, after_ns: int = 0) -> list[float]:
        """seen - written of each line's first arrival, for lines written after ``after_ns``."""
        firsts: dict[int, float] = {}
        for index, written, seen_at in self.lines:
            if index not in firsts and written >= after_ns:
                firsts[index] = (seen_at - written) / 1e6
        return list(firsts.values())

    def first_written_ns(self) -> int | None:
        return min((w for i, w, _ in self.lines if i == 0), default=None)


# -- the bus -------------------------------------------------------------------------------------


@dataclass
class BusWatch:
    """An ordered JetStream consumer on one task's events: what the EVENTS stream holds."""

    task_id: str
    arrivals: Arrivals
    output_events: int = 0
    terminal: asyncio.Event = field(default_factory=asyncio.Event)
    raw: list[tuple[int, str, bytes]] = field(default_factory=list)

    async def handle(self, msg: Any) -> None:
        now = time.time_ns()
        kind = str(msg.subject).rsplit(".", 1)[-1]
        self.raw.append((now, kind, bytes(msg.data)))
        if kind in TERMINAL_KINDS:
            self.terminal.set()

    def decode(self) -> None:
        """Parse what arrived (after the run: the callback only stores bytes and times)."""
        self.arrivals.lines.clear()
        self.output_events = 0
        for seen_ns, kind, payload in self.raw:
            if kind == "output":
                self.output_events += 1
                self.arrivals.add(json.loads(payload)["lines"], seen_ns)


@contextlib.asynccontextmanager
async def bus_watch(nc: Any, task_id: str) -> AsyncIterator[BusWatch]:
    watch = BusWatch(task_id, Arrivals("jetstream"))
    js = nc.jetstream()
    sub = await js.subscribe(f"events.task.{task_id}.>", cb=watch.handle, ordered_consumer=True)
    try:
        yield watch
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


# -- the gateway ---------------------------------------------------------------------------------


async def submit(client: httpx.AsyncClient, task_id: str, trigger: str) -> None:
    """``POST /task/new`` with two small JPEGs, one named ``trigger``; uuid set by ``set-uuid``."""
    parts: list[tuple[str, Any]] = [("name", (None, f"bench {trigger}"))]
    parts += [("images", (name, data.JPEG, "image/jpeg")) for name in ("DJI_0001.JPG", trigger)]
    resp = await client.post("/task/new", files=parts, headers={"set-uuid": task_id})
    body = resp.json()
    if resp.status_code != 200 or body.get("uuid") != task_id:
        raise RuntimeError(f"task not created: {resp.status_code} {resp.text}")


async def poll_info(client: httpx.AsyncClient, task_id: str, arrivals: Arrivals, *,
                    interval_s: float, ready: asyncio.Event,
                    timeout_s: float) -> int:
    """Poll ``/info?with_output=<lines seen>`` until the task ended and gave all its lines;
    returns the number of polls."""
    polls = 0
    seen = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resp = await client.get(f"/task/{task_id}/info", params={"with_output": seen})
        now = time.time_ns()
        polls += 1
        ready.set()
        info = resp.json()
        output = info.get("output") or []
        arrivals.add(output, now)
        seen += len(output)
        if info.get("status", {}).get("code") in TERMINAL_CODES and not output:
            break  # the watcher records every line before the terminal event
        await asyncio.sleep(interval_s)
    return polls


async def read_sse(client: httpx.AsyncClient, task_id: str, arrivals: Arrivals,
                   ready: asyncio.Event) -> dict[str, int]:
    """Read ``/task/{uuid}/events`` until its terminal event; output lines into ``arrivals``."""
    counts = {"messages": 0, "output_events": 0}
    async with client.stream("GET", f"/task/{task_id}/events",
                             timeout=httpx.Timeout(30, read=None)) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"event stream: {resp.status_code}")
        async for msg in sse.messages(resp):
            now = time.time_ns()
            ready.set()
            counts["messages"] += 1
            if msg.event == "output" and msg.data is not None:
                counts["output_events"] += 1
                arrivals.add(json.loads(msg.data)["lines"], now)
            if msg.event in TERMINAL_KINDS or msg.event == "removed":
                break
    return counts


# -- MongoDB -------------------------------------------------------------------------------------


@dataclass
class MongoWatch:
    """Polls the task document's ``output_lines`` (what ``/info?with_output`` serves)."""

    tasks: Any
    task_id: str
    cpu: CpuShare | None = None  # started at the first line seen, stopped at the last
    cpu_pct: dict[str, float] = field(default_factory=dict)
    polls: int = 0
    steps: list[tuple[int, int]] = field(default_factory=list)  # (seen_ns, output_lines)
    state: str = "queued"

    async def run(self, expected: int, interval_s: float, timeout_s: float) -> None:
        last = 0
        quiet_since = time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            doc = await self.tasks.find_one({"_id": self.task_id},
                                            {"output_lines": 1, "state": 1})
            now = time.time_ns()
            self.polls += 1
            if doc is not None:
                self.state = str(doc.get("state"))
                lines = int(doc.get("output_lines") or 0)
                if lines > last:
                    if not self.steps and self.cpu is not None:
                        self.cpu.start()
                    self.steps.append((now, lines))
                    last = lines
                    quiet_since = time.monotonic()
                    if self.cpu is not None:
                        self.cpu_pct = self.cpu.stop()
                if lines >= expected:
                    return
                ended = self.state in ("completed", "failed", "canceled", "removed")
                if ended and time.monotonic() - quiet_since > 3:
                    return
            await asyncio.sleep(interval_s)

    def last_ns(self) -> int | None:
        return self.steps[-1][0] if self.steps else None


async def recorded_lines(events: Any, task_id: str) -> tuple[Arrivals, dict[str, Any]]:
    """The task's output events as recorded, in ``seq`` order, and their batch shape."""
    arrivals = Arrivals("mongodb")
    cursor = events.find({"task_id": task_id, "kind": "output"}).sort("seq", 1)
    batches = gaps = 0
    next_start = 0
    sizes: list[int] = []
    async for doc in cursor:
        lines = doc["body"]["lines"]
        batches += 1
        sizes.append(len(lines))
        if doc["line_start"] != next_start:
            gaps += 1
        next_start = doc["line_start"] + len(lines)
        arrivals.add(lines, 0)
    return arrivals, {"output_events": batches, "line_start_gaps": gaps,
                      "max_batch": max(sizes, default=0),
                      "mean_batch": round(sum(sizes) / len(sizes), 1) if sizes else 0}


# -- the runs ------------------------------------------------------------------------------------


@dataclass
class Context:
    env: BenchEnv
    stack: Stack
    client: httpx.AsyncClient
    nc: Any
    db: Any
    poll_s: float
    settings: dict[str, Any]

    def cpu(self) -> CpuShare:
        return CpuShare({
            "watcher": self.stack.procs["watcher"].pid,
            "mongodb": _pid_file(self.env.tmp / "mongo" / "nx.pid"),
            "nats": self.env.nats.proc.pid,
            "gateway": self.stack.procs["gateway"].pid,
        })


def _rate(count: int, start_ns: int | None, end_ns: int | None) -> float:
    if start_ns is None or end_ns is None or end_ns <= start_ns:
        return float("nan")
    return count / ((end_ns - start_ns) / 1e9)


async def _wait_all(*aws: Awaitable[Any]) -> list[Any]:
    return list(await asyncio.gather(*aws))


async def burst(ctx: Context, lines: int) -> list[Figure]:
    task_id = str(uuid.uuid4())
    timeout_s = 120 + lines / 200
    mongo = MongoWatch(ctx.db["tasks"], task_id, ctx.cpu())
    async with bus_watch(ctx.nc, task_id) as bus:
        await submit(ctx.client, task_id, trigger_name("burst", lines))
        await mongo.run(lines, ctx.poll_s, timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(bus.terminal.wait(), 30)
        await asyncio.sleep(0.5)  # anything published after the terminal event
    bus.decode()
    recorded, shape = await recorded_lines(ctx.db["events"], task_id)
    first = recorded.first_written_ns() or bus.arrivals.first_written_ns()
    last_written = max((w for _, w, _ in recorded.lines), default=None)
    in_mongo = max((n for _, n in mongo.steps), default=0)
    mongo_rate = _rate(in_mongo, first, mongo.last_ns())
    bus_lines = len({i for i, _, _ in bus.arrivals.lines})
    bus_rate = _rate(bus_lines, first, bus.arrivals.last_ns or None)
    events_rate = _rate(bus.output_events, first, bus.arrivals.last_ns or None)
    # MongoDB visibility latency per line (output_lines steps), for the detail only
    mongo_lat: list[float] = []
    by_index = {i: w for i, w, _ in recorded.lines}
    done = 0
    for seen_ns, total in mongo.steps:
        mongo_lat += [(seen_ns - by_index[i]) / 1e6 for i in range(done, total) if i in by_index]
        done = total
    common = {
        **ctx.settings, "lines": lines, "task_state": mongo.state,
        "writer_lines_per_s": round(_rate(lines, first, last_written), 1),
        "window_s": round(((mongo.last_ns() or 0) - (first or 0)) / 1e9, 3),
        "bench_poll_ms": ctx.poll_s * 1000, "mongo_polls": mongo.polls,
        "mongo_recorded": shape,
        "cpu_pct_of_a_core_first_to_last_line": mongo.cpu_pct,
        "mongo_visible_latency_ms": {"p50": round(percentile(mongo_lat, 50), 1),
                                     "p95": round(percentile(mongo_lat, 95), 1),
                                     "max": round(max(mongo_lat, default=float("nan")), 1)},
    }
    mongo_check = recorded.check(lines)
    bus_check = bus.arrivals.check(lines)
    return [
        Figure(NAME, "burst_lines_per_s_mongodb", mongo_rate, "lines/s", JETSTREAM,
               {**common, "lines_in_mongodb": in_mongo, "check": mongo_check}),
        Figure(NAME, "burst_lines_per_s_jetstream", bus_rate, "lines/s", JETSTREAM,
               {**common, "lines_on_bus": bus_lines, "check": bus_check}),
        Figure(NAME, "burst_output_events_per_s_jetstream", events_rate, "events/s", JETSTREAM,
               {"output_events_on_bus": bus.output_events,
                "output_events_in_mongodb": shape["output_events"],
                "lines_per_event": round(bus_lines / bus.output_events, 1)
                if bus.output_events else None,
                "events_of_task_on_bus": len(bus.raw)}),
        Figure(NAME, "burst_line_mismatches_mongodb", float(recorded.mismatches(lines)), "lines",
               None, {**mongo_check, "line_start_gaps": shape["line_start_gaps"]}),
        Figure(NAME, "burst_line_mismatches_jetstream", float(bus.arrivals.mismatches(lines)),
               "lines", None, bus_check),
    ]


async def paced(ctx: Context, lines: int, rate: int, lead_ms: int) -> list[Figure]:
    task_id = str(uuid.uuid4())
    info_lines, sse_lines = Arrivals("info"), Arrivals("sse")
    info_ready, sse_ready = asyncio.Event(), asyncio.Event()
    timeout_s = 120 + lines / max(rate, 1) * 3
    async with bus_watch(ctx.nc, task_id) as bus:
        await submit(ctx.client, task_id, trigger_name("paced", lines, rate, lead_ms))
        submitted_ns = time.time_ns()
        sse_task = asyncio.create_task(read_sse(ctx.client, task_id, sse_lines, sse_ready))
        info_task = asyncio.create_task(poll_info(
            ctx.client, task_id, info_lines, interval_s=ctx.poll_s,
            ready=info_ready, timeout_s=timeout_s))
        await asyncio.wait_for(_wait_all(info_ready.wait(), sse_ready.wait()), 30)
        ready_ns = time.time_ns()
        sse_counts, polls = await asyncio.wait_for(_wait_all(sse_task, info_task), timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(bus.terminal.wait(), 10)
        await asyncio.sleep(0.3)
    bus.decode()
    first = bus.arrivals.first_written_ns() or info_lines.first_written_ns()
    detail = {**ctx.settings, "lines": lines, "rate_lines_per_s": rate, "lead_ms": lead_ms,
              "observers_ready_after_submit_ms": round((ready_ns - submitted_ns) / 1e6, 1),
              "first_line_after_observers_ready_ms":
                  round(((first or 0) - ready_ns) / 1e6, 1) if first else None}
    figures: list[Figure] = []
    paths: list[tuple[str, Arrivals, dict[str, Any]]] = [
        ("info", info_lines, {"bench_poll_ms": ctx.poll_s * 1000, "polls": polls,
                              "note": "includes up to one bench poll interval"}),
        ("sse", sse_lines, sse_counts),
        ("jetstream", bus.arrivals, {"output_events": bus.output_events}),
    ]
    for path, arrivals, extra in paths:
        lat = arrivals.latencies_ms(after_ns=ready_ns)
        excluded = len({i for i, _, _ in arrivals.lines}) - len(lat)
        d = {**detail, **extra, "lines_measured": len(lat),
             "lines_written_before_observers_ready": excluded,
             "mean_ms": round(sum(lat) / len(lat), 1) if lat else None,
             "max_ms": round(max(lat), 1) if lat else None}
        figures.append(Figure(NAME, f"latency_{path}_p50_ms", percentile(lat, 50), "ms", None, d))
        figures.append(Figure(NAME, f"latency_{path}_p95_ms", percentile(lat, 95), "ms", None,
                              {"lines_measured": len(lat)}))
    for path, arrivals, _ in paths:
        figures.append(Figure(NAME, f"paced_line_mismatches_{path}",
                              float(arrivals.mismatches(lines)), "lines", None,
                              arrivals.check(lines)))
    return figures


async def measure(env: BenchEnv, args: argparse.Namespace) -> list[Figure]:
    lines = size(args, "pipeline_lines")
    paced_lines = size(args, "pipeline_paced_lines")
    paced_rate = size(args, "pipeline_paced_rate")
    defaults = WatcherSettings.model_fields
    batch_lines = args.pipeline_batch_lines or defaults["output_batch_lines"].default
    watch_poll_s = args.pipeline_watch_poll_s or defaults["poll_interval_s"].default
    extra = {
        "SCALEODM_ENGINE": "command",
        "SCALEODM_ENGINE_COMMAND": f"{sys.executable} {ENGINE} {{options}} {{project_path}} "
                                   "{project_name}",
        "SCALEODM_OUTPUT_BATCH_LINES": str(batch_lines),
        "SCALEODM_POLL_INTERVAL_S": str(watch_poll_s),
    }
    settings = {"SCALEODM_OUTPUT_BATCH_LINES": batch_lines,
                "SCALEODM_POLL_INTERVAL_S": watch_poll_s,
                "watcher_read_chunk_bytes": 4 * 1024 * 1024,
                "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    stack = env.stack(DATABASE, extra)
    figures: list[Figure] = []
    try:
        await asyncio.to_thread(stack.start_all, "gateway", "scheduler", "watcher")
        nc = await nats.connect(env.nats.url)
        mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(env.mongo_url, tz_aware=True)
        try:
            async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as client:
                ctx = Context(env, stack, client, nc, mongo[DATABASE],
                              args.pipeline_poll_ms / 1000, settings)
                figures += await burst(ctx, lines)
                figures += await paced(ctx, paced_lines, paced_rate, lead_ms=PACED_LEAD_MS)
        finally:
            await mongo.close()
            await nc.close()
    finally:
        await asyncio.to_thread(stack.stop)
    return figures


if __name__ == "__main__":
    sys.exit(standalone(NAME, measure, _standalone_arguments))
