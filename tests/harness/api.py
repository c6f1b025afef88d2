"""Small helpers for talking to the gateway the way NodeODM clients do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx


def form(**fields: str) -> dict[str, tuple[None, str]]:
    """Multipart text fields (httpx sends urlencoded unless given ``files``)."""
    return {k: (None, v) for k, v in fields.items()}


async def create(client: httpx.AsyncClient, *, files: list[tuple[str, bytes]] | None = None,
                 headers: dict[str, str] | None = None, **fields: str) -> dict[str, Any]:
    parts: list[tuple[str, Any]] = [(k, (None, v)) for k, v in fields.items()]
    parts += [("images", (name, data, "image/jpeg")) for name, data in files or []]
    resp = await client.post("/task/new", files=parts, headers=headers)
    assert resp.status_code == 200, resp.text
    assert "application/json" in resp.headers["content-type"]
    body: dict[str, Any] = resp.json()
    return body


async def info(client: httpx.AsyncClient, task_id: str, **params: Any) -> dict[str, Any]:
    resp = await client.get(f"/task/{task_id}/info", params=params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def poll_until(
    client: httpx.AsyncClient, task_id: str, done: Callable[[dict[str, Any]], bool],
    *, timeout_s: float = 60.0, interval_s: float = 0.1, seen: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        current = await info(client, task_id)
        if seen is not None:
            seen.append(current)
        if done(current):
            return current
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_id} stuck at {current}")
        await asyncio.sleep(interval_s)


def status_is(*codes: int) -> Callable[[dict[str, Any]], bool]:
    return lambda i: "status" in i and i["status"]["code"] in codes


# --- webhook deliveries (GET /task/{uuid}/webhooks) ----------------------------------------------


async def deliveries(hc: httpx.AsyncClient, task_id: str) -> list[dict[str, Any]]:
    """The task's webhook delivery records."""
    resp = await hc.get(f"/task/{task_id}/webhooks")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert isinstance(body, list), body
    return body


async def wait_deliveries(
    hc: httpx.AsyncClient, task_id: str, done: Callable[[list[dict[str, Any]]], bool],
    timeout_s: float = 30,
) -> list[dict[str, Any]]:
    """The delivery records once ``done(records)``; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = await deliveries(hc, task_id)
        if done(current):
            return current
        assert time.monotonic() < deadline, f"deliveries of {task_id} stuck at {current}"
        await asyncio.sleep(0.1)


def deliveries_settled(count: int) -> Callable[[list[dict[str, Any]]], bool]:
    """``count`` deliveries, none pending any more."""
    return lambda ds: len(ds) == count and all(d["status"] != "pending" for d in ds)


def delivery_to(records: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """The one delivery whose URL ends with ``path``."""
    [found] = [d for d in records if d["url"].endswith(path)]
    return found
