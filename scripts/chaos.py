"""``task chaos``: fault injection on a stack of its own, for minutes; exit 1 = an invariant broke.

Starts nats-server (JetStream in a temp dir; ``--nats-nodes N``: a cluster of N), the nx-27017
MongoDB wire server, moto S3, an HTTP fixture (zipurl inputs, webhook recorder) and the four
services (``--replicas N``: N processes each) with the ODM test double, then
submits tasks while SIGKILLing and restarting random services (``tests/harness/chaos.py`` has
the details and the invariants). Prints every kill and task, then a summary.

    uv run task chaos                                  # ~3 min, 80 tasks, random seed
    uv run task chaos -- --seed 42 --duration 300 --tasks 120
    uv run task chaos -- --services scheduler,watcher  # kill only these
    uv run task chaos -- --replicas 2 --nats-nodes 3   # 2 of each service, a NATS cluster (R3)
                                                       # whose nodes are killed too
    uv run task chaos -- --split-every 5               # more split tasks (0: none)

The seed fixes the plan (task mix, kill times, victims, downtimes), not the interleaving.
``--keep`` leaves the temp dir (service logs, run dirs) for a post-mortem.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import servers  # noqa: E402
from tests.harness.chaos import CRASH_POINTS, ChaosConfig, run_chaos  # noqa: E402
from tests.harness.httpfixture import HttpFixture  # noqa: E402
from tests.harness.stack import SERVICES, Stack  # noqa: E402


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="task chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--duration", type=float, default=180.0,
                        help="seconds of submitting while killing (default 180)")
    parser.add_argument("--tasks", type=int, default=80, help="tasks planned (default 80)")
    parser.add_argument("--workers", type=int, default=4, help="tasks in flight (default 4)")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(4.0, 9.0),
                        metavar=("MIN", "MAX"), help="seconds between kills (default 4 9)")
    parser.add_argument("--down", type=float, nargs=2, default=(0.0, 1.5),
                        metavar=("MIN", "MAX"), help="seconds a killed service stays down")
    parser.add_argument("--settle", type=float, default=90.0,
                        help="seconds allowed to finish after the last submission (default 90)")
    parser.add_argument("--engine-seconds", type=float, default=3.0,
                        help="run length of the ODM test double (default 3)")
    parser.add_argument("--services", default=",".join(SERVICES),
                        help="services to kill, comma separated (default: all four)")
    parser.add_argument("--crash-points", default=CRASH_POINTS,
                        help="SCALEODM_FAILPOINTS of the services ('' for none; default: "
                        "crash:p at four windows between two writes)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="processes per service; the killer hits one at a time (default 1)")
    parser.add_argument("--nats-nodes", type=int, default=1,
                        help="NATS servers: > 1 runs a cluster, streams replicated min(3, N), "
                        "and kills NATS nodes too, one at a time (default 1)")
    parser.add_argument("--nats-kill-every", type=int, default=3,
                        help="with a cluster, kills 1, 1+N, 1+2N, ... hit a NATS node, every "
                        "other one a stream leader (default 3)")
    parser.add_argument("--split-every", type=int, default=10,
                        help="tasks 1, 1+N, 1+2N, ... are split tasks (12 geotagged images, "
                        "split 4) whose runs create child tasks; 0 for none (default 10)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, runs)")
    args = parser.parse_args(argv)
    args.services = tuple(s.strip() for s in args.services.split(",") if s.strip())
    unknown = set(args.services) - set(SERVICES)
    if unknown or not args.services:
        parser.error(f"--services: choose among {', '.join(SERVICES)}")
    if min(args.replicas, args.nats_nodes, args.nats_kill_every) < 1:
        parser.error("--replicas, --nats-nodes and --nats-kill-every are at least 1")
    if args.split_every < 0:
        parser.error("--split-every is at least 0")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    config = ChaosConfig(
        seed=seed, duration_s=args.duration, tasks=args.tasks, workers=args.workers,
        kill_every_s=tuple(args.kill_every), down_s=tuple(args.down), settle_s=args.settle,
        engine_seconds=args.engine_seconds, services=args.services,
        crash_points=args.crash_points, replicas=args.replicas, nats_nodes=args.nats_nodes,
        nats_kill_every=args.nats_kill_every, split_every=args.split_every,
        log=say,
    )
    tmp = Path(tempfile.mkdtemp(prefix="scaleodm-chaos-"))
    say(f"chaos: seed {seed} (rerun with --seed {seed}); files in {tmp}")
    http = HttpFixture(root=tmp / "www")
    http.root.mkdir()
    http.start()
    try:
        with contextlib.ExitStack() as running:
            cluster = None
            if args.nats_nodes > 1:
                cluster = running.enter_context(
                    servers.nats_cluster(tmp / "nats", size=args.nats_nodes))
                nats_url = cluster.url
            else:
                nats_url = running.enter_context(servers.nats_server(tmp / "nats")).url
            mongo_url = running.enter_context(servers.mongo_server("nx", tmp / "mongo"))
            s3 = running.enter_context(servers.s3_server())
            stack = Stack(tmp=tmp / "stack", nats_url=nats_url, mongo_url=mongo_url, s3=s3,
                          database=f"chaos_{uuid.uuid4().hex[:8]}")
            stack.tmp.mkdir()
            try:
                report = asyncio.run(run_chaos(stack, http, config, cluster))
            finally:
                stack.stop()
    finally:
        http.stop()
    say(report.summary())
    if args.keep or not report.ok:
        say(f"chaos: service logs and run dirs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
