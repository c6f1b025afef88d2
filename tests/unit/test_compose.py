"""The development deployment (docker-compose.yml, Dockerfile, .dockerignore) against the code.

Nothing here runs docker: the files are parsed (PyYAML, tomllib, a small Dockerfile reader) and
checked against the settings classes and the packages' console scripts.

Covered:
- every ``SCALEODM_*`` variable a compose service sets (mapping or list form, merged anchors) is
  read by that service's settings class (``env_names``), the values validate, and only services
  built from our Dockerfile set any;
- the four services (identified by their command, or the image's default command), nats, mongo
  and minio exist; each ScaleODM service runs once;
- scheduler and watcher mount the same runs directory at the path both read from
  ``SCALEODM_LOCAL__RUNS_DIR``; with ``SCALEODM_ENGINE=docker`` that mount is a bind mount at the
  same absolute path on host and container, the docker socket is mounted and the image has the
  docker CLI (``scheduler-docker`` target);
- the gateway publishes host port 3000 to its ``SCALEODM_GATEWAY_PORT``;
- every entry command of the Dockerfile and every compose ``command`` of our services is a console
  script of ``services/*/pyproject.toml``, one per settings class;
- every compose build target is a Dockerfile stage; the dependency layer copies every workspace
  member's pyproject.toml; ``.dockerignore`` excludes nothing the Dockerfile copies.

Compose variables are interpolated with every variable unset, i.e. the file's own defaults.
Left out: building or starting anything, and image tags (no docker engine in the test runs).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from scaleodm.common.settings import SETTINGS_CLASSES, GatewaySettings, env_names

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKER_SOCKET = "/var/run/docker.sock"
INFRASTRUCTURE = ("nats", "mongo", "minio")


# --- compose --------------------------------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$\$"
    r"|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: str) -> str:
    """Compose interpolation with every variable unset: ``${VAR:-default}`` gives the default."""

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        op = m.group("op")
        if op in ("-", ":-"):
            return m.group("arg")
        if op in ("?", ":?"):
            raise AssertionError(f"compose needs variable {m.group('name')} to be set")
        return ""

    return _VARIABLE.sub(substitute, value)


def _interpolate_tree(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate_tree(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(v) for v in node]
    if isinstance(node, str):
        return interpolate(node)
    return node


@functools.cache
def compose() -> dict[str, Any]:
    """docker-compose.yml, anchors merged (PyYAML resolves ``<<``), variables interpolated."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    result: dict[str, Any] = _interpolate_tree(data)
    return result


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose()["services"]
    return result


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's ``environment`` in mapping or list form (``KEY=VALUE`` / bare ``KEY``)."""
    env = service.get("environment") or {}
    if isinstance(env, dict):
        return {str(k): None if v is None else _env_value(v) for k, v in env.items()}
    result: dict[str, str | None] = {}
    for item in env:
        key, sep, value = str(item).partition("=")
        result[key] = value if sep else None
    return result


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def command(service: dict[str, Any]) -> list[str] | None:
    cmd = service.get("command")
    if cmd is None:
        return None
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def build_of(service: dict[str, Any]) -> dict[str, Any] | None:
    """The service's build section when it builds our Dockerfile, else None."""
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    if (ROOT / build.get("context", ".")).resolve() != ROOT:
        return None
    if build.get("dockerfile", "Dockerfile") != DOCKERFILE.name:
        return None
    result: dict[str, Any] = build
    return result


def program_of(service: dict[str, Any]) -> str | None:
    """The program a service built from our Dockerfile runs (its command or the image's CMD)."""
    build = build_of(service)
    if build is None:
        return None
    if service.get("entrypoint"):
        raise AssertionError("services built from the Dockerfile must not override entrypoint")
    cmd = command(service) or dockerfile().entry_command(build.get("target"))
    assert cmd, "no command and no CMD in the Dockerfile"
    return cmd[0]


def scaleodm_services() -> dict[str, str]:
    """Compose service name -> ScaleODM service (a key of ``SETTINGS_CLASSES``)."""
    result: dict[str, str] = {}
    for name, service in services().items():
        program = program_of(service)
        if program is None:
            continue
        kind = program.removeprefix("scaleodm-")
        assert kind in SETTINGS_CLASSES, f"{name}: {program} is not a ScaleODM service"
        result[name] = kind
    return result


def compose_name(kind: str) -> str:
    names = [n for n, k in scaleodm_services().items() if k == kind]
    assert len(names) == 1, f"expected one compose service running scaleodm-{kind}: {names}"
    return names[0]


@dataclasses.dataclass(frozen=True)
class Mount:
    source: str | None  # None: anonymous volume
    target: str
    bind: bool


def mounts(service: dict[str, Any]) -> list[Mount]:
    result = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            source, target = item.get("source"), str(item["target"])
            bind = item.get("type", "volume") == "bind"
        else:
            parts = str(item).split(":")
            source, target = (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
            bind = source is not None and source.startswith(("/", ".", "~"))
        result.append(Mount(source, target, bind))
    return result


def published_ports(service: dict[str, Any]) -> set[tuple[str, str]]:
    """(host port, container port) pairs of ``ports`` (short or long syntax)."""
    result = set()
    for item in service.get("ports") or []:
        if isinstance(item, dict):
            if item.get("published") is not None:
                result.add((str(item["published"]), str(item["target"])))
            continue
        parts = str(item).split("/")[0].split(":")
        if len(parts) >= 2:
            result.add((parts[-2], parts[-1]))
    return result


# --- Dockerfile -----------------------------------------------------------------------------------

_HEREDOC = re.compile(r"<<(-?)([\"']?)([A-Za-z_][A-Za-z0-9_]*)\2")


@dataclasses.dataclass
class Stage:
    name: str | None
    base: str
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    copies: list[list[str]] = dataclasses.field(default_factory=list)  # sources from the context
    instructions: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Dockerfile:
    stages: list[Stage]

    def stage(self, name: str | None) -> Stage:
        if name is None:
            return self.stages[-1]  # the default build target
        matches = [s for s in self.stages if s.name == name]
        assert matches, f"no Dockerfile stage {name!r}"
        return matches[0]

    def entry_command(self, target: str | None) -> list[str] | None:
        """ENTRYPOINT + CMD of a target, inherited through ``FROM <stage>``."""
        cmd = entrypoint = None
        for stage in self.chain(target):
            cmd = cmd if cmd is not None else stage.cmd
            entrypoint = entrypoint if entrypoint is not None else stage.entrypoint
        return [*(entrypoint or []), *(cmd or [])] or None

    def chain(self, target: str | None) -> list[Stage]:
        """The target stage and the stages it is built ``FROM``, nearest first."""
        names = {s.name for s in self.stages}
        stage: Stage | None = self.stage(target)
        result = []
        while stage is not None:
            result.append(stage)
            stage = self.stage(stage.base) if stage.base in names else None
        return result


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuations joined, comments and heredoc bodies skipped."""
    result = []
    lines = iter(text.splitlines())
    pending = ""
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical, pending = pending + stripped, ""
        instruction, _, args = logical.partition(" ")
        instruction = instruction.upper()
        if instruction in ("RUN", "COPY", "ADD"):
            for m in _HEREDOC.finditer(args):
                for body in lines:
                    if (body.lstrip("\t") if m.group(1) else body) == m.group(3):
                        break
        result.append((instruction, args.strip()))
    return result


def _exec_form(args: str) -> list[str]:
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list)
        return [str(v) for v in value]
    return shlex.split(args)


@functools.cache
def dockerfile() -> Dockerfile:
    stages: list[Stage] = []
    for instruction, args in _instructions(DOCKERFILE.read_text()):
        if instruction == "FROM":
            tokens = [t for t in args.split() if not t.startswith("--")]
            name = tokens[2] if len(tokens) >= 3 and tokens[1].lower() == "as" else None
            stages.append(Stage(name=name, base=tokens[0]))
            continue
        if not stages:  # global ARGs before the first FROM
            continue
        stages[-1].instructions.append((instruction, args))
        if instruction == "CMD":
            stages[-1].cmd = _exec_form(args)
        elif instruction == "ENTRYPOINT":
            stages[-1].entrypoint = _exec_form(args)
        elif instruction in ("COPY", "ADD"):
            tokens = shlex.split(args)
            if any(t.startswith("--from=") for t in tokens) or _HEREDOC.search(args):
                continue
            paths = [t for t in tokens if not t.startswith("--")]
            stages[-1].copies.append(paths[:-1])
    assert stages, "Dockerfile has no FROM"
    return Dockerfile(stages)


def console_scripts() -> dict[str, str]:
    """Console scripts of the services' pyproject.toml files -> their entry points."""
    scripts: dict[str, str] = {}
    for pyproject in sorted((ROOT / "services").glob("*/pyproject.toml")):
        data = tomllib.loads(pyproject.read_text())
        scripts.update(data.get("project", {}).get("scripts", {}))
    return scripts


# --- tests ----------------------------------------------------------------------------------------


def test_compose_parses_and_has_every_service() -> None:
    names = set(services())
    for required in (*INFRASTRUCTURE, *SETTINGS_CLASSES):
        assert required in names, f"docker-compose.yml has no service {required!r}"
    assert sorted(scaleodm_services().values()) == sorted(SETTINGS_CLASSES)
    for kind in SETTINGS_CLASSES:
        assert compose_name(kind) == kind  # the compose name says what runs


def test_scaleodm_variables_are_settings_of_the_service() -> None:
    ours = scaleodm_services()
    problems = []
    for name, service in services().items():
        assert "env_file" not in service, f"{name}: env_file would hide variables from this check"
        variables = [k for k in environment(service) if k.upper().startswith("SCALEODM_")]
        if name not in ours:
            problems += [f"{name}: {k} set on a service that is not ScaleODM" for k in variables]
            continue
        known = env_names(SETTINGS_CLASSES[ours[name]])
        problems += [
            f"{name}: {k} is not a setting of {SETTINGS_CLASSES[ours[name]].__name__}"
            for k in variables
            if k.upper() not in known
        ]
    assert not problems, "\n".join(problems)


def test_compose_environment_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("SCALEODM_"):
            monkeypatch.delenv(key)
    for name, kind in scaleodm_services().items():
        env = {k: v for k, v in environment(services()[name]).items() if v is not None}
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            settings = SETTINGS_CLASSES[kind]()
        assert settings.environment.value == "development", name
        assert settings.nats.url.startswith("nats://nats:"), name
        assert settings.mongo.url.startswith("mongodb://mongo:"), name
        assert settings.s3.endpoint_url and "//minio:" in settings.s3.endpoint_url, name
        for key in (
            "SCALEODM_S3__ACCESS_KEY_ID",
            "SCALEODM_S3__SECRET_ACCESS_KEY",
            "SCALEODM_S3__BUCKET",
            "SCALEODM_S3__REGION",
        ):
            assert key in env, f"{name}: {key} not set"


def test_scheduler_and_watcher_share_the_runs_directory() -> None:
    runs: dict[str, Mount] = {}
    for kind in ("scheduler", "watcher"):
        service = services()[compose_name(kind)]
        runs_dir = environment(service).get("SCALEODM_LOCAL__RUNS_DIR")
        assert runs_dir and runs_dir.startswith("/"), f"{kind}: SCALEODM_LOCAL__RUNS_DIR unset"
        matching = [mt for mt in mounts(service) if mt.target.rstrip("/") == runs_dir.rstrip("/")]
        assert len(matching) == 1, f"{kind}: no mount at SCALEODM_LOCAL__RUNS_DIR={runs_dir}"
        runs[kind] = matching[0]
    assert runs["scheduler"] == runs["watcher"], runs
    mount = runs["scheduler"]
    assert mount.source, "an anonymous volume is not shared"
    if not mount.bind:
        assert mount.source in (compose().get("volumes") or {}), mount


def test_docker_engine_wiring() -> None:
    service = services()[compose_name("scheduler")]
    if environment(service).get("SCALEODM_ENGINE") != "docker":
        pytest.skip("the scheduler does not run ODM through docker")
    runs_dir = environment(service)["SCALEODM_LOCAL__RUNS_DIR"]
    (mount,) = [mt for mt in mounts(service) if mt.target == runs_dir]
    # `docker run -v <project path>:/datasets` is resolved by the host's daemon.
    assert mount.bind and mount.source == mount.target, f"runs must be host path = path: {mount}"
    assert any(mt.target == DOCKER_SOCKET for mt in mounts(service)), "docker socket not mounted"
    build = build_of(service)
    assert build is not None
    installs_docker = [
        args
        for stage in dockerfile().chain(build.get("target"))
        for instruction, args in stage.instructions
        if instruction in ("COPY", "RUN") and re.search(r"\bdocker(\.io)?\b", args)
    ]
    assert installs_docker, "SCALEODM_ENGINE=docker needs an image target with the docker CLI"


def test_gateway_publishes_3000() -> None:
    service = services()[compose_name("gateway")]
    port = environment(service).get("SCALEODM_GATEWAY_PORT") or str(
        GatewaySettings.model_fields["gateway_port"].default
    )
    assert ("3000", port) in published_ports(service), published_ports(service)


def test_dependencies_wait_for_health() -> None:
    for name in scaleodm_services():
        depends = services()[name].get("depends_on")
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for infra in ("nats", "mongo"):
            assert depends.get(infra, {}).get("condition") == "service_healthy", (name, infra)
        for dep in depends:
            assert dep in services(), f"{name} depends on unknown service {dep}"
    for infra in ("nats", "mongo", "minio"):
        assert services()[infra].get("healthcheck"), f"{infra} has no healthcheck"


def test_entry_commands_are_console_scripts() -> None:
    scripts = console_scripts()
    assert {f"scaleodm-{kind}" for kind in SETTINGS_CLASSES} <= set(scripts), scripts
    programs = {
        cmd[0]
        for stage in dockerfile().stages
        if stage.name is not None and (cmd := dockerfile().entry_command(stage.name))
    }
    assert programs, "the Dockerfile declares no CMD"
    programs |= {p for s in services().values() if (p := program_of(s)) is not None}
    missing = sorted(p for p in programs if p not in scripts)
    assert not missing, f"not console scripts of services/*/pyproject.toml: {missing}"


def test_build_targets_are_dockerfile_stages() -> None:
    for service in services().values():
        build = build_of(service)
        if build is not None and build.get("target") is not None:
            dockerfile().stage(build["target"])  # asserts it exists
    assert dockerfile().stages[-1].name == "runtime", "the default target should be `runtime`"


def test_dockerfile_copies_every_workspace_member_manifest() -> None:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    members = [
        path.parent.relative_to(ROOT).as_posix()
        for pattern in root["tool"]["uv"]["workspace"]["members"]
        for path in sorted(ROOT.glob(f"{pattern}/pyproject.toml"))
    ]
    copied = {src for stage in dockerfile().stages for copy in stage.copies for src in copy}
    for required in ("pyproject.toml", "uv.lock", *(f"{m}/pyproject.toml" for m in members)):
        assert required in copied, f"Dockerfile does not COPY {required}"


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith(("#", "!"))
    ]
    for stage in dockerfile().stages:
        for source in (src.rstrip("/") for copy in stage.copies for src in copy):
            parts = source.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            hits = [(p, pat) for p in prefixes for pat in patterns if fnmatch.fnmatch(p, pat)]
            assert not hits, f".dockerignore excludes {source}: {hits}"
