"""Split-merge: one task of ``--split-images`` geotagged images with ``split`` versus without.

The full stack (gateway, scheduler with the local executor and the ODM test double of
``--split-engine-seconds`` plus ``--split-seconds-per-image`` per image — ODM's time grows with
the dataset, and without that part a split could only look slower —, watcher) runs on the bench
servers with ``--split-slots`` run slots
and ``SCALEODM_SPLIT__*`` set so that a run's ODM (the test double speaks ODM's sm-cluster client
protocol through PyODM) sends its submodels back to the gateway as child tasks, run by the same
stack. PyODM creates the task (open node, ``Node.create_task``); the bench then polls the
parent's info (its ``children``) and each child's info every ``--split-interval`` seconds until
the parent ends. ``--split-rounds`` rounds alternate a split task and the same images without
split. Figures (medians over the rounds):

- ``split_wall_s`` / ``nosplit_wall_s``: ``create_task`` returned → first poll seeing 40;
- ``children``: child tasks created (submodels sent remotely; the others ODM processes locally);
- ``children_run_s_sum``: the sum of the children's last polled ``processingTime`` (read while
  they exist: ODM removes them at the end), and ``speedup_vs_children_sum`` = that sum /
  ``split_wall_s`` (the local submodels are not counted: a lower bound of the parallelism);
- ``split_vs_nosplit``: ``split_wall_s`` / ``nosplit_wall_s``;
- ``child_done_to_parent_s_p50`` (and max): a child's first poll seeing 40 → first poll not
  finding it (the parent's run downloaded its assets and removed it): "child done → parent took
  it", over every child of every round.

    uv run python -m bench.split [--quick] [--split-rounds 3] [--split-engine-seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pyodm import Node  # type: ignore[import-untyped]

from bench.common import BenchEnv, Figure, median, standalone
from tests.harness import data, servers
from tests.harness.data import exif_block, jpeg
from tests.harness.stack import split_env

NAME = "split"
DATABASE = "bench_split"
SERVICES = ("gateway", "scheduler", "watcher")

QUICK: dict[str, Any] = {"split_rounds": 1, "split_engine_seconds": 2.0,
                         "split_seconds_per_image": 0.1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("split")
    group.add_argument("--split-rounds", type=int, default=3,
                       help="rounds, each a split task then the same without split (default 3)")
    group.add_argument("--split-images", type=int, default=40,
                       help="geotagged images of the task (default 40)")
    group.add_argument("--split-size", type=int, default=10,
                       help="the task's split option: images per submodel (default 10)")
    group.add_argument("--split-slots", type=int, default=6, help="run slots (default 6)")
    group.add_argument("--split-engine-seconds", type=float, default=5.0,
                       help="run length of the ODM test double (default 5)")
    group.add_argument("--split-seconds-per-image", type=float, default=0.5,
                       help="the test double's time per image on top of the fixed part, as "
                       "ODM's grows with the dataset (default 0.5: 40 images, 20 s)")
    group.add_argument("--split-interval", type=float, default=0.1,
                       help="seconds between two polls of the parent and its children "
                       "(default 0.1)")
    group.add_argument("--split-timeout", type=float, default=300.0,
                       help="seconds a task may take before the benchmark fails (default 300)")


def images(directory: Path, n: int) -> list[str]:
    """Geotagged JPEGs (ODM splits only a dataset with GPS), a few metres apart."""
    directory.mkdir(parents=True, exist_ok=True)
    return [str(data.write(directory / name, jpeg(64, 48, exif_block(
        "DJI", "FC6310", 46.8 + i * 1e-4, 7.1 + (i % 7) * 1e-4, 500.0))))
        for i, name in enumerate(data.image_names(n))]


@dataclass
class Child:
    first_seen_s: float
    run_s: float | None = None  # last processingTime polled, seconds
    done_s: float | None = None  # first poll seeing 40
    gone_s: float | None = None  # first poll not finding it


@dataclass
class Round:
    split: bool
    task: str
    wall_s: float
    children: dict[str, Child] = field(default_factory=dict)
    sent: int = 0  # "LRE: About to process ... remotely"
    local: int = 0  # "... locally"


async def run_task(client: httpx.AsyncClient, node: Node, paths: list[str], split: int | None,
                   args: argparse.Namespace) -> Round:
    options = {"split": split} if split else {}
    task = await asyncio.to_thread(node.create_task, paths, options,
                                   name=f"bench split={split or 0}")
    started = time.perf_counter()
    children: dict[str, Child] = {}
    deadline = time.monotonic() + float(args.split_timeout)
    while True:
        info = (await client.get(f"/task/{task.uuid}/info")).json()
        now = time.perf_counter() - started
        code = info.get("status", {}).get("code")
        if code in (30, 40, 50):
            break
        for child in info.get("children", []):
            children.setdefault(child, Child(now))
        for uuid, child in children.items():
            if child.gone_s is not None:
                continue
            child_info = (await client.get(f"/task/{uuid}/info")).json()
            now = time.perf_counter() - started
            if "status" not in child_info:
                child.gone_s = now
                continue
            if isinstance(child_info.get("processingTime"), int | float):
                child.run_s = child_info["processingTime"] / 1000
            if child_info["status"]["code"] == 40 and child.done_s is None:
                child.done_s = now
        if time.monotonic() > deadline:
            raise TimeoutError(f"split bench: task {task.uuid} not finished: {info!r}")
        await asyncio.sleep(float(args.split_interval))
    if code != 40:
        raise RuntimeError(f"split bench: task {task.uuid} ended {info.get('status')}")
    output = await asyncio.to_thread(task.output)
    lre = [line for line in output if "LRE: About to process" in line]
    result = Round(bool(split), task.uuid, now, children,
                   sum("remotely" in line for line in lre), sum("locally" in line for line in lre))
    await asyncio.to_thread(task.remove)
    return result


async def measure(env: BenchEnv, args: argparse.Namespace) -> list[Figure]:
    slots = int(args.split_slots)
    engine_s = float(args.split_engine_seconds)
    port = servers.free_port()
    stack = env.stack(DATABASE, {
        "SCALEODM_ENGINE": "test", "SCALEODM_TEST_ENGINE_SECONDS": str(engine_s),
        **split_env(port),
        "SCALEODM_ADMISSION_INTERVAL_S": "0.5",
        "SCALEODM_CAPACITY__MAX_ACTIVE": str(slots),
        "SCALEODM_CAPACITY__CLASSES": json.dumps(
            [{"name": "any", "max_images": None, "slots": slots}]),
        "ODM_TEST_ENGINE_RETRY_S": "0.5",
        "ODM_TEST_ENGINE_SECONDS_PER_IMAGE": str(float(args.split_seconds_per_image)),
    })
    paths = images(env.tmp / NAME / "images", int(args.split_images))
    rounds: list[Round] = []
    try:
        stack.spawn("gateway", port=port)
        for service in SERVICES[1:]:
            stack.spawn(service)
        for service in SERVICES:
            await asyncio.to_thread(stack.wait_ready, service)
        node = Node("127.0.0.1", port)
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
            for i in range(int(args.split_rounds)):
                order = (True, False) if i % 2 == 0 else (False, True)
                for split in order:
                    rounds.append(await run_task(
                        client, node, paths, int(args.split_size) if split else None, args))
    finally:
        stack.stop()

    split_runs = [r for r in rounds if r.split]
    plain = [r for r in rounds if not r.split]
    split_wall = median([r.wall_s for r in split_runs])
    plain_wall = median([r.wall_s for r in plain])
    sums = [sum(c.run_s or 0.0 for c in r.children.values()) for r in split_runs]
    speedups = [s / r.wall_s for s, r in zip(sums, split_runs, strict=True)]
    ratios = [s.wall_s / p.wall_s for s, p in zip(split_runs, plain, strict=True)]
    handoffs = [c.gone_s - c.done_s for r in split_runs for c in r.children.values()
                if c.done_s is not None and c.gone_s is not None]
    detail: dict[str, Any] = {
        "slots": slots, "engine_seconds": engine_s, "images": args.split_images,
        "seconds_per_image": float(args.split_seconds_per_image),
        "split": args.split_size, "rounds": [asdict(r) for r in rounds],
        "measured": "create_task returned -> first poll seeing 40",
    }
    return [
        Figure(NAME, "split_wall_s", split_wall, "s", None, detail),
        Figure(NAME, "nosplit_wall_s", plain_wall, "s", None, {}),
        Figure(NAME, "children", median([len(r.children) for r in split_runs]), "tasks", None,
               {"sent_remotely": [r.sent for r in split_runs],
                "processed_locally": [r.local for r in split_runs]}),
        Figure(NAME, "children_run_s_sum", median(sums), "s", None,
               {"measured": "sum of each child's last polled processingTime"}),
        Figure(NAME, "speedup_vs_children_sum", median(speedups), "×", None,
               {"measured": "children_run_s_sum / split_wall_s (local submodels not counted)"}),
        Figure(NAME, "split_vs_nosplit", median(ratios), "×", None,
               {"measured": "split_wall_s / nosplit_wall_s, per round"}),
        Figure(NAME, "child_done_to_parent_s_p50", median(handoffs), "s", None,
               {"measured": "child's first poll seeing 40 -> first poll not finding it",
                "children": len(handoffs)}),
        Figure(NAME, "child_done_to_parent_s_max", max(handoffs, default=float("nan")), "s",
               None, {}),
    ]


if __name__ == "__main__":
    sys.exit(standalone(NAME, measure, add_arguments, QUICK))
