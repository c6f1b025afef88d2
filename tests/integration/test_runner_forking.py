"""Local runners forked from the pre-imported fork server (``scaleodm.run.forking``) by the
local executor (``executors.local.RunnerForker``), and spawned when that server is not there.

Covered: the server is warm when ``prepare`` returns; a forked runner is the runner as a spawned
one would be (its own session, stdin from ``/dev/null``, stdout and stderr into ``runner.log``,
``runner.pid``, not a child of the scheduler) and a cancel (SIGTERM) ends it as canceled; a
redelivered start changes nothing; the server gone, the next runner is spawned and a new server
is started; ``close`` stops the server and the runs go on. Each run hangs in its fetch (a zipurl
on a loopback socket that never answers) until it is canceled, so it can be looked at alive.

Left out: whole tasks through the stack (``test_skeleton.py`` and every other stack test start
their runners this way), the time it saves (``bench/task_to_done.py``: first task and later
ones).
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from scaleodm.common import localruns
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.contracts.ids import run_name
from scaleodm.common.settings import EngineKind
from scaleodm.scheduler.executors import StartOutcome
from scaleodm.scheduler.executors import local as local_executor

pytestmark = pytest.mark.integration


@pytest.fixture
def silent_zipurl() -> Iterator[str]:
    """An http URL on loopback whose server takes connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/images.zip"


@pytest.fixture
async def executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                   ) -> AsyncIterator[local_executor.LocalExecutor]:
    # The fork server and the runners it forks read their settings from this environment.
    monkeypatch.setenv("SCALEODM_OUTBOUND_ALLOW", '["127.0.0.0/8"]')
    monkeypatch.setenv("SCALEODM_FETCH_TIMEOUT_S", "60")
    executor = local_executor.LocalExecutor(tmp_path / "runs", EngineKind.TEST)
    await executor.prepare()
    try:
        yield executor
    finally:
        await executor.close()
        for rd in localruns.runs(tmp_path / "runs"):  # runs outlive the executor: end them
            pid = localruns.read_pid(rd.file(localruns.RUNNER_PID))
            if pid is not None and rd.runner_alive():
                os.killpg(pid, 9)


def _spec(zipurl: str) -> RunSpec:
    task_id = str(uuid.uuid4())
    return RunSpec(task_id=task_id, attempt=1, name="forked", sources=[zipurl],
                   output_prefix=f"s3://scaleodm/tasks/{task_id}/outputs/")


async def _fetching(executor: local_executor.LocalExecutor, spec: RunSpec) -> tuple[
        localruns.RunDir, int]:
    """The run directory and runner pid of ``spec``, once its runner is in the fetch."""
    rd = localruns.RunDir(executor.runs_dir / run_name(spec.task_id, spec.attempt))
    async with asyncio.timeout(30):
        while rd.phase != "fetching":
            await asyncio.sleep(0.02)
    pid = localruns.read_pid(rd.file(localruns.RUNNER_PID))
    assert pid is not None and rd.runner_alive()
    return rd, pid


async def _result(rd: localruns.RunDir) -> dict[str, object]:
    async with asyncio.timeout(30):
        while (result := rd.result) is None:
            await asyncio.sleep(0.02)
    return result


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


async def test_a_forked_runner_is_a_runner_of_its_own(
    executor: local_executor.LocalExecutor, silent_zipurl: str
) -> None:
    assert executor.forker.ready, "warm before the scheduler says it is ready"
    spec = _spec(silent_zipurl)

    assert await executor.start(spec) is StartOutcome.STARTED
    rd, pid = await _fetching(executor, spec)

    assert os.getsid(pid) == pid and os.getpgid(pid) == pid  # cancel and kill_runners signal it
    assert _parent(pid) not in (os.getpid(), 1)  # the fork server's child, not the scheduler's
    assert Path(f"/proc/{pid}/fd/0").resolve() == Path(os.devnull)
    for fd in (1, 2):
        assert Path(f"/proc/{pid}/fd/{fd}").resolve() == rd.file(localruns.RUNNER_LOG).resolve()
    assert await executor.start(spec) is StartOutcome.EXISTS  # a redelivery starts nothing

    assert await executor.cancel(spec.task_id, spec.attempt)
    assert (await _result(rd))["outcome"] == "canceled"
    assert "run canceled" in rd.file(localruns.RUNNER_LOG).read_text()


async def test_without_the_fork_server_the_runner_is_spawned_and_a_server_comes_back(
    executor: local_executor.LocalExecutor, silent_zipurl: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(local_executor, "FORK_SERVER_RETRY_S", 0.0)
    server = executor.forker._proc
    assert server is not None
    server.kill()
    await server.wait()

    spec = _spec(silent_zipurl)
    assert await executor.start(spec) is StartOutcome.STARTED
    rd, pid = await _fetching(executor, spec)
    assert _parent(pid) == os.getpid()  # spawned by the executor itself
    assert os.getsid(pid) == pid

    async with asyncio.timeout(60):  # a new server, started in the background
        while not executor.forker.ready:
            await asyncio.sleep(0.05)
    again = _spec(silent_zipurl)
    assert await executor.start(again) is StartOutcome.STARTED
    _, forked = await _fetching(executor, again)
    server = executor.forker._proc
    assert server is not None and _parent(forked) == server.pid


async def test_closing_stops_the_server_and_runs_go_on(
    executor: local_executor.LocalExecutor, silent_zipurl: str
) -> None:
    spec = _spec(silent_zipurl)
    await executor.start(spec)
    rd, pid = await _fetching(executor, spec)
    server = executor.forker._proc
    assert server is not None

    await executor.forker.close()

    assert server.returncode is not None
    assert rd.runner_alive() and rd.result is None
    os.killpg(pid, 15)
    assert (await _result(rd))["outcome"] == "canceled"
