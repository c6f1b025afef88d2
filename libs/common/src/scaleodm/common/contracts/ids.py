"""Identifier types shared by the contracts."""

from __future__ import annotations

import re
from typing import NewType

TaskId = NewType("TaskId", str)
EventId = NewType("EventId", str)

# NodeODM §1.6/§3.5: 8-4-4-4-12 hex, version [1-7], variant [89ab], case-insensitive.
_UUID = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[1-7][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", re.IGNORECASE
)


def is_task_id(value: str) -> bool:
    return _UUID.fullmatch(value) is not None


def run_name(task_id: str, attempt: int) -> str:
    """Deterministic name of one attempt's run (local run dir, Argo Workflow name)."""
    return f"odm-{task_id.lower()}-{attempt}"
