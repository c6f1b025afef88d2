"""Task states and their one mapping to NodeODM status codes (nodeodm-api §4.1)."""

from __future__ import annotations

import enum


class TaskState(enum.StrEnum):
    """Internal state of a task's current attempt."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL_STATES = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELED})
ACTIVE_STATES = frozenset({TaskState.QUEUED, TaskState.RUNNING})


class NodeOdmStatus(enum.IntEnum):
    """NodeODM status codes; no other value may appear (PyODM's enum raises)."""

    QUEUED = 10
    RUNNING = 20
    FAILED = 30
    COMPLETED = 40
    CANCELED = 50


_TO_NODEODM = {
    TaskState.QUEUED: NodeOdmStatus.QUEUED,
    TaskState.RUNNING: NodeOdmStatus.RUNNING,
    TaskState.FAILED: NodeOdmStatus.FAILED,
    TaskState.COMPLETED: NodeOdmStatus.COMPLETED,
    TaskState.CANCELED: NodeOdmStatus.CANCELED,
}


def to_nodeodm_code(state: TaskState) -> NodeOdmStatus:
    return _TO_NODEODM[state]


# NodeODM §4.2: engine exit code -> errorMessage.
def engine_exit_message(code: int) -> str:
    if code in (1, 134, 139):
        return "Cannot process dataset"
    if code == 137:
        return "Not enough memory"
    if code == 132:
        return "Unsupported CPU"
    if code == 3:
        return "Installation issue"
    return f"Processing failed ({code})"
