"""The README's configuration table, generated from the settings classes.

``python scripts/settings_table.py`` prints it; ``--write`` replaces the table between the
``<!-- settings-table -->`` markers in README.md; ``--check`` exits 1 when README.md is stale
(the test suite runs the check).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from scaleodm.common.settings import SETTINGS_CLASSES, env_names

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- settings-table -->", "<!-- /settings-table -->"


def _default(field: Any) -> str:
    if field.is_required():  # a field of an optional group (`oidc`): needed once it is used
        return "unset (needed to use the group)"
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, BaseModel):
        return ""
    if value is None:
        return "unset"
    if isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
        # As the variable is written: JSON.
        return f"`{json.dumps([v.model_dump(mode='json') for v in value])}`"
    if hasattr(value, "value"):
        value = value.value
    return f"`{value}`"


def table() -> str:
    rows: dict[str, tuple[str, str, list[str]]] = {}
    for service, cls in SETTINGS_CLASSES.items():
        for env, field in env_names(cls).items():
            doc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            entry = rows.setdefault(env, (_default(field), doc, []))
            entry[2].append(service)
    lines = ["| Variable | Default | Used by | Meaning |", "|---|---|---|---|"]
    for env in sorted(rows):
        default, doc, services = rows[env]
        used = "all" if len(services) == len(SETTINGS_CLASSES) else ", ".join(services)
        lines.append(f"| `{env}` | {default} | {used} | {doc} |")
    return "\n".join(lines)


def render(readme: str) -> str:
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    if "--write" in argv:
        README.write_text(render(README.read_text()))
        return 0
    if "--check" in argv:
        current = README.read_text()
        return 0 if render(current) == current else 1
    sys.stdout.write(table() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
