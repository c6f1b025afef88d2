"""The NodeODM task info object (nodeodm-api §3.6) built from a stored task document."""

from __future__ import annotations

from typing import Any

from scaleodm.common.domain import options as odm_options
from scaleodm.common.domain.status import TaskState, to_nodeodm_code


def processing_time_ms(doc: dict[str, Any], now_ms: int) -> int:
    """-1 until processing starts; running: now - start; ended: the final duration (§3.6)."""
    state = TaskState(doc["state"])
    started = doc.get("started_at_ms")
    if started is None or state in (TaskState.QUEUED, TaskState.CANCELED):
        return -1  # NodeODM resets processingTime to -1 on cancel
    finished = doc.get("finished_at_ms")
    end = finished if finished is not None and state != TaskState.RUNNING else now_ms
    return max(0, int(end) - int(started))


def task_info(doc: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """The info object in NodeODM's field order; ``output`` is added by the caller."""
    state = TaskState(doc["state"])
    status: dict[str, Any] = {"code": int(to_nodeodm_code(state))}
    if doc.get("error_message") and state == TaskState.FAILED:
        status["errorMessage"] = doc["error_message"]
    progress = float(doc.get("progress", 0.0))
    return {
        "uuid": doc["_id"],
        "name": doc["name"],
        "dateCreated": int(doc["date_created_ms"]),
        "processingTime": processing_time_ms(doc, now_ms),
        "status": status,
        "options": shown_options(doc.get("options", [])),
        "imagesCount": int(doc.get("images_count", 0)),
        "progress": int(progress) if progress.is_integer() else progress,
    }


def shown_options(options: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored options with numbers as NodeODM shows its JavaScript numbers (``7``, never
    ``7.0``: ``options.js_number``). Validation stores them so already; this also covers
    documents stored before it did, and integers too large for MongoDB's int64 (kept as doubles).
    """
    return [
        {**option, "value": odm_options.js_number(option["value"])}
        if isinstance(option.get("value"), float) else option
        for option in options
    ]


def slice_start(n: int, total: int) -> int:
    """NodeODM slice start: negative = the last |n| lines (§3.6)."""
    return max(0, total + n) if n < 0 else n


def parse_line_param(raw: str | None) -> int:
    """``with_output``/``line`` query values: empty or non-numeric -> 0 (§3.6)."""
    if raw is None:
        return 0
    try:
        return int(raw.strip())
    except ValueError:
        return 0
