"""The run-source port: something that follows runs and emits their events until stopped."""

from __future__ import annotations

from typing import Protocol


class RunSource(Protocol):
    async def run(self) -> None:
        """Follow runs until cancelled."""
        ...
