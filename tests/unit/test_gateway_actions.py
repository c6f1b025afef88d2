"""The gateway's task actions through its HTTP routes, fast: the real FastAPI app over ASGI, the
real ``Emitter``, FastStream's in-memory ``TestNatsBroker`` and an in-memory task store.

Covered: cancel/remove/restart answer as NodeODM does and record each event in the outbox, a
cancel or remove with its command, a create or restart with none (its run command comes with its
admission, the scheduler's); with NATS down every action still succeeds at once (MongoDB holds it)
and the relay delivers the events and commands, event first, with their ``Nats-Msg-Id``, once NATS
is back; with NATS up the background publisher delivers without the relay; NodeODM's errors for an
unknown uuid, a task that cannot be restarted and bad restart options (validated before the
lookup); of two racing restarts, the options of the one recorded first are the task's; a task
waiting for its admission shows its ``queuePosition``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import types
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from faststream.nats import NatsBroker, NatsMessage, TestNatsBroker
from nats.errors import MaxPayloadError

from scaleodm.common import emitting, failpoints
from scaleodm.common.contracts import commands, events, streams
from scaleodm.common.emitting import Emitter, Relayed
from scaleodm.common.settings import GatewaySettings
from scaleodm.common.store.admission import QUEUE_ID
from scaleodm.common.store.tasks import run_command
from scaleodm.gateway.actions import NewTask
from scaleodm.gateway.deps import Resources
from scaleodm.gateway.main import create_app
from scaleodm.watcher import relaying
from tests.unit.fake_store import FakeTaskStore


class _DownBroker:
    """NATS away: every publish fails the way nats-py does while disconnected."""

    def __init__(self) -> None:
        self.calls = 0

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        raise ConnectionError("nats: connection closed")


def _bus() -> tuple[NatsBroker, list[tuple[str, dict[str, Any], str]]]:
    """A broker with one subscriber per stream recording (subject, body, Nats-Msg-Id)."""
    broker = NatsBroker()
    seen: list[tuple[str, dict[str, Any], str]] = []

    @broker.subscriber(streams.COMMAND_SUBJECTS, stream=streams.TASKS_STREAM_REF)
    async def on_command(body: dict[str, Any], msg: NatsMessage) -> None:
        seen.append((msg.raw_message.subject, body, msg.headers["Nats-Msg-Id"]))

    @broker.subscriber(streams.EVENT_SUBJECTS, stream=streams.EVENTS_STREAM_REF)
    async def on_event(body: dict[str, Any], msg: NatsMessage) -> None:
        seen.append((msg.raw_message.subject, body, msg.headers["Nats-Msg-Id"]))

    return broker, seen


class Gateway:
    def __init__(self, broker: Any) -> None:
        self.store = FakeTaskStore()
        self.settings = GatewaySettings()
        self.emitter = Emitter(self.store, broker, publish_timeout_s=1.0)  # type: ignore[arg-type]
        self.app = create_app(self.settings)
        self.res = Resources(
            self.settings, types.SimpleNamespace(store=self.store),  # type: ignore[arg-type]
            None, broker, self.emitter, None,  # type: ignore[arg-type]
            failpoints.Failpoints(""),
        )
        self.app.state.resources = self.res
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                      base_url="http://gateway")

    async def new_task(self, state: str | None = None) -> str:
        task_id = str(uuid.uuid4())
        await self.res.actions.create(NewTask(
            task_id=task_id, name="t", date_created_ms=1, options=[], images_count=2,
            webhook=None, skip_post_processing=False, outputs=None,
            sources=[f"s3://scaleodm/tasks/{task_id}/inputs/"],
            output_prefix=f"s3://scaleodm/tasks/{task_id}/outputs/", tenant="default"))
        if state is not None:
            self.store.tasks[task_id]["state"] = state
        return task_id

    async def post(self, path: str, **data: str) -> Any:
        resp = await self.http.post(path, data=data)
        assert resp.status_code == 200
        return resp.json()

    async def info(self, task_id: str) -> Any:
        return (await self.http.get(f"/task/{task_id}/info")).json()


@pytest.fixture
async def down() -> AsyncIterator[Gateway]:
    gw = Gateway(_DownBroker())
    yield gw
    await gw.emitter.aclose(drain_s=0)
    await gw.http.aclose()


async def _settle(gw: Gateway) -> None:
    await asyncio.wait_for(gw.emitter.flush(), 5)  # the background publisher is done


async def test_actions_with_nats_down_succeed_and_the_relay_delivers_them_later(
    down: Gateway,
) -> None:
    created = await down.new_task()
    running = await down.new_task(state="running")
    gone = await down.new_task(state="running")
    done = await down.new_task(state="completed")

    assert await down.post("/task/cancel", uuid=running) == {"success": True}
    assert await down.post("/task/remove", uuid=gone) == {"success": True}
    assert await down.post("/task/restart", uuid=done) == {"success": True}

    assert (await down.info(running))["status"] == {"code": 50}
    assert await down.info(gone) == {"error": f"{gone} not found"}
    assert (await down.info(done))["status"] == {"code": 10}
    pending = {e["_id"]: e["command"] for e in down.store.unpublished()}
    assert pending == {  # a queued event carries no command: the run comes with its admission
        f"{created}:1:queued": None,
        f"{running}:1:queued": None,
        f"{gone}:1:queued": None,
        f"{done}:1:queued": None,
        f"{running}:1:canceled": {"schema_version": 1, "task_id": running, "attempt": 1,
                                  "verb": "cancel"},
        f"{gone}:1:removed": {"schema_version": 1, "task_id": gone, "attempt": 1,
                              "verb": "remove"},
        f"{done}:2:queued": None,
    }

    # NATS is back: the relay hands each recorded event to the same delivery.
    broker, seen = _bus()
    async with TestNatsBroker(broker) as bus:
        relay = Emitter(down.store, bus, publish_timeout_s=1.0)  # type: ignore[arg-type]
        for doc in down.store.unpublished():
            assert await relay.republish(doc) is Relayed.SENT
    assert down.store.unpublished() == []
    ids = [msg_id for _, _, msg_id in seen]
    assert ids.index(f"{gone}:1:removed") < ids.index(f"{gone}:1:remove"), "event, then command"
    assert sorted(ids) == sorted([*pending, f"{running}:1:cancel", f"{gone}:1:remove"])
    verbs = {(s.rsplit(".", 1)[1], b["task_id"]) for s, b, _ in seen
             if s.startswith("tasks.commands.")}
    assert verbs == {("cancel", running), ("remove", gone)}


async def test_with_nats_up_the_publisher_delivers_without_the_relay() -> None:
    broker, seen = _bus()
    async with TestNatsBroker(broker) as bus:
        gw = Gateway(bus)
        try:
            task_id = await gw.new_task(state="running")
            assert await gw.post("/task/cancel", uuid=task_id.upper()) == {"success": True}
            await _settle(gw)
        finally:
            await gw.emitter.aclose()
            await gw.http.aclose()
    assert gw.store.unpublished() == []
    assert [msg_id for _, _, msg_id in seen] == [
        f"{task_id}:1:queued", f"{task_id}:1:canceled", f"{task_id}:1:cancel"]
    cancel = commands.COMMAND_ADAPTER.validate_python(seen[-1][1])
    assert cancel == commands.CancelTask(task_id=task_id, attempt=1)  # type: ignore[arg-type]
    event = events.EVENT_ADAPTER.validate_python(seen[-2][1])
    assert (event.kind, event.seq) == ("canceled", 2)


async def test_nodeodm_errors_of_the_actions(down: Gateway) -> None:
    running = await down.new_task(state="running")
    unknown = str(uuid.uuid4())
    for path in ("/task/cancel", "/task/remove", "/task/restart"):
        assert await down.post(path, uuid=unknown) == {
            "success": False, "error": f"{unknown} not found"}
        assert await down.post(path, uuid="../x") == {"success": False, "error": "../x not found"}
        assert await down.post(path) == {"error": "uuid param missing."}
    assert await down.post("/task/restart", uuid=running) == {
        "success": False, "error": "Task cannot be restarted"}
    bad = await down.post("/task/restart", uuid=unknown,
                          options='[{"name":"min-num-features","value":"many"}]')
    assert "error" in bad and "not found" not in bad["error"], "options are checked first"
    assert [e["_id"] for e in down.store.events.values()] == [f"{running}:1:queued"]


async def test_the_relay_stops_a_pass_at_the_first_refusal_and_drains_full_batches(
    down: Gateway,
) -> None:
    tasks = [await down.new_task() for _ in range(3)]
    refusing = _DownBroker()
    relay = Emitter(down.store, refusing, publish_timeout_s=1.0)  # type: ignore[arg-type]
    assert await relaying.relay_once(down.store, relay, min_age_s=0) == (0, False)
    assert refusing.calls == 1, "one timeout per pass, not one per waiting event"

    broker, seen = _bus()
    async with TestNatsBroker(broker) as bus:
        relay = Emitter(down.store, bus, publish_timeout_s=1.0)  # type: ignore[arg-type]
        assert await relaying.relay_once(down.store, relay, min_age_s=0, batch=2) == (2, True)
        assert await relaying.relay_once(down.store, relay, min_age_s=0, batch=2) == (1, False)
    assert down.store.unpublished() == []
    assert sorted(m for _, _, m in seen) == sorted(f"{t}:1:queued" for t in tasks)


class _Flaky:
    """A broker that refuses the first ``down`` publishes (NATS away), then forwards."""

    def __init__(self, target: Any, down: int) -> None:
        self.target, self.down = target, down

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            self.down -= 1
            raise ConnectionError("nats: connection closed")
        return await self.target.publish(*args, **kwargs)


async def test_the_publisher_keeps_trying_the_head_of_its_queue_while_nats_is_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(emitting, "RETRY_PAUSE_S", 0.01)
    broker, seen = _bus()
    async with TestNatsBroker(broker) as bus:
        gw = Gateway(_Flaky(bus, down=3))
        try:
            ids = [await gw.new_task() for _ in range(3)]
            await _settle(gw)
        finally:
            await gw.emitter.aclose()
            await gw.http.aclose()
    assert gw.store.unpublished() == [], "no relay needed after a short outage"
    assert [m for _, _, m in seen] == [f"{t}:1:queued" for t in ids]


async def test_the_publisher_survives_a_storage_error() -> None:
    broker, seen = _bus()
    async with TestNatsBroker(broker) as bus:
        gw = Gateway(bus)
        real = gw.store.mark_published
        failures = iter([ConnectionError("mongo away")])

        async def flaky_mark(event_id: str) -> None:
            for exc in failures:
                raise exc
            await real(event_id)

        gw.store.mark_published = flaky_mark  # type: ignore[method-assign]
        try:
            first = await gw.new_task()
            await _settle(gw)
            second = await gw.new_task()
            await _settle(gw)
        finally:
            await gw.emitter.aclose()
            await gw.http.aclose()
    assert [e["_id"] for e in gw.store.unpublished()] == [f"{first}:1:queued"]  # the relay's
    assert f"{second}:1:queued" in [m for _, _, m in seen], "the publisher lives on"


class _Refusing:
    """Refuses one kind of message for good (as NATS refuses one over ``max_payload``)."""

    def __init__(self, target: Any, subject_part: str) -> None:
        self.target, self.part = target, subject_part

    async def publish(self, message: Any, subject: str, **kwargs: Any) -> Any:
        if self.part in subject:
            raise MaxPayloadError
        return await self.target.publish(message, subject, **kwargs)


async def test_messages_that_can_never_be_published_are_set_aside_and_hold_up_nothing(
    down: Gateway,
) -> None:
    stuck, fine = await down.new_task(), await down.new_task()
    down.store.events[f"{stuck}:1:queued"]["body"]["kind"] = "no such kind"  # unreadable
    orphan = str(uuid.uuid4())
    down.store._record(events.new(events.TaskQueued, orphan, 1), None)
    down.store.events[f"{orphan}:1:queued"]["recorded_at"] -= dt.timedelta(
        seconds=emitting.ORPHAN_GRACE_S + 1)
    big = await down.new_task(state="running")
    await down.post("/task/cancel", uuid=big)

    broker, seen = _bus()
    async with TestNatsBroker(broker) as bus:
        relay = Emitter(down.store, _Refusing(bus, ".canceled"),  # type: ignore[arg-type]
                        publish_timeout_s=1.0)
        assert await relaying.relay_once(down.store, relay, min_age_s=0) == (2, False)
    assert down.store.unpublished() == []
    aside = {e["_id"] for e in down.store.events.values() if e.get("set_aside")}
    assert aside == {f"{stuck}:1:queued", f"{orphan}:1:queued", f"{big}:1:canceled"}
    assert {m for _, _, m in seen} == {f"{fine}:1:queued", f"{big}:1:queued"}


async def test_of_two_racing_restarts_the_recorded_one_runs_with_its_options(
    down: Gateway,
) -> None:
    """Both requests build attempt 2's ``queued`` event; A's insert wins, B's guarded update
    comes first. B applies A's event, not its own, and is told its restart did not happen: the
    task's options, from which its admission builds the run command, are A's."""
    task_id = await down.new_task(state="completed")
    options = [{"name": "fast-orthophoto", "value": True}]
    down.store._record(events.new(events.TaskQueued, task_id, 2, options=options),
                       None)  # A, then slow
    b = await down.post("/task/restart", uuid=task_id, options='[{"name":"dsm","value":true}]')
    assert b == {"success": False, "error": "Task cannot be restarted"}
    task = down.store.tasks[task_id]
    assert (task["attempt"], task["state"], task["options"]) == (2, "queued", options)
    assert not task["admitted"], "the new attempt waits for its admission"
    assert down.store.events[f"{task_id}:2:queued"]["body"]["options"] == options
    run = run_command(task)  # what the admission of attempt 2 will carry
    assert isinstance(run, commands.RestartTask)
    assert (run.attempt, run.options) == (2, options)


async def test_a_waiting_task_shows_its_place_in_the_admission_order(down: Gateway) -> None:
    """``queuePosition`` while the task waits for a run slot (status 10, not admitted), from
    the order the scheduler's last admission pass saved; none once it is admitted or running
    (the saved order may predate that), nor for a task that order does not have yet."""
    first, second, admitted, running, newest = [await down.new_task() for _ in range(5)]
    down.store.tasks[admitted]["admitted"] = True
    down.store.tasks[running].update(admitted=True, state="running")
    down.store.db["admission"].docs[QUEUE_ID] = {
        "_id": QUEUE_ID, "ids": [second, first, admitted, running]}
    infos = {t: await down.info(t) for t in (first, second, admitted, running, newest)}
    assert {t: i.get("queuePosition") for t, i in infos.items()} == {
        first: 2, second: 1, admitted: None, running: None, newest: None}
    assert [i["status"]["code"] for i in infos.values()] == [10, 10, 10, 20, 10]


async def test_a_task_refused_after_its_upload_is_created_failed_in_one_step() -> None:
    """NodeODM §3.5: too many images after a commit fails the task (status 30) while it
    initializes: no run, progress 0 (NodeODM's ``initialize`` sets the status only)."""
    broker, seen = _bus()
    async with TestNatsBroker(broker) as bus:
        gw = Gateway(bus)
        task_id = str(uuid.uuid4())
        try:
            await gw.res.actions.create(NewTask(
                task_id=task_id, name="t", date_created_ms=1, options=[], images_count=9,
                webhook=None, skip_post_processing=False, outputs=None, sources=[],
                output_prefix=f"s3://scaleodm/tasks/{task_id}/outputs/", tenant="default"),
                failure="Too many images")
            await _settle(gw)
            info = await gw.info(task_id)
        finally:
            await gw.emitter.aclose()
            await gw.http.aclose()
    assert (info["status"], info["progress"]) == ({"code": 30, "errorMessage": "Too many images"},
                                                  0)
    assert [m for _, _, m in seen] == [f"{task_id}:1:queued", f"{task_id}:1:failed"]
    assert gw.store.unpublished() == []
