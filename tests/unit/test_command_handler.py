"""The scheduler's ``CommandHandler`` against in-memory fakes, and its subscriber on FastStream's
``TestNatsBroker``: no servers, milliseconds.

Covered:
- create/restart start the attempt's run once, also when the command is redelivered (the
  executor's start is idempotent: the second finds the run) and only for the current attempt of a
  task still active (a stale attempt, a task already over or gone starts nothing) once that
  attempt is admitted (holds a run slot): a command for an attempt not admitted yet starts and
  stops nothing, and starts the run once the attempt is admitted;
- a malformed ``output_prefix`` fails before any run is started;
- a run whose attempt is not the task's current active one is stopped: before a start (a
  redelivered create of a task canceled, ended, restarted, removed or deleted since: the first
  delivery may have started it) and after one (a cancel, a cancel + restart, or a remove handled
  while the start was in flight); a command for an attempt the task does not have touches nothing;
- cancel and remove reach the executor; remove also deletes the task's S3 prefix and its
  documents, unless the uuid now holds a task that is not removed (a newer task: a late remove of
  the old one leaves it alone);
- an error is raised for redelivery until ``max_deliver``; at the last delivery a create/restart
  gives up with a ``failed`` event carrying the generic message (never the exception's text), a
  cancel/remove still raises and logs an ERROR naming the task;
- every command class has a branch (a class outside the union reaches ``assert_never``);
- the app's subscriber (``scheduler.app.create_app``, its resources replaced by the fakes): a
  command is handled with the delivery count JetStream reports, and a failure is NACKed with
  ``handlers.backoff_s(delivered)`` as the delay.

Left out: the executors themselves (``test_lifecycles.py``, integration tests), JetStream's own
redelivery and ``max_deliver`` (``tests/integration``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import pytest
import structlog
from faststream import TestApp
from faststream.nats import TestNatsBroker
from faststream.nats.testing import PatchedMessage

from scaleodm.common import failpoints
from scaleodm.common.contracts import commands, events, streams
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.settings import SchedulerSettings
from scaleodm.common.store.s3 import S3Url, task_prefix
from scaleodm.scheduler import app as scheduler_app
from scaleodm.scheduler import handlers
from scaleodm.scheduler.executors.base import StartOutcome

BUCKET = "scaleodm"
MAX_DELIVER = 4


# -- fakes: only what the handler calls -------------------------------------------------------


class FakeStore:
    """``handlers.TaskRecords``."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}
        self.deleted: list[str] = []

    async def get_task(
        self, task_id: str, *, include_removed: bool = False
    ) -> dict[str, Any] | None:
        doc = self.tasks.get(task_id)
        if doc is None or (doc.get("removed") and not include_removed):
            return None
        return dict(doc)

    async def delete_task(self, task_id: str) -> None:
        self.tasks.pop(task_id, None)
        self.deleted.append(task_id)


class FakeExecutor:
    """``executors.base.Executor``: runs by (task, attempt), idempotent like the real ones."""

    def __init__(self, *, failures: int = 0) -> None:
        self.runs: dict[tuple[str, int], RunSpec] = {}
        self.starts: list[tuple[str, int]] = []
        self.canceled: list[tuple[str, int]] = []
        self.removed: list[tuple[str, int]] = []
        self.failures = failures  # the next N calls raise (Kubernetes away)
        # Runs while a start is in flight: what other commands of the batch do meanwhile.
        self.during_start: Callable[[RunSpec], None] | None = None

    def _maybe_fail(self) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("executor backend at 10.0.0.7:6443 refused the connection")

    async def start(self, spec: RunSpec) -> StartOutcome:
        self._maybe_fail()
        self.starts.append((spec.task_id, spec.attempt))
        if self.during_start is not None:
            self.during_start(spec)
        if (spec.task_id, spec.attempt) in self.runs:
            return StartOutcome.EXISTS
        self.runs[(spec.task_id, spec.attempt)] = spec
        return StartOutcome.STARTED

    async def cancel(self, task_id: str, attempt: int) -> bool:
        self._maybe_fail()
        self.canceled.append((task_id, attempt))
        return (task_id, attempt) in self.runs

    async def remove(self, task_id: str, attempt: int) -> None:
        self._maybe_fail()
        self.removed.append((task_id, attempt))
        for key in [k for k in self.runs if k[0] == task_id]:
            del self.runs[key]

    async def close(self) -> None:
        pass


class FakeEmitter:
    """``handlers.EventSink``."""

    def __init__(self) -> None:
        self.emitted: list[events.TaskEvent] = []

    async def emit(self, ev: events.TaskEvent) -> object:
        self.emitted.append(ev)
        return None


class FakeS3:
    """``handlers.ObjectStore``."""

    def __init__(self) -> None:
        self.deleted: list[S3Url] = []

    async def delete_prefix(self, prefix: S3Url) -> int:
        self.deleted.append(prefix)
        return 0


class Scheduler:
    def __init__(self, executor: FakeExecutor | None = None) -> None:
        self.store, self.emitter, self.s3 = FakeStore(), FakeEmitter(), FakeS3()
        self.executor = executor or FakeExecutor()
        self.handler = handlers.CommandHandler(
            self.store,
            self.executor,
            self.emitter,
            self.s3,
            failpoints.Failpoints(""),
            bucket=BUCKET,
            max_deliver=MAX_DELIVER,
        )

    def task(self, *, attempt: int = 1, state: str = "queued", admitted: bool = True) -> str:
        """A task whose current attempt is ``attempt``, by default admitted (given a run slot:
        its run command comes with its admission)."""
        task_id = str(uuid.uuid4())
        self.store.tasks[task_id] = {"_id": task_id, "attempt": attempt, "state": state,
                                     "admitted": admitted}
        return task_id


def _spec(
    verb: Literal["create", "restart"],
    task_id: str,
    attempt: int = 1,
    *,
    output_prefix: str | None = None,
) -> commands.CreateTask | commands.RestartTask:
    cls = commands.CreateTask if verb == "create" else commands.RestartTask
    return cls(
        task_id=task_id,
        attempt=attempt,
        name="t",
        sources=[f"s3://{BUCKET}/tasks/{task_id}/inputs/"],
        output_prefix=output_prefix or f"s3://{BUCKET}/tasks/{task_id}/outputs/",
    )


# -- the handler ------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["create", "restart"])
async def test_start_runs_once_even_when_redelivered(
    verb: Literal["create", "restart"],
) -> None:
    s = Scheduler()
    task_id = s.task()
    cmd = _spec(verb, task_id)
    await s.handler.handle(cmd, delivered=1)
    await s.handler.handle(cmd, delivered=2)  # the ack was lost: JetStream delivers it again
    assert s.executor.starts == [(task_id, 1), (task_id, 1)]
    assert list(s.executor.runs) == [(task_id, 1)]
    assert s.emitter.emitted == []


Stop = Literal["cancel", "remove", None]


@pytest.mark.parametrize(
    ("doc", "attempt", "stop"),
    [
        # admitted: the attempt the task has holds a slot; what stops the run is the other reason
        pytest.param({"attempt": 2, "state": "queued", "admitted": True}, 1, "cancel",
                     id="stale-attempt"),
        pytest.param({"attempt": 1, "state": "canceled", "admitted": True}, 1, "cancel",
                     id="already-canceled"),
        pytest.param({"attempt": 1, "state": "completed", "admitted": True}, 1, "cancel",
                     id="already-completed"),
        pytest.param({"attempt": 1, "state": "canceled", "admitted": True, "removed": True}, 1,
                     "remove", id="removed"),
        pytest.param(None, 1, "remove", id="task-gone"),
        pytest.param({"attempt": 1, "state": "queued", "admitted": True}, 2, None,
                     id="attempt-not-there-yet"),
    ],
)
@pytest.mark.parametrize("first_delivery_started_it", [False, True])
async def test_start_skipped_and_run_stopped_when_not_current(
    doc: dict[str, Any] | None, attempt: int, stop: Stop, first_delivery_started_it: bool
) -> None:
    """A (redelivered) create of an attempt that is not the current active one starts nothing
    and stops the run an earlier delivery may have started."""
    s = Scheduler()
    task_id = str(uuid.uuid4())
    if doc is not None:
        s.store.tasks[task_id] = {"_id": task_id, **doc}
    cmd = _spec("create" if attempt == 1 else "restart", task_id, attempt)
    if first_delivery_started_it:
        s.executor.runs[(task_id, attempt)] = cmd
    await s.handler.handle(cmd, delivered=2 if first_delivery_started_it else 1)
    assert s.executor.starts == []
    assert s.executor.canceled == ([(task_id, attempt)] if stop == "cancel" else [])
    assert s.executor.removed == ([(task_id, attempt)] if stop == "remove" else [])
    assert s.emitter.emitted == []
    assert s.store.deleted == [] and s.s3.deleted == []  # the run only: the rest is a remove's


def _cancel(doc: dict[str, Any]) -> None:
    doc["state"] = "canceled"


def _cancel_and_restart(doc: dict[str, Any]) -> None:
    doc["state"], doc["attempt"], doc["admitted"] = "queued", doc["attempt"] + 1, False


def _remove(doc: dict[str, Any]) -> None:
    doc["state"], doc["removed"] = "canceled", True


def _fail(doc: dict[str, Any]) -> None:
    doc["state"] = "failed"


def _run(doc: dict[str, Any]) -> None:
    doc["state"] = "running"


@pytest.mark.parametrize(
    ("meanwhile", "stop"),
    [
        pytest.param(_cancel, "cancel", id="canceled"),
        pytest.param(_cancel_and_restart, "cancel", id="canceled-and-restarted"),
        pytest.param(_fail, "cancel", id="failed"),
        pytest.param(_remove, "remove", id="removed"),
        pytest.param(None, "remove", id="removed-and-deleted"),
        pytest.param(_run, None, id="still-current"),
    ],
)
async def test_a_run_overtaken_while_it_started_is_stopped(
    meanwhile: Callable[[dict[str, Any]], None] | None, stop: Stop
) -> None:
    s = Scheduler()
    task_id = s.task()

    def during_start(spec: RunSpec) -> None:
        if meanwhile is None:
            del s.store.tasks[spec.task_id]
        else:
            meanwhile(s.store.tasks[spec.task_id])

    s.executor.during_start = during_start
    await s.handler.handle(_spec("create", task_id), delivered=1)
    assert s.executor.starts == [(task_id, 1)]
    assert s.executor.canceled == ([(task_id, 1)] if stop == "cancel" else [])
    assert s.executor.removed == ([(task_id, 1)] if stop == "remove" else [])


@pytest.mark.parametrize(("verb", "attempt"), [("create", 1), ("restart", 2)])
async def test_a_command_for_an_attempt_not_admitted_starts_nothing(
    verb: Literal["create", "restart"], attempt: int
) -> None:
    """The task's current attempt, queued, but not given a run slot (a run command published
    before admission control): no run is started, none stopped, and no event; the command is
    done with (no raise: JetStream does not redeliver it). The attempt's admission starts it."""
    s = Scheduler()
    task_id = s.task(attempt=attempt, admitted=False)
    cmd = _spec(verb, task_id, attempt)
    with structlog.testing.capture_logs() as logs:
        await s.handler.handle(cmd, delivered=1)
    assert s.executor.starts == [] and s.executor.runs == {}
    assert s.executor.canceled == [] and s.executor.removed == []
    assert s.emitter.emitted == []
    assert [e["event"] for e in logs if "not admitted" in e["event"]] == [
        "attempt not admitted yet; no run started"]

    s.store.tasks[task_id]["admitted"] = True  # its admission, with the same run command
    await s.handler.handle(cmd, delivered=1)
    assert list(s.executor.runs) == [(task_id, attempt)]


async def test_malformed_output_prefix_starts_nothing() -> None:
    s = Scheduler()
    task_id = s.task()
    with pytest.raises(ValueError):
        await s.handler.handle(_spec("create", task_id, output_prefix="/tmp/x"), delivered=1)
    assert s.executor.starts == []


async def test_cancel_reaches_the_executor() -> None:
    s = Scheduler()
    task_id = s.task(state="running")
    await s.handler.handle(commands.CancelTask(task_id=task_id, attempt=1), delivered=1)
    assert s.executor.canceled == [(task_id, 1)]
    assert s.store.deleted == [] and s.s3.deleted == []


@pytest.mark.parametrize("deleted_already", [False, True], ids=["removed", "deleted-already"])
async def test_remove_deletes_the_run_the_data_and_the_task(deleted_already: bool) -> None:
    """Also when the documents are gone already (a redelivery after the deletion)."""
    s = Scheduler()
    task_id = s.task(attempt=2, state="completed")
    s.store.tasks[task_id]["removed"] = True
    s.executor.runs[(task_id, 2)] = _spec("restart", task_id, 2)
    if deleted_already:
        del s.store.tasks[task_id]
    await s.handler.handle(commands.RemoveTask(task_id=task_id, attempt=2), delivered=1)
    assert s.executor.removed == [(task_id, 2)]
    assert s.executor.runs == {}
    assert s.s3.deleted == [task_prefix(BUCKET, task_id)]
    assert s.store.deleted == [task_id]
    assert task_id not in s.store.tasks


async def test_a_late_remove_leaves_a_newer_task_under_the_uuid_alone() -> None:
    """The uuid holds a task that is not removed: the remove was for an older one."""
    s = Scheduler()
    task_id = s.task(state="running")
    s.executor.runs[(task_id, 1)] = _spec("create", task_id)
    await s.handler.handle(commands.RemoveTask(task_id=task_id, attempt=1), delivered=3)
    assert s.executor.removed == [] and list(s.executor.runs) == [(task_id, 1)]
    assert s.s3.deleted == [] and s.store.deleted == []
    assert task_id in s.store.tasks


@pytest.mark.parametrize("verb", ["create", "restart"])
async def test_errors_are_retried_then_given_up_with_a_generic_failure(
    verb: Literal["create", "restart"],
) -> None:
    s = Scheduler(FakeExecutor(failures=MAX_DELIVER))
    task_id = s.task()
    cmd = _spec(verb, task_id)
    for delivered in range(1, MAX_DELIVER):
        with pytest.raises(ConnectionError):
            await s.handler.handle(cmd, delivered)
    assert s.emitter.emitted == []
    await s.handler.handle(cmd, MAX_DELIVER)  # the last delivery: no raise, a failed event
    [failed] = s.emitter.emitted
    assert isinstance(failed, events.TaskFailed)
    assert failed == events.new(
        events.TaskFailed, task_id, 1, error_message=handlers.RUN_NOT_STARTED
    ).model_copy(update={"occurred_at": failed.occurred_at})
    assert "10.0.0.7" not in failed.error_message


@pytest.mark.parametrize(
    "cmd",
    [
        pytest.param(commands.CancelTask(task_id="t", attempt=1), id="cancel"),
        pytest.param(commands.RemoveTask(task_id="t", attempt=1), id="remove"),
    ],
)
async def test_cancel_and_remove_never_give_up_with_an_event(cmd: commands.Command) -> None:
    """... but the last failed delivery is logged at ERROR with the task: JetStream delivers the
    command no more."""
    s = Scheduler(FakeExecutor(failures=2))
    with structlog.testing.capture_logs() as logs, pytest.raises(ConnectionError):
        await s.handler.handle(cmd, MAX_DELIVER - 1)
    assert [e for e in logs if e["log_level"] == "error"] == []
    with structlog.testing.capture_logs() as logs, pytest.raises(ConnectionError):
        await s.handler.handle(cmd, MAX_DELIVER)
    assert s.emitter.emitted == []
    [given_up] = [e for e in logs if e["log_level"] == "error"]
    assert given_up["task_id"] == cmd.task_id and given_up["verb"] == cmd.verb
    assert "giving up" in given_up["event"]


class _PauseTask(commands._Command):
    """A command outside the union, as a new one looks before the handler has its branch."""

    verb: Literal["pause"] = "pause"
    attempt: int = 1


async def test_every_command_has_a_branch() -> None:
    s = Scheduler()
    with pytest.raises(AssertionError):
        await s.handler.handle(_PauseTask(task_id="t"), delivered=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("delivered", "delay_s"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (100, 60.0)],
)
def test_backoff_schedule(delivered: int, delay_s: float) -> None:
    assert handlers.backoff_s(delivered) == delay_s


# -- the app's subscriber on TestNatsBroker ----------------------------------------------------


def _js_reply(delivered: int) -> str:
    """The reply subject JetStream gives a pulled message: its metadata (``num_delivered``)."""
    return f"$JS.ACK.{streams.TASKS_STREAM}.{streams.SCHEDULER_DURABLE}.{delivered}.1.1.0.0"


@pytest.fixture
async def subscriber(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[Scheduler, Any, list[float | None]]]:
    """The scheduler app with the fakes as its resources, on the in-memory broker; NAK delays."""
    s = Scheduler()

    @contextlib.asynccontextmanager
    async def fake_resources(*_: Any) -> AsyncIterator[scheduler_app.Resources]:
        # Only the handler is used by the subscriber; the rest (connections) stays unset.
        unset = {f.name: None for f in dataclasses.fields(scheduler_app.Resources)}
        yield scheduler_app.Resources(**{**unset, "handler": s.handler})

    naks: list[float | None] = []

    async def nak(_msg: PatchedMessage, delay: float | None = None) -> None:
        naks.append(delay)

    monkeypatch.setattr(scheduler_app, "open_resources", fake_resources)
    monkeypatch.setattr(PatchedMessage, "nak", nak)
    app = scheduler_app.create_app(SchedulerSettings())
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        yield s, broker, naks


async def test_subscriber_handles_a_command(
    subscriber: tuple[Scheduler, Any, list[float | None]],
) -> None:
    s, broker, naks = subscriber
    task_id = s.task()
    cmd = _spec("create", task_id)
    await broker.publish(
        cmd, streams.command_subject("create"), stream=streams.TASKS_STREAM, reply_to=_js_reply(1)
    )
    assert list(s.executor.runs) == [(task_id, 1)]
    assert naks == []


@pytest.mark.parametrize("delivered", [1, 3])
async def test_subscriber_nacks_with_backoff(
    subscriber: tuple[Scheduler, Any, list[float | None]], delivered: int
) -> None:
    s, broker, naks = subscriber
    s.executor.failures = 1
    task_id = s.task()
    await broker.publish(
        _spec("create", task_id),
        streams.command_subject("create"),
        stream=streams.TASKS_STREAM,
        reply_to=_js_reply(delivered),
    )
    assert naks == [handlers.backoff_s(delivered)]
    assert s.executor.runs == {}
