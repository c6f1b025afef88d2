"""What every benchmark shares: the servers it runs on, its figures, and how they are reported.

A benchmark module exposes ``async def measure(env: BenchEnv, args: argparse.Namespace) ->
list[Figure]`` (plus ``add_arguments(parser)`` for its knobs), and can run on its own through
:func:`standalone`. ``bench/run.py`` runs them all on one set of servers, first the pipe
baselines, and prints every figure beside its ratio to the baseline of the pipe it runs through.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.harness import servers  # noqa: E402
from tests.harness.stack import Stack  # noqa: E402

# Names of the pipe baselines a figure can be compared with (Figure.baseline).
JETSTREAM = "jetstream_msgs_per_s"  # raw JetStream publish+consume, messages/s
S3_PUT = "s3_put_per_s"  # raw S3 PUT of small objects, requests/s
S3_PUT_MB = "s3_put_mb_per_s"  # raw S3 PUT of large objects, MB/s
MONGO_FIND = "mongo_find_per_s"  # raw find_one by _id on the tasks collection, reads/s
K8S_CREATE = "k8s_create_per_s"  # raw Workflow creates on the Kubernetes API double, creates/s
BASELINES = (JETSTREAM, S3_PUT, S3_PUT_MB, MONGO_FIND, K8S_CREATE)


@dataclass
class Figure:
    """One measured value. ``baseline`` names the pipe figure it is divided by in the report
    (same unit family, higher is better for both); None when no pipe bounds it."""

    bench: str
    name: str
    value: float
    unit: str
    baseline: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchEnv:
    """Real servers on loopback, as the tests use: nats-server, nx-27017, moto S3."""

    tmp: Path
    nats: servers.Nats
    mongo_url: str
    s3: servers.S3Endpoint

    def stack(self, database: str, extra_env: dict[str, str] | None = None) -> Stack:
        """A Stack of service processes on these servers, with its own database and run dir."""
        tmp = self.tmp / database
        tmp.mkdir(parents=True, exist_ok=True)
        env = {"SCALEODM_LOG_LEVEL": "WARNING",
               **{k: v for k, v in os.environ.items() if k.startswith("SCALEODM_")},
               **(extra_env or {})}
        return Stack(tmp=tmp, nats_url=self.nats.url, mongo_url=self.mongo_url, s3=self.s3,
                     database=database, extra_env=env)


@contextlib.contextmanager
def bench_env() -> Iterator[BenchEnv]:
    with tempfile.TemporaryDirectory(prefix="scaleodm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with servers.nats_server(tmp / "nats") as nats, \
                servers.mongo_server("nx", tmp / "mongo") as mongo, \
                servers.s3_server() as s3:
            yield BenchEnv(tmp=tmp, nats=nats, mongo_url=mongo, s3=s3)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def report(figures: list[Figure], baselines: dict[str, float] | None = None) -> str:
    """The table: bench, figure, value, unit, and the ratio to its pipe baseline when known."""
    base = dict(baselines or {})
    for fig in figures:
        if fig.name in BASELINES:
            base.setdefault(fig.name, fig.value)
    rows = [("bench", "figure", "value", "unit", "vs pipe")]
    for fig in figures:
        ratio = ""
        if fig.baseline and base.get(fig.baseline):
            ratio = f"{fig.value / base[fig.baseline]:.3f} × {fig.baseline}"
        rows.append((fig.bench, fig.name, _fmt(fig.value), fig.unit, ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) if j != 2 else cell.rjust(widths[j])
                               for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def write_json(name: str, figures: list[Figure], extra: dict[str, Any] | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": {"cpus": os.cpu_count()}, **(extra or {}),
               "figures": [asdict(f) for f in figures]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


Measure = Callable[[BenchEnv, argparse.Namespace], Awaitable[list[Figure]]]


def standalone(name: str, measure: Measure,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Run one benchmark module on its own servers: print its table, write its JSON."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args()
    with bench_env() as env:
        figures = asyncio.run(measure(env, args))
    sys.stdout.write(report(figures))
    write_json(name, figures)
    return 0
