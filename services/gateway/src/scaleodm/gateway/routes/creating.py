"""Creating tasks (NodeODM §3.4, §3.5): ``/task/new`` and the chunked init -> upload -> commit.

Files stream from the request into S3 as they arrive (``multipart.stream_form`` +
``S3Writer``), so memory stays bounded whatever the upload size (the process's part buffers,
``store.s3``) and nothing touches local disk. A chunked upload's state is in MongoDB and S3 only,
so any gateway replica can serve any of its requests. Commit reads the upload's counts in the
same write that closes it (``store.uploads``: no listing of names or objects), creates the task
and answers; the upload's records are deleted after the answer. Fetching and processing happen
in the run.

Task ids are canonical (lower-case, ``contracts.ids.canonical_task_id``) from the moment they
enter: ``set-uuid`` and the ``{uuid}`` of upload/commit. Init and commit answer the canonical
id: a departure from NodeODM's "echo exactly as given" (§3.5) that ClusterODM, which sends the
lower-case v4 uuids it generates, cannot see.

Tenants: a task belongs to its caller; a chunked upload belongs to the caller of its init, and
only that tenant may add files to it, re-init it or commit it (admins included: an upload is one
client's work in progress, and its tenant's limits are the ones checked). To anyone else the
upload does not exist (``Invalid uuid (not found)``), and its id is taken as any other
(``Invalid set-uuid``). Limits (``submission``): options, priority and images at ``/task/new``
and init as NodeODM's synchronous errors; images and the monthly quota after a commit as the
task's failure (NodeODM §3.5).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid as uuidlib
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Request
from starlette.requests import ClientDisconnect

from scaleodm.common import metrics, splitmerge, tenants
from scaleodm.common.contracts.ids import canonical_task_id
from scaleodm.common.domain.text import shown
from scaleodm.common.logging import bind_task, get_logger
from scaleodm.common.store import s3 as s3mod
from scaleodm.common.store.tasks import DEFAULT_TENANT, TaskExistsError
from scaleodm.common.store.uploads import UploadNotFoundError
from scaleodm.gateway import bodies, models, multipart, openapi, submission, uploads
from scaleodm.gateway.deps import CallerDep, CallerRequired, Resources, ResourcesDep
from scaleodm.gateway.errors import NodeOdmError

log = get_logger(__name__)
router = APIRouter(tags=["nodeodm"], dependencies=[CallerRequired])


def _taken(set_uuid: str) -> NodeOdmError:
    return NodeOdmError(f"Invalid set-uuid: {shown(set_uuid)}")


async def _checked_set_uuid(request: Request, res: Resources,
                            reinit_by: tenants.Tenant | None = None) -> str | None:
    """The canonical id of ``set-uuid``; None when absent or empty (NodeODM). An id that a task
    holds, or held until it was deleted (its tombstone, ``store.tasks``), is refused as NodeODM
    refuses an existing task's: a departure, NodeODM takes the uuid of a removed task again.
    ``reinit_by``: an init's caller, whose own open upload may be opened again; any other
    upload's id is refused here too (another tenant's open upload is a taken id)."""
    set_uuid = request.headers.get("set-uuid") or None
    if set_uuid is None:
        return None
    task_id = canonical_task_id(set_uuid)
    if (task_id is None or await res.store.get_task(task_id, include_removed=True)
            or await res.store.tombstoned(task_id)):
        raise _taken(set_uuid)
    if reinit_by is not None:
        session = await res.uploads.get(task_id)
        if session is not None and (session.get("committed")
                                    or not _uploader(session, reinit_by)):
            raise _taken(set_uuid)
    return task_id


def _uploader(session: dict[str, Any], caller: tenants.Tenant) -> bool:
    """Whether ``caller`` opened the upload ``session`` (before tenants: ``default``)."""
    return (session.get("tenant") or DEFAULT_TENANT) == caller.name


UPLOADS_BUSY = "Server busy: too many uploads in progress, please retry"


async def _parse(
    request: Request, res: Resources, open_sink: multipart.SinkFactory, *, cleanup: Any
) -> multipart.StreamedForm:
    ctype = request.headers.get("content-type", "")
    if not multipart.is_multipart(ctype):
        return multipart.StreamedForm(fields={}, files=[])  # NodeODM §1.5: multipart only
    limit = res.settings.max_request_bytes
    try:
        bodies.check_declared(request.headers.get("content-length"), limit)
    except bodies.BodyTooLargeError as exc:  # refused unread: nothing to clean up
        raise NodeOdmError(str(exc)) from exc
    # One part buffer at most for the whole request, its wait and hold bounded (store/s3.py);
    # a preemption cuts the body read short, even while it waits for the client. The reader
    # keeps the body's size and idle limits (bodies.py); the parser lets its errors through.
    account = res.s3.buffers.account(wait_s=res.settings.upload_buffer_wait_s,
                                     hold_s=res.settings.upload_buffer_hold_s)
    body = bodies.BodyReader(request.stream(), res.settings.body_idle_timeout_s,
                             max_bytes=limit)
    account.on_preempt = body.interrupt
    metrics.UPLOADS_ACTIVE.inc()
    try:
        with account.bound():
            return await multipart.stream_form(
                body.chunks(), ctype, open_sink,
                max_field_bytes=res.settings.max_field_bytes,
                max_fields=res.settings.max_form_fields,
                max_text_bytes=res.settings.max_form_text_bytes,
            )
    except (multipart.MultipartError, bodies.BodyError) as exc:
        await cleanup(exc)
        raise NodeOdmError(str(exc)) from exc
    except s3mod.BuffersBusyError as exc:
        await cleanup(exc)
        raise NodeOdmError(UPLOADS_BUSY) from exc
    except s3mod.BufferPreemptedError as exc:
        await cleanup(exc)
        raise NodeOdmError(f"Upload too slow: {exc}, please retry") from exc
    except ClientDisconnect as exc:  # nobody to answer: one log line, not two tracebacks
        await asyncio.shield(cleanup(exc))
        raise NodeOdmError("Client disconnected during the upload") from exc
    except BaseException as exc:  # S3 down, cancelled: drop what was stored, then re-raise
        await asyncio.shield(cleanup(exc))
        raise
    finally:
        metrics.UPLOADS_ACTIVE.dec()


@router.post("/task/new", operation_id="nodeodm-create_task", response_model=None,
             responses=openapi.ok(models.UuidResponse, "The new task's uuid."),
             openapi_extra=openapi.CREATE_BODY)
async def create_task(request: Request, res: ResourcesDep, caller: CallerDep
                      ) -> dict[str, str]:
    """Create a task from uploaded ``images`` and/or a ``zipurl`` in one request (§3.4)."""
    settings = res.settings
    task_id = await _checked_set_uuid(request, res) or str(uuidlib.uuid4())
    inputs = s3mod.task_inputs(settings.s3.bucket, task_id)
    # Held before a byte is stored: a concurrent /task/new, init or commit with this id is
    # refused, instead of mixing its files with these or deleting them when it fails.
    if not await res.uploads.reserve(task_id):
        raise NodeOdmError(f"Invalid set-uuid: {shown(task_id)}")
    await res.points.hit("gateway.new.after_reserve")
    stored: list[multipart.StoredFile] = []

    async def drop_inputs(exc: BaseException | None = None) -> None:
        """Delete what this request stored (only that: the prefix may hold nothing else, but
        a failure must never touch more than its own files), then free the id."""
        files = stored or (multipart.completed_files(exc) if exc is not None else [])
        await _delete_stored(res, inputs, files)
        with contextlib.suppress(Exception):
            await res.uploads.unreserve(task_id)

    with bind_task(task_id):
        registry = uploads.NameRegistry()
        form = await _parse(request, res,
                            uploads.s3_sinks(res.s3, inputs, registry,
                                             max_files=settings.max_files_per_request),
                            cleanup=drop_inputs)
        stored = form.files
        try:
            zipurl = (form.text("zipurl") or "").strip()
            count = len(form.files)
            # Images: a seed.zip is not one (splitmerge; NodeODM extracts it before counting).
            images = count - sum(f.filename == splitmerge.SEED_NAME for f in form.files)
            if not count and not zipurl:
                raise NodeOdmError("Need at least 1 file or a zip file url.")
            refusal = submission.images_refusal(res, caller, images)
            if refusal is not None:
                raise NodeOdmError(refusal)
            fields = submission.TaskFields.from_text(form.text)
            options = await submission.accepted_options(res, fields, caller)
            sources = [str(inputs)] if count else []
            if zipurl:
                refusal = tenants.check_zipurl(caller)
                if refusal is not None:
                    raise NodeOdmError(refusal)
                sources.append(await submission.check_zipurl(
                    zipurl, settings.zipurl_schemes, submission.outbound_policy(res),
                    task_id=task_id, bucket=settings.s3.bucket, s3_allow=settings.s3.input_allow,
                ))
            await submission.submit(res, task_id, fields, caller=caller, options=options,
                                    sources=sources, images_count=images)
        except NodeOdmError:
            await drop_inputs()
            raise
        await res.uploads.unreserve(task_id)  # the task exists now: it holds the id
    return {"uuid": task_id}


@router.post("/task/new/init", operation_id="nodeodm-init_task", response_model=None,
             responses=openapi.ok(models.UuidResponse, "The upload's uuid."),
             openapi_extra=openapi.INIT_BODY)
async def init_task(request: Request, res: ResourcesDep, caller: CallerDep
                    ) -> dict[str, str]:
    """Open a chunked upload (§3.5); re-init of an open upload keeps its files."""
    set_uuid = await _checked_set_uuid(request, res, reinit_by=caller)
    upload_id = set_uuid or str(uuidlib.uuid4())

    async def nothing(_: object = None) -> None:
        return None

    form = await _parse(request, res, uploads.refuse_files(), cleanup=nothing)
    fields = submission.TaskFields.from_text(form.text)
    await submission.accepted_options(res, fields, caller)  # pre-check (§5.3)
    try:
        await res.uploads.init(upload_id, fields.to_dict(), caller.name)
    except UploadNotFoundError as exc:  # committed (or taken) meanwhile
        raise _taken(request.headers.get("set-uuid") or upload_id) from exc
    log.info("upload opened", task_id=upload_id)
    return {"uuid": upload_id}  # canonical; ClusterODM compares it with its lower-case uuid


@router.post("/task/new/upload/{uuid}", operation_id="nodeodm-upload_files", response_model=None,
             responses=openapi.ok(models.SuccessResponse, "Stored.", path_params=True),
             openapi_extra=openapi.UPLOAD_BODY)
async def upload_files(uuid: str, request: Request, res: ResourcesDep, caller: CallerDep
                       ) -> dict[str, Any]:
    """Add files to an open upload; duplicate names are renamed as NodeODM does (§3.5)."""
    task_id = canonical_task_id(uuid)
    try:
        if task_id is None:
            raise UploadNotFoundError(uuid)
        await res.uploads.get_open(task_id, caller.name)
    except UploadNotFoundError as exc:
        raise NodeOdmError("Invalid uuid (not found)") from exc
    inputs = s3mod.task_inputs(res.settings.s3.bucket, task_id)
    registry = uploads.NameRegistry(upload_id=task_id, uploads=res.uploads)

    async def drop_completed(exc: BaseException) -> None:
        await _delete_stored(res, inputs, multipart.completed_files(exc), upload_id=task_id)

    with bind_task(task_id):
        form = await _parse(request, res,
                            uploads.s3_sinks(res.s3, inputs, registry,
                                             max_files=res.settings.max_files_per_request),
                            cleanup=drop_completed)
        if not form.files:
            raise NodeOdmError("Need at least 1 file.", noRetry=True)
        log.info("files uploaded", files=len(form.files))
    return {"success": True}


@router.post("/task/new/commit/{uuid}", operation_id="nodeodm-commit_task", response_model=None,
             responses=openapi.ok(models.UuidResponse, "The task's uuid.", path_params=True))
async def commit_task(uuid: str, res: ResourcesDep, caller: CallerDep,
                      background: BackgroundTasks) -> dict[str, str]:
    """Turn an upload into a task and queue it; heavy work happens in the run (§3.5)."""
    settings = res.settings
    task_id = canonical_task_id(uuid)
    if task_id is None:
        raise NodeOdmError("Invalid uuid (not found)")
    inputs = s3mod.task_inputs(settings.s3.bucket, task_id)
    with bind_task(task_id):
        # One write closes the open upload and reads what it holds, counted as its files were
        # stored (store.uploads): no listing of names or objects. A refusal below discards the
        # upload, so closing it first changes nothing for the client.
        session = await res.uploads.commit(task_id, caller.name)
        if session is None:
            session = await res.uploads.get(task_id)
            # A session committed without a task: the commit that closed it died before
            # creating the task; this (retried) commit of its tenant finishes it. With a task,
            # it is one no longer. Reserved: a /task/new's own id, or an upload the retention
            # closed.
            if session is None or session.get("reserved") or not session.get("committed") or (
                not _uploader(session, caller)
            ) or await res.store.get_task(task_id, include_removed=True):
                raise NodeOdmError("Invalid uuid (not found)")
        try:
            fields = submission.TaskFields.from_dict(session.get("fields") or {})
        except (TypeError, ValueError) as exc:
            raise NodeOdmError("Malformed body.json") from exc
        try:
            options = await submission.accepted_options(res, fields, caller)
        except NodeOdmError:
            await _discard(res, task_id, inputs)
            raise
        count = await res.uploads.stored_count(session)
        if count == 0:
            await _discard(res, task_id, inputs)
            raise NodeOdmError("Need at least 1 file.")
        # Images: a seed.zip is not one (splitmerge; NodeODM extracts it before counting).
        count -= await res.uploads.holds(task_id, splitmerge.SEED_NAME)
        await res.points.hit("gateway.commit.before_submit")
        # NodeODM §3.5: too many images after a commit fail the task (so does the quota).
        failure = submission.images_refusal(res, caller, count)
        try:
            await submission.submit(res, task_id, fields, caller=caller, options=options,
                                    sources=[str(inputs)], images_count=count, failure=failure,
                                    late=True)
        except NodeOdmError as exc:
            if isinstance(exc.__cause__, TaskExistsError):  # a concurrent retry created it
                raise NodeOdmError("Invalid uuid (not found)") from exc
            raise
        # The task holds the id now: the upload's records go after the answer. Should that fail,
        # the committed session stays until the retention's sweep (it keeps the task's files).
        background.add_task(_forget_upload, res, task_id, session)
    return {"uuid": task_id}


async def _forget_upload(res: Resources, upload_id: str, session: dict[str, Any]) -> None:
    try:
        await res.uploads.delete(upload_id, session)
    except Exception as exc:
        log.warning("upload records not deleted", task_id=upload_id, error=repr(exc))


async def _delete_stored(res: Resources, inputs: s3mod.S3Url, files: list[multipart.StoredFile],
                         *, upload_id: str | None = None) -> None:
    """Delete the files a request stored under ``inputs`` (and free their names in the chunked
    upload ``upload_id``); best effort: the request is failing already."""
    for file in files:
        with contextlib.suppress(Exception):
            await res.s3.delete(s3mod.S3Url(inputs.bucket, inputs.key + file.result))
            if upload_id is not None:
                await res.uploads.release_name(upload_id, file.result, stored_size=file.size)


async def _discard(res: Resources, upload_id: str, inputs: s3mod.S3Url) -> None:
    with contextlib.suppress(Exception):
        await res.s3.delete_prefix(inputs)
    await res.uploads.delete(upload_id)
