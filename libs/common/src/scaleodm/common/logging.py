"""Structured JSON logging with structlog, shared by every service.

Standard-library loggers (uvicorn, FastStream, botocore) go through the same processor chain, so a
service prints one JSON object per line. Task context is bound with contextvars
(``bind_task(task_id)``) and appears on every line logged while handling that task.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import structlog

_configured = False


def _flatten_extra(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    # FastStream logs with extra={"subject", "stream", "message_id", ...}; lift them to top level.
    extra = event_dict.pop("extra", None)
    if isinstance(extra, dict):
        for key, value in extra.items():
            event_dict.setdefault(key, value)
    return event_dict


def configure_logging(service: str, level: str = "INFO", json_lines: bool = True) -> None:
    """Configure structlog and the standard library for one service process."""
    global _configured
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _flatten_extra,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        # filter_by_level first: a line below the level costs one check, not the whole chain.
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # FastStream's own "faststream" logger prints coloured text through its own handler.
    fs = logging.getLogger("faststream")
    fs.handlers[:] = []
    fs.propagate = True
    for noisy in ("botocore", "aiobotocore", "urllib3", "httpx", "httpcore", "pymongo"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    structlog.contextvars.bind_contextvars(service=service)
    _configured = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)


@contextlib.contextmanager
def bind_task(task_id: str, **more: Any) -> Iterator[None]:
    """Bind ``task_id`` (and more keys) to every log line inside the block."""
    tokens = structlog.contextvars.bind_contextvars(task_id=task_id, **more)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
