"""Structured JSON logging with structlog, shared by every service.

Standard-library loggers (uvicorn, FastStream, botocore) go through the same processor chain, so a
service prints one JSON object per line. Task context is bound with contextvars
(``bind_task(task_id)``) and appears on every line logged while handling that task.

Secrets never reach the output (``redact_secrets``): the formatter's last step before rendering,
after exceptions are formatted, runs on every line — structlog's own and the standard library's
(uvicorn's access log prints each request line with its query string, ``?token=`` included). It
rewrites, in every string anywhere in the line (message, URLs, nested values, exception text),
``name=value`` / ``name%3Dvalue`` / ``"name": "value"`` where the name looks secret (token,
password, secret, signature, credential, api key, access key, authorization, cookie), the
credentials of ``Bearer``/``Basic`` and of ``scheme://user:password@``, and replaces whatever
is logged under such a key (a dict key, or the name of a ``(name, value)`` pair). Other objects
are checked through their ``repr`` (what the renderers print). Over-redaction is accepted: a line
losing a harmless value costs less than a leaked one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import urllib.parse
from collections.abc import Iterator, MutableMapping
from typing import Any

import structlog

from scaleodm.common import tracing

_configured = False


def _flatten_extra(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    # FastStream logs with extra={"subject", "stream", "message_id", ...}; lift them to top level.
    extra = event_dict.pop("extra", None)
    if isinstance(extra, dict):
        for key, value in extra.items():
            event_dict.setdefault(key, value)
    return event_dict


REDACTED = "[REDACTED]"
_NAME = (r"[\w.-]*(?:token|passw(?:or)?d|secret|signature|credential|api[_-]?key|access[_-]?key"
         r"|authorization|cookie)[\w.-]*")
# A value runs to a separator; percent-escapes are part of it, except an escaped "&" (``%26``).
_VALUE = r"(?:[^&\s\"'<>;,)\]}%]|%(?!26)[0-9A-Fa-f]{2})*"
_TEXT_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"(?i)\b({_NAME})(=|%3D)({_VALUE})"), rf"\1\2{REDACTED}"),
    (re.compile(rf"(?i)([\"']{_NAME}[\"']\s*[:=]\s*)([\"'])(?:\\.|(?!\2).)*\2"),
     rf"\1\2{REDACTED}\2"),
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[\w.~+/=-]+"), rf"\1\2{REDACTED}"),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]+):[^/\s@]+@"), rf"\1:{REDACTED}@"),
)
_HINT = re.compile(r"(?i)token|passw|secret|signature|credential|key|authorization|cookie"
                   r"|bearer|basic|://")
_SECRET_KEY = re.compile(r"(?i)(?:^|[_.-])(?:token|passw(?:or)?d|secret|signature|credentials?"
                         r"|api[_-]?key|authorization|cookie)(?:$|[_.-])")
_MAX_DEPTH = 12
_PLAIN = (int, float, bool, type(None))


# A query parameter whose *name* is percent-encoded (``?tok%65n=...``): servers decode names, so
# it authenticates like ``token=``; redacted when the decoded name is a secret's.
_ENCODED_PARAM = re.compile(rf"([?&;])([^=&\s\"'?#]*%[0-9A-Fa-f]{{2}}[^=&\s\"'?#]*)=({_VALUE})")
_SECRET_NAME = re.compile(rf"(?i){_NAME}")


def _encoded_param(match: re.Match[str]) -> str:
    name = urllib.parse.unquote_plus(match.group(2))
    if _SECRET_NAME.fullmatch(name):
        return f"{match.group(1)}{match.group(2)}={REDACTED}"
    return match.group(0)


def redact_text(text: str) -> str:
    """``text`` with the secrets it shows replaced by ``[REDACTED]`` (see the module docstring)."""
    if "%" in text:
        text = _ENCODED_PARAM.sub(_encoded_param, text)
    if not _HINT.search(text):
        return text
    for pattern, replacement in _TEXT_RULES:
        text = pattern.sub(replacement, text)
    return text


def is_secret_key(key: object) -> bool:
    """Whether a value logged under ``key`` is withheld whatever it is."""
    return isinstance(key, str) and _SECRET_KEY.search(key) is not None


def redact_value(value: Any, _depth: int = 0) -> Any:
    """``value`` with every secret in it redacted; containers are copied, never changed."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, _PLAIN):
        return value
    if _depth < _MAX_DEPTH:
        if isinstance(value, dict):
            return {k: REDACTED if is_secret_key(k) and value[k] is not None
                    else redact_value(value[k], _depth + 1) for k in value}
        if isinstance(value, tuple) and len(value) == 2 and is_secret_key(value[0]):
            return (value[0], REDACTED if value[1] is not None else None)  # a (name, value) pair
        if isinstance(value, (list, tuple, set, frozenset)):
            items = [redact_value(v, _depth + 1) for v in value]
            return tuple(items) if isinstance(value, tuple) else items
    shown = repr(value)  # what the renderers print for anything else
    redacted = redact_text(shown)
    return value if redacted == shown else redacted


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """structlog processor: no secret in any value of the line (see the module docstring)."""
    return {key: REDACTED if is_secret_key(key) and value is not None else redact_value(value)
            for key, value in event_dict.items()}


def configure_logging(service: str, level: str = "INFO", json_lines: bool | None = True
                      ) -> None:
    """Configure structlog and the standard library for one service process; ``json_lines``
    None: JSON unless the log's stream (stderr) is a terminal."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    global _configured
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _flatten_extra,
        tracing.add_trace_ids,
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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(shared, renderer))
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


def formatter(pre_chain: list[Any], renderer: Any) -> structlog.stdlib.ProcessorFormatter:
    """The one formatter every line goes through: structlog's (``wrap_for_formatter``) and the
    standard library's (``pre_chain`` first); secrets are redacted after exceptions are
    formatted, just before rendering."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
    )


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
