"""The NodeODM REST API (nodeodm-api.md), as PyODM, WebODM and ClusterODM call it."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid as uuidlib
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Query, Request
from starlette.datastructures import FormData, UploadFile

from scaleodm.common.contracts import bus, commands, events
from scaleodm.common.contracts.ids import TaskId, is_task_id
from scaleodm.common.domain import options as odm_options
from scaleodm.common.domain import taskinfo
from scaleodm.common.logging import bind_task, get_logger
from scaleodm.common.store import s3 as s3mod
from scaleodm.common.store.tasks import TaskExistsError
from scaleodm.gateway import uploads
from scaleodm.gateway.deps import ResourcesDep, TokenDep
from scaleodm.gateway.errors import NodeOdmError, not_found

log = get_logger(__name__)
router = APIRouter(tags=["nodeodm"], dependencies=[TokenDep])

API_VERSION = "2.2.4"  # NodeODM §3.1: x.y.z >= 1.5.1 unlocks chunked uploads and with_output


def _now_ms() -> int:
    return int(time.time() * 1000)


def _default_name() -> str:
    # NodeODM §4.6: "Task of <ISO-8601 UTC now>"
    now = dt.datetime.now(dt.UTC)
    return f"Task of {now.strftime('%Y-%m-%dT%H:%M:%S.')}{now.microsecond // 1000:03d}Z"


def _memory() -> tuple[int, int]:
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return info.get("MemTotal", 0), info.get("MemAvailable", 0)
    except OSError:
        return 0, 0


@router.get("/info", operation_id="nodeodm-read_info")
async def read_info(res: ResourcesDep) -> dict[str, Any]:
    """Node information (NodeODM §3.1)."""
    total, available = _memory()
    return {
        "version": API_VERSION,
        "taskQueueCount": await res.store.count_active(),
        "totalMemory": total,
        "availableMemory": available,
        "cpuCores": os.cpu_count() or 1,
        "maxImages": res.settings.max_images,
        "maxParallelTasks": res.settings.max_parallel_tasks,
        "engineVersion": "?",
        "engine": "odm",
    }


@router.get("/options", operation_id="nodeodm-read_options")
async def read_options() -> list[dict[str, Any]]:
    """The engine's option catalog (NodeODM §3.2)."""
    return odm_options.catalog_as_json()


@router.get("/task/list", operation_id="nodeodm-list_tasks")
async def list_tasks(res: ResourcesDep) -> list[dict[str, str]]:
    """Every task, in creation order (NodeODM §3.3)."""
    return [{"uuid": t} for t in await res.store.list_task_ids()]


def _check_zipurl(url: str, allowed: list[str]) -> str:
    parts = urlsplit(url)
    if parts.scheme not in allowed or not parts.netloc:
        raise NodeOdmError(
            f"Invalid zipurl: {url!r} (expected an {', '.join(s + '://' for s in allowed)} URL)"
        )
    if parts.scheme == "s3":
        try:
            s3mod.parse_s3_url(url)
        except ValueError as exc:
            raise NodeOdmError(f"Invalid zipurl: {exc}") from exc
    return url


def _validated_options(raw: str | None, skip_post_processing: bool) -> list[dict[str, Any]]:
    try:
        opts = odm_options.validate_options(raw or "[]")
    except odm_options.OptionsError as exc:
        raise NodeOdmError(str(exc)) from exc
    return odm_options.add_post_processing_options(opts, skip_post_processing=skip_post_processing)


def _text(form: FormData, key: str) -> str | None:
    value = form.get(key)
    return value if isinstance(value, str) else None


async def _read_form(request: Request) -> FormData:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return FormData()  # NodeODM §1.5: only multipart is parsed
    try:
        return await request.form(max_files=100_000, max_fields=1000)
    except Exception as exc:
        raise NodeOdmError(f"Malformed multipart body: {exc}") from exc


@router.post("/task/new", operation_id="nodeodm-create_task")
async def create_task(request: Request, res: ResourcesDep) -> dict[str, str]:
    """Create a task from uploaded images and/or a ``zipurl`` (NodeODM §3.4)."""
    settings = res.settings
    set_uuid = request.headers.get("set-uuid")
    if set_uuid is not None and (
        not is_task_id(set_uuid) or await res.store.get_task(set_uuid, include_removed=True)
    ):
        raise NodeOdmError(f"Invalid set-uuid: {set_uuid}")
    form = await _read_form(request)
    try:
        return await _create_from_form(form, set_uuid, res, settings)
    finally:
        await form.close()


async def _create_from_form(
    form: FormData, set_uuid: str | None, res: Any, settings: Any
) -> dict[str, str]:
    files = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
    zipurl = (_text(form, "zipurl") or "").strip()
    if not files and not zipurl:
        raise NodeOdmError("Need at least 1 file or a zip file url.")
    if settings.max_images and len(files) > settings.max_images:
        raise NodeOdmError(
            f"{len(files)} images uploaded, but this node can only process up to "
            f"{settings.max_images}."
        )
    skip_pp = _text(form, "skipPostProcessing") == "true"  # only the exact string (§3.4)
    options = _validated_options(_text(form, "options"), skip_pp)
    sources = [_check_zipurl(zipurl, settings.zipurl_schemes)] if zipurl else []
    outputs = _parse_outputs(_text(form, "outputs"))
    webhook = (_text(form, "webhook") or "").strip() or None
    task_id = set_uuid or str(uuidlib.uuid4())
    with bind_task(task_id):
        bucket = settings.s3.bucket
        if files:
            prefix = s3mod.task_inputs(bucket, task_id)
            await uploads.store_uploads(res.s3, prefix, files)
            sources.insert(0, str(prefix))
        date_created = _parse_int(_text(form, "dateCreated")) or _now_ms()
        doc = {
            "_id": task_id,
            "name": _text(form, "name") or _default_name(),
            "date_created_ms": date_created,
            "options": options,
            "images_count": len(files),
            "webhook": webhook,
            "skip_post_processing": skip_pp,
            "outputs": outputs,
            "sources": sources,
            "output_prefix": str(s3mod.task_outputs(bucket, task_id)),
        }
        queued = events.queued(task_id, 1)
        try:
            created = await res.store.create_task(doc, queued)
        except TaskExistsError as exc:
            raise NodeOdmError(f"Invalid set-uuid: {task_id}") from exc
        cmd = commands.CreateTask(
            task_id=TaskId(task_id),
            attempt=1,
            name=doc["name"],
            options=options,
            sources=sources,
            output_prefix=doc["output_prefix"],
            skip_post_processing=skip_pp,
            outputs=outputs,
        )
        await _publish_or_fail(res, cmd)
        await res.emitter.publish(queued.model_copy(update={"seq": created.seq}))
        log.info("task created", images=len(files), zipurl=bool(zipurl))
        return {"uuid": task_id}


async def _publish_or_fail(res: Any, cmd: commands.CreateTask | commands.RestartTask) -> None:
    try:
        await bus.publish_command(res.broker, cmd, timeout_s=res.settings.nats.publish_timeout_s)
    except Exception as exc:
        log.error("could not queue task", error=repr(exc))
        await res.emitter.emit(
            events.failed(cmd.task_id, cmd.attempt, "Could not queue the task (message bus)")
        )
        raise NodeOdmError("Could not queue the task, please retry later") from exc


def _parse_int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _parse_outputs(raw: str | None) -> list[str] | None:
    """NodeODM §7.2: a JSON array of project-relative paths; anything else -> defaults."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, list):
        return None
    paths = []
    for item in value:
        if isinstance(item, str):
            parts = [p for p in item.replace("\\", "/").split("/") if p not in ("", ".", "..")]
            if parts:
                paths.append("/".join(parts))
    return paths or None


async def _task_or_error(res: ResourcesDep, task_id: str) -> dict[str, Any]:
    doc = await res.store.get_task(task_id)
    if doc is None:
        raise not_found(task_id)
    return doc


@router.get("/task/{uuid}/info", operation_id="nodeodm-read_task_info")
async def read_task_info(
    uuid: str,
    request: Request,
    res: ResourcesDep,
    with_output: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    """Task information; ``with_output=N`` adds console lines from N on (NodeODM §3.6)."""
    doc = await _task_or_error(res, uuid)
    info = taskinfo.task_info(doc, _now_ms())
    if with_output is None and "output" in request.query_params:
        with_output = request.query_params["output"]  # §11 #18: the Swagger name, harmless
    if with_output is not None:
        info["output"] = await _output(res, doc, taskinfo.parse_line_param(with_output))
    return info


async def _output(res: ResourcesDep, doc: dict[str, Any], n: int) -> list[str]:
    total = int(doc.get("output_lines", 0))
    start = taskinfo.slice_start(n, total)
    return await res.store.read_output(doc["_id"], doc["attempt"], start, total)


@router.get("/task/{uuid}/output", operation_id="nodeodm-read_task_output")
async def read_task_output(
    uuid: str, res: ResourcesDep, line: Annotated[str | None, Query()] = None
) -> list[str]:
    """Console output from line N on; negative N = the last |N| lines (NodeODM §3.7)."""
    doc = await _task_or_error(res, uuid)
    return await _output(res, doc, taskinfo.parse_line_param(line))


async def _action_body(request: Request) -> dict[str, Any]:
    """cancel/remove/restart bodies: urlencoded or JSON (NodeODM §1.5)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise NodeOdmError(str(exc)) from exc
        return body if isinstance(body, dict) else {}
    if ctype.startswith("application/x-www-form-urlencoded"):
        form = await request.form()
        return {k: v for k, v in form.items() if isinstance(v, str)}
    return {}


def _uuid_param(body: dict[str, Any]) -> str:
    value = body.get("uuid")
    if not isinstance(value, str) or not value:
        raise NodeOdmError("uuid param missing.")
    return value


@router.post("/task/cancel", operation_id="nodeodm-cancel_task")
async def cancel_task(request: Request, res: ResourcesDep) -> dict[str, Any]:
    """Cancel a task: status 50, its run stopped (NodeODM §3.9)."""
    task_id = _uuid_param(await _action_body(request))
    doc = await res.store.get_task(task_id)
    if doc is None:
        raise NodeOdmError(f"{task_id} not found", action=True)
    with bind_task(task_id, attempt=doc["attempt"]):
        # Applied here first so the very next GET shows 50 (read-your-writes).
        await res.emitter.emit(events.canceled(task_id, doc["attempt"]))
        cmd = commands.CancelTask(task_id=TaskId(task_id), attempt=doc["attempt"])
        await bus.publish_command(res.broker, cmd, timeout_s=res.settings.nats.publish_timeout_s)
        log.info("task canceled")
    return {"success": True}
