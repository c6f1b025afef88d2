"""Request dependencies: the process-wide resources opened in the lifespan, and the caller.

Every API route knows who calls it (:func:`get_caller`, ``CallerDep``): a tenant of the tenants
directory (``scaleodm.common.tenants``), found from NodeODM's ``?token=`` or, when OIDC is
configured, from an ``Authorization: Bearer`` JWT. An open node (no tenants file, no
``SCALEODM_TOKEN``, no OIDC) answers every request as its one tenant ``default``, whatever token
it carries, as NodeODM without ``--token``. Refusals are NodeODM's (nodeodm-api §1.1, §1.3):
HTTP 200 ``{"error": "Invalid authentication token: ..."}``; an identity provider that cannot be
reached answers ``Identity provider unavailable, please retry later.`` the same way (a client's
retry helps, as with ``Storage unavailable``).
"""

from __future__ import annotations

import collections
from dataclasses import InitVar, dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from faststream.nats import NatsBroker

from scaleodm.common import failpoints, splitmerge, tenants
from scaleodm.common.contracts.ids import canonical_task_id
from scaleodm.common.domain.status import ACTIVE_STATES, TaskState
from scaleodm.common.emitting import Emitter
from scaleodm.common.settings import GatewaySettings
from scaleodm.common.store.admission import AdmissionStore
from scaleodm.common.store.s3 import S3
from scaleodm.common.store.tasks import MongoHandle, TaskStore
from scaleodm.common.store.uploads import UploadStore
from scaleodm.common.store.usage import UsageStore
from scaleodm.gateway.actions import TaskActions
from scaleodm.gateway.cached import CachedValue
from scaleodm.gateway.errors import NodeOdmError, not_found
from scaleodm.gateway.eventstream import EventHub
from scaleodm.gateway.readmodel import ReadModel
from scaleodm.gateway.stacitems import ItemCache

# Task owners remembered per process (a task's tenant never changes): the all-tasks event stream
# asks for the owner of every event it passes on.
OWNERS_SIZE = 100_000


def open_directory(settings: GatewaySettings) -> tenants.TenantDirectory:
    """The gateway's tenants: the tenants file, ``SCALEODM_TOKEN`` and OIDC of ``settings``
    (``TenantsFileError`` when the file cannot be used: the gateway refuses to start)."""
    return tenants.TenantDirectory(settings.tenants_file, settings.token, settings.oidc)


@dataclass
class Resources:
    settings: GatewaySettings
    mongo: MongoHandle
    s3: S3
    broker: NatsBroker
    emitter: Emitter
    uploads: UploadStore
    points: failpoints.Failpoints
    # Live task events for the SSE routes (routes/events.py); created on first use when unset.
    event_hub: EventHub | None = None
    # Task documents from memory (readmodel.py); without it, every read goes to MongoDB.
    read_model: ReadModel | None = None
    # taskQueueCount of /info, counted at most once per SCALEODM_INFO_CACHE_S (cached.py)
    queue_count: CachedValue[int] = field(init=False)
    # queuePosition of task info: the admission order, read at most as often.
    queue_positions: CachedValue[dict[str, int]] = field(init=False)
    # Who may call (get_caller); built from the settings when not given.
    tenant_directory: InitVar[tenants.TenantDirectory | None] = None
    # The task actions (create, restart, cancel, remove): the only writer of tasks here.
    actions: TaskActions = field(init=False)
    directory: tenants.TenantDirectory = field(init=False)
    # Images per tenant and month (monthly_image_quota).
    usage: UsageStore = field(init=False)
    _owners: collections.OrderedDict[str, str] = field(init=False)
    # Stored STAC Items of completed attempts (stacitems.py).
    stac_items: ItemCache = field(init=False)

    def __post_init__(self, tenant_directory: tenants.TenantDirectory | None) -> None:
        self.directory = (tenant_directory if tenant_directory is not None
                          else open_directory(self.settings))
        self.usage = UsageStore(self.store.db)
        self._owners = collections.OrderedDict()
        self.stac_items = ItemCache()
        self.queue_count = CachedValue(self.store.count_active, self.settings.info_cache_s)
        admission = AdmissionStore(self.store.db, self.settings.capacity)
        self.queue_positions = CachedValue(admission.queue_positions, self.settings.info_cache_s)
        # ``is not None``: an empty read model is falsy (``__len__``), and must still be told.
        written = self.read_model.written if self.read_model is not None else None
        self.actions = TaskActions(self.store, self.emitter, self.points, written)

    @property
    def store(self) -> TaskStore:
        return self.mongo.store

    async def get_task(self, task_id: str, *, include_removed: bool = False
                       ) -> dict[str, Any] | None:
        """A task as clients read it: from the read model when there is one."""
        if self.read_model is None:
            return await self.store.get_task(task_id, include_removed=include_removed)
        return await self.read_model.get_task(task_id, include_removed=include_removed)

    async def task_owner(self, task_id: str) -> str | None:
        """The tenant of task ``task_id`` (``default`` for a task from before tenants), None
        when the task is not known (any more). Remembered once found: a task's tenant never
        changes, and the events of a task deleted since still have their owner."""
        owner = self._owners.get(task_id)
        if owner is not None:
            self._owners.move_to_end(task_id)
            return owner
        doc = await self.get_task(task_id, include_removed=True)
        if doc is None:
            return None
        owner = str(doc.get("tenant") or tenants.OPEN_TENANT)
        self._owners[task_id] = owner
        while len(self._owners) > OWNERS_SIZE:
            self._owners.popitem(last=False)
        return owner


# The dependencies are ``async def`` although they never await: FastAPI runs a plain ``def``
# dependency in a worker thread, two thread hops on every request (bench/info_poll: 1.5-2.0 ms
# of gateway CPU per request with them, 1.1-1.4 ms without).
async def get_resources(request: Request) -> Resources:
    res: Resources = request.app.state.resources
    return res


ResourcesDep = Annotated[Resources, Depends(get_resources)]


TokenQuery = Annotated[
    str | None,
    Query(description="The caller's token: the node's or a tenant's (nodeodm-api §1.3); only "
          "the query string counts."),
]
# NodeODM §1.3: the text of a missing or wrong ``?token=`` (WebODM tests check the substring).
TOKEN_REFUSED = "Invalid authentication token: token does not match."
BEARER = "bearer"


def _bearer(request: Request) -> str | None:
    """The credentials of an ``Authorization: Bearer`` header, None without one (another
    scheme, e.g. an ingress's Basic, is not ours to judge)."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != BEARER:
        return None
    return credentials.strip()


async def get_caller(request: Request, res: ResourcesDep, token: TokenQuery = None
                     ) -> tenants.Tenant:
    """The tenant calling (NodeODM §1.3 for ``?token=``), else NodeODM's token error.

    With OIDC configured, a bearer JWT, when sent, decides alone: a refused one is an error even
    with a good ``?token=`` beside it (two credentials naming two tenants are no request to
    guess about). The token lookup compares digests in constant time (``tenants``); nothing of
    a credential is logged or answered.
    """
    directory = res.directory
    directory.reload_if_changed()  # a stat at most once a second
    if directory.accepts_bearer:
        bearer = _bearer(request)
        if bearer is not None:
            try:
                return await directory.authenticate_bearer(bearer)
            except tenants.TenantError as exc:  # AuthenticationError, IdentityProviderError
                # NodeODM: errors are HTTP 200 (nodeodm-api §1.1), even the provider's outage.
                raise NodeOdmError(exc.message) from None
    parent = splitmerge.parent_of(res.settings.split.token_key, token)
    if parent is not None:
        return await _scoped_caller(res, parent)
    caller = directory.lookup_token(token)
    if caller is None:
        raise NodeOdmError(TOKEN_REFUSED)
    return caller


async def _scoped_caller(res: Resources, parent: str) -> tenants.Tenant:
    """The caller of a parent-scoped token (``splitmerge``): the parent's tenant limited to its
    children, while the parent is queued or running; NodeODM's token error once it has ended,
    is removed, or its tenant is gone from the tenants file."""
    doc = await res.get_task(parent)
    if doc is None or TaskState(doc.get("state", TaskState.QUEUED)) not in ACTIVE_STATES:
        raise NodeOdmError(TOKEN_REFUSED)
    tenant = res.directory.tenant(str(doc.get("tenant") or tenants.OPEN_TENANT))
    if tenant is None:
        raise NodeOdmError(TOKEN_REFUSED)
    return tenant.scoped_to(parent)


def visible(doc: dict[str, Any] | None, caller: tenants.Tenant) -> dict[str, Any] | None:
    """A task document if ``caller`` may see it, else None: another tenant's task is, to every
    route, no task at all (routes read it as they would any task, then ask this)."""
    if doc is None or not caller.may_access(doc.get("tenant"), doc.get("parent")):
        return None
    return doc


async def task_or_not_found(res: Resources, uuid: str, caller: tenants.Tenant
                            ) -> dict[str, Any]:
    """The task a client-given ``{uuid}`` names (any spelling of its id) if ``caller`` may see
    it, else NodeODM's ``<uuid> not found``: no such task and another tenant's answer alike."""
    task_id = canonical_task_id(uuid)
    doc = visible(await res.get_task(task_id) if task_id is not None else None, caller)
    if doc is None:
        raise not_found(uuid)
    return doc


CallerDep = Annotated[tenants.Tenant, Depends(get_caller)]
# On every API router: no route of it answers an unauthenticated request, also a route that does
# not need the caller itself. FastAPI resolves ``get_caller`` once per request for both.
CallerRequired = Depends(get_caller)
