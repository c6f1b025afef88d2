"""1 GB chunked upload through the gateway: throughput and the gateway's peak RSS.

The same run as ``bench.upload`` (init, one upload per file with 10 in flight as PyODM, commit;
files generated on the fly; raw S3 PUTs of the same objects, and NodeODM when
``SCALEODM_BENCH_NODEODM_URL`` is set, in alternating rounds) with 16 files of 64 MiB, on its own
nats-server, nx-27017, moto and one gateway. Files of several parts show the pipelined parts
(``--parallel 1``: one upload alone, S3 kept busy by its next part filling while one is sent).
Prints the table and writes ``bench/results/upload_rss.json``.

    uv run python -m bench.upload_rss [--total-mb 1024] [--file-mb 64] [--parallel 10]
                                      [--rounds 1]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bench.common import BenchEnv, Figure, standalone
from bench.upload import run

NAME = "upload_rss"
QUICK: dict[str, Any] = {"total_mb": 128}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--total-mb", type=int, default=1024, help="MiB uploaded (default 1024)")
    parser.add_argument("--file-mb", type=int, default=64, help="MiB per file (default 64)")
    parser.add_argument("--parallel", type=int, default=10,
                        help="uploads in flight (default 10, PyODM's parallel_uploads)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of raw S3 PUT and upload, alternating (default 1)")


async def measure(env: BenchEnv, args: argparse.Namespace) -> list[Figure]:
    return await run(env, NAME, args.total_mb // args.file_mb, args.file_mb, args.parallel,
                     database="upload_rss", rounds=args.rounds)


if __name__ == "__main__":
    sys.exit(standalone(NAME, measure, add_arguments, QUICK))
