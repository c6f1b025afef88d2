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
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.harness import data, servers  # noqa: E402
from tests.harness.httpfixture import HttpFixture  # noqa: E402
from tests.harness.stack import Stack  # noqa: E402

# Names of the pipe baselines a figure can be compared with (Figure.baseline). A baseline measured
# at several concurrency levels adds one figure per level, named ``<baseline>@<level>`` (see
# :func:`at`); a figure measured at that level names it as its baseline.
JETSTREAM = "jetstream_msgs_per_s"  # raw JetStream publish+consume, messages/s
S3_PUT = "s3_put_per_s"  # raw S3 PUT of small objects, requests/s
S3_PUT_MB = "s3_put_mb_per_s"  # raw S3 PUT of large objects, MB/s
MONGO_FIND = "mongo_find_per_s"  # raw find_one by _id on the tasks collection, reads/s
K8S_CREATE = "k8s_create_per_s"  # raw Workflow creates on the Kubernetes API double, creates/s
BASELINES = (JETSTREAM, S3_PUT, S3_PUT_MB, MONGO_FIND, K8S_CREATE)

# Settings of the benchmark itself, not of the services (never passed to them).
BENCH_ENV_PREFIX = "SCALEODM_BENCH_"
# The base URL of a NodeODM to compare with (bench/README.md, "Comparing with NodeODM").
NODEODM_URL_ENV = "SCALEODM_BENCH_NODEODM_URL"


def at(name: str, level: int) -> str:
    """The name of a figure (or baseline) at one concurrency level: ``name@level``."""
    return f"{name}@{level}"


def is_baseline(name: str) -> bool:
    """A pipe baseline figure: one of BASELINES, or one of them at a level (``name@level``)."""
    return name.partition("@")[0] in BASELINES


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
               **{k: v for k, v in os.environ.items()
                  if k.startswith("SCALEODM_") and not k.startswith(BENCH_ENV_PREFIX)},
               **(extra_env or {})}
        return Stack(tmp=tmp, nats_url=self.nats.url, mongo_url=self.mongo_url, s3=self.s3,
                     database=database, extra_env=env)


@contextlib.contextmanager
def bench_env() -> Iterator[BenchEnv]:
    """The servers, each its own process (moto too: in-process it would share the GIL with the
    benchmark's client and slow both)."""
    # SIGTERM (``timeout``, a CI cancel) unwinds like Ctrl-C: the servers and services run in
    # their own sessions and would outlive this process otherwise.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with tempfile.TemporaryDirectory(prefix="scaleodm-bench-") as tmp_name:
            tmp = Path(tmp_name)
            with servers.nats_server(tmp / "nats") as nats, \
                    servers.mongo_server("nx", tmp / "mongo") as mongo, \
                    servers.s3_server(process=True, tmp=tmp / "s3") as s3:
                yield BenchEnv(tmp=tmp, nats=nats, mongo_url=mongo, s3=s3)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


# -- processes ------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User+system CPU seconds of a process (this one when ``pid`` is None); NaN if it is gone."""
    if pid is None:
        return time.process_time()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(stat[11]) + int(stat[12])) / _TICK


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM, ...); 0 when absent."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def mongo_pid(env: BenchEnv) -> int | None:
    """The nx-27017 process (None with a real MongoDB from SCALEODM_TEST_MONGODB_URL)."""
    try:
        return int((env.tmp / "mongo" / "nx.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return math.nan
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK


class CpuWindow:
    """CPU share (% of one core) of named processes (None = this one) between ``start()`` and
    ``stop()``: who was busy while a figure was measured. ``cpu_pct_machine`` is every core's
    busy time (at most cores × 100) and ``cpu_pct_others`` what processes not named used: work
    unrelated to the benchmark when the machine is shared."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.begin: dict[str, float] = {}
        self.wall = 0.0

    def start(self) -> None:
        self.wall = time.perf_counter()
        self.begin = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.begin[""] = machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.wall
        shares = {f"cpu_pct_{name}": round(100 * (cpu_seconds(pid) - self.begin[name]) / wall, 1)
                  for name, pid in self.pids.items()}
        machine = round(100 * (machine_busy_seconds() - self.begin[""]) / wall, 1)
        named = sum(v for v in shares.values() if not math.isnan(v))
        return {**shares, "cpu_pct_machine": machine,
                "cpu_pct_others": round(max(0.0, machine - named), 1)}


def pid_listening_on(port: int) -> int | None:
    """The process with a TCP socket listening on ``port`` (any address), from /proc; None when
    not found or not readable (another user's process, another machine)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{cols[9]}]")
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


# -- a NodeODM to compare with -----------------------------------------------------------------


def nodeodm_url() -> str | None:
    """The NodeODM to compare with (``SCALEODM_BENCH_NODEODM_URL``), None when not set."""
    url = os.environ.get(NODEODM_URL_ENV, "").strip().rstrip("/")
    return url or None


def nodeodm_pid(url: str) -> int | None:
    """The NodeODM process behind ``url`` when it runs on this machine (for its CPU share)."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    return pid_listening_on(parts.port or 80)


async def node_info(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    """``GET /info`` of a NodeODM-compatible server; a clear error when it does not answer."""
    try:
        resp = await client.get(f"{url}/info", timeout=10)
        body: dict[str, Any] = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise SystemExit(f"{url}/info does not answer ({exc!r}): is the server running?") from exc
    if resp.status_code != 200 or "version" not in body:
        raise SystemExit(f"{url}/info answered {resp.status_code} {body!r}")
    return body


def images_zip(count: int) -> bytes:
    """A zip of ``count`` tiny JPEG files in a folder (test engines only need image files)."""
    return data.images_zip(count)


@contextlib.contextmanager
def serve_files(root: Path, files: dict[str, bytes]) -> Iterator[HttpFixture]:
    """``files`` served over HTTP on 127.0.0.1 (a thread of this process) for zipurl tasks."""
    for name, content in files.items():
        data.write(root / name, content)
    fixture = HttpFixture(root)
    fixture.start()
    try:
        yield fixture
    finally:
        fixture.stop()


async def create_zipurl_task(client: httpx.AsyncClient, url: str, zipurl: str,
                             name: str) -> str:
    """``POST /task/new`` with a ``zipurl`` (multipart, as PyODM sends it); the task's uuid."""
    resp = await client.post(f"{url}/task/new", files={"zipurl": (None, zipurl),
                                                       "name": (None, name)}, timeout=120)
    body = resp.json()
    if resp.status_code != 200 or "uuid" not in body:
        raise RuntimeError(f"POST {url}/task/new answered {resp.status_code} {body!r}")
    return str(body["uuid"])


@dataclass
class Finished:
    """How a task got to its final status, seconds from ``started``."""

    info: dict[str, Any]
    seconds: float
    running_after_s: float | None  # first poll that saw status 20 (None: never seen)
    polls: int


async def wait_final(client: httpx.AsyncClient, url: str, task: str, started: float,
                     timeout_s: float, interval_s: float = 0.1) -> Finished:
    """Polls ``GET /task/{uuid}/info`` until status 30, 40 or 50."""
    running: float | None = None
    polls = 0
    while True:
        resp = await client.get(f"{url}/task/{task}/info", timeout=30)
        polls += 1
        now = time.perf_counter()
        info: dict[str, Any] = resp.json() if resp.status_code == 200 else {}
        code = info.get("status", {}).get("code")
        if code == 20 and running is None:
            running = now - started
        if code in (30, 40, 50):
            return Finished(info, now - started, running, polls)
        if now - started > timeout_s:
            raise TimeoutError(f"{url}: task {task} not finished after {timeout_s:.0f} s: "
                               f"{resp.status_code} {info or resp.text[:200]!r}")
        await asyncio.sleep(interval_s)


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else math.nan


# -- the report ------------------------------------------------------------------------------


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
        if is_baseline(fig.name):
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
    payload = {"machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
               **(extra or {}),
               "figures": [asdict(f) for f in figures]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


Measure = Callable[[BenchEnv, argparse.Namespace], Coroutine[Any, Any, list[Figure]]]


def parse_args(parser: argparse.ArgumentParser, quick: dict[str, Any] | None = None,
               argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick``, ``quick`` (dest -> value) replaces the defaults first, so
    options given explicitly still win."""
    known, _ = parser.parse_known_args(argv)
    if getattr(known, "quick", False) and quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


def standalone(name: str, measure: Measure,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
               quick: dict[str, Any] | None = None) -> int:
    """Run one benchmark module on its own servers: print its table, write its JSON.
    ``quick``: the module's small sizes, used with ``--quick`` (a smoke run)."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}")
    if add_arguments:
        add_arguments(parser)
    if quick:
        parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parse_args(parser, quick)
    with bench_env() as env:
        figures = asyncio.run(measure(env, args))
    sys.stdout.write(report(figures))
    write_json(name, figures)
    return 0
