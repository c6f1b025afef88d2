"""Runs as their events tell them (from the event log in MongoDB): when each ran, how many at once.

The runs' own ``running`` and terminal events are the truth about concurrency, not what admission
believes; ``tests/integration/test_capacity.py`` and ``test_tenants.py`` check their limits on it.
"""

from __future__ import annotations

import datetime as dt

from pymongo import MongoClient

from tests.harness.stack import Stack


def run_intervals(stack: Stack, ids: list[str]) -> dict[str, tuple[float, float]]:
    """Each task's run as its events tell it: from ``running`` to its end (or now)."""
    with MongoClient(stack.mongo_url, tz_aware=True) as client:
        db = client[stack.database]
        out = {}
        for ev in db["events"].find({"task_id": {"$in": ids}}).sort("seq"):
            t = dt.datetime.fromisoformat(ev["body"]["occurred_at"]).timestamp()
            key = f"{ev['task_id']}:{ev['attempt']}"
            if ev["kind"] == "running":
                out[key] = (t, float("inf"))
            elif ev["kind"] in ("completed", "failed", "canceled", "removed") and key in out:
                start, end = out[key]
                out[key] = (start, min(end, t))
        return out


def most_at_once(intervals: dict[str, tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals.values()] +
                    [(e, -1) for _, e in intervals.values()])
    best = now = 0
    for _, step in points:  # an end sorts before a start at the same instant
        now += step
        best = max(best, now)
    return best
