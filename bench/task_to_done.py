"""Time to done: ``POST /task/new`` with a ``zipurl`` until ``/task/{uuid}/info`` says 40.

ScaleODM runs its full stack in local mode on the bench servers — gateway, scheduler, watcher and
notifier as processes, the scheduler running each task as a local runner with the ODM test double
(``SCALEODM_ENGINE=test``) for ``--done-engine-seconds`` — and the bench serves the input zip
(``--done-images`` tiny JPEGs) over HTTP on 127.0.0.1 itself. One client (httpx) submits a task,
polls its info every ``--done-interval`` seconds until a final status, then submits the next:
one task at a time. Figures, in seconds from the ``POST`` to the first poll that saw 40:

- ``scaleodm:first_task_s``: the first task submitted once every service answers ``/readyz``
  (cold: the first runner process, the first connections and imports on the way);
- ``scaleodm:task_s``: the median of the next ``--done-tasks`` tasks;
- ``scaleodm:task_overhead_s``: the same minus the engine's run length, what the service adds.

Each figure's detail has the task's ``POST`` latency, when ``20`` (running) was first seen, the
``processingTime`` the server reported, and the CPU share of the services (not of the runners and
engines they start: see ``cpu_pct_machine``). With ``SCALEODM_BENCH_NODEODM_URL`` set (see
bench/README.md, "Comparing with NodeODM") the same series runs against that NodeODM, which must
run in ``--test`` mode with ``--test_seconds`` equal to ``--done-engine-seconds``:
``nodeodm:*`` figures and ``ratio:*`` = ScaleODM / NodeODM (below 1 is ScaleODM faster). Its
``first_task_s`` is the first task of this run, not of a fresh NodeODM: the bench does not start
it. The tasks created there are removed at the end.

    uv run python -m bench.task_to_done [--quick] [--done-tasks 3] [--done-engine-seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from bench.common import (
    BenchEnv,
    CpuWindow,
    Figure,
    create_zipurl_task,
    images_zip,
    median,
    mongo_pid,
    node_info,
    nodeodm_pid,
    nodeodm_url,
    serve_files,
    standalone,
    wait_final,
)
from tests.harness.stack import SERVICES

NAME = "task_to_done"
DATABASE = "done"
SCALEODM, NODEODM = "scaleodm", "nodeodm"
RATIO_UNIT = "× NodeODM"

QUICK: dict[str, Any] = {"done_tasks": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("task_to_done")
    group.add_argument("--done-tasks", type=int, default=3,
                       help="tasks after the first, one at a time; their median is reported "
                       "(default 3)")
    group.add_argument("--done-engine-seconds", type=float, default=5.0,
                       help="run length of ScaleODM's ODM test double; start NodeODM with the "
                       "same --test_seconds (default 5)")
    group.add_argument("--done-images", type=int, default=20,
                       help="images in the input zip (default 20)")
    group.add_argument("--done-interval", type=float, default=0.1,
                       help="seconds between two polls of a task's info (default 0.1)")
    group.add_argument("--done-timeout", type=float, default=300.0,
                       help="seconds a task may take before the benchmark fails (default 300)")


@dataclass
class Run:
    task: str
    seconds: float  # POST to the first poll seeing 40
    post_ms: float  # the POST /task/new itself
    running_after_s: float | None  # POST to the first poll seeing 20
    processing_time_ms: float | None  # what the server reports
    polls: int


async def series(url: str, zipurl: str, count: int, args: argparse.Namespace,
                 cpu: CpuWindow) -> tuple[list[Run], dict[str, float]]:
    """``count`` tasks one after the other; every one must complete (40)."""
    runs: list[Run] = []
    async with httpx.AsyncClient(timeout=120) as client:
        cpu.start()
        for i in range(count):
            started = time.perf_counter()
            task = await create_zipurl_task(client, url, zipurl, f"bench task_to_done {i}")
            post_ms = 1000 * (time.perf_counter() - started)
            done = await wait_final(client, url, task, started, float(args.done_timeout),
                                    float(args.done_interval))
            if done.info.get("status", {}).get("code") != 40:
                raise RuntimeError(f"{url}: task {task} ended {done.info.get('status')}")
            processing = done.info.get("processingTime")
            runs.append(Run(task, done.seconds, round(post_ms, 1),
                            None if done.running_after_s is None
                            else round(done.running_after_s, 3),
                            float(processing) if isinstance(processing, int | float) else None,
                            done.polls))
        shares = cpu.stop()
    return runs, shares


def side_figures(side: str, runs: list[Run], engine_s: float,
                 detail: dict[str, Any]) -> list[Figure]:
    first, later = runs[0], runs[1:]
    later_s = [r.seconds for r in later]
    detail = {**detail, "runs": [asdict(r) for r in runs]}
    return [
        Figure(NAME, f"{side}:first_task_s", first.seconds, "s", None,
               {**detail, "what": "the first task of the series"}),
        Figure(NAME, f"{side}:task_s", median(later_s), "s", None,
               {**detail, "what": f"median of the {len(later)} tasks after the first"}),
        Figure(NAME, f"{side}:task_overhead_s", median(later_s) - engine_s, "s", None,
               {**detail, "what": f"task_s minus the engine's {engine_s} s"}),
    ]


def _ratio(figures: list[Figure], name: str) -> Figure:
    ours = next(f for f in figures if f.name == f"{SCALEODM}:{name}").value
    theirs = next(f for f in figures if f.name == f"{NODEODM}:{name}").value
    return Figure(NAME, f"ratio:{name}", ours / theirs if theirs > 0 else math.nan, RATIO_UNIT,
                  None, {"what": "ScaleODM / NodeODM (below 1 is ScaleODM faster)"})


async def measure(env: BenchEnv, args: argparse.Namespace) -> list[Figure]:
    engine_s = float(args.done_engine_seconds)
    count = 1 + int(args.done_tasks)
    url = nodeodm_url()
    common = {"engine_seconds": engine_s, "images": args.done_images,
              "poll_interval_s": args.done_interval, "tasks_after_first": args.done_tasks}
    figures: list[Figure] = []
    with serve_files(env.tmp / "task_to_done",
                     {"flight.zip": images_zip(int(args.done_images))}) as files:
        zipurl = files.url("flight.zip")
        stack = env.stack(DATABASE, {"SCALEODM_ENGINE": "test",
                                     "SCALEODM_TEST_ENGINE_SECONDS": str(engine_s)})
        try:
            started = time.perf_counter()
            await asyncio.to_thread(stack.start_all, *SERVICES)
            ready_s = time.perf_counter() - started
            cpu = CpuWindow({**{name: proc.pid for name, proc in stack.procs.items()},
                             "mongo": mongo_pid(env), "client": None})
            runs, shares = await series(stack.gateway_url, zipurl, count, args, cpu)
        finally:
            stack.stop()
        figures += side_figures(SCALEODM, runs, engine_s, {
            **common, **shares, "stack_ready_s": round(ready_s, 2),
            "stack": "gateway, scheduler (local executor, ODM test double), watcher, notifier; "
                     "nats-server, nx-27017, moto S3 of the bench"})

        if url:
            async with httpx.AsyncClient(timeout=30) as client:
                node = await node_info(client, url)
            pid = nodeodm_pid(url)
            cpu = CpuWindow({"nodeodm": pid, "client": None} if pid else {"client": None})
            node_runs, node_shares = await series(url, zipurl, count, args, cpu)
            node_detail: dict[str, Any] = {
                **common, **node_shares, "url": url, "version": node.get("version"),
                "note": "first_task_s: the first task of this run, NodeODM was started before"}
            seen = [r.processing_time_ms for r in node_runs if r.processing_time_ms is not None]
            if seen and not engine_s - 0.5 <= median(seen) / 1000 <= engine_s + 2.5:
                warning = (f"NodeODM's processingTime is {median(seen) / 1000:.1f} s: is it "
                           f"running with --test_seconds {engine_s:g} (--done-engine-seconds)?")
                sys.stderr.write(f"task_to_done: WARNING: {warning}\n")
                node_detail["warning"] = warning
            figures += side_figures(NODEODM, node_runs, engine_s, node_detail)
            figures += [_ratio(figures, n) for n in ("first_task_s", "task_s", "task_overhead_s")]
            async with httpx.AsyncClient(timeout=30) as client:
                for run in node_runs:
                    with contextlib.suppress(httpx.HTTPError):
                        await client.post(f"{url}/task/remove", data={"uuid": run.task})
    return figures


if __name__ == "__main__":
    sys.exit(standalone(NAME, measure, add_arguments, QUICK))
