"""The bus on a 3-node NATS cluster (``servers.nats_cluster``): stream replicas and losing a node.

Covers ``streams.ensure_streams`` with ``replicas`` (raised on an existing stream, never lowered;
several processes creating the R3 streams at once all succeed) and what losing the leader of
``EVENTS`` costs: publishing stalls for the election (bounded here; docs/operations.md has the
measured 4-7 s), nothing acknowledged is lost, and the restarted node catches up. The services on
a cluster, with their kills, are ``test_chaos.py``; partitions and two nodes down are left out.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from scaleodm.common.contracts import streams
from tests.harness import servers

pytestmark = pytest.mark.integration

ELECTION_BOUND_S = 15.0  # Raft election timeouts are 4-9 s; generous for a loaded machine


async def replicas_of(js: JetStreamContext) -> dict[str, int]:
    return {s.name or "": (await js.stream_info(s.name or "")).config.num_replicas or 1
            for s in streams.STREAMS}


async def test_replicas_are_raised_never_lowered_and_racing_creators_succeed(
    tmp_path: Path,
) -> None:
    with servers.nats_cluster(tmp_path, size=3) as cluster:
        nc = await nats.connect(cluster.servers())
        try:
            js = nc.jetstream()
            await streams.ensure_streams(js, replicas=1)
            assert await replicas_of(js) == {"TASKS": 1, "EVENTS": 1}
            await streams.ensure_streams(js, replicas=3)
            assert await replicas_of(js) == {"TASKS": 3, "EVENTS": 3}
            await streams.ensure_streams(js, replicas=1)  # a stale process: no shrinking
            assert await replicas_of(js) == {"TASKS": 3, "EVENTS": 3}

            for cfg in streams.STREAMS:
                await js.delete_stream(cfg.name or "")

            async def start_a_service() -> None:
                own = await nats.connect(cluster.servers())
                try:
                    await streams.ensure_streams(own.jetstream(), replicas=3)
                    await streams.ensure_consumers(own.jetstream())
                finally:
                    await own.close()

            # Services starting together race to create the R3 streams (no bootstrap Job).
            await asyncio.gather(*(start_a_service() for _ in range(6)))
            assert await replicas_of(js) == {"TASKS": 3, "EVENTS": 3}
        finally:
            await nc.close()


def stream_messages(node: servers.NatsNode, stream: str) -> int:
    url = f"{node.monitor_url}/jsz?acc=%24G&streams=true"
    with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
        jsz = json.load(resp)
    for account in jsz.get("account_details", []):
        for detail in account.get("stream_detail", []):
            if detail["name"] == stream:
                return int(detail["state"]["messages"])
    return 0


async def test_losing_the_events_leader_stalls_publishing_briefly_and_loses_nothing(
    tmp_path: Path,
) -> None:
    with servers.nats_cluster(tmp_path, size=3) as cluster:
        nc = await nats.connect(cluster.servers(), max_reconnect_attempts=-1,
                                reconnect_time_wait=0.1)
        try:
            js = nc.jetstream()
            await streams.ensure_streams(js, replicas=3)
            leader = (await js.stream_info(streams.EVENTS_STREAM)).cluster
            assert leader is not None and leader.leader
            victim = next(n for n in cluster.nodes if n.name == leader.leader)
            acked: list[float] = []
            stop = asyncio.Event()

            async def publish() -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        await js.publish(streams.event_subject(f"t{i}", "progress"), b"{}",
                                         timeout=2.0, headers={"Nats-Msg-Id": f"m{i}"})
                        acked.append(time.monotonic())
                    except (nats.errors.Error, TimeoutError):
                        await asyncio.sleep(0.05)

            publisher = asyncio.create_task(publish())
            await asyncio.sleep(0.5)
            killed_at = time.monotonic()
            victim.kill()
            await asyncio.sleep(1.0)
            victim.start()
            await asyncio.to_thread(victim.wait_current, 60.0)
            while not acked or acked[-1] < time.monotonic() - 0.2:  # publishing again
                assert time.monotonic() - killed_at < 60, "publishing never resumed"
                await asyncio.sleep(0.1)
            stop.set()
            await publisher
            around = [killed_at, *(t for t in acked if t > killed_at)]
            stall = max(b - a for a, b in zip(around, around[1:], strict=False))
            assert stall < ELECTION_BOUND_S, f"publishing stalled {stall:.1f} s"

            total = (await js.stream_info(streams.EVENTS_STREAM)).state.messages
            # Every acknowledged publish is stored (one whose ack was lost may be stored too).
            assert total >= len(acked)
            await asyncio.to_thread(victim.wait_current, 30.0)
            deadline = time.monotonic() + 30
            while stream_messages(victim, streams.EVENTS_STREAM) < total:  # caught up
                assert time.monotonic() < deadline, "the restarted node did not catch up"
                await asyncio.sleep(0.2)
        finally:
            await nc.close()
