"""Process scaffolding for the bus-driven services (scheduler, watcher, notifier), and the one
NATS client builder every process uses (the gateway's and ``scaleodm-bootstrap``'s too).

Each bus service runs one FastStream app as ASGI on uvicorn, which gives it ``/healthz`` and
``/readyz`` on ``SCALEODM_HEALTH_PORT``, and graceful shutdown on SIGTERM: uvicorn runs the
lifespan's shutdown, FastStream stops fetching, lets in-flight handlers finish (bounded by
``graceful_timeout``) and drains the connection.

Dependencies come and go; the processes stay (docs/operations.md):

- **NATS** connections never give up by default (``NatsSettings.max_reconnect_attempts`` -1):
  the first attempt after a loss is immediate, then the waits double from ``reconnect_wait_s``
  up to ``reconnect_max_wait_s`` with jitter (``reconnect_delay_s``). nats-py's own default
  (60 attempts, 2 s apart) closed the connection for good after two minutes.
- **Liveness** (``liveness``) fails only when the connection is closed for good: reconnecting is
  not dead, and restarting a process cannot bring NATS back. **Readiness** (``check_readiness``)
  fails while any dependency is away; every check is bounded, so a probe never hangs.
- **Start and stop are bounded**: the first connection by ``startup_timeout_s``; the stop by
  ``graceful_timeout`` + ``drain_timeout_s`` (a connection that cannot drain is closed), and
  each shutdown hook and the closing of a service's resources by ``SHUTDOWN_STEP_TIMEOUT_S``,
  so a frozen dependency cannot hold the exit past Kubernetes' grace period (30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Generic, TypeVar

import nats
import nats.errors
import nats.js.errors
import uvicorn
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.nats import NatsBroker, NatsUserPassword
from faststream.nats.prometheus.provider import settings_provider_factory as nats_metrics_settings
from faststream.prometheus import PrometheusMiddleware
from nats.aio.client import Client as NatsClient
from nats.js.client import JetStreamContext
from prometheus_client import REGISTRY

from scaleodm.common import clock, metrics
from scaleodm.common.contracts import streams
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


def reconnect_delay_s(failed: int, *, base_s: float, max_s: float) -> float:
    """Wait before the next NATS reconnection attempt, after ``failed`` failed ones: 0 for the
    first (a restarted server is back at once), then ``clock.backoff_s`` with a quarter of
    jitter, so the replicas that lost the same server do not come back in lockstep."""
    if failed <= 0:
        return 0.0
    return clock.backoff_s(failed, base_s=base_s, max_s=max_s, jitter=0.25)


def _reconnect_handler(nats_settings: NatsSettings) -> Callable[..., tuple[Any, float]]:
    """nats-py's ``reconnect_to_server_handler``: which server next, after how long.

    nats-py waits a constant ``reconnect_time_wait`` between attempts; this handler replaces that
    wait with ``reconnect_delay_s``, counted on the server's failed attempts (nats-py resets
    them on success). The least-tried server of the pool goes first.
    """

    def choose(servers: list[Any], server_info: dict[str, Any]) -> tuple[Any, float]:  # noqa: ARG001
        server = min(servers, key=lambda s: s.reconnects)
        delay = reconnect_delay_s(server.reconnects, base_s=nats_settings.reconnect_wait_s,
                                  max_s=nats_settings.reconnect_max_wait_s)
        log.info("reconnecting to NATS", attempt=server.reconnects + 1, delay_s=round(delay, 3),
                 server=f"{server.uri.hostname}:{server.uri.port}")
        return server, delay

    return choose


def connection_options(nats_settings: NatsSettings) -> dict[str, Any]:
    """``nats.connect`` keyword arguments every NATS client shares (besides servers and
    credentials): attempt timeout, reconnection policy, drain bound."""
    return {
        # nats-py hands both to asyncio.wait_for, so fractions of a second work (its hints say int)
        "connect_timeout": nats_settings.connect_timeout_s,
        "drain_timeout": nats_settings.drain_timeout_s,
        "reconnect_time_wait": nats_settings.reconnect_wait_s,  # between first-connection attempts
        "max_reconnect_attempts": nats_settings.max_reconnect_attempts,
        "reconnect_to_server_handler": _reconnect_handler(nats_settings),
        # nats-py takes whole seconds here (its ping timer); at least one
        "ping_interval": max(1, round(nats_settings.ping_interval_s)),
        "max_outstanding_pings": nats_settings.max_outstanding_pings,
    }


async def connect_nats(nats_settings: NatsSettings) -> NatsClient:
    """A plain nats-py connection with the services' options and credentials (``bootstrap``);
    gives up after ``startup_timeout_s``."""
    try:
        async with asyncio.timeout(nats_settings.startup_timeout_s):
            return await nats.connect(
                servers=nats_settings.servers(), **connection_options(nats_settings),
                **nats_settings.credentials(),
            )
    except TimeoutError:
        raise ConnectionError(
            f"NATS unreachable for {nats_settings.startup_timeout_s:g} s at start-up"
        ) from None


CLOSE_TIMEOUT_S = 2.0


async def close_nats(conn: NatsClient, drain_timeout_s: float) -> None:
    """Drain ``conn`` within ``drain_timeout_s`` (+1 s), else close it; never raises. A connection
    that is reconnecting cannot drain (nats-py refuses): it is closed at once."""
    try:
        await asyncio.wait_for(conn.drain(), drain_timeout_s + 1)
        return
    except Exception as exc:
        if conn.is_closed:
            return
        log.warning("NATS connection not drained, closing it", error=repr(exc))
    try:
        await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT_S)
    except Exception as exc:
        log.warning("NATS connection did not close cleanly", error=repr(exc))


FETCH_PAUSE_S = 1.0


def _fix_pull_fetch() -> None:
    """Make JetStream pull fetches fail only in the ways FastStream's pull loop expects.

    FastStream's consume loop (``PullStreamSubscriber._consume_pull``, 0.7.8) suppresses
    ``nats.errors.TimeoutError`` and fetches again at once. Two fetch outcomes break it:

    - nats-py 2.16's batch fetch raises the *built-in* ``TimeoutError`` when the server's 408 for
      an expired pull request arrives in the last 100 µs before the client's own deadline (the
      request's ``expires`` is the timeout minus 100 µs; nats.py #934 added that path): about one
      idle fetch in 30 on loopback. The loop's task then dies, FastStream's supervisor logs an
      ERROR with a traceback and restarts it; on an idle stack within seconds of a clean start.
      It is the same "no message yet" outcome, so it becomes ``nats.errors.TimeoutError``.
    - on a connection closed for good (or JetStream answering 503) the fetch fails without
      waiting, and the loop retries without ever yielding to the event loop: the process stops
      answering anything, ``/healthz`` included. Those failures now wait ``FETCH_PAUSE_S`` first.

    Installed once per process by ``make_broker``, on nats-py's class (FastStream creates the
    subscriptions, so there is no instance to configure).
    """
    cls = JetStreamContext.PullSubscription
    if getattr(cls.fetch, "_scaleodm_fixed", False):
        return
    original = cls.fetch

    @functools.wraps(original)
    async def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, *args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc
        except (nats.errors.ConnectionClosedError, nats.js.errors.ServiceUnavailableError):
            await asyncio.sleep(FETCH_PAUSE_S)
            raise

    fetch._scaleodm_fixed = True  # type: ignore[attr-defined]
    cls.fetch = fetch  # type: ignore[method-assign]


class NatsState(enum.StrEnum):
    """Where a process's NATS connection stands."""

    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # lost; attempts go on: not ready, but alive
    CLOSED = "closed"  # closed for good (attempts exhausted) or never opened: dead


def nats_state(broker: NatsBroker) -> NatsState:
    conn = broker._connection
    if conn is None or conn.is_closed:
        return NatsState.CLOSED
    if conn.is_connected:
        return NatsState.CONNECTED
    # nats-py's reconnection runs in one task; an exception in a callback (e.g. FastStream's
    # error callback on an authorization error) ends it while the state still says
    # "reconnecting": no attempt will ever come, which is as dead as closed.
    attempts = getattr(conn, "_reconnection_task", None)
    if attempts is not None and attempts.done():
        return NatsState.CLOSED
    return NatsState.RECONNECTING


def liveness(broker: NatsBroker) -> tuple[int, dict[str, str]]:
    """``/healthz`` of every service: 503 only once the NATS connection is closed for good (a
    restart is then the cure); 200 while connected or reconnecting. No I/O: it cannot hang."""
    state = nats_state(broker)
    dead = state is NatsState.CLOSED
    return (503 if dead else 200), {"status": "dead" if dead else "ok", "nats": state.value}


def nats_check(broker: NatsBroker) -> ReadyCheck:
    """The ``nats`` readiness check: connected, and JetStream answers (stack-notes §3)."""

    async def check() -> None:
        conn = broker._connection
        state = nats_state(broker)
        if conn is None or state is not NatsState.CONNECTED:
            raise ConnectionError(f"NATS connection {state.value}")
        await conn.jetstream().account_info()

    return ("nats", check)


class ServiceBroker(NatsBroker):
    """A ``NatsBroker`` whose connection outlives NATS outages, with a bounded start and stop.

    Built by ``make_broker`` only. The first connection gives up after ``startup_timeout_s``;
    ``stop`` lets in-flight handlers finish (``graceful_timeout``) and drains, and a connection
    that cannot drain in time (NATS away: nats-py refuses to drain while reconnecting) is closed.
    Connection changes are logged: lost, re-established, closed for good.
    """

    def __init__(self, nats_settings: NatsSettings, *, graceful_timeout: float,
                 logger: Any, middlewares: Sequence[Any] = ()) -> None:
        self._nats_settings = nats_settings
        self._graceful_timeout_s = graceful_timeout
        self._stopping = False
        super().__init__(
            nats_settings.servers(),
            graceful_timeout=graceful_timeout,
            security=nats_security(nats_settings),
            logger=logger,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
            middlewares=tuple(middlewares),
            **connection_options(nats_settings),
        )

    async def _connect(self) -> NatsClient:
        timeout_s = self._nats_settings.startup_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await super()._connect()
        except TimeoutError:
            raise ConnectionError(f"NATS unreachable for {timeout_s:g} s at start-up") from None

    async def stop(
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> None:
        self._stopping = True
        conn = self._connection
        budget_s = self._graceful_timeout_s + self._nats_settings.drain_timeout_s + 1
        try:
            async with asyncio.timeout(budget_s):
                await super().stop(exc_type, exc_val, exc_tb)
            return
        except Exception as exc:  # a timeout, a connection that cannot drain, a subscriber
            log.warning("NATS broker did not stop cleanly", error=repr(exc))
        if conn is not None and not conn.is_closed:
            await close_nats(conn, 0)
        self._connection = None
        self.config.disconnect()

    async def _on_disconnected(self) -> None:
        if not self._stopping:
            log.warning("NATS connection lost")

    async def _on_reconnected(self) -> None:
        log.info("NATS connection re-established")

    async def _on_closed(self) -> None:
        if not self._stopping:
            log.error("NATS connection closed for good: liveness fails from now on")


def make_broker(settings: BaseServiceSettings, service: str) -> ServiceBroker:
    """The NATS broker of a service (every service, the gateway included), with FastStream's
    Prometheus middleware (``metrics``)."""
    _fix_pull_fetch()
    return ServiceBroker(settings.nats, graceful_timeout=GRACEFUL_TIMEOUT_S,
                         logger=get_logger("scaleodm.bus"),
                         middlewares=[_prometheus_middleware(service)]
                         if settings.metrics_enabled else [])


class _SubjectTemplates:
    """FastStream's NATS metrics settings with subjects as label templates: one task's
    ``events.task.<id>.<kind>`` would otherwise make a series per task."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.messaging_system = inner.messaging_system

    def get_consume_attrs_from_message(self, msg: Any) -> Any:
        attrs = dict(self._inner.get_consume_attrs_from_message(msg))
        attrs["destination_name"] = metrics.subject_template(str(attrs["destination_name"]))
        return attrs

    def get_publish_destination_name_from_cmd(self, cmd: Any) -> str:
        return metrics.subject_template(self._inner.get_publish_destination_name_from_cmd(cmd))


def _templated_settings(msg: Any) -> _SubjectTemplates | None:
    inner = nats_metrics_settings(msg)
    return None if inner is None else _SubjectTemplates(inner)


_middleware: PrometheusMiddleware[Any, Any] | None = None


def _prometheus_middleware(service: str) -> PrometheusMiddleware[Any, Any]:
    """One per process: its metrics register once in the process's registry. A service is one
    process, so ``app_name`` is its name (in tests building several brokers in one process, the
    first one's)."""
    global _middleware
    if _middleware is None:
        _middleware = PrometheusMiddleware(
            settings_provider_factory=_templated_settings, registry=REGISTRY,
            app_name=service, metrics_prefix="faststream")
    return _middleware


READY_CHECK_TIMEOUT_S = 2.0


async def check_readiness(checks: Sequence[ReadyCheck]) -> tuple[bool, dict[str, str]]:
    """Run each check: ``ok``, ``down`` or ``timeout`` per name, never an exception's text (the
    readiness probes are unauthenticated and that text names hosts and URLs); the log has the
    repr. Shared by every service's ``/readyz``. The checks run concurrently: the answer comes
    within ``READY_CHECK_TIMEOUT_S`` however many dependencies hang (probes time out at 5 s)."""

    async def run(name: str, check: Callable[[], Awaitable[Any]]) -> str:
        try:
            await asyncio.wait_for(check(), READY_CHECK_TIMEOUT_S)
            return "ok"
        except TimeoutError:
            log.warning("readiness check timed out", check=name, timeout_s=READY_CHECK_TIMEOUT_S)
            return "timeout"
        except Exception as exc:
            log.warning("readiness check failed", check=name, error=repr(exc))
            return "down"

    words = await asyncio.gather(*(run(name, check) for name, check in checks))
    results = {name: word for (name, _), word in zip(checks, words, strict=True)}
    return all(v == "ok" for v in results.values()), results


def _readiness(checks: Sequence[ReadyCheck]) -> Any:
    """``/readyz`` of a bus service (``check_readiness``)."""

    @get(include_in_schema=False)
    async def ready(scope: Any) -> AsgiResponse:  # noqa: ARG001
        ok, results = await check_readiness(checks)
        body = json.dumps({"ready": ok, "checks": results}).encode()
        return AsgiResponse(body, 200 if ok else 503, headers={"content-type": "application/json"})

    return ready


T = TypeVar("T")


class Lifecycle(Generic[T]):
    """A bus service's resources while its app runs, typed.

    ``open`` is the service's resource factory: an async context manager (one ``AsyncExitStack``)
    yielding a frozen dataclass. ``lifespan`` enters it, for ``make_app(lifespan=...)``; handlers
    and readiness checks read ``current``. FastStream enters the lifespan before it starts the
    broker and leaves it after the broker stopped (in-flight handlers done, connection drained).
    """

    def __init__(self, open_: Callable[[], AbstractAsyncContextManager[T]]) -> None:
        self._open = open_
        self._current: T | None = None

    @property
    def current(self) -> T:
        """The resources; ``RuntimeError`` outside the lifespan."""
        if self._current is None:
            raise RuntimeError("the service's resources are not open")
        return self._current

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        async with self._open() as resources:
            self._current = resources
            try:
                yield
            finally:
                self._current = None


def start_loop(
    stack: contextlib.AsyncExitStack, loop: Coroutine[Any, Any, None], name: str
) -> asyncio.Task[None]:
    """Run ``loop`` (a service's background loop) as a task, cancelled and awaited when
    ``stack`` closes."""
    task = asyncio.get_running_loop().create_task(loop, name=name)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)
    return task


async def open_bus(broker: NatsBroker, settings: BaseServiceSettings, *,
                   durable: str | None = None, **tuning: float) -> NatsClient:
    """Connect, and declare the streams (at ``nats.stream_replicas``) and this service's
    durable consumer, if it has one (``tuning``: its ``streams.durables`` parameters); the
    connection."""
    conn = await broker.connect()
    js = conn.jetstream()
    await streams.ensure_streams(js, replicas=settings.nats.stream_replicas)
    if durable is not None:
        await streams.ensure_consumers(js, only=durable, **tuning)
    return conn


CONSUMER_LAG_EVERY_S = 5.0


async def consumer_lag(conn: NatsClient, stream: str, durable: str) -> None:
    """``scaleodm_jetstream_pending`` and ``…_ack_pending`` of this service's durable consumer,
    read every ``CONSUMER_LAG_EVERY_S`` (bounded; a failed read keeps the last values)."""
    js = conn.jetstream()
    while True:
        try:
            async with asyncio.timeout(CONSUMER_LAG_EVERY_S):
                info = await js.consumer_info(stream, durable)
        except Exception as exc:  # NATS away: the gauges keep their last values
            log.debug("consumer lag not read", consumer=durable, error=repr(exc))
        else:
            metrics.JS_PENDING.labels(durable).set(info.num_pending or 0)
            metrics.JS_ACK_PENDING.labels(durable).set(info.num_ack_pending or 0)
        await asyncio.sleep(CONSUMER_LAG_EVERY_S)


def make_app(
    broker: NatsBroker,
    *,
    lifespan: Callable[[], AbstractAsyncContextManager[None]] | None = None,
    ready_checks: Sequence[ReadyCheck] = (),
    on_startup: Sequence[Callable[..., Any]] = (),
    after_startup: Sequence[Callable[..., Any]] = (),
    on_shutdown: Sequence[Callable[..., Any]] = (),
    after_shutdown: Sequence[Callable[..., Any]] = (),
) -> AsgiFastStream:
    """The service's ASGI app: ``/healthz`` (``liveness``), ``/readyz`` (NATS, then
    ``ready_checks``), the shutdown hooks and the closing of ``lifespan`` each bounded by
    ``SHUTDOWN_STEP_TIMEOUT_S``."""
    return AsgiFastStream(
        broker,
        asgi_routes=[
            ("/healthz", _liveness(broker)),
            ("/readyz", _readiness([nats_check(broker), *ready_checks])),
            ("/metrics", _metrics()),
        ],
        logger=get_logger("scaleodm.app"),
        lifespan=_bounded_lifespan(lifespan) if lifespan is not None else None,
        on_startup=on_startup,
        after_startup=after_startup,
        on_shutdown=[_bounded_hook(hook) for hook in on_shutdown],
        after_shutdown=[_bounded_hook(hook) for hook in after_shutdown],
        asyncapi_path="/asyncapi",
    )


SHUTDOWN_STEP_TIMEOUT_S = 5.0


def _metrics() -> Any:
    """``/metrics`` of a bus service: the process's registry (``metrics``), text format."""

    @get(include_in_schema=False)
    async def scrape(scope: Any) -> AsgiResponse:  # noqa: ARG001
        return AsgiResponse(metrics.exposition(), 200,
                            headers={"content-type": metrics.CONTENT_TYPE_LATEST})

    return scrape


def _liveness(broker: NatsBroker) -> Any:
    """``/healthz`` of a bus service (``liveness``)."""

    @get(include_in_schema=False)
    async def alive(scope: Any) -> AsgiResponse:  # noqa: ARG001
        status, body = liveness(broker)
        return AsgiResponse(json.dumps(body).encode(), status,
                            headers={"content-type": "application/json"})

    return alive


def _bounded_hook(hook: Callable[..., Any]) -> Callable[[], Awaitable[None]]:
    """A shutdown hook that gives up after ``SHUTDOWN_STEP_TIMEOUT_S`` (logged)."""
    name = getattr(hook, "__name__", repr(hook))

    async def bounded() -> None:
        try:
            async with asyncio.timeout(SHUTDOWN_STEP_TIMEOUT_S):
                result = hook()
                if asyncio.iscoroutine(result):
                    await result
        except TimeoutError:
            log.warning("shutdown hook abandoned", hook=name, timeout_s=SHUTDOWN_STEP_TIMEOUT_S)

    bounded.__name__ = name
    return bounded


def _bounded_lifespan(
    lifespan: Callable[[], AbstractAsyncContextManager[None]],
) -> Callable[[], AbstractAsyncContextManager[None]]:
    """``lifespan`` whose closing (the resources' ``AsyncExitStack``) gives up after
    ``SHUTDOWN_STEP_TIMEOUT_S``; what is left open then goes with the process."""

    @contextlib.asynccontextmanager
    async def bounded() -> AsyncIterator[None]:
        cm = lifespan()
        await cm.__aenter__()
        try:
            yield
        except BaseException as exc:
            if not await cm.__aexit__(type(exc), exc, exc.__traceback__):
                raise
            return
        try:
            async with asyncio.timeout(SHUTDOWN_STEP_TIMEOUT_S):
                await cm.__aexit__(None, None, None)
        except TimeoutError:
            log.warning("resources not closed in time, left to the process exit",
                        timeout_s=SHUTDOWN_STEP_TIMEOUT_S)

    return bounded


def serve(app: AsgiFastStream, settings: BaseServiceSettings) -> None:
    uvicorn.run(
        app,
        host=settings.health_host,
        port=settings.health_port,
        log_config=None,
        timeout_graceful_shutdown=int(GRACEFUL_TIMEOUT_S) + 5,
    )
