"""Task events as Server-Sent Events: MongoDB replay joined to live bus events without a gap.

Two streams (HTTP routes in ``routes/events.py``):

**One task** (``GET /task/{uuid}/events``). The SSE ``id`` is the event's per-task ``seq``, which
the event log allocates densely (1, 2, 3, ... with no holes: a writer inserts ``last + 1``). The
stream therefore sends exactly ``cursor + 1, cursor + 2, ...``:

1. subscribe (core NATS, ``events.task.<uuid>.>``) through the :class:`EventHub`, which waits
   until the server has registered the interest, so whatever is published from now on is seen;
2. replay the log after the cursor from MongoDB (paged);
3. take live events from the subscription's bounded queue: ``seq <= last sent`` is a duplicate
   (skipped); ``seq == last + 1`` is sent; a larger ``seq`` means events were published out of
   order (two writers) or lost (NATS reconnect, a publish left to the outbox): the missing ones
   are read from the log, then the live event is sent (or skipped, if the log had it);
4. an idle stream re-reads the log every heartbeat interval, which covers lost publishes, and
   ends if the task is over (or gone) without its terminal event after the cursor;
5. the stream ends after the first terminal event (completed/failed/canceled) of the attempt that
   was current when it opened, or after a ``removed`` event. A restart is a new attempt, hence a
   new stream; a stream opened on an older attempt's position passes through that attempt's
   terminal event and ends with the current one.

Bus events normally carry ``seq`` (emitters publish after recording). One without ``seq`` is
looked up by its event id; if the log does not have it (yet) it is skipped: the log is the truth,
and a recorded event is read from it at the next gap or idle re-read.

A task that is over (terminal state) when the stream opens is replayed from the log up to that
terminal event and the stream ends, without a subscription.

**All tasks** (``GET /events``). There is no total order across tasks in MongoDB, so this stream
reads the ``EVENTS`` JetStream stream: the SSE ``id`` is the JetStream stream sequence (unique,
increasing, stable for the stream's lifetime, ``max_age`` 7 days). One ordered consumer per client
replays from ``cursor + 1`` and continues live, in order, gap-free by construction (JetStream
de-duplicates re-publishes by ``Nats-Msg-Id``, so an event appears once). Without a cursor the
stream is live only. A status filter becomes the consumer's subject filter; a tenant's filter
(``keep``: whose task an event is, asked per event) skips the others' events, which a resuming
client then passes again and skips again (ids advance only with what is sent).

Memory: between the bus and each client sits one queue (``ClientQueue``), bounded in count
(``sse_queue_size``, per-task streams) and in bytes of event data (``sse_max_pending_bytes``,
both streams). A client further behind than that is disconnected and resumes with
``Last-Event-ID``: nothing after the overflow is ever sent, so it misses nothing (an all-tasks
stream first sends what it had queued before the overflow, so that each connection of a slow
client makes progress). All-tasks streams take JetStream messages into that queue as they
arrive (a subscription callback), so the NATS client holds nothing for them; at an overflow the
consumer is stopped at once (the stream's end waits for that stop, shielded, and logs a
failure). JetStream pushes a replay (``?since=``) faster than a client reads, so a replay
advances by about ``sse_max_pending_bytes`` per connection: the bound trades replay speed for
memory. sse-starlette writes each message with ``send_timeout`` (``sse_send_timeout_s``), and
uvicorn's transport takes a write only below its high-water mark (64 KiB), so a client that
stops reading costs at most its queue, that buffer and one message, and is disconnected after
the send timeout; ``serving.py`` aborts the connection if the client still takes nothing
(socket buffers in the kernel aside).

Open streams are counted (``StreamSlots``): at most ``sse_max_streams`` per process and
``sse_max_streams_per_client`` per client; beyond, the route answers a NodeODM-style error
before streaming.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import anyio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import ValidationError
from sse_starlette import ServerSentEvent

from scaleodm.common import metrics
from scaleodm.common.contracts import events, streams
from scaleodm.common.domain.status import TERMINAL_STATES, NodeOdmStatus, TaskState
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import GatewaySettings

log = get_logger(__name__)
T = TypeVar("T")

RETRY_MS = 3000  # EventSource reconnect delay, sent once per stream
REPLAY_PAGE = 200  # events per MongoDB read while replaying
CLOSED_CHECK_S = 5.0  # an idle all-tasks stream checks this often whether NATS is closed

# ``?status=N``: the events that move a task to NodeODM status N. Events that do not change the
# status (inputs, progress, output, removed) match no status filter.
STATUS_KINDS: dict[int, str] = {
    NodeOdmStatus.QUEUED: "queued",
    NodeOdmStatus.RUNNING: "running",
    NodeOdmStatus.FAILED: "failed",
    NodeOdmStatus.COMPLETED: "completed",
    NodeOdmStatus.CANCELED: "canceled",
}


def task_subject(task_id: str) -> str:
    return f"events.task.{task_id}.>"


def preamble() -> ServerSentEvent:
    """First message of every stream: the reconnect delay (no event is dispatched)."""
    return ServerSentEvent(comment="stream open", retry=RETRY_MS)


def heartbeat() -> ServerSentEvent:
    return ServerSentEvent(comment="heartbeat")


def _canonical(raw: dict[str, Any]) -> tuple[events.TaskEvent | None, str]:
    """The event model (if it validates) and its JSON text, identical for bus and log."""
    try:
        ev = events.EVENT_ADAPTER.validate_python(raw)
    except ValidationError:
        log.warning("event does not validate; passed on as stored", event_id=raw.get("event_id"))
        return None, json.dumps(raw, separators=(",", ":"))
    return ev, ev.model_dump_json()


class Stopped(Exception):
    """The server is shutting down: end the stream cleanly (the client resumes elsewhere)."""


async def wait_for(
    aw: Coroutine[Any, Any, T], timeout_s: float | None, stop: anyio.Event | None
) -> T | None:
    """``aw``'s result, None after ``timeout_s``; :class:`Stopped` if ``stop`` is set first.

    ``aw`` is cancelled on timeout or stop: with a timeout it must be cancellation-safe (as
    ``asyncio.Queue.get``). At a stop whatever is lost was not sent, and ids advance only when
    sent, so a client resuming with its last id misses nothing.
    """
    task = asyncio.ensure_future(aw)
    waiters: set[asyncio.Future[Any]] = {task}
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if stopper is not None:
        waiters.add(stopper)
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            if not waiter.done():
                waiter.cancel()
    if task.done():
        if task.cancelled():  # the connection closed under it
            raise Stopped
        return task.result()
    if stopper is not None and stopper in done:
        raise Stopped
    return None


def _stopped(stop: anyio.Event | None) -> bool:
    return stop is not None and stop.is_set()


# -- live events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveEvent:
    """An event received on the bus, decoded once and shared by every listener."""

    event: events.TaskEvent

    @property
    def seq(self) -> int | None:
        return self.event.seq

    def with_seq(self, seq: int) -> events.TaskEvent:
        return self.event if self.event.seq == seq else self.event.model_copy(update={"seq": seq})


class ClientQueue(Generic[T]):
    """What one client has not been sent yet, bounded in count (``max_items``; 0: no bound) and
    in bytes of event data (``max_bytes``; None: no bound). Both streams use it: the per-task
    ones for live events (:data:`Listener`), the all-tasks one for JetStream messages.

    Passing a bound latches ``overflowed``: nothing is queued from then on, and the stream ends
    (the client resumes from its last id, so it misses nothing). Hashed by identity: a hub
    holds a set of them.
    """

    def __init__(self, *, max_items: int = 0, max_bytes: int | None = None) -> None:
        self.queue: asyncio.Queue[tuple[T, int]] = asyncio.Queue(maxsize=max_items)
        self.max_bytes = max_bytes
        self.pending_bytes = 0
        self.overflowed = False

    def offer(self, item: T, size: int) -> bool:
        """Queue ``item`` of ``size`` bytes; False (and nothing queued from now on) once a
        bound is passed."""
        if self.overflowed:
            return False
        if self.max_bytes is not None and self.pending_bytes + size > self.max_bytes:
            self.overflowed = True
            return False
        try:
            self.queue.put_nowait((item, size))
        except asyncio.QueueFull:
            self.overflowed = True
            return False
        self.pending_bytes += size
        return True

    def empty(self) -> bool:
        return self.queue.empty()

    async def get(self, timeout_s: float, stop: anyio.Event | None = None) -> T | None:
        """The next item, None after ``timeout_s`` without one; :class:`Stopped` when ``stop``
        is set first."""
        got = await wait_for(self.queue.get(), timeout_s, stop)  # Queue.get: cancellation-safe
        if got is None:
            return None
        item, size = got
        self.pending_bytes -= size
        return item


Listener = ClientQueue[LiveEvent]
"""One per-task client's queue of live events (``EventHub.listen``)."""


class TooManyStreamsError(Exception):
    """An event stream refused by ``StreamSlots``; ``str(exc)`` is the client-facing text."""


class StreamSlots:
    """This process's open event streams: at most ``max_streams``, ``max_per_client`` each."""

    def __init__(self, max_streams: int, max_per_client: int) -> None:
        self.max_streams = max_streams
        self.max_per_client = max_per_client
        self.open = 0
        self._per_client: collections.Counter[str] = collections.Counter()

    def take(self, client: str) -> Callable[[], None]:
        """Count one more stream of ``client``; returns its (idempotent) release."""
        if self.open >= self.max_streams:
            raise TooManyStreamsError(
                f"Too many event streams: at most {self.max_streams} on this node, please retry "
                "later"
            )
        if self._per_client[client] >= self.max_per_client:
            raise TooManyStreamsError(
                f"Too many event streams: at most {self.max_per_client} per client"
            )
        self.open += 1
        metrics.SSE_CLIENTS.inc()
        self._per_client[client] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.open -= 1
            metrics.SSE_CLIENTS.dec()
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]

        return release


@dataclass
class _Topic:
    listeners: set[Listener] = field(default_factory=set)
    sub: Subscription | None = None


class EventHub:
    """Fans core-NATS event subjects out to per-client queues: one subscription per subject.

    ``listen(subject)`` returns once the NATS server has registered the subscription (a flush
    after SUB), so an event published afterwards reaches the listener. A subject's subscription
    is dropped when its last listener leaves.
    """

    def __init__(self, nc: NatsClient, queue_size: int, *, max_pending_bytes: int | None = None,
                 streams: StreamSlots | None = None) -> None:
        self.nc = nc
        self.queue_size = queue_size
        self.max_pending_bytes = max_pending_bytes
        # The process's open streams (both routes): the hub is the one per-process stream object.
        self.streams = streams or StreamSlots(1 << 30, 1 << 30)
        self._topics: dict[str, _Topic] = {}
        self._lock = asyncio.Lock()
        self._unsubscribing: set[asyncio.Task[None]] = set()

    @classmethod
    def for_settings(cls, nc: NatsClient, settings: GatewaySettings) -> EventHub:
        """A hub with the queue, byte and stream bounds of ``settings``."""
        return cls(nc, settings.sse_queue_size, max_pending_bytes=settings.sse_max_pending_bytes,
                   streams=StreamSlots(settings.sse_max_streams,
                                       settings.sse_max_streams_per_client))

    @contextlib.asynccontextmanager
    async def listen(self, subject: str) -> AsyncIterator[Listener]:
        listener = Listener(max_items=self.queue_size, max_bytes=self.max_pending_bytes)
        async with self._lock:
            topic = self._topics.get(subject)
            if topic is None:
                topic = _Topic()
                topic.sub = await self.nc.subscribe(subject, cb=self._deliver_to(topic))
                self._topics[subject] = topic
            topic.listeners.add(listener)
        try:
            await self.nc.flush()  # SUB before PING: the PONG means the server has it
            yield listener
        finally:
            self._leave(subject, topic, listener)  # synchronous: safe inside a cancelled scope

    def _leave(self, subject: str, topic: _Topic, listener: Listener) -> None:
        topic.listeners.discard(listener)
        if topic.listeners or self._topics.get(subject) is not topic:
            return
        del self._topics[subject]
        if topic.sub is not None and not self.nc.is_closed:
            task = asyncio.get_running_loop().create_task(_unsubscribe(topic.sub))
            self._unsubscribing.add(task)  # keep a reference until it is done
            task.add_done_callback(self._unsubscribing.discard)

    @staticmethod
    def _deliver_to(topic: _Topic) -> Callable[[Msg], Awaitable[None]]:
        async def deliver(msg: Msg) -> None:
            try:
                ev = events.EVENT_ADAPTER.validate_json(msg.data)
            except ValidationError:
                log.warning("undecodable event on the bus", subject=msg.subject)
                return
            item = LiveEvent(ev)
            for listener in tuple(topic.listeners):
                listener.offer(item, len(msg.data))

        return deliver

    async def close(self) -> None:
        async with self._lock:
            topics, self._topics = list(self._topics.values()), {}
        for topic in topics:
            if topic.sub is not None and not self.nc.is_closed:
                await _unsubscribe(topic.sub)


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as exc:  # the connection is closing anyway
        log.debug("unsubscribe failed", error=repr(exc))


# -- one task ---------------------------------------------------------------------------------


class EventLog(Protocol):
    """What the per-task stream reads from the task store."""

    async def get_task(self, task_id: str, *, include_removed: bool = False) -> (
        dict[str, Any] | None
    ): ...

    async def read_events(
        self, task_id: str, after_seq: int = 0, *, through_seq: int | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]: ...

    async def event_seq(self, event_id: str) -> int | None: ...


class Hub(Protocol):
    def listen(self, subject: str) -> contextlib.AbstractAsyncContextManager[Listener]: ...


@dataclass(frozen=True)
class _Frame:
    seq: int
    kind: str
    attempt: int
    sse: ServerSentEvent


def _log_frame(doc: dict[str, Any]) -> _Frame:
    seq = int(doc["seq"])
    _, data = _canonical({**doc["body"], "seq": seq})
    return _Frame(seq, str(doc["kind"]), int(doc["attempt"]),
                  ServerSentEvent(data, event=str(doc["kind"]), id=str(seq)))


def _live_frame(item: LiveEvent, seq: int) -> _Frame:
    ev = item.with_seq(seq)
    return _Frame(seq, ev.kind, ev.attempt,
                  ServerSentEvent(ev.model_dump_json(), event=ev.kind, id=str(seq)))


async def _log_after(
    store: EventLog, task_id: str, after: int, through: int | None = None
) -> AsyncIterator[_Frame]:
    """The log after ``after`` (through ``through``), paged."""
    while True:
        docs = await store.read_events(task_id, after, through_seq=through, limit=REPLAY_PAGE)
        for doc in docs:
            frame = _log_frame(doc)
            after = frame.seq
            yield frame
        if len(docs) < REPLAY_PAGE:
            return


async def replay_task(
    store: EventLog, task_id: str, cursor: int, through: int | None,
    stop: anyio.Event | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """A finished task: its log after ``cursor`` through its terminal event, then the end."""
    yield preamble()
    async for frame in _log_after(store, task_id, cursor, through):
        if _stopped(stop):
            return
        yield frame.sse


async def follow_task(
    store: EventLog, hub: Hub, task_id: str, cursor: int, *, resync_s: float,
    stop: anyio.Event | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """A task not over yet: replay after ``cursor``, then live, until its terminal event.

    ``stop`` (set at server shutdown) ends the stream cleanly at the next event or wait.
    """
    try:
        async with hub.listen(task_subject(task_id)) as listener:
            doc = await store.get_task(task_id)
            if doc is None:
                return  # removed in the meantime
            end_attempt = int(doc["attempt"])
            last = cursor

            def ends(frame: _Frame) -> bool:
                return frame.kind == "removed" or (
                    frame.kind in events.TERMINAL_KINDS and frame.attempt == end_attempt
                )

            yield preamble()
            async for frame in _log_after(store, task_id, last):
                if _stopped(stop):
                    return
                yield frame.sse
                last = frame.seq
                if ends(frame):
                    return
            while True:
                if listener.overflowed:
                    log.info("event stream client too slow; disconnected",
                             task_id=task_id, seq=last)
                    return
                item = await listener.get(resync_s, stop)
                if listener.overflowed:
                    continue
                seq: int | None = None
                if item is not None:
                    seq = item.seq if item.seq is not None else await store.event_seq(
                        item.event.event_id
                    )
                    if seq is None or seq <= last:
                        continue  # not recorded (the log has it if it ever is), or a duplicate
                    if seq == last + 1:
                        frame = _live_frame(item, seq)
                        yield frame.sse
                        last = seq
                        if ends(frame):
                            return
                        continue
                over = False
                if item is None:
                    # Idle: is the task still on? Read before the log: a terminal state is recorded
                    # after its event, so the log read below then has everything up to the end.
                    now = await store.get_task(task_id)
                    over = now is None or int(now["attempt"]) != end_attempt or (
                        TaskState(now["state"]) in TERMINAL_STATES
                    )
                # An idle tick, or a gap before ``seq``: the log has what is missing.
                async for frame in _log_after(store, task_id, last):
                    yield frame.sse
                    last = frame.seq
                    if ends(frame):
                        return
                if over:
                    return  # ended without its terminal event after the cursor (a cursor past it)
                if item is not None and seq is not None and seq > last:
                    # Not in the log although published with a seq: the log was deleted (removal).
                    frame = _live_frame(item, seq)
                    yield frame.sse
                    last = seq
                    if ends(frame):
                        return
    except Stopped:
        return


# -- all tasks --------------------------------------------------------------------------------


def status_filter(statuses: list[int]) -> list[str]:
    """Subjects of the events that move a task to one of ``statuses`` (all events if none)."""
    if not statuses:
        return [streams.EVENT_SUBJECTS]
    kinds = sorted({STATUS_KINDS[s] for s in statuses})
    return [streams.event_subject("*", kind) for kind in kinds]


async def follow_all(
    nc: NatsClient, cursor: int | None, subjects: list[str], *, stop: anyio.Event | None = None,
    max_pending_bytes: int | None = None, keep: Callable[[str], Awaitable[bool]] | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """Every task's events from the EVENTS stream after stream sequence ``cursor`` (None: live);
    with ``keep``, only the events of the tasks it says yes to (asked with the task id).

    Data is passed on as stored in the stream (an event published without ``seq`` keeps
    ``"seq": null`` here). ``stop`` (set at server shutdown) ends the stream cleanly. More than
    ``max_pending_bytes`` of data not sent yet ends it too: nothing more is queued, what was
    queued before is sent, then the stream ends (the client resumes from its last id).
    """
    config = ConsumerConfig()
    if len(subjects) > 1:
        config.filter_subjects = subjects
    if cursor is None:
        policy = DeliverPolicy.NEW
    else:
        policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = cursor + 1
    backlog: ClientQueue[Msg] = ClientQueue(max_bytes=max_pending_bytes)
    subscribed: list[Subscription] = []  # the subscription, once js.subscribe returned
    stopping: list[asyncio.Task[None]] = []  # the consumer's early stop, at most one
    ended = False  # the stream's own stop runs: no early one from now on

    async def take(msg: Msg) -> None:
        if backlog.offer(msg, len(msg.data)) or stopping or not subscribed or ended:
            return
        # Too far behind: stop the consumer now rather than when the stream next runs (it may
        # be stuck in a send for up to the send timeout while JetStream goes on pushing). The
        # stream's end awaits this stop and logs how it failed, if it did.
        stopping.append(asyncio.get_running_loop().create_task(subscribed[0].unsubscribe()))

    js = nc.jetstream()
    sub = await js.subscribe(
        subjects[0], stream=streams.EVENTS_STREAM, ordered_consumer=True, config=config,
        deliver_policy=policy, idle_heartbeat=5.0, cb=take,
        # The callback empties the NATS client's queue as messages arrive; these limits sit
        # far above what it ever holds so that nothing is dropped there (a drop would be a
        # silent gap). The bound is the backlog's.
        pending_msgs_limit=1 << 20, pending_bytes_limit=64 << 20,
    )
    subscribed.append(sub)
    try:
        yield preamble()
        while True:
            if backlog.overflowed and backlog.empty():  # what came before it is sent
                log.info("event stream client too slow; disconnected")
                return
            try:
                msg = await backlog.get(CLOSED_CHECK_S, stop)
            except Stopped:
                return
            if msg is None:
                if nc.is_closed:  # for good (a reconnect keeps the subscription)
                    return
                continue
            try:
                raw = json.loads(msg.data)
            except ValueError:
                log.warning("undecodable event on the bus", subject=msg.subject)
                continue
            ev, data = _canonical(raw)
            if keep is not None and not await keep(_task_of(msg.subject, raw)):
                continue
            kind = ev.kind if ev is not None else str(raw.get("kind", "message"))
            yield ServerSentEvent(data, event=kind, id=str(msg.metadata.sequence.stream))
    finally:
        ended = True
        with anyio.CancelScope(shield=True):
            if stopping:  # stopped early, at an overflow: wait until it is done
                await _settled(stopping[0])
            elif not nc.is_closed:
                await _unsubscribe(sub)


def _task_of(subject: str, raw: Any) -> str:
    """The task an EVENTS message is about: its body's ``task_id`` (what the client reads),
    else its subject's (``events.task.<id>.<kind>``)."""
    task_id = raw.get("task_id") if isinstance(raw, dict) else None
    if isinstance(task_id, str):
        return task_id
    parts = subject.split(".")
    return parts[2] if len(parts) == 4 else ""


async def _settled(task: asyncio.Task[None]) -> None:
    """Wait for the early stop ``task`` to end (the caller shields the wait); log a failure
    (the task's exception is observed here, never left to the loop's "never retrieved")."""
    await asyncio.wait({task})
    if task.cancelled():
        log.warning("stopping an event consumer failed", error="cancelled")
    elif (exc := task.exception()) is not None:
        log.warning("stopping an event consumer failed", error=repr(exc))
