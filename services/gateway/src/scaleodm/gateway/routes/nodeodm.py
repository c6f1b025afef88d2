"""The NodeODM REST API (nodeodm-api.md), as PyODM, WebODM and ClusterODM call it.

Hardened on purpose (departures from NodeODM that its clients do not notice):

- Task ids are canonical (lower-case) from the moment they enter, ``{uuid}`` and action bodies
  alike (``contracts.ids.canonical_task_id``): one task, one spelling.
- Console output comes in pages of at most ``output_page_lines`` lines from where the client
  asked. WebODM polls ``with_output=<lines it has>`` and appends, CloudODM polls
  ``output?line=<lines seen>`` (§12.2, §12.4), so a short page is simply continued by the next poll.
  A negative N (the last |N| lines, §3.6) keeps its meaning of "the tail": the last
  ``min(|N|, output_page_lines)`` lines.
- cancel/remove/restart bodies are read up to ``max_action_body_bytes`` and no further, with
  the body idle timeout (``bodies.read_capped``).
- Tenants (``deps.get_caller``): ``/task/list`` lists the caller's tasks (an admin's: every
  task); a task of another tenant answers exactly as an unknown uuid on every route, from the
  same read (the task is read, then its tenant compared: an unknown uuid costs the same read).
  ``/info`` reports the caller's ``maxImages``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from scaleodm.common import clock, splitmerge, stac, tenants
from scaleodm.common.contracts.ids import canonical_task_id
from scaleodm.common.domain import options as odm_options
from scaleodm.common.domain import taskinfo
from scaleodm.common.domain.status import TaskState
from scaleodm.common.domain.text import shown
from scaleodm.common.logging import get_logger
from scaleodm.common.store import s3 as s3mod
from scaleodm.gateway import actions, bodies, deps, downloads, models, openapi, submission
from scaleodm.gateway.deps import CallerDep, CallerRequired, ResourcesDep
from scaleodm.gateway.errors import NodeOdmError
from scaleodm.gateway.responses import JsonResponse

log = get_logger(__name__)
router = APIRouter(tags=["nodeodm"], dependencies=[CallerRequired])

API_VERSION = "2.2.4"  # NodeODM §3.1: x.y.z >= 1.5.1 unlocks chunked uploads and with_output


def _memory() -> tuple[int, int]:
    """MemTotal and MemAvailable in bytes (the first and third lines of /proc/meminfo)."""
    found: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    found[key] = int(value.split()[0]) * 1024
                    if len(found) == 2:
                        break
    except OSError:
        pass
    return found.get("MemTotal", 0), found.get("MemAvailable", 0)


@router.get("/info", operation_id="nodeodm-read_info", response_model=None,
            responses=openapi.ok(models.NodeInfo, "Node information."))
async def read_info(res: ResourcesDep, caller: CallerDep) -> JsonResponse:
    """Node information (NodeODM §3.1); ``maxImages`` is the caller's."""
    total, available = _memory()
    return JsonResponse({
        "version": API_VERSION,
        "taskQueueCount": await res.queue_count.get(),
        "totalMemory": total,
        "availableMemory": available,
        "cpuCores": os.cpu_count() or 1,
        "maxImages": tenants.max_images(caller, res.settings.max_images),
        "maxParallelTasks": res.settings.capacity.parallel,
        "engineVersion": res.settings.engine_version,
        "engine": "odm",
    })


@router.get("/options", operation_id="nodeodm-read_options", response_model=None,
            responses=openapi.ok(list[models.OptionPublic], "The option catalog."))
async def read_options() -> JsonResponse:
    """The engine's option catalog (NodeODM §3.2)."""
    return JsonResponse(odm_options.catalog_as_json())


@router.get("/task/list", operation_id="nodeodm-list_tasks", response_model=None,
            responses=openapi.ok(list[models.TaskListItem], "The caller's tasks."))
async def list_tasks(res: ResourcesDep, caller: CallerDep) -> JsonResponse:
    """The caller's tasks (an admin's: every task), in creation order (NodeODM §3.3)."""
    owner = None if caller.role == "admin" else caller.name
    return JsonResponse([{"uuid": t} for t in await res.store.list_task_ids(owner,
                                                                             caller.parent)])


@router.get("/task/{uuid}/info", operation_id="nodeodm-read_task_info", response_model=None,
            responses=openapi.ok(models.TaskInfo, "The task.", path_params=True))
async def read_task_info(
    uuid: str,
    request: Request,
    res: ResourcesDep,
    caller: CallerDep,
    with_output: Annotated[str | None, Query()] = None,
) -> JsonResponse:
    """Task information; ``with_output=N`` adds console lines from N on (NodeODM §3.6)."""
    doc = await deps.task_or_not_found(res, uuid, caller)
    info = taskinfo.task_info(doc, clock.now_ms())
    if doc["state"] == TaskState.QUEUED.value and not doc.get("admitted"):
        position = (await res.queue_positions.get()).get(doc["_id"])
        if position is not None:
            info["queuePosition"] = position
    if doc.get("parent"):
        info["parent"] = doc["parent"]
    if splitmerge.splits(doc.get("options") or ()):
        # Only a splitting task can have children: other tasks' reads stay in memory.
        info["children"] = await res.store.children_of(doc["_id"])
    if with_output is None and "output" in request.query_params:
        with_output = request.query_params["output"]  # §11 #18: the Swagger name, harmless
    if with_output is not None:
        info["output"] = await _output(res, doc, taskinfo.parse_line_param(with_output))
    return JsonResponse(info)  # JSON already (responses.py): no jsonable_encoder walk


async def _output(res: ResourcesDep, doc: dict[str, Any], n: int) -> list[str]:
    """NodeODM's slice for ``n`` (§3.6), one page at most: from ``n`` on, or the tail."""
    total = int(doc.get("output_lines", 0))
    page = res.settings.output_page_lines
    start = taskinfo.slice_start(n, total)
    if n < 0:  # the last |n| lines (§3.6): a page of them is their tail
        start, end = max(start, total - page), total
    else:  # one page from n on: a departure (module docstring)
        end = min(total, start + page)
    return await res.store.read_output(doc["_id"], doc["attempt"], start, end)


@router.get("/task/{uuid}/output", operation_id="nodeodm-read_task_output", response_model=None,
            responses=openapi.ok(list[str], "Console lines.", path_params=True))
async def read_task_output(
    uuid: str, res: ResourcesDep, caller: CallerDep,
    line: Annotated[str | None, Query()] = None,
) -> JsonResponse:
    """Console output from line N on; negative N = the last |N| lines (NodeODM §3.7)."""
    doc = await deps.task_or_not_found(res, uuid, caller)
    return JsonResponse(await _output(res, doc, taskinfo.parse_line_param(line)))


async def _capped_body(request: Request, res: ResourcesDep) -> bytes:
    """The whole body, at most ``max_action_body_bytes`` of it, with the body idle timeout.

    What follows the cap is not kept: the server drops the rest of an unread body as it
    arrives. The connection is not closed on purpose: closing with unread input makes the
    kernel reset it, and the client would lose the answer it is sent.
    """
    try:
        return await bodies.read_capped(
            request.stream(), res.settings.max_action_body_bytes,
            res.settings.body_idle_timeout_s,
            content_length=request.headers.get("content-length"),
        )
    except bodies.BodyError as exc:
        raise NodeOdmError(str(exc)) from exc


async def _action_body(request: Request, res: ResourcesDep) -> dict[str, Any]:
    """cancel/remove/restart bodies: urlencoded or JSON (NodeODM §1.5), size-capped."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        raw = await _capped_body(request, res)
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise NodeOdmError(shown(str(exc))) from exc
        return body if isinstance(body, dict) else {}
    if ctype.startswith("application/x-www-form-urlencoded"):
        raw = await _capped_body(request, res)
        # As Starlette's form parser did: bytes as latin-1, %-escapes as UTF-8 (invalid ones
        # U+FFFD), blank values kept, the last of repeated names wins.
        return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))
    return {}


def _uuid_param(body: dict[str, Any]) -> str:
    value = body.get("uuid")
    if not isinstance(value, str) or not value:
        raise NodeOdmError("uuid param missing.")
    # JSON may carry lone surrogates, which no uuid has and UTF-8 cannot encode: U+FFFD, as
    # an urlencoded body's invalid bytes get.
    return submission.valid_unicode(value)


def _action_error(exc: actions.ActionError, uuid: str) -> NodeOdmError:
    """NodeODM's answer to an action that could not be done (§3.9-3.11)."""
    if isinstance(exc, actions.NotRestartableError):
        return NodeOdmError("Task cannot be restarted", action=True)
    return NodeOdmError(f"{shown(uuid)} not found", action=True)


async def _act(uuid: str, act: Callable[[str], Awaitable[None]]) -> dict[str, Any]:
    """Run a task action on the task a body's ``uuid`` names (any spelling of its id)."""
    task_id = canonical_task_id(uuid)
    try:
        if task_id is None:
            raise actions.UnknownTaskError(uuid)
        await act(task_id)
    except actions.ActionError as exc:
        raise _action_error(exc, uuid) from exc
    return {"success": True}


@router.post("/task/cancel", operation_id="nodeodm-cancel_task", response_model=None,
             responses=openapi.action_ok("Canceled."),
             openapi_extra=openapi.action_body())
async def cancel_task(request: Request, res: ResourcesDep, caller: CallerDep
                      ) -> dict[str, Any]:
    """Cancel a task: status 50, its run stopped (NodeODM §3.9)."""
    async def cancel(task_id: str) -> None:
        await res.actions.cancel(task_id, by=caller)

    return await _act(_uuid_param(await _action_body(request, res)), cancel)


@router.post("/task/remove", operation_id="nodeodm-remove_task", response_model=None,
             responses=openapi.action_ok("Removed."),
             openapi_extra=openapi.action_body())
async def remove_task(request: Request, res: ResourcesDep, caller: CallerDep
                      ) -> dict[str, Any]:
    """Cancel a task and delete it with its data; the uuid is gone at once (NodeODM §3.10)."""
    async def remove(task_id: str) -> None:
        await res.actions.remove(task_id, by=caller)

    return await _act(_uuid_param(await _action_body(request, res)), remove)


@router.post("/task/restart", operation_id="nodeodm-restart_task", response_model=None,
             responses=openapi.action_ok("Restarted."),
             openapi_extra=openapi.action_body(restart=True))
async def restart_task(request: Request, res: ResourcesDep, caller: CallerDep
                       ) -> dict[str, Any]:
    """Run a finished task again under the same uuid, optionally with new options (§3.11)."""
    body = await _action_body(request, res)
    uuid = _uuid_param(body)
    raw = body.get("options")
    new_options: list[dict[str, Any]] | None = None
    if raw not in (None, "", []):
        # §3.11 step 2: options are validated before the task is looked up
        try:
            new_options = submission.storable_options(odm_options.validate_options(
                raw if isinstance(raw, str) else json.dumps(raw)
            ))
        except odm_options.OptionsError as exc:
            raise NodeOdmError(exc.error) from exc
        submission.check_tenant_options(caller, new_options)
        await submission.check_option_urls(new_options, submission.outbound_policy(res))

    async def restart(task_id: str) -> None:
        await res.actions.restart(task_id, new_options, by=caller)

    return await _act(uuid, restart)


# {asset:path}: an encoded "../x" arrives decoded; it must be refused as an asset, not 404.
@router.get("/task/{uuid}/download/{asset:path}", operation_id="nodeodm-download_asset",
            response_model=None, responses=openapi.DOWNLOAD_RESPONSES)
async def download_asset(uuid: str, asset: str, request: Request, res: ResourcesDep,
                         caller: CallerDep) -> Response:
    """``all.zip`` of a completed task, streamed from S3 (NodeODM §3.8); also, a departure
    NodeODM's clients never meet, the orthophoto, DSM and DTM alone (``orthophoto.tif``,
    ``dsm.tif``, ``dtm.tif``: the STAC Item's asset links), which answer ``Range`` requests
    (``downloads.single_file``) so that GIS software reads the COGs remotely."""
    doc = await deps.task_or_not_found(res, uuid, caller)
    if asset != "all.zip" and asset not in stac.DOWNLOADS:
        raise NodeOdmError("Invalid asset")
    if doc["state"] != TaskState.COMPLETED.value:
        raise NodeOdmError("Asset not ready")  # §11 #12: only completed tasks are served
    prefix = s3mod.parse_s3_url(doc["output_prefix"])
    if asset == "all.zip":
        found = await downloads.all_zip(res.s3, prefix)
        if found is None:
            raise NodeOdmError("Asset not ready")
        return downloads.streaming_response(found)
    try:
        found = await downloads.single_file(res.s3, prefix, stac.DOWNLOADS[asset], asset,
                                            _range_of(request))
    except downloads.Unsatisfiable as exc:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{exc.size}",
                                                  "Accept-Ranges": "bytes"})
    if found is None:
        raise NodeOdmError("Asset not ready")
    return downloads.file_response(found)


def _range_of(request: Request) -> str | None:
    """The ``Range`` to honour: none when ``If-Range`` is sent (no validators kept here)."""
    if "if-range" in request.headers:
        return None
    return request.headers.get("range")
