"""Named fault-injection points for tests and chaos runs (``SCALEODM_FAILPOINTS``).

A failpoint is a place in the code where a test can make a service hang or crash, e.g. the
scheduler between starting a run and acking the command. Production leaves the setting empty,
and then ``hit()`` costs one dict lookup. ``name=action:p`` acts with probability ``p`` only
(chaos runs: ``gateway.run.before_publish=crash:0.05`` crashes one request in twenty there).
"""

from __future__ import annotations

import asyncio
import os
import random

from scaleodm.common.logging import get_logger

log = get_logger(__name__)


def parse(spec: str) -> dict[str, str]:
    points: dict[str, str] = {}
    for item in spec.split(","):
        name, _, action = item.strip().partition("=")
        if name:
            points[name.strip()] = action.strip() or "hang"
    return points


class Failpoints:
    """Actions: ``hang`` (wait forever), ``crash`` (exit the process at once, no cleanup),
    ``error`` (raise ``FailpointError``: an unexpected exception, as a bug would raise),
    ``sleep<ms>`` (wait that many milliseconds, then go on: a slow dependency)."""

    def __init__(self, spec: str = "") -> None:
        self._points = parse(spec)

    async def hit(self, name: str) -> None:
        action = self._points.get(name)
        if action is None:
            return
        action, _, chance = action.partition(":")
        if chance and random.random() >= float(chance):
            return
        log.warning("failpoint hit", failpoint=name, action=action)
        if action == "crash":
            os._exit(97)
        if action == "hang":
            await asyncio.Event().wait()
        if action == "error":
            raise FailpointError(name)
        if action.startswith("sleep"):
            await asyncio.sleep(int(action.removeprefix("sleep")) / 1000)


class FailpointError(RuntimeError):
    """Raised by an ``error`` failpoint."""
