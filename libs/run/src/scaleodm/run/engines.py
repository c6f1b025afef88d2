"""The engine command of a local run: ODM in docker, the ODM test double, or a custom command.

Options reach the engine as separate argv items, never through a shell (nodeodm-api §5.5).
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import sys
from pathlib import Path

from scaleodm.common.settings import EngineKind, SchedulerSettings


class EngineUnavailableError(RuntimeError):
    pass


async def docker_answers(timeout_s: float = 5.0) -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        proc = await asyncio.create_subprocess_exec(
            "docker", "info", "--format", "{{.ServerVersion}}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        return await asyncio.wait_for(proc.wait(), timeout_s) == 0
    except (OSError, TimeoutError):
        return False


async def resolve_engine(settings: SchedulerSettings) -> EngineKind:
    """``auto`` means docker when a docker engine answers; never silently the test double."""
    if settings.engine is not EngineKind.AUTO:
        return settings.engine
    if await docker_answers():
        return EngineKind.DOCKER
    raise EngineUnavailableError(
        "SCALEODM_ENGINE=auto found no docker engine; start docker, or set SCALEODM_ENGINE=test "
        "to run the ODM test double (development and tests only)"
    )


def engine_argv(
    kind: EngineKind,
    settings: SchedulerSettings,
    *,
    options: list[str],
    project_path: Path,
    project_name: str,
    container_name: str,
) -> list[str]:
    if kind is EngineKind.TEST:
        return [sys.executable, "-m", "odm_test_engine", *options,
                "--project-path", str(project_path), project_name]
    if kind is EngineKind.DOCKER:
        return ["docker", "run", "--rm", "--name", container_name,
                "-v", f"{project_path}:/datasets", settings.odm_image,
                *options, "--project-path", "/datasets", project_name]
    if kind is EngineKind.COMMAND:
        argv: list[str] = []
        for token in shlex.split(settings.engine_command):
            if token == "{options}":
                argv.extend(options)
            else:
                argv.append(token.format(project_path=project_path, project_name=project_name))
        if not argv:
            raise EngineUnavailableError("SCALEODM_ENGINE=command needs SCALEODM_ENGINE_COMMAND")
        return argv
    raise EngineUnavailableError(f"engine {kind} is not resolved")
