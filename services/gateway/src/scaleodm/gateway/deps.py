"""Request dependencies: the process-wide resources opened in the lifespan, and token auth."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from faststream.nats import NatsBroker

from scaleodm.common import failpoints
from scaleodm.common.emitting import Emitter
from scaleodm.common.settings import GatewaySettings
from scaleodm.common.store.admission import AdmissionStore
from scaleodm.common.store.s3 import S3
from scaleodm.common.store.tasks import MongoHandle, TaskStore
from scaleodm.common.store.uploads import UploadStore
from scaleodm.gateway.actions import TaskActions
from scaleodm.gateway.cached import CachedValue
from scaleodm.gateway.errors import NodeOdmError
from scaleodm.gateway.eventstream import EventHub
from scaleodm.gateway.readmodel import ReadModel


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
    # The task actions (create, restart, cancel, remove): the only writer of tasks here.
    actions: TaskActions = field(init=False)

    def __post_init__(self) -> None:
        self.queue_count = CachedValue(self.store.count_active, self.settings.info_cache_s)
        admission = AdmissionStore(self.store.db, self.settings.capacity)
        self.queue_positions = CachedValue(admission.queue_positions, self.settings.info_cache_s)
        # ``is not None``: an empty read model is falsy (``__len__``), and must still be told.
        written = self.read_model.written if self.read_model is not None else None
        self.actions = TaskActions(self.store, self.emitter, self.points, written)

    @property
    def store(self) -> TaskStore:
        return self.mongo.store

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        """A task as clients read it: from the read model when there is one."""
        if self.read_model is None:
            return await self.store.get_task(task_id)
        return await self.read_model.get_task(task_id)


# The dependencies are ``async def`` although they never await: FastAPI runs a plain ``def``
# dependency in a worker thread, two thread hops on every request (bench/info_poll: 1.5-2.0 ms
# of gateway CPU per request with them, 1.1-1.4 ms without).
async def get_resources(request: Request) -> Resources:
    res: Resources = request.app.state.resources
    return res


ResourcesDep = Annotated[Resources, Depends(get_resources)]


TokenQuery = Annotated[
    str | None,
    Query(description="The node's token, when it has one (nodeodm-api §1.3); only the query "
          "string counts."),
]


async def check_token(res: ResourcesDep, token: TokenQuery = None) -> None:
    """NodeODM §1.3: with a token configured, every API route needs ``?token=``."""
    expected = res.settings.token
    if expected is None:
        return
    # As bytes: compare_digest raises TypeError for a str with non-ASCII characters.
    if token is None or not secrets.compare_digest(
        token.encode("utf-8", "surrogatepass"),
        expected.get_secret_value().encode("utf-8", "surrogatepass"),
    ):
        raise NodeOdmError("Invalid authentication token: token does not match.")


TokenDep = Depends(check_token)
