"""Bus contracts (scaleodm.common.contracts: commands, events, streams, ids, bus).

Covered:
- JSON round-trips of every command (discriminator ``verb``) and every event (discriminator
  ``kind``) through ``COMMAND_ADAPTER`` / ``EVENT_ADAPTER``, landing on the right class;
  ``schema_version`` defaults to 1 and any other value, an unknown or missing discriminator and
  attempt 0 are rejected; messages are frozen;
- deterministic event ids ``<task>:<attempt>:<kind>[:<key>]`` from every constructor function, and
  ``idempotency_key`` of every command;
- subjects (``command_subject``, ``event_subject``, ``TERMINAL_EVENT_SUBJECTS``), the two stream
  configs and the two durables with their filters (the notifier sees terminal subjects only);
- ``is_task_id`` (NodeODM's set-uuid rules), ``canonical_task_id`` and ``run_name``;
- ``publish_command`` / ``publish_event`` against a recording stand-in broker: subject, stream,
  ``Nats-Msg-Id`` header and a payload that validates back to the same message.

Left out: a real NATS server (stream creation, deduplication within the window and consumer
behaviour are integration tests); ``ensure_streams`` / ``ensure_consumers``.
"""

from __future__ import annotations

import datetime as dt
import json
import typing
from typing import Any

import pytest
from nats.js.api import PubAck, RetentionPolicy
from pydantic import BaseModel, ValidationError

from scaleodm.common.contracts import bus, commands, events, streams
from scaleodm.common.contracts.ids import TaskId, canonical_task_id, is_task_id, run_name

TASK = "6824c890-2dc7-444d-ab9b-f0e50b88eea9"
RUN = {
    "task_id": TASK,
    "attempt": 2,
    "name": "test-task-1",
    "options": [{"name": "fast-orthophoto", "value": True}, {"name": "mesh-size", "value": 5}],
    "sources": ["s3://bucket/uploads/x/", "https://example.invalid/a.zip"],
    "output_prefix": "s3://bucket/outputs/x/2/",
    "skip_post_processing": True,
    "outputs": ["odm_orthophoto/odm_orthophoto.tif"],
    "priority": -5,
    "size_class": "medium",
}
AT = dt.datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)


AnyCommand = commands.CreateTask | commands.RestartTask | commands.CancelTask | commands.RemoveTask


def _command(verb: str) -> AnyCommand:
    match verb:
        case "create":
            return commands.CreateTask(**RUN)
        case "restart":
            return commands.RestartTask(**RUN)
        case "cancel":
            return commands.CancelTask(task_id=TaskId(TASK), attempt=2)
        case _:
            return commands.RemoveTask(task_id=TaskId(TASK), attempt=2)


COMMANDS = [
    pytest.param("create", commands.CreateTask, id="create"),
    pytest.param("restart", commands.RestartTask, id="restart"),
    pytest.param("cancel", commands.CancelTask, id="cancel"),
    pytest.param("remove", commands.RemoveTask, id="remove"),
]

# (constructor call, class, expected event_id)
EVENTS = [
    pytest.param(
        lambda: events.new(events.TaskQueued, TASK, 1), events.TaskQueued, f"{TASK}:1:queued",
        id="queued",
    ),
    pytest.param(
        lambda: events.new(
            events.TaskQueued,
            TASK,
            3,
            options=[{"name": "dsm", "value": True}],
            date_created_ms=1795323496602,
        ),
        events.TaskQueued,
        f"{TASK}:3:queued",
        id="queued-restart",
    ),
    pytest.param(
        lambda: events.new(events.TaskAdmitted, TASK, 2, size_class="large"),
        events.TaskAdmitted,
        f"{TASK}:2:admitted",
        id="admitted",
    ),
    pytest.param(
        lambda: events.new(events.TaskRunning, TASK, 1), events.TaskRunning, f"{TASK}:1:running",
        id="running",
    ),
    pytest.param(
        lambda: events.new(events.TaskInputsReady, TASK, 1, images_count=42),
        events.TaskInputsReady,
        f"{TASK}:1:inputs",
        id="inputs",
    ),
    pytest.param(
        lambda: events.new(events.TaskProgressed, TASK, 1, key="opensfm", progress=22.5),
        events.TaskProgressed,
        f"{TASK}:1:progress:opensfm",
        id="progress-str-key",
    ),
    pytest.param(
        lambda: events.new(events.TaskProgressed, TASK, 2, key=93, progress=93.0),
        events.TaskProgressed,
        f"{TASK}:2:progress:93",
        id="progress-int-key",
    ),
    pytest.param(
        lambda: events.new(
            events.TaskOutput, TASK, 1, line_start=200,
            lines=["a", "", "[INFO]    Running dataset stage"],
        ),
        events.TaskOutput,
        f"{TASK}:1:output:200",
        id="output",
    ),
    pytest.param(
        lambda: events.new(events.TaskOutput, TASK, 1, line_start=0, lines=[]),
        events.TaskOutput,
        f"{TASK}:1:output:0",
        id="output-key-zero",
    ),
    pytest.param(
        lambda: events.new(events.TaskCompleted, TASK, 4),
        events.TaskCompleted,
        f"{TASK}:4:completed",
        id="completed",
    ),
    pytest.param(
        lambda: events.new(events.TaskFailed, TASK, 1, error_message="Not enough memory"),
        events.TaskFailed,
        f"{TASK}:1:failed",
        id="failed",
    ),
    pytest.param(
        lambda: events.new(events.TaskCanceled, TASK, 1), events.TaskCanceled,
        f"{TASK}:1:canceled", id="canceled",
    ),
    pytest.param(
        lambda: events.new(events.TaskRemoved, TASK, 1), events.TaskRemoved, f"{TASK}:1:removed",
        id="removed",
    ),
    pytest.param(
        lambda: events.new(events.TaskChildChanged, TASK, 2, key=f"{TASK}:1:running",
                           child=TASK, child_kind="running", status=20),
        events.TaskChildChanged, f"{TASK}:2:child:{TASK}:1:running", id="child",
    ),
]


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("verb", "cls"), COMMANDS)
def test_command_json_round_trip(verb: str, cls: type[BaseModel]) -> None:
    cmd = _command(verb)
    wire = cmd.model_dump_json()
    assert json.loads(wire)["verb"] == verb
    assert json.loads(wire)["schema_version"] == 1

    back = commands.COMMAND_ADAPTER.validate_json(wire)

    assert type(back) is cls
    assert back == cmd
    assert commands.COMMAND_ADAPTER.dump_python(back, mode="json") == json.loads(wire)


@pytest.mark.parametrize(("verb", "cls"), COMMANDS)
def test_command_from_dict_with_only_the_discriminator(verb: str, cls: type[BaseModel]) -> None:
    payload = _command(verb).model_dump(mode="json")
    del payload["schema_version"]  # defaults to 1
    back = commands.COMMAND_ADAPTER.validate_python(payload)
    assert type(back) is cls
    assert back.schema_version == 1


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"schema_version": 2}, id="schema-version-2"),
        pytest.param({"schema_version": 0}, id="schema-version-0"),
        pytest.param({"verb": "pause"}, id="unknown-verb"),
        pytest.param({"verb": None}, id="missing-verb"),
        pytest.param({"attempt": 0}, id="attempt-zero"),
        pytest.param({"sources": None}, id="missing-sources"),
    ],
)
def test_command_rejected(change: dict[str, Any]) -> None:
    payload = {**_command("create").model_dump(mode="json"), **change}
    payload = {k: v for k, v in payload.items() if v is not None}
    with pytest.raises(ValidationError):
        commands.COMMAND_ADAPTER.validate_python(payload)


@pytest.mark.parametrize(
    ("verb", "key"),
    [
        # Not ":create"/":restart": those ids of a node before admission control, published
        # for the same attempt, would deduplicate away the admission's run command.
        pytest.param("create", f"{TASK}:2:start", id="create"),
        pytest.param("restart", f"{TASK}:2:start", id="restart"),
        pytest.param("cancel", f"{TASK}:2:cancel", id="cancel"),
        pytest.param("remove", f"{TASK}:2:remove", id="remove"),
    ],
)
def test_idempotency_key(verb: str, key: str) -> None:
    assert commands.idempotency_key(_command(verb)) == key


def test_idempotency_key_differs_per_attempt() -> None:
    first = commands.CreateTask(**RUN)
    second = commands.RestartTask(**{**RUN, "attempt": 3})
    assert commands.idempotency_key(first) != commands.idempotency_key(second)
    assert commands.idempotency_key(second) == f"{TASK}:3:start"


def test_commands_are_frozen() -> None:
    cmd = _command("cancel")
    with pytest.raises(ValidationError):
        cmd.attempt = 5  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# events
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "cls", "event_id"), EVENTS)
def test_event_constructor_ids(make: Any, cls: type[BaseModel], event_id: str) -> None:
    event = make()
    assert type(event) is cls
    assert event.event_id == event_id
    assert event.task_id == TASK
    assert event.schema_version == 1
    assert event.seq is None
    assert event.occurred_at.tzinfo is not None


@pytest.mark.parametrize(("make", "cls", "event_id"), EVENTS)
def test_event_json_round_trip(make: Any, cls: type[BaseModel], event_id: str) -> None:
    event = make().model_copy(update={"seq": 17, "occurred_at": AT})
    wire = event.model_dump_json()
    assert json.loads(wire)["kind"] == event.kind

    back = events.EVENT_ADAPTER.validate_json(wire)

    assert type(back) is cls
    assert back == event
    assert back.event_id == event_id
    assert back.seq == 17
    assert back.occurred_at == AT


@pytest.mark.parametrize(("make", "cls", "event_id"), EVENTS)
def test_event_ids_are_deterministic(make: Any, cls: type[BaseModel], event_id: str) -> None:
    del cls, event_id
    first, second = make(), make()
    assert first.event_id == second.event_id


def test_every_event_kind_is_covered() -> None:
    kinds = {p.values[0]().kind for p in EVENTS}  # type: ignore[operator]
    declared = {cls.model_fields["kind"].default for cls in typing.get_args(events.TaskEvent)}
    assert kinds == declared
    assert events.TERMINAL_KINDS == {"completed", "failed", "canceled"}
    assert events.TERMINAL_KINDS < declared


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"schema_version": 2}, id="schema-version-2"),
        pytest.param({"kind": "paused"}, id="unknown-kind"),
        pytest.param({"attempt": 0}, id="attempt-zero"),
        pytest.param({"progress": 100.5}, id="progress-above-100"),
        pytest.param({"progress": -1}, id="progress-negative"),
        pytest.param({"kind": "admitted"}, id="admitted-without-size-class"),
    ],
)
def test_event_rejected(change: dict[str, Any]) -> None:
    event = events.new(events.TaskProgressed, TASK, 1, key="x", progress=50.0)
    payload = {**event.model_dump(mode="json"), **change}
    with pytest.raises(ValidationError):
        events.EVENT_ADAPTER.validate_python(payload)


def test_event_without_kind_rejected() -> None:
    payload = events.new(events.TaskCompleted, TASK, 1).model_dump(mode="json")
    del payload["kind"]
    with pytest.raises(ValidationError):
        events.EVENT_ADAPTER.validate_python(payload)


def test_make_id() -> None:
    assert events._Event.make_id("t", 1, "k") == "t:1:k"
    assert events._Event.make_id("t", 1, "k", 0) == "t:1:k:0"
    assert events._Event.make_id("t", 1, "k", "") == "t:1:k:"


# --------------------------------------------------------------------------------------------
# subjects, streams, durables
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        pytest.param(streams.command_subject("create"), "tasks.commands.create", id="cmd-create"),
        pytest.param(streams.command_subject("remove"), "tasks.commands.remove", id="cmd-remove"),
        pytest.param(
            streams.event_subject(TASK, "completed"), f"events.task.{TASK}.completed", id="event"
        ),
        pytest.param(streams.event_subject("*", "failed"), "events.task.*.failed", id="wildcard"),
    ],
)
def test_subjects(subject: str, expected: str) -> None:
    assert subject == expected


def test_terminal_event_subjects() -> None:
    assert streams.TERMINAL_EVENT_SUBJECTS == [
        "events.task.*.completed",
        "events.task.*.failed",
        "events.task.*.canceled",
    ]


def _stream(name: str) -> Any:
    (cfg,) = [s for s in streams.STREAMS if s.name == name]
    return cfg


def test_tasks_stream_is_a_work_queue() -> None:
    cfg = _stream("TASKS")
    assert cfg.subjects == ["tasks.commands.>"]
    assert cfg.retention == RetentionPolicy.WORK_QUEUE
    assert cfg.duplicate_window and cfg.duplicate_window > 0


def test_events_stream_keeps_events() -> None:
    cfg = _stream("EVENTS")
    assert cfg.subjects == ["events.task.>"]
    assert cfg.retention == RetentionPolicy.LIMITS
    assert cfg.duplicate_window and cfg.duplicate_window > 0
    assert cfg.max_age and cfg.max_age >= cfg.duplicate_window


def test_exactly_two_streams() -> None:
    assert sorted(s.name for s in streams.STREAMS) == ["EVENTS", "TASKS"]
    assert streams.TASKS_STREAM_REF.name == "TASKS"
    assert streams.EVENTS_STREAM_REF.name == "EVENTS"


@pytest.mark.parametrize(
    ("name", "stream", "filter_subject", "filter_subjects"),
    [
        pytest.param("scheduler", "TASKS", "tasks.commands.>", None, id="scheduler"),
        pytest.param(
            "notifier",
            "EVENTS",
            None,
            ["events.task.*.completed", "events.task.*.failed", "events.task.*.canceled"],
            id="notifier-terminal-only",
        ),
    ],
)
def test_durables(
    name: str, stream: str, filter_subject: str | None, filter_subjects: list[str] | None
) -> None:
    by_name = {d.config.durable_name: d for d in streams.durables()}
    assert set(by_name) == {"scheduler", "notifier"}
    durable = by_name[name]
    assert durable.stream == stream
    assert durable.config.filter_subject == filter_subject
    assert durable.config.filter_subjects == filter_subjects
    assert durable.config.ack_policy is not None
    assert durable.config.ack_policy.value == "explicit"


def test_durables_tuning_applies_to_the_scheduler_only() -> None:
    default = {d.config.durable_name: d.config for d in streams.durables()}
    tuned = {d.config.durable_name: d.config for d in streams.durables(ack_wait_s=7, max_deliver=3)}
    assert (tuned["scheduler"].ack_wait, tuned["scheduler"].max_deliver) == (7, 3)
    assert tuned["notifier"] == default["notifier"]


# --------------------------------------------------------------------------------------------
# ids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        pytest.param(TASK, True, id="v4-lower"),
        pytest.param(TASK.upper(), True, id="v4-upper"),
        pytest.param("6824C890-2dc7-444D-Ab9b-f0e50b88eea9", True, id="mixed-case"),
        pytest.param("6824c890-2dc7-144d-8b9b-f0e50b88eea9", True, id="version-1-variant-8"),
        pytest.param("6824c890-2dc7-744d-9b9b-f0e50b88eea9", True, id="version-7-variant-9"),
        pytest.param("6824c890-2dc7-444d-bb9b-f0e50b88eea9", True, id="variant-b"),
        pytest.param("6824c890-2dc7-044d-ab9b-f0e50b88eea9", False, id="version-0"),
        pytest.param("6824c890-2dc7-844d-ab9b-f0e50b88eea9", False, id="version-8"),
        pytest.param("6824c890-2dc7-444d-cb9b-f0e50b88eea9", False, id="variant-c"),
        pytest.param("6824c890-2dc7-444d-7b9b-f0e50b88eea9", False, id="variant-7"),
        pytest.param("6824c8902dc7444dab9bf0e50b88eea9", False, id="no-dashes"),
        pytest.param("{6824c890-2dc7-444d-ab9b-f0e50b88eea9}", False, id="braces"),
        pytest.param("6824c890-2dc7-444d-ab9b-f0e50b88eea", False, id="short"),
        pytest.param("6824c890-2dc7-444d-ab9b-f0e50b88eea9a", False, id="long"),
        pytest.param("6824c890-2dc7-444d-ab9b-f0e50b88eeg9", False, id="non-hex"),
        pytest.param(TASK + "\n", False, id="trailing-newline"),
        pytest.param(" " + TASK, False, id="leading-space"),
        pytest.param("", False, id="empty"),
    ],
)
def test_is_task_id(value: str, ok: bool) -> None:
    assert is_task_id(value) is ok


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        pytest.param(TASK, TASK, id="lower"),
        pytest.param(TASK.upper(), TASK, id="upper"),
        pytest.param(TASK[:9] + TASK[9:].upper(), TASK, id="mixed"),
        pytest.param(TASK.replace("a", "\u0430"), None, id="cyrillic-a"),
        pytest.param(TASK.replace("f", "\uff46"), None, id="fullwidth-f"),
        pytest.param("not-a-uuid", None, id="garbage"),
        pytest.param(None, None, id="none"),
    ],
)
def test_canonical_task_id(value: str | None, canonical: str | None) -> None:
    assert canonical_task_id(value) == canonical


@pytest.mark.parametrize(
    ("task_id", "attempt", "name"),
    [
        pytest.param(TASK, 1, f"odm-{TASK}-1", id="lower"),
        pytest.param(TASK.upper(), 12, f"odm-{TASK}-12", id="upper-is-lowered"),
    ],
)
def test_run_name(task_id: str, attempt: int, name: str) -> None:
    assert run_name(task_id, attempt) == name
    assert run_name(task_id, attempt) == run_name(task_id, attempt)


# --------------------------------------------------------------------------------------------
# publishing
# --------------------------------------------------------------------------------------------


class _RecordingBroker:
    """Stands in for ``NatsBroker.publish``: records each call and answers with an ack."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, str, dict[str, Any]]] = []

    async def publish(self, message: Any, subject: str, **kw: Any) -> PubAck:
        self.calls.append((message, subject, kw))
        return PubAck(stream=kw["stream"], seq=len(self.calls))


@pytest.mark.parametrize(("verb", "cls"), COMMANDS)
async def test_publish_command(verb: str, cls: type[BaseModel]) -> None:
    broker = _RecordingBroker()
    cmd = _command(verb)

    ack = await bus.publish_command(broker, cmd, timeout_s=2.5)  # type: ignore[arg-type]

    assert ack.seq == 1
    ((message, subject, kw),) = broker.calls
    assert subject == f"tasks.commands.{verb}"
    assert kw["stream"] == "TASKS"
    assert kw["headers"] == {"Nats-Msg-Id": commands.idempotency_key(cmd)}
    assert 2.4 < kw["timeout"] <= 2.5  # the whole publish's deadline
    back = commands.COMMAND_ADAPTER.validate_json(json.dumps(message))
    assert type(back) is cls
    assert back == cmd


async def test_publish_tries_again_while_a_stream_elects_its_leader() -> None:
    """"No responders" (the stream's leader died, a new one not elected yet) is retried within
    the publish's timeout; past it, the error is the caller's (the outbox keeps the message)."""
    from nats.errors import NoRespondersError

    class Electing(_RecordingBroker):
        def __init__(self, refusals: int) -> None:
            super().__init__()
            self.refusals = refusals

        async def publish(self, message: Any, subject: str, **kw: Any) -> PubAck:
            if self.refusals:
                self.refusals -= 1
                raise NoRespondersError
            return await super().publish(message, subject, **kw)

    broker = Electing(refusals=2)
    ack = await bus.publish_command(broker, _command("cancel"), timeout_s=2.0)  # type: ignore[arg-type]
    assert ack is not None and ack.seq == 1
    with pytest.raises(NoRespondersError):
        await bus.publish_command(Electing(refusals=100), _command("cancel"),  # type: ignore[arg-type]
                                  timeout_s=0.6)


@pytest.mark.parametrize(("make", "cls", "event_id"), EVENTS)
async def test_publish_event(make: Any, cls: type[BaseModel], event_id: str) -> None:
    broker = _RecordingBroker()
    event = make()

    await bus.publish_event(broker, event, timeout_s=1.0)  # type: ignore[arg-type]

    ((message, subject, kw),) = broker.calls
    assert subject == f"events.task.{TASK}.{event.kind}"
    assert kw["stream"] == "EVENTS"
    assert kw["headers"] == {"Nats-Msg-Id": event_id}
    back = events.EVENT_ADAPTER.validate_json(json.dumps(message))
    assert type(back) is cls
    assert back == event
