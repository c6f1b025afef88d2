"""One local run, as its own process: ``python -m scaleodm.run.runner <run dir>``, or forked
from the pre-imported fork server (``scaleodm.run.forking``), which is how the scheduler starts it.

The local counterpart of an Argo Workflow's pod: fetch inputs -> run the engine -> package and
upload the outputs -> write ``result.json``. It runs in its own session, so a scheduler crash
does not stop it, and holds ``runner.lock`` for its whole life, so a second runner for the same
attempt exits at once. SIGTERM (a cancel) kills the engine's process group and ends the run as
canceled. Progress and console lines are not reported from here: the watcher follows the run
directory, as it follows pods on Kubernetes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from scaleodm.common import localruns
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.domain import options as odm_options
from scaleodm.common.domain.status import engine_exit_message
from scaleodm.common.logging import configure_logging, get_logger
from scaleodm.common.settings import EngineKind, SchedulerSettings
from scaleodm.common.store.s3 import S3, parse_s3_url
from scaleodm.run import engines, fetching, packaging, stages

log = get_logger("scaleodm.runner")
KILL_GRACE_S = 10.0



def engine_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The engine's environment: the runner's without any ``SCALEODM_*`` setting. The engine
    works on hostile input and needs none of them (S3 keys, database and bus passwords)."""
    return {k: v for k, v in environ.items() if not k.upper().startswith("SCALEODM_")}

class Runner:
    def __init__(self, rd: localruns.RunDir, settings: SchedulerSettings) -> None:
        self.rd = rd
        self.settings = settings
        run = rd.run or {}
        self.spec = RunSpec.model_validate(run["spec"])
        self.engine = EngineKind(run["engine"])
        self.sm_cluster: str | None = run.get(localruns.SM_CLUSTER)
        self.traceparent: str | None = run.get(localruns.TRACEPARENT)
        self.engine_proc: asyncio.subprocess.Process | None = None
        self.canceled = False

    @property
    def project(self) -> Path:
        return self.rd.file(localruns.WORK_DIR) / self.spec.task_id

    async def execute(self) -> None:
        try:
            await self._stages()
        except asyncio.CancelledError:
            self.rd.write_result("canceled")
            log.info("run canceled")
        except (fetching.InputError, packaging.UploadError) as exc:
            self._fail(str(exc))
        except Exception:
            # The exception's text may hold paths, hosts or S3 details: it stays in the log.
            log.exception("run failed")
            self._fail(stages.INTERNAL_ERROR)

    def _fail(self, message: str, exit_code: int | None = None) -> None:
        if self.canceled:
            self.rd.write_result("canceled")
        else:
            self.rd.write_result("failed", message, exit_code)
        log.info("run ended", outcome="failed", error=message)

    async def _stages(self) -> None:
        images = self.project / "images"
        async with S3.open(self.settings.s3) as s3:
            self.rd.set_phase("fetching")
            count = await stages.fetch_images(
                self.spec.sources, images, s3, self.settings, task_id=self.spec.task_id
            )
            log.info("inputs fetched", images=count)
            extra = fetching.control_file_args(images, self.project)
            self.rd.set_phase("processing", images=count)
            if self.sm_cluster is not None:  # the run splits onto the cluster (splitmerge)
                extra += ["--sm-cluster", self.sm_cluster]
            code = await self._run_engine([*odm_options.to_engine_args(self.spec.options), *extra])
            if code != 0:
                self._fail(engine_exit_message(code), code)
                return
            self.rd.set_phase("packaging")
            packaging.write_task_output(self.rd.file(localruns.CONSOLE_FILE), self.project)
            await packaging.post_process(self.project, self.spec)
            files = packaging.collect(self.project, self.spec.outputs)
            archive = self.rd.file("all.zip")
            packaging.build_zip(self.project, files, archive)
            self.rd.set_phase("uploading")
            await packaging.upload_outputs(
                s3, parse_s3_url(self.spec.output_prefix), self.project, files, archive
            )
        self.rd.write_result("completed", exit_code=0)
        log.info("run ended", outcome="completed", files=len(files))

    async def _run_engine(self, option_args: list[str]) -> int:
        argv = engines.engine_argv(
            self.engine, self.settings, options=option_args,
            project_path=self.project.parent, project_name=self.spec.task_id,
            container_name=self.rd.path.name,
        )
        env = {**engine_environment(os.environ), "ODM_NONINTERACTIVE": "1"}
        if self.traceparent is not None:  # the run's trace, for an engine that reads it
            env["TRACEPARENT"] = self.traceparent
        if self.engine is EngineKind.TEST:
            env["ODM_TEST_ENGINE_SECONDS"] = str(self.settings.test_engine_seconds)
        console = self.rd.file(localruns.CONSOLE_FILE).open("ab")
        try:
            self.engine_proc = await asyncio.create_subprocess_exec(
                *argv, stdout=console, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True, env=env,
            )
        except OSError as exc:
            console.close()
            log.error("engine not started", argv=argv[:3], error=repr(exc))
            raise fetching.InputError("Could not start the processing engine") from exc
        self.rd.file(localruns.ENGINE_PID).write_text(str(self.engine_proc.pid))
        log.info("engine started", argv=argv[:3], pid=self.engine_proc.pid)
        try:
            return await self.engine_proc.wait()
        finally:
            console.close()

    async def stop_engine(self) -> None:
        proc = self.engine_proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        if self.engine is EngineKind.DOCKER:
            kill = await asyncio.create_subprocess_exec(
                "docker", "kill", self.rd.path.name,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
            await kill.wait()
        try:
            await asyncio.wait_for(proc.wait(), KILL_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def main_async(rd: localruns.RunDir) -> int:
    lock_fd = os.open(rd.file(localruns.LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another runner owns this attempt
    rd.file(localruns.RUNNER_PID).write_text(str(os.getpid()))
    if rd.result is not None:
        return 0
    settings = SchedulerSettings()
    configure_logging("runner", settings.log_level, settings.log_json)
    if rd.cancel_requested:
        rd.write_result("canceled")
        return 0
    runner = Runner(rd, settings)
    body = asyncio.create_task(runner.execute())
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if runner.canceled:
            return
        runner.canceled = True
        log.info("cancel requested")

        async def stop() -> None:
            await runner.stop_engine()
            body.cancel()

        loop.create_task(stop())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    with contextlib.suppress(asyncio.CancelledError):
        await body
    if rd.result is None:
        rd.write_result("canceled" if runner.canceled else "failed", "Run ended without result")
    # The outputs are in S3 (or there are none): the disk goes back now, not when the task is
    # removed. The watcher's files stay (localruns.KEPT_FILES); the lock is held until here.
    rd.discard_work()
    return 0


def run(path: Path) -> int:
    """The run of the run directory ``path``, in this process; returns the exit code. Called by
    ``main`` and in each child of the fork server (``scaleodm.run.forking``)."""
    return asyncio.run(main_async(localruns.RunDir(path)))


def main() -> None:
    sys.exit(run(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
