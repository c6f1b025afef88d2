"""Client-given text as a message may echo it back (errors, errorMessages, records)."""

from __future__ import annotations

import re

SHOWN_MAX_CHARS = 120
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(value: str, limit: int = SHOWN_MAX_CHARS) -> str:
    """``value`` with control characters escaped (``\\x00``: no line breaks or terminal escapes
    in a message or a log) and at most ``limit`` characters of it (then ``...``), so that an
    echo stays one short line whatever the client sent."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value[: limit + 1])
    return text[:limit] + "..." if len(text) > limit else text
