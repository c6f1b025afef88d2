"""Fault injection, short: the ``task chaos`` driver for ~25 s with a fixed seed.

Tasks (zipurl and chunked; completing, failing on purpose, canceled mid-run) flow while random
services are SIGKILLed and restarted, and failpoints crash the gateway and the scheduler between
two writes now and then. The invariants (``tests/harness/chaos.py``): no task lost or stuck,
every terminal task's webhook delivered (repeats counted by ``webhook-id``), every task's event
``seq`` 1..n without gap, the outbox drained and every event on JetStream. The long version is
``uv run task chaos``.

The second test runs the same with two processes of every service on a 3-node NATS cluster
(streams R3), and the killer SIGKILLs NATS nodes too, one at a time, often a stream or durable
leader, restarting each on its ports and store. Left out: two nodes down at once (R3 loses its
majority: JetStream stops, by design), network partitions, MongoDB replica sets.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from tests.harness import servers
from tests.harness.chaos import ChaosConfig, run_chaos
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration

SEED = 20261122
CLUSTER_SEED = 20261204


async def test_chaos_no_task_lost_or_stuck_every_webhook_sent_no_seq_gap(
    fresh_stack: tuple[Stack, servers.Nats], http_fixture: HttpFixture
) -> None:
    stack, _ = fresh_stack
    lines: list[str] = []
    report = await run_chaos(stack, http_fixture, ChaosConfig(
        seed=SEED, duration_s=25, tasks=12, workers=3, kill_every_s=(2.0, 4.0),
        down_s=(0.0, 1.0), settle_s=40, log=lines.append,
    ))
    summary = report.summary()
    sys.stdout.write(summary + "\n")  # shown with -s, and with the failure below
    assert report.ok, summary + "\n" + "\n".join(lines)
    assert len(report.tasks) >= 6, summary
    # The faults really happened (how many fit in 25 s depends on the machine's speed).
    assert len(report.kills) >= 2 and len(report.kills) + len(report.crashes) >= 3, summary


async def test_chaos_with_replicas_and_a_nats_cluster_losing_nodes(
    tmp_path: Path, mongo_url: str, s3: servers.S3Endpoint, http_fixture: HttpFixture
) -> None:
    lines: list[str] = []
    with servers.nats_cluster(tmp_path / "nats", size=3) as cluster:
        stack = Stack(tmp=tmp_path, nats_url=cluster.url, mongo_url=mongo_url, s3=s3,
                      database=f"t_{uuid.uuid4().hex[:12]}")
        try:
            report = await run_chaos(stack, http_fixture, ChaosConfig(
                seed=CLUSTER_SEED, duration_s=25, tasks=10, workers=3, kill_every_s=(2.0, 4.0),
                down_s=(0.0, 1.0), settle_s=40, replicas=2, nats_nodes=3, nats_kill_every=2,
                log=lines.append,
            ), cluster)
        finally:
            stack.stop()
    summary = report.summary()
    sys.stdout.write(summary + "\n")
    assert report.ok, summary + "\n" + "\n".join(lines)
    assert len(report.tasks) >= 6, summary
    # The faults really happened: the first kill hits a NATS stream leader, the second a service.
    assert report.nats_kills and report.nats_kills[0].led_ours and report.kills, summary
