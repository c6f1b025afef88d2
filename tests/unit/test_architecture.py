"""The architecture contracts and the developer entry points.

Covered:
- ``lint-imports`` (import-linter, from the venv next to ``sys.executable``) keeps every contract of
  ``[tool.importlinter]`` in pyproject.toml: services independent, layers inside common, the pure
  domain, where pymongo/aioboto3/FastStream/Kubernetes may be imported;
- README.md documents ``uv run task up`` and ``uv run task test``; Taskfile.yml defines the tasks
  ``up``, ``test`` and ``lint`` (each with at least one command).

Left out: ruff and mypy (run by ``task lint``, not by the tests) and running the tasks themselves.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"import-linter is not installed next to {sys.executable}"
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]

    proc = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Contracts: {len(contracts)} kept, 0 broken." in proc.stdout
    assert len(contracts) >= 8


@pytest.mark.parametrize(
    "command",
    [pytest.param("uv run task up", id="up"), pytest.param("uv run task test", id="test")],
)
def test_readme_mentions(command: str) -> None:
    assert command in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("task", [pytest.param(t, id=t) for t in ("up", "test", "lint")])
def test_taskfile_defines(task: str) -> None:
    taskfile = yaml.safe_load((ROOT / "Taskfile.yml").read_text())
    assert str(taskfile["version"]) == "3"
    definition = taskfile["tasks"][task]
    assert definition["cmds"], f"task {task} has no commands"


def test_lint_task_runs_import_linter() -> None:
    lint = yaml.safe_load((ROOT / "Taskfile.yml").read_text())["tasks"]["lint"]
    assert any("lint-imports" in str(cmd) for cmd in lint["cmds"])
