"""Process scaffolding for the bus-driven services (scheduler, watcher, notifier).

Each runs one FastStream app as ASGI on uvicorn, which gives it ``/healthz`` (broker connection)
and ``/readyz`` (its dependencies answer) on ``SCALEODM_HEALTH_PORT``, and graceful shutdown on
SIGTERM: uvicorn runs the lifespan's shutdown, FastStream stops fetching, lets in-flight handlers
finish (bounded by ``graceful_timeout``) and drains the connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import uvicorn
from faststream.asgi import AsgiFastStream, AsgiResponse, get, make_ping_asgi
from faststream.nats import NatsBroker, NatsUserPassword

from scaleodm.common.logging import get_logger
from scaleodm.common.settings import BaseServiceSettings, NatsSettings

log = get_logger(__name__)

ReadyCheck = tuple[str, Callable[[], Awaitable[Any]]]
GRACEFUL_TIMEOUT_S = 15.0


def nats_security(nats: NatsSettings) -> NatsUserPassword | None:
    """User/password authentication when ``nats.user`` is set (every NATS client uses this).

    FastStream refuses it together with credentials in the URL (``SetupError`` at start-up).
    """
    credentials = nats.credentials()
    if not credentials:
        return None
    return NatsUserPassword(credentials["user"], credentials["password"])


def make_broker(settings: BaseServiceSettings) -> NatsBroker:
    return NatsBroker(
        settings.nats.servers(),
        connect_timeout=int(settings.nats.connect_timeout_s),
        graceful_timeout=GRACEFUL_TIMEOUT_S,
        security=nats_security(settings.nats),
        logger=get_logger("scaleodm.bus"),
    )


READY_CHECK_TIMEOUT_S = 2.0


async def check_readiness(checks: Sequence[ReadyCheck]) -> tuple[bool, dict[str, str]]:
    """Run each check: ``ok``, ``down`` or ``timeout`` per name, never an exception's text (the
    readiness probes are unauthenticated and that text names hosts and URLs); the log has the
    repr. Shared by every service's ``/readyz``."""
    results: dict[str, str] = {}
    for name, check in checks:
        try:
            await asyncio.wait_for(check(), READY_CHECK_TIMEOUT_S)
            results[name] = "ok"
        except TimeoutError:
            log.warning("readiness check timed out", check=name, timeout_s=READY_CHECK_TIMEOUT_S)
            results[name] = "timeout"
        except Exception as exc:
            log.warning("readiness check failed", check=name, error=repr(exc))
            results[name] = "down"
    return all(v == "ok" for v in results.values()), results


def _readiness(checks: Sequence[ReadyCheck]) -> Any:
    """``/readyz`` of a bus service (``check_readiness``)."""

    @get(include_in_schema=False)
    async def ready(scope: Any) -> AsgiResponse:  # noqa: ARG001
        ok, results = await check_readiness(checks)
        body = json.dumps({"ready": ok, "checks": results}).encode()
        return AsgiResponse(body, 200 if ok else 503, headers={"content-type": "application/json"})

    return ready


def make_app(
    broker: NatsBroker,
    *,
    ready_checks: Sequence[ReadyCheck] = (),
    on_startup: Sequence[Callable[..., Any]] = (),
    after_startup: Sequence[Callable[..., Any]] = (),
    on_shutdown: Sequence[Callable[..., Any]] = (),
    after_shutdown: Sequence[Callable[..., Any]] = (),
) -> AsgiFastStream:
    return AsgiFastStream(
        broker,
        asgi_routes=[
            ("/healthz", make_ping_asgi(broker, timeout=2, include_in_schema=False)),
            ("/readyz", _readiness(ready_checks)),
        ],
        logger=get_logger("scaleodm.app"),
        on_startup=on_startup,
        after_startup=after_startup,
        on_shutdown=on_shutdown,
        after_shutdown=after_shutdown,
        asyncapi_path="/asyncapi",
    )


def serve(app: AsgiFastStream, settings: BaseServiceSettings) -> None:
    uvicorn.run(
        app,
        host=settings.health_host,
        port=settings.health_port,
        log_config=None,
        timeout_graceful_shutdown=int(GRACEFUL_TIMEOUT_S) + 5,
    )
