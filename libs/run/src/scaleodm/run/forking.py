"""The runner fork server: local runs forked from a process that has already imported them.

A runner started as ``python -m scaleodm.run.runner`` spends about 1.5 s (2 cores, loaded) before
its first useful step: the interpreter, then the imports of the run package and what it pulls in
(aioboto3/botocore, pymongo through the store package, httpx, pydantic models), then the S3
client's first construction (botocore's service model). A task's run paid that every time: more
than half of what ScaleODM adds to the engine's run.

``python -m scaleodm.run.forking`` pays it once: it imports the runner, builds and closes one S3
client (``warm_up``, no request), says ``ready`` and then forks one child per request. The child
is the runner as ``python -m scaleodm.run.runner <run dir>`` would be: its own session (a process
group the scheduler and the tests signal by ``runner.pid``), stdin from ``/dev/null``, stdout and
stderr appended to ``runner.log``, the environment the server was started with; it runs
``runner.run`` and exits with its code. The scheduler's local executor starts the server and
waits for ``ready`` before it says it is ready itself (``executors.local.RunnerForker``). A forked
runner keeps the server's command line (``ps`` shows ``-m scaleodm.run.forking``): tell runners
by their ``runner.pid``, as the executor and the tests do.

Protocol, one line each way, on the server's stdin and stdout (its logs go to stderr):

- server → scheduler, once: ``ready``;
- scheduler → server: the run directory's absolute path;
- server → scheduler: the child's pid, or ``error`` (logged here) when it could not fork.

The server is single-threaded and runs no event loop between requests (``warm_up``'s loop is
closed before the first fork), so a fork copies nothing half-done. It reaps its children, and it
exits when its stdin closes (the scheduler stopped or died); runs in flight go on in their own
sessions, as runners spawned directly do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Final

from scaleodm.common import localruns
from scaleodm.common.logging import configure_logging, get_logger
from scaleodm.common.settings import SchedulerSettings
from scaleodm.common.store.s3 import S3
from scaleodm.run import runner

log = get_logger("scaleodm.run.forking")

READY: Final = b"ready"
ERROR: Final = b"error"
REAP_INTERVAL_S: Final = 1.0  # children that ended are reaped at least this often


async def warm_up(settings: SchedulerSettings) -> None:
    """Build and close one S3 client as the runner builds it, without a request: what botocore
    loads and caches at the first construction is then in every forked runner."""
    quiet = settings.s3.model_copy(update={"create_bucket": False})
    async with S3.open(quiet):
        pass


def fork_runner(path: Path, channels: tuple[int, ...]) -> int:
    """Fork the runner of the run directory ``path``; returns the child's pid (parent side).

    ``channels`` are the server's protocol descriptors, closed in the child so that the scheduler
    sees the server's end, not a runner's, when the server goes.
    """
    log_fd = os.open(path / localruns.RUNNER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()  # else the child would write the server's pending output once more
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:
        os.close(log_fd)
        raise
    if pid:
        os.close(log_fd)
        return pid
    code = 1
    try:  # the child: never returns into the server's loop
        os.setsid()
        for fd in channels:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        sys.argv = [runner.__file__ or runner.__name__, str(path)]
        code = runner.run(path)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def serve(requests: int, replies: int) -> int:
    """Answer fork requests read from ``requests`` on ``replies`` until ``requests`` closes."""
    pending = b""
    while True:
        readable, _, _ = select.select([requests], [], [], REAP_INTERVAL_S)
        _reap()
        if not readable:
            continue
        chunk = os.read(requests, 4096)
        if not chunk:
            return 0
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            path = Path(os.fsdecode(line))
            try:
                if not path.is_absolute():
                    raise ValueError("not an absolute path")
                pid = fork_runner(path, (requests, replies))
            except Exception as exc:
                log.error("runner not forked", run=path.name, error=repr(exc))
                answer = ERROR
            else:
                answer = str(pid).encode()
            os.write(replies, answer + b"\n")


def main() -> int:
    started = time.perf_counter()
    settings = SchedulerSettings()
    configure_logging("runner-forkserver", settings.log_level, settings.log_json)
    # The protocol on descriptors of its own; 0 and 1 then lead nowhere that matters, so that
    # nothing printed by an import can be taken for a reply.
    requests, replies = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    try:
        asyncio.run(warm_up(settings))
    except Exception as exc:  # the imports are most of the gain; serve without the rest
        log.warning("fork server warm-up failed", error=repr(exc))
    threads = threading.active_count()
    if threads != 1:  # a fork copies only the calling thread: say so, the runs may misbehave
        log.warning("threads alive in the fork server", threads=threads)
    log.info("runner fork server ready", warm_up_s=round(time.perf_counter() - started, 3))
    os.write(replies, READY + b"\n")
    try:
        return serve(requests, replies)
    except KeyboardInterrupt:  # a Ctrl-C that reached the scheduler's process group
        return 0


if __name__ == "__main__":
    sys.exit(main())
