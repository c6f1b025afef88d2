"""Identifier types shared by the contracts, and the one rule for spelling a task id.

A task id is a uuid, which is case-insensitive: ``ABC…`` and ``abc…`` name the same task. Every
id that enters the system (the ``set-uuid`` header, ``{uuid}`` path parameters, action bodies) goes
through ``canonical_task_id`` first, so one task has exactly one spelling in the store, the
bus, S3 keys and run names; two spellings can never become two tasks sharing one run.
"""

from __future__ import annotations

import re
from typing import NewType

TaskId = NewType("TaskId", str)
EventId = NewType("EventId", str)

# NodeODM §1.6/§3.5: 8-4-4-4-12 hex, version [1-7], variant [89ab], case-insensitive. ASCII only:
# under Unicode case folding some non-ASCII letters match ASCII ones (U+212A KELVIN SIGN ~ k).
_UUID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[1-7][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
    re.IGNORECASE | re.ASCII,
)


def is_task_id(value: str) -> bool:
    return _UUID.fullmatch(value) is not None


def canonical_task_id(value: str | None) -> TaskId | None:
    """The task id ``value`` spells, in its canonical lower-case form; None when it is none.

    NodeODM generates lower-case v4 uuids (§1.6) and ClusterODM sends those as ``set-uuid``, so
    the canonical form is what those clients already use.
    """
    if value is None or not is_task_id(value):
        return None
    return TaskId(value.lower())


def run_name(task_id: str, attempt: int) -> str:
    """Deterministic name of one attempt's run (local run dir, Argo Workflow name)."""
    return f"odm-{task_id.lower()}-{attempt}"
