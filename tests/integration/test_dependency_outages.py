"""Services outlive their dependencies: NATS stopped, MongoDB or S3 frozen, a stop meanwhile.

Runs the four services on a stack of its own (own nats-server, own nx-27017 MongoDB wire server
process, own moto S3 process) with small deadlines, so that it can stop NATS and freeze MongoDB
and S3 (SIGSTOP: the sockets stay open and nothing answers, the worst case for timeouts).
Every service's ``/metrics`` answers at once while MongoDB is frozen, the gateway's task counts
kept and marked stale (``scaleodm_tasks_stale``), fresh again after SIGCONT.

Covers: NATS away for longer than nats-py's old reconnect budget (60 attempts) — every service
keeps trying, answers ``/readyz`` 503 quickly and ``/healthz`` 200 (reconnecting is not dead),
and recovers without a restart when NATS is back on the same port (a task created afterwards
completes); a frozen MongoDB answers ``Storage unavailable, please retry later`` within its
deadline (info of a task the gateway must read from MongoDB, task creation; a task its read
model holds is still answered, from memory) and fails readiness, and everything works after
SIGCONT; a
frozen S3 does the same for an upload and a download, while a removal accepted meanwhile
deletes the task's S3 objects once S3 answers again; cancel and remove answer the same error while
MongoDB is frozen and change nothing; SIGTERM while MongoDB is frozen stops every
service well within Kubernetes' grace period; no service logs an ERROR on the way but for a
storage outage it met (FastStream's supervisor's pull-fetch ``TimeoutError`` traceback, which a
clean start used to log, included). MongoDB is always nx-27017 here, even with
``SCALEODM_TEST_MONGODB_URL`` set: the test must own the process it freezes.
Leaves out: task creation, cancel and removal *while NATS is down* (the commands' outbox path,
tested with it), NATS frozen rather than stopped, a NATS cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest

from tests.harness import api, data, servers
from tests.harness.stack import SERVICES, Stack, running_stack

pytestmark = pytest.mark.integration

STORAGE_UNAVAILABLE = {"error": "Storage unavailable, please retry later"}
MONGO_TIMEOUT_S = 2.0
S3_DEADLINE_S = 2.0
READY_BOUND_S = 2.0 + 1.0  # runtime.READY_CHECK_TIMEOUT_S, plus the HTTP round trip
GRACE_PERIOD_S = 30  # terminationGracePeriodSeconds (deploy/k8s/base)
OLD_RECONNECT_BUDGET = 60  # nats-py's default max_reconnect_attempts


@dataclass
class Outages:
    """The stack and handles on its dependencies."""

    stack: Stack
    nats: servers.Nats
    mongo_pid: int
    s3_pid: int
    held: contextlib.ExitStack
    tmp: Path
    completed: list[str] = field(default_factory=list)  # tasks that reached 40 here

    def record(self, **figures: float) -> None:
        """Keep measured times in ``figures.json`` of the stack's directory (for reports)."""
        path = self.tmp / "figures.json"
        known = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps(known | {k: round(v, 2) for k, v in figures.items()}))

    def restart_nats(self) -> None:
        """A new nats-server on the same port and JetStream store (streams and durables kept)."""
        port = int(self.nats.url.rsplit(":", 1)[1])
        self.nats = self.held.enter_context(servers.nats_server(self.tmp / "nats", port=port))


@contextlib.contextmanager
def _frozen(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def outages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outages]:
    tmp: Path = tmp_path_factory.mktemp("outages")
    with contextlib.ExitStack() as held:
        nats = held.enter_context(servers.nats_server(tmp / "nats"))
        with mock.patch.dict(os.environ):  # a process of our own to freeze, even with a real one
            os.environ.pop("SCALEODM_TEST_MONGODB_URL", None)
            mongo_url = held.enter_context(servers.mongo_server("nx", tmp / "mongo"))
        s3 = held.enter_context(servers.s3_server(process=True, tmp=tmp / "s3"))
        assert s3.pid is not None
        stack = Stack(
            tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3, database="outages",
            extra_env={
                "SCALEODM_NATS__RECONNECT_WAIT_S": "0.05",
                "SCALEODM_NATS__RECONNECT_MAX_WAIT_S": "0.1",
                "SCALEODM_MONGO__TIMEOUT_MS": str(int(MONGO_TIMEOUT_S * 1000)),
                "SCALEODM_MONGO__SERVER_SELECTION_TIMEOUT_MS": str(int(MONGO_TIMEOUT_S * 1000)),
                "SCALEODM_MONGO__CONNECT_TIMEOUT_MS": "1000",
                "SCALEODM_TASK_COUNTS_INTERVAL_S": "0.5",
                "SCALEODM_S3__REQUEST_TIMEOUT_S": str(S3_DEADLINE_S),
                "SCALEODM_S3__CONNECT_TIMEOUT_S": "1",
                "SCALEODM_S3__READ_TIMEOUT_S": "2",
                "SCALEODM_TEST_ENGINE_SECONDS": "1",
            },
        )
        mongo_pid = int((tmp / "mongo" / "nx.pid").read_text())
        with running_stack(stack):
            yield Outages(stack, nats, mongo_pid, s3.pid, held, tmp)


@pytest.fixture
async def gw(outages: Outages) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=outages.stack.gateway_url, timeout=60) as c:
        yield c


async def _timed(call: Any) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    resp = await call
    return time.monotonic() - started, resp


async def _probe(stack: Stack, service: str, path: str) -> tuple[float, httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as c:
        return await _timed(c.get(f"http://127.0.0.1:{stack.ports[service]}{path}"))


async def _assert_unready(stack: Stack, services: tuple[str, ...], check: str,
                          words: tuple[str, ...] = ("down", "timeout")) -> None:
    """Each service's /readyz answers 503 within its bound, naming ``check``; /healthz 200."""

    async def probe(service: str) -> None:
        elapsed, resp = await _probe(stack, service, "/readyz")
        assert resp.status_code == 503 and elapsed < READY_BOUND_S, (service, elapsed, resp.text)
        assert resp.json()["checks"][check] in words, (service, resp.text)
        _, alive = await _probe(stack, service, "/healthz")
        assert alive.status_code == 200 and alive.json()["status"] == "ok", (service, alive.text)

    await asyncio.gather(*(probe(service) for service in services))


async def _wait_ready(stack: Stack, services: tuple[str, ...] = SERVICES,
                      timeout_s: float = 20) -> float:
    """Seconds until every service's /readyz answers 200."""
    started = time.monotonic()
    for service in services:
        while (await _probe(stack, service, "/readyz"))[1].status_code != 200:
            assert time.monotonic() - started < timeout_s, f"{service} not ready again"
            await asyncio.sleep(0.1)
    return time.monotonic() - started


def _log_entries(stack: Stack, service: str) -> list[dict[str, Any]]:
    entries = []
    for line in stack.log(service).splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


def _reconnect_attempts(stack: Stack, service: str) -> int:
    return max((int(e.get("attempt", 0)) for e in _log_entries(stack, service)
                if e.get("event") == "reconnecting to NATS"), default=0)


def _files(n: int = 2) -> list[tuple[str, bytes]]:
    return [(name, data.JPEG) for name in data.image_names(n)]


async def _completed_task(outages: Outages, gw: httpx.AsyncClient) -> str:
    """A task that completed on this stack (the one the NATS test created, when it ran)."""
    if not outages.completed:
        task_id = str((await api.create(gw, files=_files()))["uuid"])
        final = await api.poll_until(gw, task_id, api.status_is(30, 40, 50), timeout_s=30)
        assert final["status"]["code"] == 40, final
        outages.completed.append(task_id)
    return outages.completed[0]


async def _accepted_task(gw: httpx.AsyncClient) -> None:
    """A new task is created and queued (or already running)."""
    task_id = (await api.create(gw, files=_files()))["uuid"]
    assert (await api.info(gw, task_id))["status"]["code"] in (10, 20)


async def test_nats_outage_longer_than_the_old_budget(
    outages: Outages, gw: httpx.AsyncClient
) -> None:
    stack = outages.stack
    servers.stop_process(outages.nats.proc)
    started = time.monotonic()
    await asyncio.sleep(0.5)
    await _assert_unready(stack, SERVICES, "nats")
    for service in SERVICES:
        _, alive = await _probe(stack, service, "/healthz")
        assert alive.json() == {"status": "ok", "nats": "reconnecting"}, (service, alive.text)
    # Past nats-py's old budget (60 attempts), every service is still trying and still alive.
    while min(_reconnect_attempts(stack, s) for s in SERVICES) <= OLD_RECONNECT_BUDGET:
        assert time.monotonic() - started < 30, {
            s: _reconnect_attempts(stack, s) for s in SERVICES}
        await asyncio.sleep(0.5)
    await _assert_unready(stack, SERVICES, "nats")
    outage_s = time.monotonic() - started

    outages.restart_nats()
    recovered_s = await _wait_ready(stack)
    await _completed_task(outages, gw)  # commands, events and the projection flow again
    outages.record(nats_outage_s=outage_s, nats_ready_after_restart_s=recovered_s)


def _metric(text: str, series: str) -> float:
    """The value of one series (``name{labels}`` as exposed) in an exposition, NaN if absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def _wait_metric(stack: Stack, series: str, value: float, timeout_s: float = 10,
                       *, at_least: bool = False) -> str:
    """The gateway's exposition once ``series`` has ``value`` (or more, ``at_least``)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as c:
        while True:
            text = (await c.get(f"http://127.0.0.1:{stack.ports['gateway']}/metrics")).text
            got = _metric(text, series)
            if got == value or (at_least and got >= value):
                return text
            assert time.monotonic() < deadline, f"{series} never {value}"
            await asyncio.sleep(0.2)


async def test_frozen_mongodb_answers_storage_unavailable(
    outages: Outages, gw: httpx.AsyncClient
) -> None:
    stack = outages.stack
    task_id = await _completed_task(outages, gw)
    bound_s = MONGO_TIMEOUT_S + 2
    await _wait_metric(stack, 'scaleodm_tasks{status="completed"}', 1.0, at_least=True)
    with _frozen(outages.mongo_pid):
        # A task this gateway holds in its read model is answered from memory (NATS is up:
        # it is current); one it must read from MongoDB gets the error, within the deadline.
        held_s, held = await _timed(gw.get(f"/task/{task_id}/info"))
        assert held.json()["status"]["code"] == 40 and held_s < 1.0, (held_s, held.text)
        unheld = str(uuid.uuid4())
        info_s, info = await _timed(gw.get(f"/task/{unheld}/info"))
        assert info.status_code == 200 and info.json() == STORAGE_UNAVAILABLE, info.text
        assert info_s < bound_s, info_s
        files = [("images", (name, body, "image/jpeg")) for name, body in _files()]
        new_s, new = await _timed(gw.post("/task/new", files=files))
        assert new.status_code == 200 and new.json() == STORAGE_UNAVAILABLE, new.text
        assert new_s < bound_s, new_s
        for action in ("/task/cancel", "/task/remove"):
            action_s, answer = await _timed(gw.post(action, data={"uuid": task_id}))
            assert answer.json() == STORAGE_UNAVAILABLE and action_s < bound_s, (
                action, action_s, answer.text)
        await _assert_unready(stack, SERVICES, "mongo")
        # /metrics answers at once with what it has; the task counts are marked stale.
        for service in SERVICES:
            scrape_s, scraped = await _timed(httpx.AsyncClient(timeout=5).get(
                f"http://127.0.0.1:{stack.ports[service]}/metrics"))
            assert scraped.status_code == 200 and scrape_s < 1.0, (service, scrape_s)
        stale = await _wait_metric(stack, "scaleodm_tasks_stale", 1.0)
        assert _metric(stale, 'scaleodm_tasks{status="completed"}') >= 1  # the last values
    recovered_s = await _wait_ready(stack)
    await _wait_metric(stack, "scaleodm_tasks_stale", 0.0)
    assert (await api.info(gw, task_id))["status"]["code"] == 40, "the refused cancel left nothing"
    await _accepted_task(gw)
    outages.record(mongo_frozen_info_s=info_s, mongo_frozen_task_new_s=new_s,
                   mongo_ready_after_sigcont_s=recovered_s)


async def test_frozen_s3_answers_storage_unavailable(
    outages: Outages, gw: httpx.AsyncClient
) -> None:
    stack = outages.stack
    task_id = await _completed_task(outages, gw)
    bound_s = S3_DEADLINE_S + 2
    with _frozen(outages.s3_pid):
        files = [("images", (name, body, "image/jpeg")) for name, body in _files()]
        upload_s, upload = await _timed(gw.post("/task/new", files=files))
        assert upload.status_code == 200 and upload.json() == STORAGE_UNAVAILABLE, upload.text
        assert upload_s < bound_s + S3_DEADLINE_S, upload_s  # + the cleanup's delete
        download_s, download = await _timed(gw.get(f"/task/{task_id}/download/all.zip"))
        assert download.status_code == 200, download.text
        assert download.json() == STORAGE_UNAVAILABLE, download.text
        assert download_s < bound_s, download_s
        await _assert_unready(stack, ("gateway",), "s3")
    recovered_s = await _wait_ready(stack)
    again = await gw.get(f"/task/{task_id}/download/all.zip")
    assert again.status_code == 200 and again.content.startswith(b"PK"), again.text[:200]
    await _accepted_task(gw)
    # A removal accepted while S3 is frozen (MongoDB holds it) takes effect once S3 is back.
    doomed = str((await api.create(gw, files=_files()))["uuid"])
    await api.poll_until(gw, doomed, api.status_is(40), timeout_s=30)
    with _frozen(outages.s3_pid):
        remove_s, removed = await _timed(gw.post("/task/remove", data={"uuid": doomed}))
        assert removed.json() == {"success": True} and remove_s < 1.0, (remove_s, removed.text)
        await asyncio.sleep(S3_DEADLINE_S + 1)  # the scheduler's deletion fails meanwhile
    deadline = time.monotonic() + 60
    while outages.stack.s3_keys(f"tasks/{doomed}/"):
        assert time.monotonic() < deadline, "the removal never deleted the task's S3 objects"
        await asyncio.sleep(0.5)
    outages.record(s3_frozen_upload_s=upload_s, s3_frozen_download_s=download_s,
                   s3_ready_after_sigcont_s=recovered_s)


async def test_stop_while_mongodb_is_frozen(outages: Outages, gw: httpx.AsyncClient) -> None:
    stack = outages.stack
    with _frozen(outages.mongo_pid):
        pending = asyncio.ensure_future(gw.get(f"/task/{uuid.uuid4()}/info"))
        await asyncio.sleep(0.5)  # a request waits on MongoDB as the stop begins
        started = time.monotonic()
        procs = dict(stack.procs)
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        stopped: dict[str, float] = {}
        while len(stopped) < len(procs):
            for service, proc in procs.items():
                if service not in stopped and proc.poll() is not None:
                    stopped[service] = time.monotonic() - started
            assert time.monotonic() - started < GRACE_PERIOD_S, f"still running: {stopped}"
            await asyncio.sleep(0.05)
        with contextlib.suppress(httpx.HTTPError):
            await pending
    stack.procs.clear()
    outages.record(**{f"stop_{s}_s": t for s, t in stopped.items()})
    assert max(stopped.values()) < GRACE_PERIOD_S / 2, stopped


def test_no_service_logged_an_error(outages: Outages) -> None:
    """Clean start, outages and stops: no ERROR, FastStream's supervisor tracebacks included;
    only a storage outage may be one (logged by the code that met it, with its exception)."""
    for service in SERVICES:
        errors = [e for e in _log_entries(outages.stack, service)
                  if e.get("level") in ("error", "critical")]
        unexplained = [e for e in errors
                       if not any(name in str(e.get("exception", "")) + str(e.get("error", ""))
                                  for name in ("pymongo.errors.", "StorageUnavailable"))]
        assert not unexplained, (service, unexplained[:3])
