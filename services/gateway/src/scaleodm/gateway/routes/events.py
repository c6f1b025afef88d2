"""Task events as Server-Sent Events (an extension; NodeODM has no such route).

- ``GET /task/{uuid}/events`` — one task's events. SSE ``id`` = the event's per-task ``seq``
  (1, 2, 3, ... without holes). Without a cursor the whole history is replayed first. The stream
  ends after the terminal event (completed/failed/canceled) of the attempt current when it
  opened, or after ``removed``; a task already over is replayed and the stream ends; a cursor at
  or past a finished task's terminal event answers 204 (EventSource then stops reconnecting).
- ``GET /events`` — every task's events, from the ``EVENTS`` JetStream stream. SSE ``id`` = the
  JetStream stream sequence (``max_age`` 7 days). Without a cursor: live only, every event
  published after the first message (a comment) arrived. ``?status=N``
  (repeatable) keeps the events that move a task to NodeODM status N: 10 ``queued``,
  20 ``running``, 30 ``failed``, 40 ``completed``, 50 ``canceled``; the other kinds (inputs,
  progress, output, removed) change no status and match no filter. The stream never ends.

Both: ``event:`` = the event kind, ``data:`` = the event JSON as on the bus (AsyncAPI:
``docs/asyncapi.yaml``; per-task streams always include ``seq``). Resume with the
``Last-Event-ID`` header (what EventSource sends) or ``?since=<id>`` (the header wins); the next
event is the one after that id. Heartbeat comments every ``sse_heartbeat_s``; at shutdown the
streams end cleanly (clients reconnect elsewhere). Token as on every route (``?token=``). Errors
before the stream starts are NodeODM-style: 200 ``{"error": ...}``, among them ``Too many event
streams ...`` beyond ``sse_max_streams`` open streams per process or ``sse_max_streams_per_client``
per client (the client is its address — behind ``trusted_proxies`` the forwarded one — together
with its tenant).

Tenants: another tenant's task answers as an unknown uuid on ``/task/{uuid}/events``; on
``/events`` a tenant that is not an admin gets the events of its own tasks only. Events carry no
tenant: each is matched with its task's tenant (``Resources.task_owner``: from memory once known,
a task's tenant never changing). An event of a task this process never saw and that is deleted
already (a replay of old events) has no known owner and goes to admins only: refusing what
cannot be attributed is the safe side, and its task can no longer be read by anyone anyway.
How replay and live events are joined: ``scaleodm.gateway.eventstream``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from scaleodm.common import tenants
from scaleodm.common.contracts import events
from scaleodm.common.contracts.ids import canonical_task_id
from scaleodm.common.domain.status import TERMINAL_STATES, TaskState
from scaleodm.common.logging import get_logger
from scaleodm.gateway import deps, eventstream, openapi
from scaleodm.gateway.deps import CallerDep, CallerRequired, Resources, ResourcesDep
from scaleodm.gateway.errors import NodeOdmError, not_found

log = get_logger(__name__)
router = APIRouter(tags=["events"], dependencies=[CallerRequired])

class SseResponse(EventSourceResponse):
    """sse-starlette's response, with its media type visible to OpenAPI; it gives its stream
    slot back when it ends, however it ends."""

    media_type = "text/event-stream"
    release: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:  # the client stopped reading: not an application error
            log.info("event stream client not reading; disconnected",
                     send_timeout_s=self.send_timeout)
        finally:
            if self.release is not None:
                self.release()


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """A JSON schema with its local ``$defs`` references replaced by their targets."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _event_schema() -> dict[str, Any]:
    """The TaskEvent union (contracts/events.py) as one self-contained JSON schema."""
    schema = events.EVENT_ADAPTER.json_schema()
    inlined: dict[str, Any] = _inline(schema, schema.get("$defs", {}))
    inlined.pop("discriminator", None)  # its mapping names the $defs just inlined
    return inlined


def _stream_content(id_doc: str) -> dict[str, Any]:
    """OpenAPI content of a stream response: one SSE message, described as OpenAPI 3.2 does
    (``itemSchema``, as FastAPI's own SSE routes), plus the NodeODM-style error."""
    return {
        "text/event-stream": {
            # OpenAPI 3.2: `schema` of a sequential media type is the whole stream, read as an
            # array (it replaces the `{"type": "string"}` FastAPI infers from the class).
            "schema": {"type": "array"},
            "itemSchema": {
                "type": "object",
                "description": "One message: `id:`, `event:`, `data:` lines and a blank line. "
                "Comment lines (`: heartbeat`) keep the connection alive; the first message "
                "is a comment with `retry:`.",
                "required": ["id", "event", "data"],
                "properties": {
                    "id": {"type": "string", "description": id_doc},
                    "event": {"type": "string", "enum": list(events.KINDS),
                              "description": "The event kind (same as `data.kind`)."},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": _event_schema(),
                        "description": "The event JSON as on the bus, on one line.",
                    },
                    "retry": {"type": "integer", "minimum": 0,
                              "description": "Reconnect delay in ms (first message only)."},
                },
            },
        },
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
            },
            "example": {"error": "0d2c1c6e-8a0b-4f7e-9c58-3b1f2a4d5e6f not found"},
        },
    }


TASK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A `text/event-stream` of the task's events; or, before streaming, a "
        "NodeODM-style `{\"error\"}` (unknown task, invalid token or event id).",
        "content": _stream_content(
            "The event's per-task `seq` (decimal): 1, 2, 3, ... without holes."
        ),
    },
    204: {"description": "The task is over and the cursor is at or past its terminal event."},
    **openapi.NOT_FOUND_HTML,
}

ALL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A `text/event-stream` of every task's events; or, before streaming, a "
        "NodeODM-style `{\"error\"}` (invalid token, status or event id).",
        "content": _stream_content(
            "The event's sequence in the EVENTS JetStream stream (decimal; increasing, with "
            "holes where other events were filtered out)."
        ),
    },
}

SinceQuery = Annotated[
    str | None,
    Query(description="Resume after this event id (as `Last-Event-ID`; the header wins)."),
]
LastEventIdHeader = Annotated[
    str | None,
    Header(alias="Last-Event-ID", description="Resume after this event id (EventSource sends it)."),
]


# Sequences are int64 in MongoDB and uint64 in JetStream (which is asked for the one after).
MAX_EVENT_ID = 2**63 - 1


def _cursor(last_event_id: str | None, since: str | None) -> int | None:
    raw = last_event_id if last_event_id not in (None, "") else since
    if raw is None or raw == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_EVENT_ID:
        raise NodeOdmError(f"Invalid event id: {raw}")
    return value


def _hub(res: Resources) -> eventstream.EventHub:
    if res.event_hub is None:
        res.event_hub = eventstream.EventHub.for_settings(res.broker.connection, res.settings)
    return res.event_hub


def client_key(request: Request, caller: tenants.Tenant) -> str:
    """Whose stream this is, for ``sse_max_streams_per_client``: the peer address and the
    caller's tenant. With one token shared by many clients (``SCALEODM_TOKEN``), the tenant
    alone would make them all one client."""
    addr = request.client.host if request.client else "?"
    return f"tenant:{caller.name}:addr:{addr}"


SHUTDOWN_GRACE_S = 2.0  # streams end cleanly at shutdown (uvicorn waits up to 20 s)


def _respond(
    request: Request, res: Resources, caller: tenants.Tenant,
    stream: Callable[[anyio.Event], AsyncIterator[ServerSentEvent]],
) -> SseResponse:
    try:  # counted before anything is streamed; given back when the response ends
        release = _hub(res).streams.take(client_key(request, caller))
    except eventstream.TooManyStreamsError as exc:
        raise NodeOdmError(str(exc)) from exc
    stop = anyio.Event()  # set by sse-starlette when the server shuts down
    try:
        response = SseResponse(
            stream(stop),
            ping=res.settings.sse_heartbeat_s,
            ping_message_factory=eventstream.heartbeat,
            send_timeout=res.settings.sse_send_timeout_s,
            shutdown_event=stop,
            shutdown_grace_period=SHUTDOWN_GRACE_S,
        )
    except BaseException:
        release()
        raise
    response.release = release
    return response


@router.get(
    "/task/{uuid}/events", operation_id="events-stream_task_events",
    response_class=SseResponse, response_model=None, responses=TASK_RESPONSES,
)
async def stream_task_events(
    uuid: str, request: Request, res: ResourcesDep, caller: CallerDep, since: SinceQuery = None,
    last_event_id: LastEventIdHeader = None,
) -> Response:
    """One task's events as Server-Sent Events: history after the cursor, then live, until the
    current attempt's terminal event. `id` = per-task `seq`."""
    cursor = _cursor(last_event_id, since) or 0
    task_id = canonical_task_id(uuid)  # one spelling per task (contracts/ids.py)
    doc = deps.visible(await res.store.get_task(task_id) if task_id is not None else None,
                       caller)
    if task_id is None or doc is None:
        raise not_found(uuid)
    uuid = task_id
    if TaskState(doc["state"]) in TERMINAL_STATES:
        through = await res.store.terminal_seq(uuid, int(doc["attempt"]))
        if through is not None and cursor >= through:
            return Response(status_code=204)
        return _respond(request, res, caller, lambda stop: eventstream.replay_task(
            res.store, uuid, cursor, through, stop
        ))
    hub = _hub(res)
    return _respond(request, res, caller, lambda stop: eventstream.follow_task(
        res.store, hub, uuid, cursor, resync_s=res.settings.sse_heartbeat_s, stop=stop
    ))


@router.get(
    "/events", operation_id="events-stream_events",
    response_class=SseResponse, response_model=None, responses=ALL_RESPONSES,
)
async def stream_events(
    request: Request,
    res: ResourcesDep,
    caller: CallerDep,
    status: Annotated[
        list[int] | None,
        Query(description="Keep the events that move a task to this NodeODM status "
              "(10 queued, 20 running, 30 failed, 40 completed, 50 canceled); repeatable."),
    ] = None,
    since: SinceQuery = None,
    last_event_id: LastEventIdHeader = None,
) -> Response:
    """Every task's events (a tenant not admin: its own tasks') as Server-Sent Events, from the
    EVENTS JetStream stream. `id` = stream sequence; without a cursor, live only."""
    statuses = status or []
    unknown = [s for s in statuses if s not in eventstream.STATUS_KINDS]
    if unknown:
        raise NodeOdmError(f"Invalid status: {unknown[0]}")
    cursor = _cursor(last_event_id, since)
    subjects = eventstream.status_filter(statuses)
    keep = None if caller.role == "admin" else _owned_by(res, caller)
    return _respond(request, res, caller, lambda stop: eventstream.follow_all(
        res.broker.connection, cursor, subjects, stop=stop,
        max_pending_bytes=res.settings.sse_max_pending_bytes, keep=keep,
    ))


def _owned_by(res: Resources, caller: tenants.Tenant) -> Callable[[str], Awaitable[bool]]:
    """Whether an event of task ``task_id`` is ``caller``'s to see (module docstring)."""
    async def keep(task_id: str) -> bool:
        return caller.may_access(await res.task_owner(task_id) or UNATTRIBUTED)

    return keep


# No tenant has this name (tenant names start with a letter or digit): an event of a task whose
# owner is unknown is nobody's, which only admins see.
UNATTRIBUTED = "-"
