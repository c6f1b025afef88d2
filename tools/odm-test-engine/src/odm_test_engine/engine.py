"""Run loop of the ODM test double: pacing, markers, progress datagrams, failure injection and
   signals.

Nothing here processes images. The engine prints ODM's startup block, plays back each stage plan
from :mod:`odm_test_engine.stages` between ``Running <stage> stage`` / ``Finished <stage> stage``
markers, sends the ``PGUP`` progress datagrams, writes the placeholder outputs and ``log.json``, and
exits like ODM would. A split-merge run (:mod:`odm_test_engine.splitmerge`) replaces the split and
merge plans with the remote executor and the merge of the submodels' outputs, and then, as ODM,
jumps to the last stage.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType

from . import ODM_VERSION, splitmerge
from .artifacts import Scene, to_json
from .cli import STAGES, Invocation
from .console import (
    Console,
    ProgressSender,
    odm_timestamp,
    opensfm_timestamp,
    write_error,
    write_line,
)
from .failures import InjectedFailure, failure_marker
from .images import list_images, read_images
from .stages import (
    STAGE_END_PROGRESS,
    STAGE_TIME_WEIGHT,
    Checkpoint,
    Context,
    Log,
    Raw,
    Sfm,
    Step,
    Write,
    executed_stages,
    plan,
    split_size,
    wants_split,
)

DEFAULT_SECONDS = 3.0
DEFAULT_FAIL_STAGE = "opensfm"
DEFAULT_PROGRESS_PORT = 6367
DEFAULT_RETRY_S = 10.0  # ODM's Task(retry_timeout=10)
DEFAULT_POLL_S = 3.0  # PyODM's wait_for_completion(interval=3), which ODM keeps

_SIGNAL_EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}


class ConfigError(Exception):
    """An invalid ``ODM_TEST_ENGINE_*`` environment variable (exit code 2)."""


class Interrupted(BaseException):
    """Raised from the signal handler; unwinds the run without writing anything else."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass(frozen=True)
class EngineConfig:
    """Test-double controls read from the environment (see the package docstring)."""

    seconds: float = DEFAULT_SECONDS
    fail_code: int | None = None
    fail_stage: str = DEFAULT_FAIL_STAGE
    progress_port: int = DEFAULT_PROGRESS_PORT
    ansi: bool = True
    retry_s: float = DEFAULT_RETRY_S
    poll_s: float = DEFAULT_POLL_S
    per_image_s: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EngineConfig:
        seconds = DEFAULT_SECONDS
        raw_seconds = env.get("ODM_TEST_ENGINE_SECONDS", "").strip()
        if raw_seconds:
            try:
                seconds = float(raw_seconds)
            except ValueError:
                raise ConfigError(
                    f"ODM_TEST_ENGINE_SECONDS must be a number, got {raw_seconds!r}"
                ) from None
            if not 0.0 <= seconds < float("inf"):
                raise ConfigError(f"ODM_TEST_ENGINE_SECONDS must be >= 0, got {raw_seconds!r}")

        fail_code: int | None = None
        raw_fail = env.get("ODM_TEST_ENGINE_FAIL", "").strip()
        if raw_fail:
            try:
                fail_code = int(raw_fail)
            except ValueError:
                raise ConfigError(
                    f"ODM_TEST_ENGINE_FAIL must be an integer exit code, got {raw_fail!r}"
                ) from None
            if not 0 <= fail_code <= 255:
                raise ConfigError(
                    f"ODM_TEST_ENGINE_FAIL must be between 0 and 255, got {raw_fail!r}"
                )
            fail_code = fail_code or None

        fail_stage = env.get("ODM_TEST_ENGINE_FAIL_STAGE", "").strip() or DEFAULT_FAIL_STAGE
        if fail_stage not in STAGES:
            raise ConfigError(
                f"ODM_TEST_ENGINE_FAIL_STAGE must be one of {', '.join(STAGES)}, got {fail_stage!r}"
            )

        port = DEFAULT_PROGRESS_PORT
        raw_port = env.get("ODM_TEST_ENGINE_PROGRESS_PORT", "").strip()
        if raw_port:
            try:
                port = int(raw_port)
            except ValueError:
                raise ConfigError(
                    f"ODM_TEST_ENGINE_PROGRESS_PORT must be an integer, got {raw_port!r}"
                ) from None
            if not 1 <= port <= 65535:
                raise ConfigError(
                    f"ODM_TEST_ENGINE_PROGRESS_PORT must be 1-65535, got {raw_port!r}"
                )

        return cls(
            seconds,
            fail_code,
            fail_stage,
            port,
            ansi=not env.get("no_ansiesc"),
            retry_s=_seconds(env, "ODM_TEST_ENGINE_RETRY_S", DEFAULT_RETRY_S, allow_zero=True),
            poll_s=_seconds(env, "ODM_TEST_ENGINE_POLL_S", DEFAULT_POLL_S, allow_zero=False),
            per_image_s=_seconds(env, "ODM_TEST_ENGINE_SECONDS_PER_IMAGE", 0.0,
                                 allow_zero=True),
        )


def _seconds(env: Mapping[str, str], name: str, default: float, *, allow_zero: bool) -> float:
    """A finite duration in seconds from ``env[name]`` (>= 0, or > 0 unless ``allow_zero``)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not (0.0 <= value < float("inf")) or (value == 0.0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {raw!r}")
    return value


def _failure_explanation(code: int) -> str:
    """The human-readable ``[ERROR]`` line after the dump, by exit-code class (as NodeODM)."""
    prefix = f"The program exited with a strange value ({code})"
    if code in (1, 134, 139):
        reason = "processing stopped because of strange values in the reconstruction"
    elif code == 137:
        reason = "it ran out of memory; add RAM or lower the quality settings"
    elif code == 132:
        reason = "this CPU is not supported by the ODM build"
    elif code == 3:
        reason = "a program required for processing is missing"
    else:
        return f"{prefix}. Please report it."
    return f"{prefix}: {reason}."


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT while a file is written, so that no half-written file is left."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(_SIGNAL_EXIT))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class _StageRecord:
    name: str
    start: str
    end: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)


class Engine:
    """One simulated ODM run."""

    def __init__(self, invocation: Invocation, config: EngineConfig) -> None:
        self.invocation = invocation
        self.config = config
        self.console = Console(config.ansi)
        self.project_dir = Path(invocation.project_path) / invocation.project_name
        self.started = datetime.now().astimezone()
        self.records: list[_StageRecord] = []
        self.progress = 0.0
        self.sender = ProgressSender(invocation.project_name, config.progress_port)
        self.end_progress: dict[str, float | None] = dict(STAGE_END_PROGRESS)
        self.executor: splitmerge.LocalRemoteExecutor | None = None
        self.submodels: list[splitmerge.Submodel] = []

    # --------------------------------------------------------------------------------- entry point

    def run(self) -> int:
        """Run to completion and return the exit code (SIGTERM/SIGINT: 143/130 at once)."""
        previous = {signum: signal.signal(signum, _raise_interrupted) for signum in _SIGNAL_EXIT}
        try:
            return self._run()
        except Interrupted as interrupted:
            code = _SIGNAL_EXIT.get(signal.Signals(interrupted.signum), 128 + interrupted.signum)
            if self.executor is not None and self.executor.started:
                self._exit_gracefully(code)
            return code
        except BrokenPipeError:
            # the reader of stdout went away: stop like a process killed by SIGPIPE would
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 128 + 13
        finally:
            self.sender.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _run(self) -> int:
        self._log("INFO", f"Initializing ODM {ODM_VERSION} - {odm_timestamp(self.started)}")
        self._log("INFO", "==============")
        for name, value in self.invocation.option_dump():
            self._log("INFO", f"{name}: {value}")
        self._log("INFO", "==============")

        chain = executed_stages(self.invocation)
        time_weight = STAGE_TIME_WEIGHT

        images_dir = self.project_dir / "images"
        self._begin_stage("dataset")
        images = read_images(list_images(images_dir))
        if not images:
            self._log("INFO", f"Loading dataset from: {images_dir}")
            self._log("ERROR", f"Not enough supported images in {images_dir}")
            self._write_log_json(
                success=False, error={"code": 1, "message": "Not enough supported images"}
            )
            return 1
        marked = failure_marker(list_images(images_dir))
        if marked is not None:
            self.config = dataclasses.replace(self.config, fail_code=marked)
        context = Context(
            self.invocation, self.project_dir, Scene.from_images(images), self.started
        )
        split_merge = bool(self.invocation.value("sm-cluster")) and wants_split(
            self.invocation, context.scene
        )
        if split_merge:
            chain = [s for s in chain if s in splitmerge.PARENT_STAGES]
            if "merge" not in chain:
                chain = [s for s in chain if s != "odm_postprocess"]
            time_weight = splitmerge.TIME_WEIGHT
            self.end_progress.update(splitmerge.END_PROGRESS)
        weights = {stage: time_weight[stage] for stage in chain}
        total_weight = sum(weights.values()) or 1.0
        # ODM's time grows with the dataset: a fixed part, plus a part per image when asked
        # (a split run's images are processed in its submodels: their share is theirs).
        seconds = self.config.seconds + (
            0.0 if split_merge else self.config.per_image_s * len(images))

        try:
            for stage in chain:
                if stage != "dataset":
                    self._begin_stage(stage)
                duration = seconds * weights[stage] / total_weight
                if split_merge and stage == "split":
                    self._split(context, duration)
                elif split_merge and stage == "merge":
                    self._play(stage, splitmerge.merge_plan(context, self.submodels), duration)
                else:
                    self._play(stage, plan(stage, context), duration)
                self._finish_stage(stage)
        except InjectedFailure as failure:
            self._dump_failure(failure)
            return failure.code
        except splitmerge.SplitMergeError as error:
            # ODM: system.ExitException -> [ERROR] line, log.json error, exit 1
            self._log("ERROR", str(error))
            self._write_log_json(success=False, error={"code": 1, "message": str(error)})
            return 1
        except splitmerge.ToolchainFailed as failed:
            # ODM lets the executor's error escape run.py: a Python traceback and exit 1
            trace = [
                "Traceback (most recent call last):",
                '  File "odm_test_engine/splitmerge.py", in run',
                "    raise error",
                f"{failed.kind}: {failed}",
            ]
            for line in trace:
                write_error(line)
            self._write_log_json(
                success=False,
                error={"code": 1, "message": str(failed), "stackTrace": "\n".join(trace)},
            )
            return 1

        if self.invocation.end_with in chain:
            self._log("INFO", "No more stages to run")
        self._log("INFO", f"ODM app finished - {odm_timestamp()}")
        self._write_log_json(success=True)
        return 0

    # ------------------------------------------------------------------------------- split-merge

    def _split(self, context: Context, duration: float) -> None:
        """ODM's split stage with a cluster node: lay out the submodels, run the toolchain phase.

        The stage's time goes to the local worker, ``duration / submodels`` per local submodel;
        remote submodels take as long as the node takes.
        """
        size = split_size(self.invocation) or 1
        images = context.scene.images
        concurrency = self.invocation.value("max-concurrency") or "4"
        try:
            reduced = max(1, int(concurrency) - 1)
        except ValueError:
            reduced = 1
        self._log("INFO", f"Setting max-concurrency to {reduced} to better handle remote splits")
        self._log(
            "INFO",
            f"Large dataset detected ({len(images)} photos) and split set at {size}. "
            "Preparing split merge.",
        )
        opensfm = context.path("opensfm")
        self._log("INFO", f'running "opensfm" create_submodels "{opensfm}"')
        self.submodels = splitmerge.layout(self.project_dir, images, size)
        for submodel in self.submodels:
            with _signals_deferred():
                splitmerge.link_images(submodel, self.project_dir / "images")
            for step in splitmerge.seed_steps(submodel):
                self._write(step)
        self._log(
            "INFO",
            f"Dataset has been split into {len(self.submodels)} submodels. "
            "Reconstructing each submodel...",
        )
        self._checkpoint("split", 25.0)
        if self.config.fail_code is not None and self.config.fail_stage == "split":
            raise InjectedFailure(self.config.fail_code, "split")

        url = self.invocation.value("sm-cluster") or ""
        self.executor = splitmerge.LocalRemoteExecutor(
            splitmerge.ExecutorSettings(
                url=url,
                options=splitmerge.submodel_options(self.invocation),
                local_seconds=duration / max(len(self.submodels), 1),
                per_image_s=self.config.per_image_s,
                retry_s=self.config.retry_s,
                poll_s=self.config.poll_s,
                started=self.started,
                log=self._log,
                write=self._write_file,
                on_finished=lambda done, total: self._checkpoint(
                    "split", 25.0 + 75.0 * done / max(total, 1)
                ),
            )
        )
        self.executor.connect()
        self.executor.run(self.submodels)
        self._write(Write("opensfm/split_done.txt", b"Done!\n"))

    def _checkpoint(self, stage: str, percent: float) -> None:
        """A stage-internal PGUP datagram (``percent`` of the stage), never going backwards."""
        end = self.end_progress[stage]
        if end is None:
            return
        start = self.progress
        self.sender.send(max(start, start + (end - start) * percent / 100.0))

    def _exit_gracefully(self, code: int) -> None:
        """SIGTERM during split-merge: remove the remote tasks (bounded), then exit at once.

        Like ODM's ``exit_gracefully``, the process ends with ``os._exit``: the workers and
        monitors are daemon threads that may be blocked in network calls.
        """
        executor = self.executor
        assert executor is not None
        for signum in _SIGNAL_EXIT:  # a second TERM must not cut the cleanup short
            signal.signal(signum, signal.SIG_IGN)
        try:
            executor.exit_gracefully()
        except BrokenPipeError:
            pass
        finally:
            self.sender.close()
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except OSError:
                    pass
            os._exit(code)

    # -------------------------------------------------------------------------------------- stages

    def _begin_stage(self, stage: str) -> None:
        self.records.append(_StageRecord(stage, datetime.now().astimezone().isoformat()))
        self._log("INFO", f"Running {stage} stage")

    def _finish_stage(self, stage: str) -> None:
        self._log("INFO", f"Finished {stage} stage")
        self.records[-1].end = datetime.now().astimezone().isoformat()
        end = self.end_progress[stage]
        if end is not None:
            self.progress = max(self.progress, end)
        self.sender.send(self.progress)

    def _play(self, stage: str, steps: list[Step], duration: float) -> None:
        visible = sum(1 for step in steps if isinstance(step, Log | Raw | Sfm))
        fail_after: int | None = None
        if self.config.fail_code is not None and stage == self.config.fail_stage:
            fail_after = visible // 2
        stage_start = self.progress
        stage_end = self.end_progress[stage] or stage_start
        started = time.monotonic()
        shown = 0
        for step in steps:
            if fail_after is not None and shown >= fail_after and isinstance(step, Log | Raw | Sfm):
                raise InjectedFailure(self.config.fail_code or 1, stage)
            if isinstance(step, Log):
                self._log(step.level, step.message)
            elif isinstance(step, Raw):
                self.console.raw(step.text)
            elif isinstance(step, Sfm):
                self.console.raw(f"{opensfm_timestamp()} {step.level}: {step.message}")
            elif isinstance(step, Checkpoint):
                self.sender.send(
                    max(
                        self.progress,
                        stage_start + (stage_end - stage_start) * step.percent / 100.0,
                    )
                )
                continue
            else:
                self._write(step)
                continue
            shown += 1
            self._pace(started, duration * shown / max(visible, 1))
        if fail_after is not None:
            raise InjectedFailure(self.config.fail_code or 1, stage)
        self._pace(started, duration)

    @staticmethod
    def _pace(started: float, offset: float) -> None:
        """Sleep until ``started + offset`` (deadline-based: short lines accumulate no drift)."""
        remaining = started + offset - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)

    # ------------------------------------------------------------------------------------- outputs

    def _log(self, level: str, message: str) -> None:
        self.console.log(level, message)
        if self.records:
            self.records[-1].messages.append({"message": message, "type": level.lower()})

    def _write(self, step: Write) -> None:
        self._write_file(self.project_dir / step.path, step.data)

    def _write_file(self, target: Path, data: bytes) -> None:
        """Write ``data`` atomically (temporary file + rename); also called by worker threads."""
        with _signals_deferred():
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.{threading.get_ident()}.tmp")
            temporary.write_bytes(data)
            os.replace(temporary, target)

    def _dump_failure(self, failure: InjectedFailure) -> None:
        trace = [
            "Traceback (most recent call last):",
            '  File "odm_test_engine/engine.py", in _play',
            "    raise InjectedFailure(code, stage)",
            f"odm_test_engine.engine.InjectedFailure: {failure} "
            f"(simulated in stage {failure.stage} by ODM_TEST_ENGINE_FAIL; this is a test double)",
        ]
        write_line("")
        write_line("===== Dumping Info for Geeks (developers need this to fix bugs) =====")
        write_line(str(failure))
        for line in trace:
            write_line(line)
        write_line("===== Done, human-readable information to follow... =====")
        write_line("")
        self._log("ERROR", _failure_explanation(failure.code))
        self._write_log_json(
            success=False,
            error={"code": failure.code, "message": str(failure), "stackTrace": "\n".join(trace)},
        )

    def _write_log_json(self, *, success: bool, error: dict[str, object] | None = None) -> None:
        if not self.project_dir.is_dir():
            return
        finished = datetime.now().astimezone()
        document: dict[str, object] = {
            "odmVersion": ODM_VERSION,
            "engine": "odm-test-engine (TEST DOUBLE, no processing was done)",
            "cpus": os.cpu_count(),
            "images": len(list_images(self.project_dir / "images")),
            "options": dict(self.invocation.option_dump()),
            "startTime": self.started.isoformat(),
            "stages": [
                {"name": r.name, "startTime": r.start, "endTime": r.end, "messages": r.messages}
                for r in self.records
            ],
            "processes": [],
            "success": success,
            "endTime": finished.isoformat(),
            "totalTime": round((finished - self.started).total_seconds(), 3),
        }
        if error is not None:
            document["error"] = error
        self._write(Write("log.json", to_json(document)))
