"""Fault injection, short: the ``task chaos`` driver for ~25 s with a fixed seed.

Tasks (zipurl and chunked; completing, failing on purpose, canceled mid-run) flow while random
services are SIGKILLed and restarted, and failpoints crash the gateway and the scheduler between
two writes now and then. The invariants (``tests/harness/chaos.py``): no task lost or stuck,
every terminal task's webhook delivered (repeats counted by ``webhook-id``), every task's event
``seq`` 1..n without gap, the outbox drained and every event on JetStream. The long version is
``uv run task chaos``.
"""

from __future__ import annotations

import sys

import pytest

from tests.harness import servers
from tests.harness.chaos import ChaosConfig, run_chaos
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration

SEED = 20261122


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
