"""Fault injection, short: the ``task chaos`` driver for ~25 s with a fixed seed.

Tasks (zipurl and chunked; completing, failing on purpose, canceled mid-run) flow while random
services are SIGKILLed and restarted, and failpoints crash the gateway and the scheduler between
two writes now and then. The invariants (``tests/harness/chaos.py``): no task lost or stuck,
every terminal task's webhook delivered (repeats counted by ``webhook-id``), every task's event
``seq`` 1..n without gap, the outbox drained and every event on JetStream. The long version is
``uv run task chaos``.

Split tasks are in the mix (every 6th task, the first at once: 12 geotagged images with
``split: 4``, whose runs send submodels back to the gateway as children): a scheduler, watcher or
gateway killed during a split run loses no child and leaves no orphan: every child ends with its
parent (none left queued or running), its parent's stream told it, a completed parent's
``all.zip`` holds the merged outputs. The cluster test has one split task (the default every 10th).

The second test runs the same with two processes of every service on a 3-node NATS cluster
(streams R3), and the killer SIGKILLs NATS nodes too, one at a time, often a stream or durable
leader, restarting each on its ports and store. Left out: two nodes down at once (R3 loses its
majority: JetStream stops, by design), network partitions, MongoDB replica sets.

Each run has deadlines of its own (a phase that overruns fails naming the phase and what it
waited for, see ``ChaosHang``) well inside the tests' pytest-timeout; and if a test is
interrupted all the same, its finalizer (``Chaos.shutdown``) and the fixtures stop every process
it started: a ``finally`` inside the test coroutine would not run, as pytest-timeout leaves the
coroutine pending in the session's event loop.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import servers
from tests.harness.chaos import Chaos, ChaosConfig, ChaosHang, ChaosReport
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import Stack

# Alone: many processes on two cores; beside another worker's tests they starve (tasks of
# 30 s instead of 7), and the run asserts how much work got done.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

SEED = 20261122
CLUSTER_SEED = 20261204
# The run's own deadline (it fails naming the phase that overran) comes first; pytest-timeout,
# a last resort, leaves room for the fixtures' setup and the stack's stop after it.
RUN_DEADLINE_S = 230.0
TEST_TIMEOUT_S = 300  # a loaded 2-core CI runner; alone each test takes ~30-40 s


async def chaos_run(request: pytest.FixtureRequest, chaos: Chaos, lines: list[str]
                    ) -> ChaosReport:
    """``chaos.run()``, stopped by a finalizer whatever happens to this coroutine; a failure of
    the run (a phase that overran) comes with the run's log."""
    request.addfinalizer(chaos.shutdown)
    try:
        return await chaos.run()
    except ChaosHang as exc:
        pytest.fail(f"{exc}\nthe run's log:\n" + "\n".join(lines), pytrace=False)
    except Exception as exc:
        exc.add_note("the run's log:\n" + "\n".join(lines))
        raise


@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_chaos_no_task_lost_or_stuck_every_webhook_sent_no_seq_gap(
    request: pytest.FixtureRequest, fresh_stack: tuple[Stack, servers.Nats],
    http_fixture: HttpFixture,
) -> None:
    stack, _ = fresh_stack
    lines: list[str] = []
    report = await chaos_run(request, Chaos(stack, http_fixture, ChaosConfig(
        seed=SEED, duration_s=25, tasks=12, workers=3, kill_every_s=(2.0, 4.0),
        down_s=(0.0, 1.0), settle_s=40, split_every=6, deadline_s=RUN_DEADLINE_S,
        log=lines.append,
    )), lines)
    summary = report.summary()
    sys.stdout.write(summary + "\n")  # shown with -s, and with the failure below
    assert report.ok, summary + "\n" + "\n".join(lines)
    assert len(report.tasks) >= 6, summary
    # The split tasks ran (the first is submitted at once) and created children on the way,
    # and a scheduler or watcher was SIGKILLed during a split run.
    assert sum(t.split for t in report.tasks) >= 1 and report.children, summary
    assert report.kills_in_split_runs["scheduler"] + report.kills_in_split_runs["watcher"], (
        summary)
    # The faults really happened (how many fit in 25 s depends on the machine's speed).
    assert len(report.kills) >= 2 and len(report.kills) + len(report.crashes) >= 3, summary


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[servers.NatsCluster]:
    """Three nodes, stopped in teardown: also after pytest-timeout interrupted the test."""
    with servers.nats_cluster(tmp_path / "nats", size=3) as cluster:
        yield cluster


@pytest.fixture
def cluster_stack(tmp_path: Path, mongo_url: str, s3: servers.S3Endpoint,
                  nats_cluster: servers.NatsCluster) -> Iterator[Stack]:
    """Services on the cluster, not started (the run starts them); stopped in teardown."""
    stack = Stack(tmp=tmp_path, nats_url=nats_cluster.url, mongo_url=mongo_url, s3=s3,
                  database=f"t_{uuid.uuid4().hex[:12]}")
    try:
        yield stack
    finally:
        stack.stop()


@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_chaos_with_replicas_and_a_nats_cluster_losing_nodes(
    request: pytest.FixtureRequest, cluster_stack: Stack, nats_cluster: servers.NatsCluster,
    http_fixture: HttpFixture,
) -> None:
    lines: list[str] = []
    report = await chaos_run(request, Chaos(cluster_stack, http_fixture, ChaosConfig(
        seed=CLUSTER_SEED, duration_s=25, tasks=10, workers=3, kill_every_s=(2.0, 4.0),
        down_s=(0.0, 1.0), settle_s=40, replicas=2, nats_nodes=3, nats_kill_every=2,
        deadline_s=RUN_DEADLINE_S, log=lines.append,
    ), nats_cluster), lines)
    summary = report.summary()
    sys.stdout.write(summary + "\n")
    assert report.ok, summary + "\n" + "\n".join(lines)
    assert len(report.tasks) >= 6, summary
    # The faults really happened: the first kill hits a NATS stream leader, the second a service.
    assert report.nats_kills and report.nats_kills[0].led_ours and report.kills, summary
