"""The watcher's local-run source: a run printing a burst of console output does not hold up
the others, and every line is still recorded once, in order.

Run directories are written by hand here (the runner's side of the contract in
``scaleodm.common.localruns``), the watcher's source runs in-process on a real MongoDB wire
server and a real nats-server.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from faststream.nats import NatsBroker
from pymongo import AsyncMongoClient

from scaleodm.common import localruns
from scaleodm.common.contracts import events, streams
from scaleodm.common.contracts.ids import run_name
from scaleodm.common.domain.status import TaskState
from scaleodm.common.emitting import Emitter
from scaleodm.common.store.tasks import Doc, TaskStore
from scaleodm.watcher.sources.local import READ_CHUNK, LocalRunSource
from tests.harness import servers

pytestmark = pytest.mark.integration

BUSY_LINES = 20_000  # ~1.5 MB of console: several chunks


@pytest.fixture
async def store(mongo_url: str) -> AsyncIterator[TaskStore]:
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url)
    name = f"localsrc_{uuid.uuid4().hex[:8]}"
    s = TaskStore(client[name])
    await s.ensure_indexes()
    yield s
    await client.drop_database(name)
    await client.close()


@pytest.fixture
async def broker(nats: servers.Nats) -> AsyncIterator[NatsBroker]:
    b = NatsBroker(nats.url)
    conn = await b.connect()
    await streams.ensure_streams(conn.jetstream())
    yield b
    await b.stop()


@pytest.fixture
def lock_holder() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


async def _run_dir(store: TaskStore, root: Path, console: bytes, held: list[int], *,
                   result: str | None) -> tuple[str, localruns.RunDir]:
    task_id = str(uuid.uuid4())
    await store.create_task({"_id": task_id, "name": "t", "date_created_ms": 1, "options": []},
                            events.new(events.TaskQueued, task_id, 1))
    rd = localruns.RunDir(root / run_name(task_id, 1))
    rd.path.mkdir(parents=True)
    localruns.write_json_atomic(rd.file(localruns.RUN_FILE),
                                {"spec": {"task_id": task_id, "attempt": 1}})
    fd = os.open(rd.file(localruns.LOCK_FILE), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live runner holds the lock
    held.append(fd)
    rd.file(localruns.RUNNER_PID).write_text(str(os.getpid()))
    rd.file(localruns.CONSOLE_FILE).write_bytes(console)
    if result:
        rd.write_result(result)
    return task_id, rd


async def test_a_console_burst_does_not_hold_up_other_runs(
    store: TaskStore, broker: NatsBroker, tmp_path: Path, lock_holder: list[int],
) -> None:
    busy_lines = [f"busy line {i:06d} " + "x" * 60 for i in range(BUSY_LINES)]
    busy, _ = await _run_dir(store, tmp_path, ("\n".join(busy_lines) + "\n").encode(),
                             lock_holder, result=None)
    quiet, _ = await _run_dir(store, tmp_path, b"quiet 1\nquiet 2\n", lock_holder,
                              result="completed")
    source = LocalRunSource(tmp_path, store, Emitter(store, broker, 5.0), poll_interval_s=0.1,
                            batch_lines=200, start_grace_s=30)

    await source.poll_once()

    # One poll: the quiet run is reported to the end, the busy one by one chunk only.
    quiet_doc = await store.get_task(quiet)
    assert quiet_doc is not None and quiet_doc["state"] == TaskState.COMPLETED
    assert await store.read_output(quiet, 1, 0, 10) == ["quiet 1", "quiet 2"]
    first = await store.output_end(busy, 1)
    assert 0 < first <= READ_CHUNK // len(busy_lines[0])
    assert any(f.backlog for f in source.followers.values())

    polls = 1
    while any(f.backlog for f in source.followers.values()):
        await source.poll_once()
        polls += 1
    assert polls > 2
    assert await store.output_end(busy, 1) == BUSY_LINES
    assert await store.read_output(busy, 1, 0, BUSY_LINES) == busy_lines
