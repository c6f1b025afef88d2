"""Which webhook values are webhooks at all (NodeODM §8), for the gateway and the notifier."""

from __future__ import annotations

from typing import Any


def webhook_target(raw: Any) -> str | None:
    """``raw`` stripped when it names a target, else None: NodeODM calls a webhook only when
    its value is longer than 3 characters (§8), so shorter values are "no webhook"."""
    if not isinstance(raw, str):
        return None
    url = raw.strip()
    return url if len(url) > 3 else None
