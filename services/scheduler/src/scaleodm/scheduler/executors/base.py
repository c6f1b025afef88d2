"""The executor port: start, cancel and remove one attempt's run, idempotently."""

from __future__ import annotations

import enum
from typing import Protocol

from scaleodm.common.contracts.commands import RunSpec


class StartOutcome(enum.Enum):
    STARTED = "started"
    EXISTS = "exists"  # the run was already created: a redelivered command changes nothing


class Executor(Protocol):
    async def start(self, spec: RunSpec) -> StartOutcome:
        """Create the attempt's run unless it exists (the run name derives from uuid + attempt)."""
        ...

    async def cancel(self, task_id: str, attempt: int) -> bool:
        """Stop the attempt's run; True if a live run was signalled."""
        ...

    async def remove(self, task_id: str, attempt: int) -> None:
        """Stop and delete every trace of the task's runs."""
        ...

    async def close(self) -> None: ...
