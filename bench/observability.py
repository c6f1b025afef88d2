"""What metrics and traces cost: ``GET /task/{uuid}/info`` with them on and off.

``info_poll``'s stored tasks (``seed_tasks``) and its pollers (``poll``: aiohttp, one connection
each, every answer checked) against three gateway processes on the same database: ``on`` (the
default: the HTTP middleware counting every request by route, FastStream's consumer/publisher
middleware), ``off`` (``SCALEODM_METRICS_ENABLED=false``), and ``traced`` (metrics on, and
traces: a server span per request, exported in batches to a JSON-lines file,
``SCALEODM_TRACES_FILE``); ``--obs-rounds`` rounds at ``--obs-level`` pollers, the order
rotating, and medians of the rounds:

- ``task_info_metrics_on_per_s``, ``task_info_metrics_off_per_s``,
  ``task_info_traced_per_s`` with each one's p99, and the ratios ``metrics_on_vs_off`` and
  ``traced_vs_off`` (1.0: no cost).

    uv run python -m bench.observability [--quick] [--obs-rounds 3] [--obs-seconds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

from pymongo import AsyncMongoClient

from bench.common import BenchEnv, CpuWindow, Figure, standalone
from bench.info_poll import poll, seed_tasks

NAME = "observability"
DATABASE = "observability"
QUICK: dict[str, Any] = {"obs_rounds": 1, "obs_seconds": 1.0, "obs_tasks": 100}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("observability")
    group.add_argument("--obs-rounds", type=int, default=3,
                       help="rounds, each polling both gateways (default 3)")
    group.add_argument("--obs-seconds", type=float, default=5.0,
                       help="measured seconds per gateway per round (default 5)")
    group.add_argument("--obs-level", type=int, default=10, help="pollers (default 10)")
    group.add_argument("--obs-tasks", type=int, default=1000,
                       help="stored tasks (default 1000)")


def _p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[int(0.99 * (len(ordered) - 1))] * 1000 if ordered else 0.0


async def measure(env: BenchEnv, args: argparse.Namespace) -> list[Figure]:
    seconds, level = float(args.obs_seconds), int(args.obs_level)
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(env.mongo_url, tz_aware=True)
    try:
        tasks = await seed_tasks(mongo, DATABASE, int(args.obs_tasks), 20)
    finally:
        await mongo.close()
    active = sum(1 for s in tasks.values() if s.code in (10, 20))
    spans = env.tmp / f"{DATABASE}-spans.jsonl"
    stacks = {"on": env.stack(DATABASE),
              "off": env.stack(DATABASE, {"SCALEODM_METRICS_ENABLED": "false"}),
              "traced": env.stack(DATABASE, {"SCALEODM_TRACES_FILE": str(spans)})}
    # Stacks on one database and one tmp dir: distinct tmp dirs for their logs.
    for side in ("off", "traced"):
        stacks[side].tmp = stacks[side].tmp.parent / f"{DATABASE}-{side}"
        stacks[side].tmp.mkdir(parents=True, exist_ok=True)
    rates: dict[str, list[float]] = {side: [] for side in stacks}
    p99s: dict[str, list[float]] = {side: [] for side in stacks}
    errors: dict[str, int] = dict.fromkeys(stacks, 0)
    try:
        for stack in stacks.values():
            stack.start("gateway")
        for n in range(int(args.obs_rounds)):
            sides = list(stacks)
            order = sides[n % 3:] + sides[:n % 3]
            for side in order:
                stack = stacks[side]
                cpu = CpuWindow({"gateway": stack.procs["gateway"].pid, "client": None})
                res = await poll(stack.gateway_url, "task_info", tasks, active, level, seconds,
                                 1.0, cpu)
                rates[side].append(len(res.latencies) / seconds)
                p99s[side].append(_p99(res.latencies))
                errors[side] += sum(res.errors.values())
    finally:
        for stack in stacks.values():
            stack.stop()
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    traced = statistics.median(rates["traced"])
    detail = {"pollers": level, "seconds": seconds, "rounds": int(args.obs_rounds),
              "tasks": len(tasks), "rates": rates, "p99_ms": p99s, "errors": errors,
              "what": "GET /task/{uuid}/info of a random stored task, three gateway processes "
              "on one database, the order rotating"}
    return [
        Figure(NAME, f"task_info_metrics_on_per_s@{level}", on, "req/s", None,
               {**detail, "p99_ms_median": statistics.median(p99s["on"])}),
        Figure(NAME, f"task_info_metrics_off_per_s@{level}", off, "req/s", None,
               {**detail, "p99_ms_median": statistics.median(p99s["off"])}),
        Figure(NAME, f"task_info_traced_per_s@{level}", traced, "req/s", None,
               {**detail, "p99_ms_median": statistics.median(p99s["traced"])}),
        Figure(NAME, "metrics_on_vs_off", on / off if off else 0.0, "×", None, detail),
        Figure(NAME, "traced_vs_off", traced / off if off else 0.0, "×", None, detail),
    ]


if __name__ == "__main__":
    sys.exit(standalone(NAME, measure, add_arguments, QUICK))
