"""Liveness (``runtime.liveness``): alive while connected or reconnecting, dead once the NATS
connection is closed for good — or once nats-py's reconnection task has ended while the
connection still says "reconnecting" (an exception in a callback ends it: no attempt will come).
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

from scaleodm.common import runtime


def _broker(**conn: Any) -> Any:
    return types.SimpleNamespace(_connection=types.SimpleNamespace(**conn))


async def test_liveness_follows_the_connection_and_its_reconnection_task() -> None:
    running = asyncio.get_running_loop().create_task(asyncio.sleep(60))
    ended = asyncio.get_running_loop().create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    try:
        connected = _broker(is_closed=False, is_connected=True, _reconnection_task=ended)
        trying = _broker(is_closed=False, is_connected=False, _reconnection_task=running)
        stuck = _broker(is_closed=False, is_connected=False, _reconnection_task=ended)
        closed = _broker(is_closed=True, is_connected=False, _reconnection_task=None)
        assert runtime.liveness(connected) == (200, {"status": "ok", "nats": "connected"})
        assert runtime.liveness(trying) == (200, {"status": "ok", "nats": "reconnecting"})
        assert runtime.liveness(stuck) == (503, {"status": "dead", "nats": "closed"})
        assert runtime.liveness(closed) == (503, {"status": "dead", "nats": "closed"})
        assert runtime.liveness(types.SimpleNamespace(_connection=None))[0] == 503
    finally:
        running.cancel()
