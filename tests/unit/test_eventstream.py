"""The per-task SSE stream's seam between the MongoDB replay and live bus events
(``scaleodm.gateway.eventstream.follow_task``), with an in-memory event log and hub.

Covered: duplicates and events published out of order (two writers) are sent once and in seq
order; an event arriving without ``seq`` is looked up by id, or skipped when not recorded; an
event recorded but never published is found by the idle re-read; the stream ends with the
current attempt's terminal event (passing through an older attempt's) or ``removed``, when
idle and the task is over past the cursor, and cleanly at shutdown; a client whose queue
overflows is disconnected; live and replayed messages are byte-identical; ``wait_for`` (timeout,
stop, a cancelled get takes nothing); the status filter's subjects. The all-tasks stream
(``follow_all``) over a fake JetStream subscription: at an overflow the consumer is stopped once,
from the message callback, what was queued before is sent, and the stream ends only once that
stop is done, even when its response is cancelled meanwhile; a failed stop is logged.

Left out: NATS and HTTP (``tests/integration/test_event_streams.py``), the queue bounds
(``tests/security/test_sse_limits.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
import structlog.testing
from sse_starlette import ServerSentEvent

from scaleodm.common.contracts import events
from scaleodm.gateway import eventstream
from scaleodm.gateway.eventstream import Listener, LiveEvent

TASK = "5b0e4c3e-8d9a-4f6b-9c1d-2e3f4a5b6c7d"


class FakeLog:
    """The event log: seq allocated densely on record, like TaskStore."""

    def __init__(self, attempt: int = 1) -> None:
        self.task: dict[str, Any] | None = {"_id": TASK, "attempt": attempt, "state": "running"}
        self.docs: list[dict[str, Any]] = []

    def record(self, ev: events.TaskEvent) -> events.TaskEvent:
        seq = len(self.docs) + 1
        self.docs.append({
            "_id": ev.event_id, "task_id": ev.task_id, "attempt": ev.attempt, "kind": ev.kind,
            "seq": seq, "body": ev.model_dump(mode="json", exclude={"seq"}),
        })
        return ev.model_copy(update={"seq": seq})

    async def get_task(self, task_id: str, *, include_removed: bool = False) -> (
        dict[str, Any] | None
    ):
        assert task_id == TASK and not include_removed
        return self.task

    async def read_events(
        self, task_id: str, after_seq: int = 0, *, through_seq: int | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        docs = [d for d in self.docs if d["seq"] > after_seq
                and (through_seq is None or d["seq"] <= through_seq)]
        return docs[:limit] if limit is not None else docs

    async def event_seq(self, event_id: str) -> int | None:
        return next((d["seq"] for d in self.docs if d["_id"] == event_id), None)


class FakeHub:
    def __init__(self, size: int = 100) -> None:
        self.listener = Listener(max_items=size)
        self.subscribed = asyncio.Event()
        self.left = False

    @contextlib.asynccontextmanager
    async def listen(self, subject: str) -> AsyncIterator[Listener]:
        assert subject == f"events.task.{TASK}.>"
        self.subscribed.set()
        try:
            yield self.listener
        finally:
            self.left = True

    def publish(self, ev: events.TaskEvent) -> None:
        self.listener.offer(LiveEvent(ev), len(ev.model_dump_json()))


async def _collect(gen: AsyncIterator[ServerSentEvent], out: list[ServerSentEvent]) -> None:
    async for msg in gen:
        out.append(msg)


def _ids(msgs: list[ServerSentEvent]) -> list[int]:
    return [int(m.id) for m in msgs if m.id is not None]


def _start(log: FakeLog, hub: FakeHub, cursor: int = 0, resync_s: float = 5.0
           ) -> tuple[asyncio.Task[None], list[ServerSentEvent]]:
    out: list[ServerSentEvent] = []
    gen = eventstream.follow_task(log, hub, TASK, cursor, resync_s=resync_s)
    return asyncio.create_task(_collect(gen, out)), out


async def _until(cond: Any, timeout_s: float = 2.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.005)


async def test_seam_out_of_order_duplicates_and_missing_seq() -> None:
    log, hub = FakeLog(), FakeHub()
    published = [log.record(events.new(kind, TASK, 1))
                 for kind in (events.TaskQueued, events.TaskRunning)]
    for ev in published:  # published after the subscription, before the replay read them
        hub.publish(ev)
    task, out = _start(log, hub)
    await _until(lambda: _ids(out) == [1, 2])

    p3 = log.record(events.new(events.TaskProgressed, TASK, 1, key="a", progress=10))
    p4 = log.record(events.new(events.TaskProgressed, TASK, 1, key="b", progress=20))
    hub.publish(p4)  # the second writer's publish overtakes the first's
    hub.publish(p3)
    hub.publish(p4)
    o5 = log.record(events.new(events.TaskOutput, TASK, 1, line_start=0, lines=["line"]))
    hub.publish(o5.model_copy(update={"seq": None}))  # seq-less: found by event id
    hub.publish(events.new(
        events.TaskOutput, TASK, 1, line_start=1, lines=["never recorded"]
    ))  # seq-less, not in the log: skip
    hub.publish(log.record(events.new(events.TaskCompleted, TASK, 1)))
    await asyncio.wait_for(task, 2)

    assert _ids(out) == [1, 2, 3, 4, 5, 6]
    assert out[0].retry == eventstream.RETRY_MS and out[0].data is None
    for msg in out[1:]:
        body = json.loads(msg.data)
        assert (body["seq"], body["kind"]) == (int(msg.id or 0), msg.event)
    assert hub.left


async def test_live_frames_equal_replayed_frames() -> None:
    log, hub = FakeLog(), FakeHub()
    evs = [events.new(events.TaskQueued, TASK, 1, options=[{"name": "dsm", "value": True}]),
           events.new(events.TaskRunning, TASK, 1),
           events.new(events.TaskProgressed, TASK, 1, key="x", progress=37.5),
           events.new(events.TaskFailed, TASK, 1, error_message="Not enough memory")]
    task, live = _start(log, hub)
    await hub.subscribed.wait()
    await asyncio.sleep(0.01)
    for ev in evs:
        hub.publish(log.record(ev))
    await asyncio.wait_for(task, 2)
    log.task = {"_id": TASK, "attempt": 1, "state": "failed"}
    replayed = [m async for m in eventstream.replay_task(log, TASK, 0, 4)]
    assert [(m.id, m.event, m.data) for m in live] == [(m.id, m.event, m.data) for m in replayed]


async def test_recorded_but_unpublished_event_is_read_when_idle() -> None:
    log, hub = FakeLog(), FakeHub()
    log.record(events.new(events.TaskQueued, TASK, 1))
    task, out = _start(log, hub, resync_s=0.05)
    await _until(lambda: _ids(out) == [1])
    # its publish was lost: the outbox will resend it later
    log.record(events.new(events.TaskRunning, TASK, 1))
    await _until(lambda: _ids(out) == [1, 2])
    log.record(events.new(events.TaskCanceled, TASK, 1))
    await asyncio.wait_for(task, 2)
    assert _ids(out) == [1, 2, 3]


async def test_cursor_in_an_older_attempt_runs_to_the_current_terminal() -> None:
    log = FakeLog(attempt=2)
    for ev in (events.new(events.TaskQueued, TASK, 1), events.new(events.TaskRunning, TASK, 1),
               events.new(events.TaskFailed, TASK, 1, error_message="x"),
               events.new(events.TaskQueued, TASK, 2), events.new(events.TaskRunning, TASK, 2)):
        log.record(ev)
    hub = FakeHub()
    task, out = _start(log, hub, cursor=1)
    await _until(lambda: _ids(out) == [2, 3, 4, 5])  # attempt 1's terminal event passed through
    assert not task.done()
    hub.publish(log.record(events.new(events.TaskCompleted, TASK, 2)))
    hub.publish(log.record(events.new(events.TaskOutput, TASK, 2, line_start=0, lines=["late"])))
    await asyncio.wait_for(task, 2)
    assert _ids(out) == [2, 3, 4, 5, 6]


async def test_removed_ends_the_stream_even_when_the_log_is_gone() -> None:
    log, hub = FakeLog(), FakeHub()
    log.record(events.new(events.TaskQueued, TASK, 1))
    task, out = _start(log, hub)
    await _until(lambda: _ids(out) == [1])
    gone = log.record(events.new(events.TaskRemoved, TASK, 1)).model_copy(update={"seq": 3})
    log.docs.clear()  # deleted before the stream could read it
    hub.publish(gone)
    await asyncio.wait_for(task, 2)
    assert _ids(out) == [1, 3] and out[-1].event == "removed"


async def test_slow_client_is_disconnected_on_overflow() -> None:
    log, hub = FakeLog(), FakeHub(size=3)
    log.record(events.new(events.TaskQueued, TASK, 1))
    out: list[ServerSentEvent] = []
    gen = eventstream.follow_task(log, hub, TASK, 0, resync_s=5)
    out.append(await anext(gen))  # preamble
    out.append(await anext(gen))  # seq 1; the client now stops reading
    for i in range(5):
        hub.publish(log.record(events.new(events.TaskProgressed, TASK, 1, key=i, progress=i + 1)))
    assert hub.listener.overflowed
    rest = [m async for m in gen]
    assert rest == [] and hub.left


async def test_idle_stream_ends_when_the_task_is_over_past_the_cursor() -> None:
    log, hub = FakeLog(), FakeHub()
    for ev in (events.new(events.TaskQueued, TASK, 1), events.new(events.TaskRunning, TASK, 1)):
        log.record(ev)
    task, out = _start(log, hub, cursor=9, resync_s=0.05)  # a cursor past the end of the log
    await asyncio.sleep(0.15)
    assert not task.done()
    log.record(events.new(events.TaskCompleted, TASK, 1))  # seq 3 <= cursor: never sent
    log.task = {"_id": TASK, "attempt": 1, "state": "completed"}
    await asyncio.wait_for(task, 2)
    assert _ids(out) == []


async def test_shutdown_ends_the_stream_cleanly() -> None:
    log, hub = FakeLog(), FakeHub()
    log.record(events.new(events.TaskQueued, TASK, 1))
    stop = anyio.Event()
    out: list[ServerSentEvent] = []
    gen = eventstream.follow_task(log, hub, TASK, 0, resync_s=60, stop=stop)
    task = asyncio.create_task(_collect(gen, out))
    await _until(lambda: _ids(out) == [1])
    stop.set()
    await asyncio.wait_for(task, 2)  # returned, not cancelled: the response can end properly
    assert hub.left


async def test_wait_for_result_timeout_and_stop() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    assert await eventstream.wait_for(queue.get(), 0.01, None) is None
    queue.put_nowait(7)
    assert await eventstream.wait_for(queue.get(), 1, anyio.Event()) == 7
    stop = anyio.Event()
    stop.set()
    with pytest.raises(eventstream.Stopped):
        await eventstream.wait_for(queue.get(), 1, stop)
    queue.put_nowait(8)
    assert queue.get_nowait() == 8  # nothing was taken by the cancelled gets


async def test_task_removed_before_the_stream_starts_ends_it() -> None:
    log, hub = FakeLog(), FakeHub()
    log.task = None
    task, out = _start(log, hub)
    await asyncio.wait_for(task, 2)
    assert out == []


# -- all tasks: the early stop at an overflow --------------------------------------------------


class FakeSub:
    """A JetStream subscription whose unsubscribe takes until ``release`` is set (and then
    raises ``fails``, if set)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0
        self.done = False
        self.fails: Exception | None = None

    async def unsubscribe(self) -> None:
        self.calls += 1
        await self.release.wait()
        self.done = True
        if self.fails is not None:
            raise self.fails


class FakeNats:
    """``nc.jetstream().subscribe(..., cb=...)``: keeps the callback, returns a FakeSub."""

    is_closed = False

    def __init__(self) -> None:
        self.sub = FakeSub()
        self.cb: Any = None

    def jetstream(self) -> FakeNats:
        return self

    async def subscribe(self, subject: str, **kw: Any) -> FakeSub:
        self.cb = kw["cb"]
        return self.sub


def _bus_msg(stream_seq: int) -> Any:
    data = events.new(
        events.TaskProgressed, TASK, 1, key="x", progress=stream_seq
    ).model_dump_json().encode()
    return SimpleNamespace(data=data, subject=f"events.task.{TASK}.progressed",
                           metadata=SimpleNamespace(sequence=SimpleNamespace(stream=stream_seq)))


async def _overflowed_all_tasks_stream() -> tuple[FakeNats, AsyncIterator[ServerSentEvent]]:
    """An all-tasks stream with room for 2 messages, sent 3: the consumer is being stopped."""
    nc = FakeNats()
    size = len(_bus_msg(1).data)
    gen = eventstream.follow_all(nc, 0, ["events.task.>"],  # type: ignore[arg-type]
                                 max_pending_bytes=2 * size)
    assert (await anext(gen)).retry == eventstream.RETRY_MS
    for seq in (1, 2, 3, 4):
        await nc.cb(_bus_msg(seq))
    await _until(lambda: nc.sub.calls == 1)  # at once, from the callback, and only once
    return nc, gen


async def _yield_a_while() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_all_tasks_stream_ends_after_its_early_stop_is_done() -> None:
    nc, gen = await _overflowed_all_tasks_stream()
    assert [(await anext(gen)).id for _ in range(2)] == ["1", "2"]  # queued before: sent
    ending = asyncio.ensure_future(anext(gen))
    await _yield_a_while()
    assert not ending.done()  # the stream's end waits for the stop
    nc.sub.release.set()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(ending, 2)
    assert nc.sub.done and nc.sub.calls == 1  # not unsubscribed a second time


async def test_a_cancelled_all_tasks_stream_still_waits_for_its_early_stop() -> None:
    nc, gen = await _overflowed_all_tasks_stream()
    scope = anyio.CancelScope()  # the response's, as sse-starlette's task group cancels it
    reading = asyncio.Event()

    async def read() -> None:
        with scope:
            await anext(gen)
            reading.set()
            async for _ in gen:  # cancelled on the way (waiting for a message, or at the end)
                pass

    task = asyncio.ensure_future(read())
    await reading.wait()
    scope.cancel()  # the response is torn down while the stop is under way
    await _yield_a_while()
    assert not task.done() and not nc.sub.done  # the shielded end waits for the stop
    nc.sub.release.set()
    await asyncio.wait_for(task, 2)
    assert nc.sub.done and nc.sub.calls == 1


async def test_a_failed_early_stop_is_logged_and_the_stream_still_ends() -> None:
    nc, gen = await _overflowed_all_tasks_stream()
    nc.sub.fails = RuntimeError("connection lost")
    nc.sub.release.set()
    with structlog.testing.capture_logs() as logs:
        assert [m.id async for m in gen] == ["1", "2"]
    failed = [e for e in logs if e["event"] == "stopping an event consumer failed"]
    assert [e["error"] for e in failed] == ["RuntimeError('connection lost')"]
    assert nc.sub.calls == 1


def test_status_filter_subjects() -> None:
    assert eventstream.status_filter([]) == ["events.task.>"]
    assert eventstream.status_filter([40]) == ["events.task.*.completed"]
    assert eventstream.status_filter([50, 30, 30]) == [
        "events.task.*.canceled", "events.task.*.failed"
    ]
    with pytest.raises(KeyError):
        eventstream.status_filter([60])
