"""Fault injection: tasks flow through the stack while services are SIGKILLed and restarted.

Shared by ``scripts/chaos.py`` (``uv run task chaos``, minutes) and
``tests/integration/test_chaos.py`` (a short run inside ``task test``). ``run_chaos`` drives a
:class:`~tests.harness.stack.Stack` that is not started yet:

- submitters send tasks through the gateway as NodeODM clients do: ``/task/new`` with a
  ``zipurl`` from the HTTP fixture, or chunked ``init`` -> ``upload`` (one file per request) ->
  ``commit``. Each task has its own ``set-uuid`` and a webhook on the fixture. The mix: tasks that
  complete (40), tasks that fail on purpose (an image named ``odm-test-engine-fail-1.jpg``: 30),
  tasks canceled mid-run (50); some webhook receivers answer 503 once. A request cut off by a
  kill is retried with back-off. ``set-uuid`` makes the retry safe: the gateway refuses an
  existing uuid with ``Invalid set-uuid: <uuid>`` (NodeODM's answer), which for our own uuid after
  a cut-off attempt means the first attempt created the task (checked with ``/info``). A commit
  retried after a cut-off answers ``Invalid uuid (not found)`` once the upload became a task;
  ``/info`` tells which. An upload retried after a cut-off may store the file twice
  (``a_.jpg``), as NodeODM would;
- split tasks (``split_every``: tasks 1, 1 + n, ...; the first goes out at once, so its run
  overlaps the first kills): geotagged JPEGs with ``split``, ending 40 (or 50 when the mix cancels
  them). The stack has ``SCALEODM_SPLIT__*`` set, the cluster URL on the first gateway's port,
  chosen before start (the killer restarts a gateway on its port), so their runs (the ODM double)
  send submodels back through the gateway as child tasks;
- a killer, seeded, picks a service every few seconds, SIGKILLs its process group (each service
  is its own session, so the detached local runs of the scheduler are never hit), waits a little
  and restarts it on the same port (waiting for ``/readyz``); while a split run is in flight the
  first kills hit every scheduler and watcher in turn, later ones most (``SPLIT_FOCUS``);
- with ``replicas`` > 1 every service runs that many processes (``scheduler``, ``scheduler-2``,
  ...; the client spreads its requests over the gateways and moves on from one that does not
  answer, as a load balancer would) and the killer hits one process at a time (a failpoint
  crash may still take the other replica meanwhile);
- with ``nats_nodes`` > 1 the bus is a NATS cluster (``servers.nats_cluster``, streams
  replicated ``min(3, nodes)``, created first as the bootstrap Job does, services given every
  node's URL) and every ``nats_kill_every``-th kill, starting with the first, SIGKILLs a NATS
  node instead, every other one of them the leader of ``TASKS`` or ``EVENTS`` (so even a short
  run loses a leader); the node restarts on its ports and store and the killer waits until it
  has caught up (``/healthz``) before the next kill, so at most one node is ever down (R3
  keeps a majority). A probe publishing to a stream of its own (R3 as well) times how long
  publishing stalls around each NATS kill;
- failpoints (``CRASH_POINTS``, ``crash:p``) make services exit at once, now and then, exactly
  between two writes (task recorded / command published, upload closed / task created, run
  started / command acked), which random kills almost never hit; a reviver restarts them;
- then submissions stop, the killer stops, and everything has ``settle_s`` to finish.

Every wait on a process or the network has a deadline: each phase of the run (bootstrap, start,
submitting, the killer's last kill, the workers, settling, the checks, a restart, a NATS node's
catch-up, reading ``EVENTS`` back) runs under ``asyncio.timeout`` and, when it overruns, fails with
:class:`ChaosHang` naming the phase, what it waited for, how far it got and where every task of the
run was waiting (``deadline_s`` bounds the whole run as well). :meth:`Chaos.shutdown` (synchronous,
idempotent) stops everything even when :meth:`Chaos.run` never finishes, e.g. a test interrupted
by pytest-timeout: no more restarts, the run's tasks cancelled, the stack's processes stopped.

The invariants, checked through real interfaces (gateway, fixture recorder, MongoDB, JetStream):
every submitted uuid exists and is terminal (30/40/50) — else *lost* or *stuck*; every terminal
task's webhook was POSTed at least once (duplicates counted by ``webhook-id``: the same id twice
is a repeated delivery, two ids for one task two deliveries); each task's events in MongoDB carry
``seq`` 1..n without gap or repeat and a terminal event of its attempt; the outbox is drained and
JetStream's ``EVENTS`` stream holds every recorded event. Split tasks' children (not submitted, so
never *lost* as submitted tasks are; found through MongoDB's ``tasks`` with ``parent`` and the
parents' ``child`` events, which outlive a removed child's deleted documents): none left queued or
running once their parents ended (the admission pass ends them), each told on its parent's stream
(its end or removal too), a child told but without documents was removed (else it is lost), the
events of those not removed are checked like a task's; a completed parent's ``all.zip`` holds the
merged outputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import itertools
import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
import zipfile
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import nats
import standardwebhooks
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from pymongo import MongoClient

from scaleodm.common.store.admission import HOLDING
from tests.harness import data
from tests.harness.data import exif_block, jpeg
from tests.harness.httpfixture import HttpFixture, Received
from tests.harness.servers import BIN, NatsCluster, free_port, wait_http
from tests.harness.stack import SERVICES, Stack, service_of, split_env

TERMINAL = (30, 40, 50)
SECRET = "whsec_" + "Y2hhb3MtdGVzdC1zZWNyZXQtMDEyMzQ1Njc4OWFi"  # fixed: verify signatures
FAIL_IMAGE = "odm-test-engine-fail-1.jpg"
INTENDED = {"ok": 40, "fail": 30, "cancel": 50}
# Split tasks (splitmerge): the parent's run sends submodels back to the gateway as children.
MERGED_OUTPUT = "odm_orthophoto/odm_orthophoto.tif"  # in a completed split parent's all.zip
SPLIT_FOCUS = 0.6  # share of the kills aimed at a scheduler or watcher while a split run is on
CHAOS_SLOTS = 4  # runs the scheduler may admit at once
PROBE_STREAM = "CHAOS_PROBE"  # subject ``chaos_probe``: publish stalls around NATS kills
RETRYABLE = (httpx.TransportError,)  # connect refused, reset, cut off mid-answer, timeouts
# Crashes (exit 97) right inside the windows between two writes that a random kill rarely hits.
CRASH_POINTS = ",".join((
    "gateway.run.before_publish=crash:0.1",  # task recorded, run command not yet published
    "gateway.commit.before_submit=crash:0.15",  # upload closed, task not yet created
    "scheduler.create.before_start=crash:0.05",  # command received, run not started
    "scheduler.create.before_ack=crash:0.05",  # run started, command not acked
))


@dataclass(frozen=True)
class ChaosConfig:
    seed: int
    duration_s: float = 180.0  # submitting while killing
    tasks: int = 80  # planned over duration_s (fewer if the stack is slower)
    workers: int = 4  # tasks in flight at once (each is a runner + an engine process)
    kill_every_s: tuple[float, float] = (4.0, 9.0)
    down_s: tuple[float, float] = (0.0, 1.5)
    settle_s: float = 90.0
    engine_seconds: float = 3.0
    services: tuple[str, ...] = SERVICES
    chunked_share: float = 0.35
    fail_share: float = 0.2
    cancel_share: float = 0.2
    hook_fail_share: float = 0.15
    crash_points: str = CRASH_POINTS  # SCALEODM_FAILPOINTS of every service; "" = none
    replicas: int = 1  # processes per service
    nats_nodes: int = 1  # > 1: run_chaos gets the NatsCluster (streams R min(3, nodes))
    nats_kill_every: int = 3  # with a cluster: kills 1, 1 + n, 1 + 2n, ... hit a NATS node
    # Tasks 1, 1 + n, 1 + 2n, ... are split tasks (0: none): ``split_images`` geotagged JPEGs
    # with ``split`` = ``split_size``, never failing on purpose (ok or cancel); their runs create
    # children through the gateway (the stack gets SCALEODM_SPLIT__*). The first is submitted at
    # once, so its run overlaps the first kills.
    split_every: int = 10
    split_images: int = 12
    split_size: int = 4
    # Deadlines (seconds) of the phases that wait on processes or the network; an overrun raises
    # ChaosHang. Generous: a loaded 2-core CI runner is several times slower than a laptop.
    start_s: float = 120.0  # bootstrap; all services answering /readyz
    restart_s: float = 90.0  # a killed or crashed service back (/readyz), re-crashes included
    nats_catch_up_s: float = 90.0  # a restarted NATS node current (/healthz) + a meta leader
    check_s: float = 90.0  # the invariant checks (gateway, MongoDB, JetStream)
    deadline_s: float | None = None  # the whole run; None: duration_s + settle_s + 600
    log: Callable[[str], None] = print

    @property
    def stream_replicas(self) -> int:
        return min(3, self.nats_nodes)


class ChaosHang(Exception):  # noqa: N818 - the name says what happened
    """A phase of the run overran its deadline; the message names the phase, what it waited
    for, how far it got and where each task of the run was waiting."""


@dataclass
class Phase:
    name: str
    waiting_for: str
    started: float  # monotonic
    detail: str = ""  # progress, kept up to date by the phase's code


def await_chain(task: asyncio.Task[Any]) -> str:
    """Where a task waits: its coroutines, outermost first (``name:line``)."""
    parts: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None and len(parts) < 12:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            parts.append(f"{getattr(coro, '__qualname__', '?')}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    if coro is not None or not parts:
        parts.append(repr(coro)[:80])
    return " -> ".join(parts)


@dataclass
class TaskRecord:
    uuid: str
    kind: str  # ok | fail | cancel
    chunked: bool
    hook: str
    cancel_delay_s: float = 0.0  # after it is seen running (``cancel`` tasks)
    submitted_at: float = 0.0
    finished_at: float = 0.0  # first seen terminal (monotonic)
    accepted: bool = False
    retries: int = 0  # requests repeated after a cut-off
    accepted_as_existing: bool = False  # "Invalid set-uuid"/"not found" after a cut-off + /info
    hook_fails: int = 0  # the receiver answers 503 to this many first POSTs
    cancel_sent: bool = False
    final: int | None = None
    error: str | None = None  # a submission that did not end with a task
    split: bool = False  # a split task (``split_every``): its run creates children


@dataclass
class Child:
    """A task a split parent's run created (``splitmerge``), as MongoDB and the parent's
    stream (its ``child`` events) tell it after the run: a removed child's documents are
    deleted once its removal is done, then only the parent's stream remembers it."""

    uuid: str
    parent: str
    told: list[str] = field(default_factory=list)  # child_kind of the parent's child events
    state: str | None = None  # the task document's, None when it is gone (deleted)
    removed: bool = False  # the document says removed (its deletion may still be under way)


@dataclass
class Kill:
    at: float
    service: str
    pid: int
    down_s: float
    restart_s: float


@dataclass
class NatsKill:
    at: float
    node: str
    pid: int
    led: list[str]  # streams and durables this node led when it was killed
    down_s: float
    restart_s: float = 0.0  # restart until caught up (/healthz 200)
    probe_stall_s: float = 0.0  # longest time without an acknowledged probe publish

    @property
    def led_ours(self) -> bool:
        return any(not name.startswith(PROBE_STREAM) for name in self.led)


@dataclass
class ChaosReport:
    seed: int
    tasks: list[TaskRecord] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    crashes: list[Kill] = field(default_factory=list)  # at failpoints (``crash:p``)
    nats_kills: list[NatsKill] = field(default_factory=list)
    replicas: int = 1
    nats_nodes: int = 1
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    submit_s: float = 0.0
    settle_s: float = 0.0
    webhook_posts: int = 0
    webhook_tasks: int = 0
    webhook_ids: int = 0
    repeated_deliveries: int = 0  # same webhook-id POSTed again
    slots_at_once: int = 0  # most run slots held at once (admitted, not ended)
    tasks_with_several_ids: int = 0
    events: int = 0
    seq_gaps: int = 0
    seq_repeats: int = 0
    unpublished: int = 0
    stream_missing: int = 0
    stream_repeats: int = 0
    children: list[Child] = field(default_factory=list)
    children_active: int = 0  # not removed, queued or running after settling: must be 0
    merged_checked: int = 0  # completed split parents whose all.zip held MERGED_OUTPUT
    kills_in_split_runs: Counter[str] = field(default_factory=Counter)  # SIGKILLs, by service
    crashes_in_split_runs: Counter[str] = field(default_factory=Counter)  # at failpoints

    @property
    def ok(self) -> bool:
        return not self.problems

    def split_summary(self) -> str:
        split = [t for t in self.tasks if t.split]
        finals = Counter(t.final for t in split)
        children = self.children
        gone = sum(c.state is None for c in children)
        removed = sum(c.removed for c in children)
        ended = Counter(c.state for c in children if c.state is not None and not c.removed)
        kills, crashes = self.kills_in_split_runs, self.crashes_in_split_runs
        states = ", ".join(f"{k} {v}" for k, v in sorted(ended.items())) or "-"
        return (f"{len(split)} ("
                + "  ".join(f"{code}: {finals.get(code, 0)}" for code in TERMINAL)
                + f"); children created {len(children)}: removed {gone + removed} ("
                f"{removed} with data still being deleted), ended not removed "
                f"{sum(ended.values())} ({states}), left active {self.children_active}; "
                f"merged all.zip checked {self.merged_checked}; during split runs: kills "
                + ("  ".join(f"{s} {kills[s]}" for s in SERVICES if kills[s]) or "none")
                + ", failpoint crashes "
                + ("  ".join(f"{s} {crashes[s]}" for s in SERVICES if crashes[s]) or "none"))

    def summary(self) -> str:
        by_status = Counter(t.final for t in self.tasks if t.accepted)
        kills = Counter(service_of(k.service) for k in self.kills)
        crashes = Counter(service_of(k.service) for k in self.crashes)
        took = sorted(t.finished_at - t.submitted_at for t in self.tasks if t.finished_at)
        chunked = sum(t.chunked for t in self.tasks)
        retried = sum(t.retries > 0 for t in self.tasks)
        existing = sum(t.accepted_as_existing for t in self.tasks)
        mismatched = [t for t in self.tasks if t.final in TERMINAL and t.final != INTENDED[t.kind]]
        rows = [
            ("seed", str(self.seed)),
            ("elapsed", f"{self.submit_s + self.settle_s:.1f} s (submitting {self.submit_s:.1f} s,"
                        f" settling {self.settle_s:.1f} s)"),
            ("tasks submitted", f"{len(self.tasks)} (zipurl {len(self.tasks) - chunked}, chunked "
                                f"{chunked}); {retried} retried after a cut-off, {existing} "
                                "found existing on retry"),
            ("final status", "  ".join(f"{code}: {by_status.get(code, 0)}" for code in TERMINAL)
             + f"  not terminal: {sum(t.accepted and t.final not in TERMINAL for t in self.tasks)}"
             + f"  not accepted: {sum(not t.accepted for t in self.tasks)}"),
            ("not as intended", f"{len(mismatched)} (informational: e.g. a cancel after the end)"),
            ("task duration", f"p50 {took[len(took) // 2]:.1f} s, max {took[-1]:.1f} s "
                              "(submitted -> seen terminal)" if took else "-"),
            ("run slots", f"at most {self.slots_at_once} held at once (capacity "
                          f"{CHAOS_SLOTS})"),
            ("topology", f"{self.replicas} process(es) per service; NATS "
                         + (f"cluster of {self.nats_nodes}" if self.nats_nodes > 1
                            else "single server")),
            ("kills", "  ".join(f"{s} {kills.get(s, 0)}" for s in SERVICES)
             + f"  (total {len(self.kills)})"),
            *([("NATS node kills", f"{len(self.nats_kills)}, "
                f"{sum(k.led_ours for k in self.nats_kills)} of a TASKS/EVENTS (or durable) "
                "leader; " + (
                    f"publish stall max {max(k.probe_stall_s for k in self.nats_kills):.1f} s, "
                    f"back and caught up in max "
                    f"{max(k.restart_s for k in self.nats_kills):.1f} s"
                    if self.nats_kills else "-"))] if self.nats_nodes > 1 else []),
            ("failpoint crashes", "  ".join(f"{s} {crashes.get(s, 0)}" for s in SERVICES)
             + f"  (total {len(self.crashes)})"),
            ("webhooks", f"{self.webhook_tasks} tasks notified, {self.webhook_posts} POSTs "
                         f"({sum(t.hook_fails for t in self.tasks)} answered 503 on purpose), "
                         f"{self.webhook_ids} webhook-ids; repeated deliveries (same id) "
                         f"{self.repeated_deliveries}; tasks with several ids "
                         f"{self.tasks_with_several_ids}"),
            ("events", f"{self.events} in MongoDB; seq gaps {self.seq_gaps}, repeated seqs "
                       f"{self.seq_repeats}, unpublished {self.unpublished}"),
            ("JetStream EVENTS", f"missing {self.stream_missing}, repeated {self.stream_repeats}"),
            *([("split tasks", self.split_summary())] if any(t.split for t in self.tasks)
              else []),
            ("result", "PASS" if self.ok else f"FAIL ({len(self.problems)} problems)"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = ["chaos summary", *(f"  {k.ljust(width)}  {v}" for k, v in rows)]
        lines += [f"  NATS kill at {k.at:.1f}s: {k.node} (led {', '.join(k.led) or 'nothing'}),"
                  f" down {k.down_s:.1f}s, caught up {k.restart_s:.1f}s after restart, probe "
                  f"stall {k.probe_stall_s:.1f}s" for k in self.nats_kills]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def stack_env(config: ChaosConfig) -> dict[str, str]:
    """Settings that make recovery take seconds, not minutes (redeliveries, retries)."""
    return {
        "SCALEODM_TEST_ENGINE_SECONDS": str(config.engine_seconds),
        # Fewer slots than tasks: admission works through the kills (and no slot may leak).
        "SCALEODM_CAPACITY__MAX_ACTIVE": str(CHAOS_SLOTS),
        "SCALEODM_CAPACITY__CLASSES": json.dumps(
            [{"name": "any", "max_images": None, "slots": CHAOS_SLOTS}]),
        "SCALEODM_ADMISSION_INTERVAL_S": "1",
        "SCALEODM_ACK_WAIT_S": "4",  # scheduler: an unacked command comes back after 4 s
        "SCALEODM_WEBHOOK_SECRET": SECRET,  # webhook-id + signatures
        "SCALEODM_WEBHOOK_TIMEOUT_S": "2",
        "SCALEODM_WEBHOOK_ACK_WAIT_S": "4",
        "SCALEODM_WEBHOOK_BACKOFF_BASE_S": "0.2",
        "SCALEODM_WEBHOOK_BACKOFF_MAX_S": "1",
        "SCALEODM_RUN_START_GRACE_S": "20",
        "SCALEODM_OUTBOX_INTERVAL_S": "1",
        "SCALEODM_OUTBOX_MIN_AGE_S": "1",
        "SCALEODM_FAILPOINTS": config.crash_points,
        "SCALEODM_NATS__STREAM_REPLICAS": str(config.stream_replicas),
    }


def chaos_split_env(gateway_port: int) -> dict[str, str]:
    """Split-merge on the stack: runs reach the (first) gateway on loopback; the killer
    restarts a gateway on its port, so the URL stays right. ODM's retry unit: 0.5 s, not 10."""
    return {**split_env(gateway_port), "ODM_TEST_ENGINE_RETRY_S": "0.5"}


def geotagged_images(n: int) -> dict[str, bytes]:
    """JPEGs with GPS a few metres apart (ODM splits only a dataset with GPS)."""
    return {name: jpeg(64, 48, exif_block("DJI", "FC6310", 46.8 + i * 1e-4,
                                      7.1 + (i % 7) * 1e-4, 500.0))
            for i, name in enumerate(data.image_names(n))}


def signed(post: Received) -> bool:
    """A valid Standard Webhooks signature (``verify`` without its 5-minute freshness check: the
    long run looks at early deliveries minutes later)."""
    headers = {k.lower(): v for k, v in post.headers.items()}
    try:
        at = dt.datetime.fromtimestamp(int(headers["webhook-timestamp"]), dt.UTC)
        expected = standardwebhooks.Webhook(SECRET).sign(headers["webhook-id"], at,
                                                          post.body.decode())
    except (KeyError, ValueError):
        return False
    return expected in headers.get("webhook-signature", "").split()


class Chaos:
    def __init__(self, stack: Stack, http: HttpFixture, config: ChaosConfig,
                 cluster: NatsCluster | None = None) -> None:
        if (cluster is None) != (config.nats_nodes == 1):
            raise ValueError("a NatsCluster is needed exactly when nats_nodes > 1")
        self.stack = stack
        self.http = http
        self.config = config
        self.cluster = cluster
        self.gateway_turn = 0
        self.planned = 0  # tasks planned so far (split_every counts them)
        self.split_kills = 0  # kills aimed at a scheduler or watcher during a split run
        self.gateway_port = 0  # the first gateway's, fixed before start (the split cluster URL)
        self.probe_acks: list[float] = []  # when probe publishes were acknowledged (run clock)
        # Two streams, so the task plan and the kill plan each follow from the seed alone.
        self.plan_rng = random.Random(config.seed)
        self.kill_rng = random.Random(config.seed + 1)
        self.report = ChaosReport(seed=config.seed, replicas=config.replicas,
                                  nats_nodes=config.nats_nodes)
        self.prefix = f"/chaos-{uuid.uuid4().hex[:8]}"
        self.t0 = time.monotonic()
        self.submitting = True
        self.stop_killing = asyncio.Event()
        self.stack_lock = asyncio.Lock()  # one kill/restart at a time
        self.settle_deadline = float("inf")
        self.deadline = float("inf")  # of the whole run (monotonic), set by run()
        # ``stack.procs`` changes in restart threads, which cancelling does not stop: every such
        # change happens under procs_lock and only while not ``closed``, so once closed (by the
        # end of run() or by shutdown()) no thread starts or drops a process any more.
        self.procs_lock = threading.Lock()
        self.closed = False
        self.run_task: asyncio.Task[Any] | None = None
        self.failure: BaseException | None = None  # of a vital helper: ends the run
        self.last_error: dict[asyncio.Task[Any] | None, str] = {}  # a request being retried
        self.helpers: dict[str, asyncio.Task[Any]] = {}  # killer, reviver, probe, worker-N
        self.phases: dict[asyncio.Task[Any] | None, list[Phase]] = defaultdict(list)

    # -- plumbing --------------------------------------------------------------------------

    def log(self, message: str) -> None:
        self.config.log(f"[{time.monotonic() - self.t0:7.2f}s] {message}")

    @contextlib.asynccontextmanager
    async def phase(self, name: str, waiting_for: str, budget_s: float) -> AsyncIterator[Phase]:
        """Run the body under a deadline: ``budget_s``, and never past the run's deadline. An
        overrun cancels the body (as ``asyncio.timeout`` does) and raises :class:`ChaosHang`
        naming the phase and what it waited for; the message is written when the deadline
        passes, while every phase of every task of the run is still where it waits."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        now = time.monotonic()
        budget, whose = budget_s, "its"
        if self.deadline - now < budget_s:
            budget, whose = max(0.0, self.deadline - now), "the run's"
        current = Phase(name, waiting_for, now)
        stack = self.phases[task]
        stack.append(current)
        overran: list[str] = []

        def expire() -> None:
            overran.append(self.overrun(current, budget, whose))
            task.cancel()

        cancelling = task.cancelling()
        timer = loop.call_later(budget, expire)
        try:
            yield current
        except asyncio.CancelledError:
            if overran and task.uncancel() <= cancelling:  # our cancel, nobody else's
                raise ChaosHang(overran[0]) from None
            raise
        except TimeoutError as exc:  # a wait inside gave up on its own (its deadline is shorter)
            raise ChaosHang(f"chaos phase {name!r} gave up waiting for {waiting_for}"
                            + (f" ({current.detail})" if current.detail else "")
                            + f": {exc}") from exc
        finally:
            timer.cancel()
            stack.remove(current)

    def overrun(self, phase: Phase, budget: float, whose: str) -> str:
        lines = [f"chaos phase {phase.name!r} overran {whose} {budget:.0f} s deadline, waiting "
                 f"for {phase.waiting_for}" + (f" ({phase.detail})" if phase.detail else "")
                 + "; the run's tasks were at:"]
        for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
            if task in self.phases or task in self.helpers.values():
                active = " > ".join(p.name + (f" [{p.detail}]" if p.detail else "")
                                    for p in self.phases.get(task, []))
                retrying = self.last_error.get(task)
                lines.append(f"  task {task.get_name()}: {await_chain(task)}"
                             + (f"  (phases: {active})" if active else "")
                             + (f"  ({retrying[:200]})" if retrying else ""))
        self.log(lines[0])
        return "\n".join(lines)

    def helper(self, name: str, coro: Any, *, vital: bool = False) -> asyncio.Task[Any]:
        """A task of the run; a ``vital`` one (killer, reviver) that fails ends the run at once,
        whatever phase it is in (a restart that overran must not leave the run waiting on a
        service that will never come back)."""
        task = asyncio.create_task(coro, name=f"chaos-{name}")
        self.helpers[name] = task
        if vital:
            task.add_done_callback(self.vital_done)
        return task

    def vital_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is None or self.closed:
            return
        if self.failure is None:
            self.failure = task.exception()
            if self.run_task is not None and not self.run_task.done():
                self.run_task.cancel()

    def helper_failed(self) -> None:
        """Raise the failure of a helper that ended early (the killer or the reviver)."""
        for task in self.helpers.values():
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    def url(self, path: str) -> str:
        """The next gateway in turn (one, or ``replicas``); a retry goes to the next one."""
        gateways = self.stack.instances("gateway")
        self.gateway_turn += 1
        port = self.stack.ports[gateways[self.gateway_turn % len(gateways)]]
        return f"http://127.0.0.1:{port}{path}"

    def nats_servers(self) -> list[str]:
        return self.cluster.servers() if self.cluster else [self.stack.nats_url]

    async def request(self, client: httpx.AsyncClient, method: str, path: str,
                      task: TaskRecord | None = None, patience_s: float = 120.0,
                      **kw: Any) -> httpx.Response:
        """One request, repeated after connection errors (a killed gateway) with back-off."""
        delay = 0.1
        deadline = time.monotonic() + patience_s
        while True:
            try:
                resp = await client.request(method, self.url(path), **kw)
                if resp.status_code < 500:
                    self.last_error.pop(asyncio.current_task(), None)
                    return resp
                error: str = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except RETRYABLE as exc:
                error = repr(exc)
            self.last_error[asyncio.current_task()] = f"{method} {path} retried: {error}"
            if task is not None:
                task.retries += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {path}: still failing ({error})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def patience(self) -> float:
        """How long a request may keep retrying: 120 s, less once the settle deadline is near."""
        return max(5.0, min(120.0, self.settle_deadline - time.monotonic()))

    async def exists(self, client: httpx.AsyncClient, task_id: str) -> bool:
        resp = await self.request(client, "GET", f"/task/{task_id}/info")
        return "uuid" in resp.json()

    # -- submissions -------------------------------------------------------------------------

    def plan(self) -> TaskRecord:
        rng = self.plan_rng
        cfg = self.config
        split = cfg.split_every > 0 and self.planned % cfg.split_every == 0
        self.planned += 1
        roll = rng.random()
        kind = ("fail" if roll < cfg.fail_share else
                "cancel" if roll < cfg.fail_share + cfg.cancel_share else "ok")
        if split and (kind == "fail" or self.planned == 1):
            kind = "ok"  # no failure on purpose; the first split task runs to its end
        task_id = str(uuid.uuid4())
        hook = f"{self.prefix}/hooks/{task_id}"
        task = TaskRecord(task_id, kind, rng.random() < cfg.chunked_share, hook,
                          cancel_delay_s=rng.uniform(0.0, cfg.engine_seconds / 2), split=split)
        if rng.random() < self.config.hook_fail_share:
            task.hook_fails = 1
            self.http.fail_times(hook, task.hook_fails, 503)
        return task

    def images(self, task: TaskRecord) -> dict[str, bytes]:
        if task.split:
            return geotagged_images(self.config.split_images)
        files = dict.fromkeys(data.image_names(3), data.JPEG)
        if task.kind == "fail":
            files[FAIL_IMAGE] = data.JPEG
        return files

    async def submit(self, client: httpx.AsyncClient, task: TaskRecord) -> None:
        fields = {"name": f"chaos {'split ' if task.split else ''}{task.kind}",
                  "webhook": self.http.url(task.hook)}
        if task.split:
            fields["options"] = json.dumps([{"name": "split", "value": self.config.split_size}])
        headers = {"set-uuid": task.uuid}
        task.submitted_at = time.monotonic()
        if not task.chunked:
            name = "split.zip" if task.split else "fail.zip" if task.kind == "fail" else "ok.zip"
            parts = {**fields, "zipurl": self.http.url(f"{self.prefix}/{name}")}
            body = await self.create(client, "/task/new", task, headers=headers,
                                     files={k: (None, v) for k, v in parts.items()})
        else:
            resp = await self.request(client, "POST", "/task/new/init", task, headers=headers,
                                      files={k: (None, v) for k, v in fields.items()})
            if resp.json().get("uuid") != task.uuid:
                task.error = f"init: {resp.text[:200]}"
                return
            for name, content in self.images(task).items():
                resp = await self.request(
                    client, "POST", f"/task/new/upload/{task.uuid}", task,
                    files=[("images", (name, content, "image/jpeg"))])
                if resp.json() != {"success": True}:
                    task.error = f"upload {name}: {resp.text[:200]}"
                    return
            body = await self.create(client, f"/task/new/commit/{task.uuid}", task)
        if body.get("uuid") == task.uuid:
            task.accepted = True
        elif task.error is None:
            task.error = f"refused: {body}"

    async def create(self, client: httpx.AsyncClient, path: str, task: TaskRecord,
                     **kw: Any) -> dict[str, Any]:
        """``/task/new`` or commit; an error after a cut-off attempt may mean it went through."""
        before = task.retries
        resp = await self.request(client, "POST", path, task, **kw)
        body: dict[str, Any] = resp.json()
        error = str(body.get("error", ""))
        if error and task.retries > before and error in (
            f"Invalid set-uuid: {task.uuid}", "Invalid uuid (not found)"
        ):
            if await self.exists(client, task.uuid):
                task.accepted_as_existing = True
                return {"uuid": task.uuid}
            task.error = f"cut off, then {error!r}, and no such task: lost"
        return body

    async def follow(self, client: httpx.AsyncClient, task: TaskRecord) -> None:
        """Poll until terminal; cancel ``cancel`` tasks once running."""
        cancel_at: float | None = None
        while True:
            resp = await self.request(client, "GET", f"/task/{task.uuid}/info",
                                      patience_s=self.patience())
            code = resp.json().get("status", {}).get("code")
            if code in TERMINAL:
                task.final = code
                task.finished_at = time.monotonic()
                return
            now = time.monotonic()
            if task.kind == "cancel" and not task.cancel_sent:
                if code == 20 and cancel_at is None:
                    cancel_at = now + task.cancel_delay_s
                if cancel_at is not None and now >= cancel_at:
                    resp = await self.request(client, "POST", "/task/cancel", task,
                                              data={"uuid": task.uuid})
                    task.cancel_sent = True
                    if resp.json() != {"success": True}:
                        task.error = f"cancel: {resp.text[:200]}"
            if not self.submitting and now > self.settle_deadline:
                return
            await asyncio.sleep(0.3)

    async def worker(self, schedule: asyncio.Queue[float]) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            while self.submitting:
                try:
                    start = schedule.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await asyncio.sleep(max(0.0, start - (time.monotonic() - self.t0)))
                if not self.submitting:
                    return
                task = self.plan()
                self.report.tasks.append(task)
                try:
                    await self.submit(client, task)
                except Exception as exc:
                    task.error = f"submission: {exc!r}"
                if task.accepted:
                    await self.follow(client, task)
                self.log(f"task {task.uuid[:8]} {task.kind:6} {'split ' if task.split else ''}"
                         f"{'chunked' if task.chunked else 'zipurl '} -> {task.final}"
                         + (f" ({task.retries} retries)" if task.retries else "")
                         + (f" ERROR {task.error}" if task.error else ""))

    # -- the killer --------------------------------------------------------------------------

    def kill9(self, service: str) -> int:
        with self.procs_lock:
            if self.closed or service not in self.stack.procs:
                return 0
            proc = self.stack.procs.pop(service)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the service's own session, never a run's
        proc.wait(30)
        return proc.pid

    def start_services(self) -> None:
        """Every service (``replicas`` processes each) at once, then wait for each /readyz."""
        names = [name for service in SERVICES for name in self.stack.instances(service)]
        with self.procs_lock:
            if self.closed:
                return
            for name in names:
                self.stack.spawn(name, port=self.gateway_port if name == "gateway" else None)
        deadline = time.monotonic() + self.config.start_s
        for name in names:
            self.wait_ready(name, deadline)

    def wait_ready(self, service: str, deadline: float) -> None:
        proc = self.stack.procs.get(service)
        if proc is None:  # closed meanwhile
            return
        wait_http(f"http://127.0.0.1:{self.stack.ports[service]}/readyz", proc=proc,
                  timeout_s=max(1.0, deadline - time.monotonic()))

    def restart(self, service: str) -> None:
        """Start ``service`` on its port; again if a failpoint crashed it while starting. Gives
        up after ``restart_s`` or three failures; does nothing once closed."""
        port = self.stack.ports[service]
        failures = 0
        deadline = time.monotonic() + self.config.restart_s
        while True:
            with self.procs_lock:
                if self.closed:
                    return
                self.stack.spawn(service, port=port)
            try:
                self.wait_ready(service, deadline)
                return
            except (TimeoutError, RuntimeError) as exc:
                with self.procs_lock:
                    if self.closed:
                        return
                    proc = self.stack.procs.pop(service)
                if proc.poll() is None:
                    proc.kill()
                proc.wait(30)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{service} not back within {self.config.restart_s:.0f}s"
                                       f": {exc}") from exc
                if proc.returncode == 97:  # a redelivered command hit a failpoint: fine
                    self.log(f"{service} crashed at a failpoint while starting")
                    self.report.crashes.append(Kill(time.monotonic() - self.t0, service,
                                                    proc.pid, 0.0, 0.0))
                    continue
                failures += 1
                self.report.notes.append(f"restart of {service} failed: {exc}")
                if failures == 3:
                    raise RuntimeError(f"{service} does not restart") from exc
                if service_of(service) != "gateway":
                    port = 0  # a fresh (health) port

    async def bring_back(self, kill: Kill, record: list[Kill]) -> None:
        started = time.monotonic()
        async with self.phase(f"restart of {kill.service}",
                              f"{kill.service} to answer /readyz on port "
                              f"{self.stack.ports[kill.service]} again",
                              self.config.restart_s + 15.0):  # restart() gives up first
            await asyncio.to_thread(self.restart, kill.service)
        proc = self.stack.procs.get(kill.service)
        if self.closed or proc is None:
            return
        kill.restart_s = time.monotonic() - started
        record.append(kill)
        self.log(f"{kill.service} back (pid {proc.pid}) in {kill.restart_s:.1f}s")

    async def killer(self) -> None:
        lo, hi = self.config.kill_every_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_killing.wait(), self.kill_rng.uniform(lo, hi))
            if self.stop_killing.is_set():
                return
            turn = len(self.report.kills) + len(self.report.nats_kills)
            if self.cluster and turn % self.config.nats_kill_every == 0:
                await self.kill_nats_node(self.cluster)
                continue
            victims = [n for s in self.config.services for n in self.stack.instances(s)]
            # While a split run is in flight, most kills hit what keeps its family together:
            # the scheduler (admission, orphans, runs) and the watcher (the runs' ends).
            family = [n for s in ("scheduler", "watcher") if s in self.config.services
                      for n in self.stack.instances(s)]
            in_split = any(t.split and t.submitted_at and not t.finished_at
                           for t in self.report.tasks)
            service = self.kill_rng.choice(victims)
            if in_split and family and (self.split_kills < len(family)
                                        or self.kill_rng.random() < SPLIT_FOCUS):
                # The first ones in turn (every scheduler and watcher once), then at random.
                service = (family[self.split_kills] if self.split_kills < len(family)
                           else self.kill_rng.choice(family))
                self.split_kills += 1
            down = self.kill_rng.uniform(*self.config.down_s)
            async with self.stack_lock:
                at = time.monotonic() - self.t0
                pid = await asyncio.to_thread(self.kill9, service)
                self.log(f"kill -9 {service} (pid {pid}); down {down:.1f}s")
                await asyncio.sleep(down)
                await self.bring_back(Kill(at, service, pid, down, 0.0), self.report.kills)

    async def kill_nats_node(self, cluster: NatsCluster) -> None:
        """SIGKILL one node (every other time the leader of TASKS or EVENTS), restart it after
        ``down_s`` on its ports and store, and return once it has caught up: never two down."""
        rng = self.kill_rng
        stream: str | None = rng.choice(("TASKS", "EVENTS"))
        if len(self.report.nats_kills) % 2:
            stream = None  # any node
        down = rng.uniform(*self.config.down_s)
        pick = rng.randrange(len(cluster.nodes))
        async with self.stack_lock:
            leaders = await asyncio.to_thread(nats_leaders, cluster)
            by_name = {n.name: n for n in cluster.nodes}
            node = by_name.get(leaders.get(stream or "", ""), cluster.nodes[pick])
            led = sorted(k for k, v in leaders.items() if v == node.name)
            kill = NatsKill(time.monotonic() - self.t0, node.name, 0, led, down)
            kill.pid = await asyncio.to_thread(node.kill)
            self.log(f"kill -9 NATS {node.name} (pid {kill.pid}, led {', '.join(led) or '-'});"
                     f" down {down:.1f}s")
            await asyncio.sleep(down)
            if self.closed:
                return
            started = time.monotonic()
            node.start()
            budget = self.config.nats_catch_up_s  # the waits give up first, the phase after
            async with self.phase(f"NATS {node.name} restart",
                                  f"{node.name} to catch up (/healthz 200) and the cluster to "
                                  "agree on a JetStream meta leader", budget + 15.0) as phase:
                phase.detail = f"{node.name} /healthz"
                await asyncio.to_thread(node.wait_current, budget)
                phase.detail = "every node current, one meta leader"
                await asyncio.to_thread(cluster.wait_ready,
                                        max(1.0, started + budget - time.monotonic()))
            kill.restart_s = time.monotonic() - started
            self.report.nats_kills.append(kill)
            self.log(f"NATS {node.name} back and caught up in {kill.restart_s:.1f}s")

    async def probe(self) -> None:
        """Publish to a probe stream (replicated like ours) every 0.1 s; note each ack."""
        nc = await nats.connect(self.nats_servers(), max_reconnect_attempts=-1,
                                reconnect_time_wait=0.1, connect_timeout=5,
                                error_cb=quiet_nats_errors)
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(
                name=PROBE_STREAM, subjects=[PROBE_STREAM.lower()], max_msgs=1000,
                storage=StorageType.FILE, num_replicas=self.config.stream_replicas))
            while True:
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await js.publish(PROBE_STREAM.lower(), b"", timeout=2.0)
                    self.probe_acks.append(time.monotonic() - self.t0)
                await asyncio.sleep(0.1)
        finally:
            await close_nats(nc)

    def probe_stalls(self) -> None:
        """Per NATS kill: the longest time without a probe ack, from the kill to recovery."""
        acks = self.probe_acks
        for kill in self.report.nats_kills:
            end = kill.at + kill.down_s + kill.restart_s
            window = [kill.at, *(a for a in acks if kill.at < a <= end + 5.0)]
            after = next((a for a in acks if a > end + 5.0), end + 5.0)
            window.append(after)
            kill.probe_stall_s = max(b - a for a, b in itertools.pairwise(window))

    async def reviver(self) -> None:
        """Restarts a service that crashed at one of its failpoints (exit code 97)."""
        while True:
            await asyncio.sleep(0.2)
            async with self.stack_lock:
                for service, proc in list(self.stack.procs.items()):
                    if proc.poll() is None:
                        continue
                    with self.procs_lock:
                        if self.closed:
                            return
                        self.stack.procs.pop(service)
                    self.log(f"{service} (pid {proc.pid}) exited with {proc.returncode}"
                             + (" at a failpoint" if proc.returncode == 97 else ""))
                    if proc.returncode != 97:
                        self.report.problems.append(
                            f"{service} exited on its own with {proc.returncode}")
                    at = time.monotonic() - self.t0
                    await self.bring_back(Kill(at, service, proc.pid, 0.0, 0.0),
                                          self.report.crashes)

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> ChaosReport:
        cfg = self.config
        self.run_task = asyncio.current_task()
        assert self.run_task is not None
        cancelling = self.run_task.cancelling()
        self.deadline = time.monotonic() + (cfg.deadline_s if cfg.deadline_s is not None
                                            else cfg.duration_s + cfg.settle_s + 600.0)
        try:
            await self.phases_of_the_run()
        except asyncio.CancelledError:
            # vital_done's cancel (a helper failed), or someone else's (shutdown, pytest)
            if self.failure is not None and self.run_task.uncancel() <= cancelling:
                raise self.failure from None
            raise
        finally:
            await self.stop_helpers()
        self.probe_stalls()
        return self.report

    async def phases_of_the_run(self) -> None:
        cfg = self.config
        self.stack.extra_env = {**self.stack.extra_env, **stack_env(cfg)}
        data.write(self.http.root / self.prefix.lstrip("/") / "ok.zip", data.images_zip(3))
        data.write(self.http.root / self.prefix.lstrip("/") / "fail.zip",
                   data.images_zip(3, extra={f"flight/{FAIL_IMAGE}": data.JPEG}))
        if cfg.split_every > 0:
            data.write(self.http.root / self.prefix.lstrip("/") / "split.zip", data.zip_bytes(
                {f"flight/{k}": v for k, v in geotagged_images(cfg.split_images).items()}))
            self.gateway_port = free_port()
            self.stack.extra_env.update(chaos_split_env(self.gateway_port))
        self.log(f"seed {cfg.seed}: {cfg.tasks} tasks over {cfg.duration_s:g}s, "
                 f"{cfg.workers} in flight, kills every {cfg.kill_every_s[0]:g}-"
                 f"{cfg.kill_every_s[1]:g}s among {', '.join(cfg.services)}")
        self.stack.replicas = cfg.replicas
        if self.cluster:
            async with self.phase("bootstrap", "scaleodm-bootstrap to create the streams and "
                                  "durables on the NATS cluster", cfg.start_s + 15.0):
                await asyncio.to_thread(self.bootstrap)
        async with self.phase("start", f"{len(SERVICES) * cfg.replicas} service processes to "
                              "answer /readyz", cfg.start_s + 15.0):
            await asyncio.to_thread(self.start_services)
        self.t0 = time.monotonic()
        if self.cluster:
            self.helper("probe", self.probe())
        schedule: asyncio.Queue[float] = asyncio.Queue()
        for i in range(cfg.tasks):
            schedule.put_nowait(i * cfg.duration_s / cfg.tasks)
        killer = self.helper("killer", self.killer(), vital=True)
        reviver = self.helper("reviver", self.reviver(), vital=True)
        workers = [self.helper(f"worker-{i}", self.worker(schedule)) for i in range(cfg.workers)]
        # Sleeps duration_s, unless the killer or the reviver fails first (a restart overran).
        await asyncio.wait([killer, reviver], timeout=cfg.duration_s)
        self.helper_failed()
        self.submitting = False
        self.stop_killing.set()
        self.report.submit_s = time.monotonic() - self.t0
        self.settle_deadline = time.monotonic() + cfg.settle_s
        self.log("submissions stopped; waiting for the killer's last restart")
        async with self.phase("last kill", "the killer's kill in progress to end (a service's "
                              "restart or a NATS node's catch-up)",
                              max(cfg.restart_s, cfg.nats_catch_up_s) + cfg.down_s[1] + 30.0):
            await killer
        self.log("killer stopped; settling")
        async with self.phase("workers", "the submissions in flight to end and their tasks to "
                              "turn terminal (or the settle deadline)", cfg.settle_s + 45.0):
            await asyncio.gather(*workers)
        self.helper_failed()
        async with self.phase("settle", "every task terminal and notified and the outbox drained"
                              " (or the settle deadline)",
                              max(0.0, self.settle_deadline - time.monotonic()) + 45.0) as phase:
            await self.settle(phase)
        self.report.settle_s = time.monotonic() - self.t0 - self.report.submit_s
        self.helper_failed()
        async with self.phase("check", "the invariant checks (gateway /info, webhooks, MongoDB "
                              "events, JetStream EVENTS)", cfg.check_s) as phase:
            await self.check(phase)

    async def stop_helpers(self) -> None:
        """Close (no restart starts a process any more, even from a thread in flight), cancel
        every helper task and wait for them, briefly: the caller stops the stack next."""
        with self.procs_lock:
            self.closed = True
        self.stop_killing.set()
        pending = [t for t in self.helpers.values() if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            _, still = await asyncio.wait(pending, timeout=15.0)
            for task in still:
                self.report.notes.append(f"{task.get_name()} did not end when cancelled: "
                                         f"{await_chain(task)}")
        for name, task in self.helpers.items():  # retrieved: no "never retrieved" warnings
            if task.done() and not task.cancelled() and task.exception() is not None:
                self.log(f"{name} failed: {task.exception()!r}")

    def shutdown(self) -> None:
        """Synchronous and idempotent, for a test's finalizer: safe when run() never finished
        (pytest-timeout interrupted the test, leaving its task pending in the event loop). No
        restart starts a process any more, the run's tasks are cancelled (they unwind the next
        time the loop runs), and the stack's processes are stopped. The NATS cluster is the
        caller's (its own fixture)."""
        with self.procs_lock:
            self.closed = True
        for task in (*self.helpers.values(), self.run_task):
            if task is not None and not task.done():
                with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to cancel
                    task.cancel()
        self.stack.stop()

    def bootstrap(self) -> None:
        """Streams and durables first, as the bootstrap Job does on Kubernetes: services starting
        together would race to create the R3 streams, and the losers wait out a timeout."""
        subprocess.run([str(BIN / "scaleodm-bootstrap")], env=self.stack.env("scheduler"),
                       check=True, capture_output=True, timeout=self.config.start_s)

    async def settle(self, phase: Phase) -> None:
        """Until every task is terminal and notified, the outbox empty, or the deadline."""
        async with httpx.AsyncClient(timeout=30) as client:
            while True:
                pending = [t for t in self.report.tasks if t.accepted and t.final not in TERMINAL]
                for task in pending:
                    resp = await self.request(client, "GET", f"/task/{task.uuid}/info",
                                              patience_s=self.patience())
                    task.final = resp.json().get("status", {}).get("code")
                pending = [t for t in self.report.tasks if t.accepted and t.final not in TERMINAL]
                hooked = self.hook_posts()
                silent = [t for t in self.report.tasks if t.final in TERMINAL
                          and t.uuid not in hooked]
                unpublished = await asyncio.to_thread(self.unpublished_count)
                # Every parent has ended (or soon will): the admission pass ends its children.
                active = (await asyncio.to_thread(self.active_children)
                          if self.config.split_every > 0 else [])
                phase.detail = (f"{len(pending)} not terminal, {len(silent)} without webhook, "
                                f"{unpublished} unpublished events, {len(active)} children "
                                "queued or running")
                if not pending and not silent and not unpublished and not active:
                    return
                if time.monotonic() > self.settle_deadline:
                    self.log(f"settle deadline: {phase.detail}")
                    return
                await asyncio.sleep(0.5)

    # -- the invariants ----------------------------------------------------------------------

    def hook_posts(self) -> dict[str, list[Received]]:
        """Webhook POSTs of this run, by the task uuid in the (verified) payload."""
        by_task: dict[str, list[Received]] = defaultdict(list)
        with self.http.lock:
            posts = [r for r in self.http.received if r.path.startswith(self.prefix + "/hooks/")]
        for post in posts:
            key = (str(json.loads(post.body).get("uuid")) if signed(post)
                   else f"unverified:{post.path}")
            by_task[key].append(post)
        return by_task

    def mongo(self) -> Any:
        """A client that gives up (no call in a thread may outlive its phase for long)."""
        client: MongoClient[dict[str, Any]] = MongoClient(
            self.stack.mongo_url, tz_aware=True, serverSelectionTimeoutMS=10_000,
            connectTimeoutMS=5_000, socketTimeoutMS=30_000)
        return client

    def unpublished_count(self) -> int:
        with self.mongo() as client:
            return int(client[self.stack.database]["events"].count_documents({"published": False}))

    def mongo_events(self) -> list[dict[str, Any]]:
        with self.mongo() as client:
            coll = client[self.stack.database]["events"]
            found = list(coll.find(
                {}, {"_id": 1, "task_id": 1, "attempt": 1, "kind": 1, "seq": 1, "published": 1,
                     "recorded_at": 1}))
            # A parent's ``child`` events with their bodies (which child, what happened).
            bodies = {d["_id"]: d.get("body") or {}
                      for d in coll.find({"kind": "child"}, {"_id": 1, "body": 1})}
            for ev in found:
                if ev["_id"] in bodies:
                    ev["body"] = bodies[ev["_id"]]
            return found

    def child_docs(self) -> list[dict[str, Any]]:
        """The task documents of children (``parent`` set; a removed child's is deleted once
        its removal is done)."""
        with self.mongo() as client:
            return list(client[self.stack.database]["tasks"].find(
                {"parent": {"$exists": True}},
                {"_id": 1, "parent": 1, "state": 1, "removed": 1, "attempt": 1}))

    def active_children(self) -> list[str]:
        with self.mongo() as client:
            return [d["_id"] for d in client[self.stack.database]["tasks"].find(
                {"parent": {"$exists": True}, "removed": False,
                 "state": {"$in": ["queued", "running"]}}, {"_id": 1})]

    async def stream_event_ids(self) -> Counter[str]:
        """Every event id in JetStream's EVENTS stream (an ephemeral consumer reads it all).

        Reads until it has as many messages as ``stream_info`` counted or three fetches in a
        row bring nothing: a fetch that finds nothing may raise a timeout or return an empty
        list (nats-py returns ``[]`` when the server's 408 for the expired pull arrives before
        its own timer), and an R1 ephemeral consumer of an R3 stream reads the store of the one
        replica it was placed on, which may count fewer messages than the leader. Missing
        events show up as a problem (``stream_missing``), not as a wait without end."""
        budget = 45.0
        async with self.phase("JetStream EVENTS read", "an ephemeral pull consumer to deliver "
                              "every message of the EVENTS stream", budget) as phase:
            phase.detail = "connecting"
            nc = await nats.connect(self.nats_servers(), connect_timeout=5,
                                    max_reconnect_attempts=10, reconnect_time_wait=0.5,
                                    error_cb=quiet_nats_errors)
            try:
                js = nc.jetstream(timeout=10)
                phase.detail = "stream_info"
                total = (await js.stream_info("EVENTS")).state.messages
                phase.detail = "creating the consumer"
                sub = await js.pull_subscribe(
                    "events.task.>", stream="EVENTS",
                    config=ConsumerConfig(ack_policy=AckPolicy.NONE,
                                          deliver_policy=DeliverPolicy.ALL,
                                          inactive_threshold=budget))
                ids: Counter[str] = Counter()
                read = empty = timeouts = nothing = 0
                while read < total and empty < 3:
                    phase.detail = f"read {read} of {total}, {empty} empty fetches in a row"
                    try:
                        msgs = await sub.fetch(500, timeout=5)
                        nothing += not msgs
                    except TimeoutError:  # nats.errors.TimeoutError is one
                        msgs = []
                        timeouts += 1
                    empty = 0 if msgs else empty + 1
                    for msg in msgs:
                        ids[json.loads(msg.data)["event_id"]] += 1
                    read += len(msgs)
                if read < total:
                    self.report.notes.append(
                        f"JetStream EVENTS: the consumer delivered {read} of the {total} "
                        f"messages stream_info counted ({timeouts} fetches timed out, {nothing} "
                        "returned nothing)")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sub.unsubscribe(), 5)
                return ids
            finally:
                await close_nats(nc)

    def held_slots(self) -> list[str]:
        """Tasks still holding a run slot (admission counts them from the task documents)."""
        with self.mongo() as client:
            tasks = client[self.stack.database]["tasks"]
            return [d["_id"] for d in tasks.find(HOLDING, {"_id": 1})]

    async def check(self, phase: Phase) -> None:
        phase.detail = "reading the events from MongoDB"
        events = await asyncio.to_thread(self.mongo_events)
        await self.check_tasks(events, phase)
        if any(t.split for t in self.report.tasks):
            phase.detail = "split families"
            await self.check_families(events, await asyncio.to_thread(self.child_docs), phase)
        phase.detail = "run slots"
        self.check_slots(events, await asyncio.to_thread(self.held_slots))
        phase.detail = "webhooks"
        self.check_webhooks(events)
        phase.detail = "events"
        await self.check_events(events)

    async def check_tasks(self, events: list[dict[str, Any]], phase: Phase) -> None:
        """Every submitted uuid exists and is terminal; a cancel that was answered shows."""
        rep, problems = self.report, self.report.problems
        kinds: dict[str, list[str]] = defaultdict(list)
        for ev in sorted(events, key=lambda e: (e["task_id"], e["seq"])):
            kinds[ev["task_id"]].append(ev["kind"])
        for task in rep.tasks:
            if task.error is not None:
                problems.append(f"task {task.uuid} ({task.kind}): {task.error}")
            elif not task.accepted:
                problems.append(f"task {task.uuid} ({task.kind}): never accepted")
        async with httpx.AsyncClient(timeout=30) as client:
            for i, task in enumerate(rep.tasks):
                if not task.accepted:
                    continue
                phase.detail = f"GET /task/{task.uuid}/info ({i + 1} of {len(rep.tasks)})"
                resp = await self.request(client, "GET", f"/task/{task.uuid}/info",
                                          patience_s=30)
                info = resp.json()
                if "uuid" not in info:
                    problems.append(f"task {task.uuid} ({task.kind}) lost: {info}")
                    task.final = None
                    continue
                task.final = info["status"]["code"]
                if task.final not in TERMINAL:
                    problems.append(f"task {task.uuid} ({task.kind}) stuck at {task.final}, "
                                    f"progress {info.get('progress')}; its events: "
                                    f"{kinds.get(task.uuid, [])}")
                elif task.kind == "cancel" and task.cancel_sent and task.final != 50:
                    problems.append(f"task {task.uuid}: canceled, yet ended {task.final} "
                                    "(NodeODM §3.9: a cancel turns 30 and 40 into 50)")
                elif task.final != INTENDED[task.kind]:
                    why = ("the run ended before the cancel was sent" if task.kind == "cancel"
                           else info.get("errorMessage") or "")
                    rep.notes.append(f"task {task.uuid} ({task.kind}, "
                                     f"{'chunked' if task.chunked else 'zipurl'}) ended "
                                     f"{task.final}: {why}"[:240])

    async def check_families(self, events: list[dict[str, Any]], docs: list[dict[str, Any]],
                             phase: Phase) -> None:
        """Split tasks: every child (as MongoDB and its parent's ``child`` events know it) ended
        with its parent, none left queued or running (the admission pass cancels the children
        of an ended parent, removes those of a removed one); every child's task document was
        told on its parent's stream, its end or removal too; a child told but without a
        document was removed (its data deleted), else it is lost; a completed parent's all.zip
        holds the merged outputs. Children are no submitted tasks: not counted as lost."""
        rep, problems = self.report, self.report.problems
        parents = {t.uuid: t for t in rep.tasks if t.split}
        children: dict[str, Child] = {}
        for ev in sorted(events, key=lambda e: (e["task_id"], e["seq"])):
            if ev["kind"] != "child":
                continue
            body = ev.get("body") or {}
            if "child" not in body:
                problems.append(f"child event {ev['_id']} without its child: {body}")
                continue
            child = children.setdefault(body["child"], Child(body["child"], ev["task_id"]))
            child.told.append(str(body.get("child_kind")))
        for doc in docs:
            child = children.setdefault(doc["_id"], Child(doc["_id"], doc["parent"]))
            child.state, child.removed = doc.get("state"), bool(doc.get("removed"))
            if doc["parent"] != child.parent:
                problems.append(f"child {child.uuid}: parent {doc['parent']}, yet told on "
                                f"{child.parent}'s stream")
        rep.children = sorted(children.values(), key=lambda c: (c.parent, c.uuid))
        for child in rep.children:
            parent = parents.get(child.parent)
            whose = (f"child {child.uuid} of {child.parent} "
                     f"({'a split task' if parent else 'not a split task of this run'}, "
                     f"final {parent.final if parent else '?'})")
            if parent is None:
                problems.append(f"{whose}: a child of a task that is no split task")
            if child.state is None:
                if "removed" not in child.told:
                    problems.append(f"{whose} lost: no task document, and its parent's stream "
                                    f"never told its removal (told: {child.told})")
                continue
            if not child.removed and child.state in ("queued", "running"):
                rep.children_active += 1
                problems.append(f"{whose} left {child.state} after settling (told: "
                                f"{child.told})")
            end = "removed" if child.removed else child.state
            if end not in child.told:
                problems.append(f"{whose}: {end}, but its parent's stream told {child.told}")
            if parent is not None and parent.final == 40 and not child.removed:
                rep.notes.append(f"{whose}: {child.state}, not removed by the completed run "
                                 "(ODM's removal failed, e.g. the gateway was down)")
        async with httpx.AsyncClient(timeout=30) as client:
            for parent in parents.values():
                if parent.final != 40:
                    continue
                phase.detail = f"all.zip of split parent {parent.uuid}"
                resp = await self.request(client, "GET",
                                          f"/task/{parent.uuid}/download/all.zip", patience_s=30)
                try:
                    with zipfile.ZipFile(io.BytesIO(resp.content)) as z:
                        names = set(z.namelist())
                except zipfile.BadZipFile:
                    names = set()
                if MERGED_OUTPUT in names:
                    rep.merged_checked += 1
                else:
                    problems.append(f"split parent {parent.uuid} completed, but its all.zip "
                                    f"holds no {MERGED_OUTPUT}: {sorted(names)[:10]} "
                                    f"({resp.status_code}, {resp.content[:120]!r})")
        for kills, during in ((rep.kills, rep.kills_in_split_runs),
                              (rep.crashes, rep.crashes_in_split_runs)):
            for kill in kills:
                if any(t.submitted_at - self.t0 <= kill.at
                       <= (t.finished_at or float("inf")) - self.t0 for t in parents.values()):
                    during[service_of(kill.service)] += 1

    def check_slots(self, events: list[dict[str, Any]], held: list[str]) -> None:
        """Every task ended, so no slot may be held any more (a leaked slot is held forever);
        and never more slots were held at once than the capacity: each attempt holds one from
        its ``admitted`` event to its end (completed, failed, canceled) or its task's removal,
        by the events' recording times."""
        problems = self.report.problems
        if held:
            problems.append(f"{len(held)} run slot(s) still held after every task ended: "
                            f"{held[:5]}")
        admitted: dict[tuple[str, int], float] = {}
        ended: dict[tuple[str, int], float] = {}
        removed: dict[str, float] = {}
        for ev in events:
            at = ev["recorded_at"].timestamp()
            key = (ev["task_id"], ev["attempt"])
            if ev["kind"] == "admitted":
                admitted[key] = at
            elif ev["kind"] in ("completed", "failed", "canceled"):
                ended[key] = min(at, ended.get(key, at))
            elif ev["kind"] == "removed":
                removed[ev["task_id"]] = min(at, removed.get(ev["task_id"], at))
        spans = []
        for key, start in admitted.items():
            end = min(ended.get(key, float("inf")), removed.get(key[0], float("inf")))
            if end > start:  # else it was never held: the attempt ended before its admission
                spans.append((start, end))
        steps = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
        now = most = 0
        for _, step in steps:  # an end sorts before a start at the same instant
            now += step
            most = max(most, now)
        self.report.slots_at_once = most
        if most > CHAOS_SLOTS:
            problems.append(f"{most} run slots held at once; the capacity is {CHAOS_SLOTS}")

    def check_webhooks(self, events: list[dict[str, Any]]) -> None:
        """Every terminal task was POSTed (signed) at least once, with its final status; but a
        cancel that arrived after the run had ended (40/30 -> 50, NodeODM's behaviour) sends no
        webhook of its own, as NodeODM's does not: the ended run's webhook is the last one."""
        rep, problems = self.report, self.report.problems
        posts = self.hook_posts()
        ended_then_canceled: set[str] = set()
        by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for ev in events:
            by_task[ev["task_id"]].append(ev)
        for task_id, evs in by_task.items():
            evs.sort(key=lambda e: int(e["seq"]))
            last = evs[-1]
            if last["kind"] == "canceled" and any(
                ev["kind"] in ("completed", "failed") and ev["attempt"] == last["attempt"]
                for ev in evs[:-1]
            ):
                ended_then_canceled.add(task_id)
        for key, bad in posts.items():
            if key.startswith("unverified:"):
                problems.append(f"{len(bad)} webhook POST(s) with a bad signature on {key[11:]}")
        ours = {t.uuid for t in rep.tasks}
        rep.webhook_posts = sum(len(v) for k, v in posts.items() if k in ours)
        for task in rep.tasks:
            got = posts.get(task.uuid, [])
            if task.final in TERMINAL and not got:
                problems.append(f"task {task.uuid} ({task.kind}, {task.final}): no webhook")
            if not got:
                continue
            rep.webhook_tasks += 1
            hook_ids = Counter(p.headers.get("webhook-id") for p in got)
            rep.webhook_ids += len(hook_ids)
            rep.tasks_with_several_ids += len(hook_ids) > 1
            answered_2xx = len(got) - min(task.hook_fails, len(got))  # scripted 503s first
            rep.repeated_deliveries += max(0, answered_2xx - len(hook_ids))
            codes = {p.json()["status"]["code"] for p in got}
            if (task.final == 50 and task.uuid in ended_then_canceled
                    and codes <= {30, 40}):
                continue  # canceled after the end: no webhook for the cancel (docstring)
            if task.final in TERMINAL and task.final not in codes:
                problems.append(f"task {task.uuid}: webhooks said {sorted(codes)}, task is "
                                f"{task.final}")

    async def check_events(self, events: list[dict[str, Any]]) -> None:
        """seq 1..n per task, a terminal event, all published, all on JetStream."""
        rep, problems = self.report, self.report.problems
        # A removed child's events are being deleted with it: only those still there count.
        family = {c.uuid: c for c in rep.children if c.state is not None and not c.removed}
        ours = {t.uuid for t in rep.tasks} | set(family)
        mine = [ev for ev in events if ev["task_id"] in ours]
        rep.events = len(mine)
        seqs: dict[str, list[int]] = defaultdict(list)
        terminal: dict[str, set[int]] = defaultdict(set)
        for ev in mine:
            seqs[ev["task_id"]].append(int(ev["seq"]))
            if ev["kind"] in ("completed", "failed", "canceled"):
                terminal[ev["task_id"]].add(int(ev["attempt"]))
        for task in rep.tasks:
            if not task.accepted:
                continue
            got = sorted(seqs.get(task.uuid, []))
            repeats = len(got) - len(set(got))
            gaps = len(set(range(1, max(got, default=0) + 1)) - set(got))
            rep.seq_repeats += repeats
            rep.seq_gaps += gaps
            if repeats or gaps or not got:
                problems.append(f"task {task.uuid}: event seqs {got} (gaps {gaps}, repeats "
                                f"{repeats})")
            if task.final in TERMINAL and 1 not in terminal.get(task.uuid, set()):
                problems.append(f"task {task.uuid}: terminal ({task.final}) without a terminal "
                                "event in the log")
        for child in family.values():
            got = sorted(seqs.get(child.uuid, []))
            repeats = len(got) - len(set(got))
            gaps = len(set(range(1, max(got, default=0) + 1)) - set(got))
            rep.seq_repeats += repeats
            rep.seq_gaps += gaps
            if repeats or gaps or not got:
                problems.append(f"child {child.uuid}: event seqs {got} (gaps {gaps}, repeats "
                                f"{repeats})")
            if child.state in ("completed", "failed", "canceled") and not terminal[child.uuid]:
                problems.append(f"child {child.uuid}: {child.state} without a terminal event in "
                                "the log")
        rep.unpublished = sum(1 for ev in mine if not ev["published"])
        if rep.unpublished:
            problems.append(f"{rep.unpublished} events never published (outbox not drained)")
        recorded = {str(ev["_id"]) for ev in mine}
        stream = await self.stream_event_ids()
        missing = recorded - set(stream)
        rep.stream_missing = len(missing)
        rep.stream_repeats = sum(n - 1 for i, n in stream.items() if i in recorded and n > 1)
        if missing:
            problems.append(f"{len(missing)} recorded events missing from JetStream, e.g. "
                            f"{sorted(missing)[:3]}")


async def quiet_nats_errors(exc: Exception) -> None:  # a killed node is the point: no tracebacks
    del exc


async def close_nats(nc: Any) -> None:
    """``nc.close()``, bounded: it flushes and waits for the socket, and a finally of a task
    being cancelled must not wait without end."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 5.0)


def nats_leaders(cluster: NatsCluster) -> dict[str, str]:
    """Leader node of each stream and durable (``TASKS``, ``TASKS/scheduler``, ...), from the
    monitoring endpoint of a running node (``/jsz``)."""
    for node in cluster.nodes:
        if node.proc is None:
            continue
        url = f"{node.monitor_url}/jsz?acc=%24G&streams=true&consumers=true"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
                jsz = json.load(resp)
        except OSError:
            continue
        leaders: dict[str, str] = {}
        for account in jsz.get("account_details", []):
            for stream in account.get("stream_detail", []):
                leaders[stream["name"]] = stream.get("cluster", {}).get("leader", "")
                for consumer in stream.get("consumer_detail", []):
                    leader = consumer.get("cluster", {}).get("leader", "")
                    leaders[f"{stream['name']}/{consumer['name']}"] = leader
        return leaders
    return {}


async def run_chaos(stack: Stack, http: HttpFixture, config: ChaosConfig,
                    cluster: NatsCluster | None = None) -> ChaosReport:
    """Start ``stack`` (not started yet), run the chaos, check; the caller stops the stack.
    ``cluster``: the NATS cluster ``stack`` uses, when ``config.nats_nodes`` > 1."""
    return await Chaos(stack, http, config, cluster).run()

