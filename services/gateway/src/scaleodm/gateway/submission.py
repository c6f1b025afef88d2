"""Turning accepted input into a task: the fields NodeODM clients send, validated, then handed
to ``actions.TaskActions.create``.

Shared by the single-request ``/task/new`` and the chunked ``init``/``commit`` flow, so both give
the same task for the same input.

The caller's tenant (``scaleodm.common.tenants``) bounds what it submits: the options it may set
(checked on the options it sent, before the post-processing ones are added: §5.4), images per
task (the smaller of the node's ``max_images`` and the tenant's, with NodeODM's message, §3.4
step 5), the priority it may ask for, and its monthly image quota. The task belongs to the
caller (``tenant`` in its document). The quota is taken last, just before the task is created,
in one conditional MongoDB update (``store.usage``), and given back when the creation is refused.
Images of a ``zipurl`` are not known at submission and are not counted.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

from scaleodm.common import clock, netguard, tenants
from scaleodm.common.domain import options as odm_options
from scaleodm.common.domain import webhooks
from scaleodm.common.domain.status import TaskState
from scaleodm.common.domain.text import shown
from scaleodm.common.logging import get_logger
from scaleodm.common.store import s3 as s3mod
from scaleodm.gateway import actions
from scaleodm.gateway.deps import Resources
from scaleodm.gateway.errors import NodeOdmError

log = get_logger(__name__)

RESOLVE_TIMEOUT_S = 5.0  # zipurl, webhook and sm-cluster hosts, at submission
ZIPURL_MAX_CHARS = 16384  # presigned URLs with session tokens exceed netguard's 2048 default


def default_name() -> str:
    # NodeODM §4.6: "Task of <ISO-8601 UTC now>"
    now = clock.now()
    return f"Task of {now.strftime('%Y-%m-%dT%H:%M:%S.')}{now.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class TaskFields:
    """The text fields of ``/task/new`` and ``init`` (NodeODM §3.4), as sent."""

    name: str | None = None
    options: str | None = None
    skip_post_processing: str | None = None
    webhook: str | None = None
    outputs: str | None = None
    date_created: str | None = None
    priority: str | None = None  # ScaleODM: admission order (higher first)

    @classmethod
    def from_text(cls, text: Any) -> TaskFields:
        """From anything with ``text(name) -> str | None`` (a parsed form)."""
        return cls(
            name=text("name"), options=text("options"),
            skip_post_processing=text("skipPostProcessing"), webhook=text("webhook"),
            outputs=text("outputs"), date_created=text("dateCreated"),
            priority=text("priority"),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskFields:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if any(v is not None and not isinstance(v, str) for v in known.values()):
            raise ValueError("fields must be strings")
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def skip_pp(self) -> bool:
        return self.skip_post_processing == "true"  # only the exact string (§3.4)

    def priority_for(self, tenant: tenants.Tenant) -> int:
        """``priority``: an integer in ``PRIORITIES`` at most the tenant's ceiling; the tenant's
        default when not given; else the client's error."""
        raw = (self.priority or "").strip()
        requested = None
        if raw:
            if not re.fullmatch(r"[+-]?[0-9]{1,4}", raw) or int(raw) not in PRIORITIES:
                raise NodeOdmError(f"Invalid priority: {shown(raw)} (an integer from "
                                   f"{PRIORITIES.start} to {PRIORITIES.stop - 1})")
            requested = int(raw)
        try:
            return tenants.check_priority(tenant, requested)
        except tenants.PriorityError as exc:
            raise NodeOdmError(exc.message) from exc


# ScaleODM's ``priority`` field: waiting tasks of a higher priority are admitted first.
PRIORITIES = tenants.PRIORITIES
ADMIT_POLL_S = 0.05  # a read-model read: memory, kept current by the task's events


async def accepted_options(res: Resources, fields: TaskFields, caller: tenants.Tenant
                           ) -> list[dict[str, Any]]:
    """Everything about the fields that can be refused synchronously, checked for ``caller``;
    the options to store. The same for ``/task/new``, init (pre-check) and commit (§5.3)."""
    outbound = outbound_policy(res)
    fields.priority_for(caller)
    options = validated_options(fields.options, skip_pp=fields.skip_pp, caller=caller)
    await check_option_urls(options, outbound)
    await check_webhook(fields.webhook, outbound)
    return options


def check_tenant_options(caller: tenants.Tenant, options: list[dict[str, Any]]) -> None:
    """Refuse an option the client named that ``caller`` may not set (before the gateway adds
    its post-processing options, §5.4)."""
    refusal = tenants.check_options(caller, (option["name"] for option in options))
    if refusal is not None:
        raise NodeOdmError(refusal)


def images_refusal(res: Resources, caller: tenants.Tenant, count: int) -> str | None:
    """NodeODM's error for a task of ``count`` images beyond the node's or ``caller``'s
    ``max_images`` (§3.4 step 5), else None."""
    return tenants.check_images(caller, count, res.settings.max_images)


def outbound_policy(res: Resources) -> netguard.OutboundPolicy:
    return netguard.OutboundPolicy(res.settings.outbound_allow)


def validated_options(raw: str | None, *, skip_pp: bool, caller: tenants.Tenant
                      ) -> list[dict[str, Any]]:
    """NodeODM §5: errors become the client's ``{"error": ...}``; the options ``caller`` may
    not set refused; auto options added (§5.4)."""
    try:
        opts = odm_options.validate_options(raw if raw else "[]")
    except odm_options.OptionsError as exc:
        raise NodeOdmError(exc.error) from exc
    stored = storable_options(opts)
    check_tenant_options(caller, stored)
    return odm_options.add_post_processing_options(stored, skip_post_processing=skip_pp)


INT64 = range(-(2**63), 2**63)  # what MongoDB stores as an integer


_SURROGATE = re.compile(r"[\ud800-\udfff]")


class _Unstorable(ValueError):
    pass


def _storable(value: Any) -> Any:
    """A scalar option value as MongoDB and JSON can carry it, with the same meaning in JS.

    Integers beyond 64 bits become floats (JavaScript numbers are doubles: NodeODM's ``parseInt``
    gives ``1e+23`` too); lone surrogates (valid in JSON text, not in UTF-8) become U+FFFD.
    Raises ``_Unstorable`` for non-finite numbers (JSON has none; NodeODM would report them as
    ``null`` and pass ``Infinity`` to the engine) and for arrays and objects, which validation
    already refuses (stored user data never holds a document, so never a ``$`` or dotted key).
    """
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return valid_unicode(value)
    if isinstance(value, int):
        if value in INT64:
            return value
        try:
            value = float(value)
        except OverflowError as exc:
            raise _Unstorable from exc
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Unstorable
        return value
    raise _Unstorable


def valid_unicode(text: str) -> str:
    """``text`` with lone surrogates (from JSON ``\\udXXX`` escapes) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def storable_options(options: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validated options made storable (``_storable``); a value that cannot be is refused as
    out of range, in the format of NodeODM's options errors (§5.1 step 7)."""
    result: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for option in options:
        try:
            result.append({**option, "value": _storable(option["value"])})
        except _Unstorable:
            text = valid_unicode(shown(odm_options.js_to_string(option["value"])))
            errors.append({"name": option["name"],
                           "error": f"Invalid value {text} (out of range)"})
    if errors:
        raise NodeOdmError(_options_error(errors))
    return result


def _options_error(errors: list[dict[str, str]]) -> str:
    # NodeODM §5.1 step 7: the error is the JSON *string* of [{name, error}]
    return json.dumps(errors, ensure_ascii=False, separators=(",", ":"))


async def _resolve_checked(parts: SplitResult, outbound: netguard.OutboundPolicy) -> None:
    """Refuse (``RefusedAddressError``) a host that resolves to an address we may not reach.

    A name that does not resolve here (or not in time) passes: it may resolve where the request
    is made, and that connection checks again (``netguard.GuardedTransport``), so a name that
    changes its answer after this check (DNS rebinding) is still refused there.
    """
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            await outbound.resolve_checked(parts.hostname or "", port)
    except (netguard.ResolveError, TimeoutError):
        pass


async def check_url(url: str, outbound: netguard.OutboundPolicy) -> None:
    """An http(s) URL we may call: well-formed (``netguard.validate_url``), not resolving to a
    refused address. Raises ``ValueError`` with the reason (no URL in it: callers show it)."""
    try:
        parts = netguard.validate_url(url)
        await _resolve_checked(parts, outbound)
    except netguard.InvalidTargetError as exc:
        raise ValueError(str(exc)) from exc
    except netguard.RefusedAddressError as exc:
        raise ValueError(f"refused address ({exc})") from exc


async def check_webhook(raw: str | None, outbound: netguard.OutboundPolicy) -> str | None:
    """The task's webhook URL, or None for none (NodeODM §8: empty, or 3 characters or fewer).

    Checked at submission like a zipurl, so a webhook no delivery could ever make (another
    scheme, malformed, a private address) is refused now instead of failing later unseen.
    """
    url = webhooks.webhook_target(raw)
    if url is None:
        return None
    try:
        await check_url(url, outbound)
    except ValueError as exc:
        raise NodeOdmError(f"Invalid webhook: {shown(str(exc))}") from exc
    return url


URL_OPTIONS = ("sm-cluster",)  # option values the engine connects to (a ClusterODM URL)


async def check_option_urls(
    options: list[dict[str, Any]], outbound: netguard.OutboundPolicy
) -> None:
    """URL-valued options must be URLs we may call, refused like other option errors (§5.1
    step 7). The catalog's own default (``None``: no cluster) and an empty value stay allowed."""
    defaults = {spec.name: spec.value for spec in odm_options.load_catalog()}
    errors: list[dict[str, str]] = []
    for option in options:
        name, value = option["name"], option["value"]
        if name not in URL_OPTIONS or not isinstance(value, str):
            continue
        if value.strip() in ("", defaults.get(name)):
            continue
        try:
            await check_url(value, outbound)
        except ValueError as exc:
            errors.append({"name": name, "error": f"Invalid value {shown(value)} ({exc})"})
    if errors:
        raise NodeOdmError(_options_error(errors))


async def check_zipurl(
    url: str, allowed: list[str], outbound: netguard.OutboundPolicy, *, task_id: str,
    bucket: str, s3_allow: list[str],
) -> str:
    """A usable ``zipurl``; an http(s) host must resolve only to addresses we may fetch from,
    an ``s3://`` one must lie in an operator-listed input location (never another task's data:
    runs read S3 with the service's credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. "http://[::1"
        raise NodeOdmError(f"Invalid zipurl: malformed URL ({exc})") from exc
    if parts.scheme not in allowed or not parts.netloc:
        raise NodeOdmError(
            f"Invalid zipurl: {shown(repr(url))} "
            f"(expected an {', '.join(s + '://' for s in allowed)} URL)"
        )
    if parts.scheme == "s3":
        try:
            location = s3mod.parse_s3_url(url)
        except ValueError as exc:
            raise NodeOdmError(f"Invalid zipurl: {shown(str(exc))}") from exc
        if not s3mod.input_allowed(location, task_id=task_id, bucket=bucket, allow=s3_allow):
            raise NodeOdmError(
                f"Invalid zipurl: {shown(url)} is not an allowed input location"
            )
    elif parts.scheme in ("http", "https"):
        try:
            checked = netguard.validate_url(url, max_length=ZIPURL_MAX_CHARS)
            await _resolve_checked(checked, outbound)
        except (ValueError, netguard.RefusedAddressError) as exc:
            raise NodeOdmError(f"Invalid zipurl: {shown(str(exc))}") from exc
    return url


def parse_outputs(raw: str | None) -> list[str] | None:
    """NodeODM §7.2: a JSON array of project-relative paths; anything else -> defaults."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, list):
        return None
    paths = []
    for item in value:
        if isinstance(item, str):
            item = valid_unicode(item)
            parts = [p for p in item.replace("\\", "/").split("/") if p not in ("", ".", "..")]
            if parts:
                paths.append("/".join(parts))
    return paths or None


# ECMAScript's time range (±100,000,000 days): NodeODM's Date cannot go beyond it either.
DATE_RANGE_MS = range(-(8_640_000 * 10**9), 8_640_000 * 10**9 + 1)


def _int(raw: str | None) -> int | None:
    """``dateCreated``: an integer within the ECMAScript time range, else None (= now)."""
    try:
        value = int(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is None or value in DATE_RANGE_MS else None


async def submit(
    res: Resources,
    task_id: str,
    fields: TaskFields,
    *,
    caller: tenants.Tenant,
    options: list[dict[str, Any]],
    sources: list[str],
    images_count: int,
    failure: str | None = None,
    late: bool = False,
) -> None:
    """Create ``caller``'s task (status 10) and queue its first run; ``failure`` fails it at
    once. Its images count on the caller's monthly quota; a quota passed refuses the request,
    or with ``late`` (a commit: the count was not known before, NodeODM §3.5) fails the task."""
    priority = fields.priority_for(caller)
    if caller.parent is not None:
        # A child (splitmerge): its parent's priority; its images are its parent's, counted on
        # the quota when the parent was submitted.
        parent = await res.get_task(caller.parent)
        priority = int((parent or {}).get("priority") or 0)
    month = None
    if failure is None and images_count and caller.parent is None:
        month = tenants.quota_month(clock.now())
        refusal = await _take_quota(res, caller, month, images_count)
        if refusal is not None:
            if not late:
                raise NodeOdmError(refusal)
            failure, month = refusal, None
    new = actions.NewTask(
        task_id=task_id,
        name=fields.name or default_name(),
        date_created_ms=_int(fields.date_created) or clock.now_ms(),
        options=options,
        images_count=images_count,
        webhook=webhooks.webhook_target(fields.webhook),
        skip_post_processing=fields.skip_pp,
        outputs=parse_outputs(fields.outputs),
        sources=sources,
        output_prefix=str(s3mod.task_outputs(res.settings.s3.bucket, task_id)),
        tenant=caller.name,
        priority=priority,
        parent=caller.parent,
    )
    if caller.parent is not None:
        await res.points.hit("gateway.child.before_create")  # its parent may end meanwhile
    try:
        await res.actions.create(new, failure=failure)
    except actions.TaskExistsAlreadyError as exc:
        # Nothing was recorded: the images go back. (After a storage error the task may exist,
        # MongoDB can apply a write whose answer timed out: they stay counted.)
        if month is not None:
            await asyncio.shield(_give_back(res, caller, month, images_count))
        raise NodeOdmError(f"Invalid set-uuid: {task_id}") from exc
    if caller.parent is not None and failure is None:
        await _until_admitted(res, task_id)


async def _until_admitted(res: Resources, task_id: str) -> None:
    """Wait (at most ``split.admit_wait_s``) for a child to leave QUEUED: ODM reads a child
    still queued right after creating it as a node without room, removes it and sends it again
    later (docs/split-merge.md). A child with no slot free stays queued and is answered so."""
    deadline = asyncio.get_running_loop().time() + res.settings.split.admit_wait_s
    while asyncio.get_running_loop().time() < deadline:
        doc = await res.get_task(task_id)
        if doc is None or doc.get("state") != TaskState.QUEUED:
            return
        await asyncio.sleep(ADMIT_POLL_S)


async def _take_quota(res: Resources, caller: tenants.Tenant, month: str, count: int
                      ) -> str | None:
    """Count ``count`` images on ``caller``'s ``month``; the client's error when that would
    pass its monthly quota (nothing counted then), else None."""
    quota = caller.monthly_image_quota
    used = await res.usage.take(caller.name, month, count, quota)
    if used is None:
        return None
    refusal = tenants.check_quota(caller, used, count)
    # ``take`` refuses only a count beyond the quota; should a give-back have raced it, the
    # message still says the quota is used up rather than nothing.
    return refusal or tenants.check_quota(caller, quota or 0, count) or "Monthly quota exceeded."


async def _give_back(res: Resources, caller: tenants.Tenant, month: str, count: int) -> None:
    try:
        await res.usage.give_back(caller.name, month, count)
    except Exception as exc:
        log.warning("quota not given back", tenant=caller.name, images=count, error=repr(exc))
