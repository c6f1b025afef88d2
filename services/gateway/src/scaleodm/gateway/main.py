"""Gateway process: FastAPI app factory, lifespan (MongoDB, S3, NATS), uvicorn entry point."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from faststream.nats import NatsBroker

from scaleodm.common import failpoints, metrics, runtime, tracing
from scaleodm.common.contracts import streams
from scaleodm.common.emitting import Emitter
from scaleodm.common.logging import configure_logging, get_logger
from scaleodm.common.settings import Environment, GatewaySettings, get_gateway_settings
from scaleodm.common.store import uploads
from scaleodm.common.store.s3 import S3
from scaleodm.common.store.tasks import TaskStore, open_store
from scaleodm.common.store.uploads import UploadStore
from scaleodm.gateway import deps, errors, openapi, responses, serving
from scaleodm.gateway.deps import Resources
from scaleodm.gateway.eventstream import EventHub
from scaleodm.gateway.httpmetrics import HttpMetrics
from scaleodm.gateway.readmodel import ReadModel
from scaleodm.gateway.routes import (
    auth,
    console,
    creating,
    events,
    health,
    nodeodm,
    stac,
    tiles,
    usage,
    webhooks,
)

log = get_logger(__name__)
STARTUP_FAILURE = 3  # uvicorn's exit code when the server did not start


def _operation_id(route: APIRoute) -> str:
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or get_gateway_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _check_secrets(settings)
        # First: a tenants file that cannot be used stops the start before anything is opened.
        directory = deps.open_directory(settings)
        log.info("tenants", open_node=directory.open, tenants=len(directory.tenants),
                 tenants_file=str(settings.tenants_file) if settings.tenants_file else None,
                 bearer=directory.accepts_bearer)
        async with contextlib.AsyncExitStack() as stack:
            mongo = await open_store(settings.mongo, "gateway")
            stack.push_async_callback(mongo.close)
            s3 = await stack.enter_async_context(S3.open(settings.s3))
            # The services' NATS client: reconnects for as long as NATS is away, start and stop
            # bounded (runtime.ServiceBroker).
            broker = runtime.make_broker(settings, "gateway")
            conn = await broker.connect()
            stack.push_async_callback(_stop_broker, broker)
            await streams.ensure_streams(
                conn.jetstream(), replicas=settings.nats.stream_replicas
            )
            # This process's lease: the single-request uploads it holds name it, and a retry
            # takes over the holds of a gateway that died (store/uploads.py).
            holder = f"gateway/{socket.gethostname()}/{uuidlib.uuid4().hex[:12]}"
            upload_store = UploadStore(mongo.store.db, holder)
            await upload_store.ensure_indexes()
            runtime.start_loop(stack, upload_store.leases.keep(
                holder, uploads.HOLDER_TTL_S, uploads.HOLDER_RENEW_S), "holder-lease")
            hub = EventHub.for_settings(conn, settings)
            stack.push_async_callback(hub.close)  # runs before the broker drains
            points = failpoints.Failpoints(settings.failpoints)
            emitter = Emitter(mongo.store, broker, settings.nats.publish_timeout_s, points)
            stack.push_async_callback(emitter.aclose)  # before the broker drains
            read_model = ReadModel.for_settings(mongo.store, conn, settings)
            await read_model.start()
            stack.push_async_callback(read_model.close)
            app.state.resources = Resources(
                settings, mongo, s3, broker, emitter, upload_store,
                points, event_hub=hub, read_model=read_model, tenant_directory=directory,
            )
            runtime.start_loop(stack, _count_tasks(mongo.store, settings.task_counts_interval_s),
                               "task-counts")
            log.info("gateway ready", port=settings.gateway_port)
            yield
            log.info("gateway stopping")

    app = FastAPI(
        title="ScaleODM",
        summary="NodeODM-compatible processing API for OpenDroneMap",
        version="0.1.0",
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
        redirect_slashes=False,  # Express does not redirect; unknown paths answer 404
        # Every JSON answer: application/json; charset=utf-8, by orjson (responses.py).
        default_response_class=responses.JsonResponse,
        # FastAPI's native OpenTelemetry: server spans when traces are on (tracing.py); off,
        # it would only look up the global providers on every request to find that out.
        # Metrics are ours (httpmetrics.py), logs structlog's.
        # One server span per request: no spans of FastAPI's own steps (dependencies,
        # serialization: each request's cost doubled with them), none for the probes.
        telemetry={"tracing": tracing.enabled(), "metrics": False, "logs": False,
                   "operation_spans": False, "auto_configure": False,
                   "exclude": _untraced},
    )
    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]
    )
    if settings.metrics_enabled:
        app.add_middleware(HttpMetrics)  # outermost: every answer counts, CORS preflights too
    errors.install(app)
    # The polled routes first: a request is matched against the routes in order, and no two
    # routers share a method and path, so the order changes nothing else.
    app.include_router(nodeodm.router)
    app.include_router(health.router)
    app.include_router(auth.router)
    app.include_router(creating.router)
    app.include_router(webhooks.router)
    app.include_router(events.router)
    app.include_router(usage.router)
    app.include_router(stac.router)
    app.include_router(tiles.router)
    app.include_router(console.router)  # the web console at /, outside the API's schema
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app


UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    """Requests without a span: the probes and the scrapes."""
    return scope.get("path") in UNTRACED_PATHS


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's document, without the 422 responses this API never sends (``openapi.py``)."""
    generate = app.openapi

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi.drop_validation_responses(generate())
        return app.openapi_schema

    return build


async def _count_tasks(store: TaskStore, every_s: float) -> None:
    """``scaleodm_tasks{status}`` refreshed in the background, so a scrape never waits on
    MongoDB: a failed or slow refresh keeps the last values and sets ``scaleodm_tasks_stale``."""
    while True:
        try:
            async with asyncio.timeout(every_s):
                counts = await store.count_by_state()
        except Exception as exc:  # MongoDB away or slow: the values stay, marked stale
            metrics.TASKS_STALE.set(1)
            log.debug("task counts not refreshed", error=repr(exc))
        else:
            for state, count in counts.items():
                metrics.TASKS.labels(state).set(count)
            metrics.TASKS_STALE.set(0)
        await asyncio.sleep(every_s)


async def _stop_broker(broker: NatsBroker) -> None:
    """Drain the connection (bounded: a connection that cannot drain is closed, see
    ``runtime.ServiceBroker.stop``); a connection already lost is not an error at shutdown."""
    try:
        await broker.stop()
    except Exception as exc:
        log.warning("NATS connection did not drain cleanly", error=repr(exc))


def _check_secrets(settings: GatewaySettings) -> None:
    insecure = settings.insecure_defaults()
    if not insecure:
        return
    if settings.environment is Environment.PRODUCTION:
        raise RuntimeError(f"development credentials in production: {', '.join(insecure)}")
    log.warning("development credentials in use", settings=insecure)


def prewarm(app: FastAPI) -> None:
    """Build now what FastAPI builds on first use, so that no client request pays for it.

    FastAPI builds the request handlers of included routers (their parameters' pydantic fields)
    when the first request is routed (~30-75 ms, on a process's first poll), and the OpenAPI
    document on the first ``/openapi.json`` (~60-100 ms). Generating the document builds both.
    """
    app.openapi()


def main() -> None:
    settings = get_gateway_settings()
    configure_logging("gateway", settings.log_level, settings.log_json)
    tracing.configure("gateway", settings.traces_file)
    app = create_app(settings)
    prewarm(app)
    # uvicorn.run, with the connection deadlines of serving.py (header, keep-alive, closing).
    server = uvicorn.Server(serving.config(app, settings))
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
