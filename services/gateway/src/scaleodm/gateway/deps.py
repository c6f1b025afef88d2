"""Request dependencies: the process-wide resources opened in the lifespan, and token auth."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from faststream.nats import NatsBroker

from scaleodm.common.emitting import Emitter
from scaleodm.common.settings import GatewaySettings
from scaleodm.common.store.s3 import S3
from scaleodm.common.store.tasks import MongoHandle, TaskStore
from scaleodm.common.store.uploads import UploadStore
from scaleodm.gateway.errors import NodeOdmError
from scaleodm.gateway.eventstream import EventHub


@dataclass
class Resources:
    settings: GatewaySettings
    mongo: MongoHandle
    s3: S3
    broker: NatsBroker
    emitter: Emitter
    uploads: UploadStore
    # Live task events for the SSE routes (routes/events.py); created on first use when unset.
    event_hub: EventHub | None = None

    @property
    def store(self) -> TaskStore:
        return self.mongo.store


def get_resources(request: Request) -> Resources:
    res: Resources = request.app.state.resources
    return res


ResourcesDep = Annotated[Resources, Depends(get_resources)]


def check_token(res: ResourcesDep, token: Annotated[str | None, Query()] = None) -> None:
    """NodeODM §1.3: with a token configured, every API route needs ``?token=``."""
    expected = res.settings.token
    if expected is None:
        return
    if token is None or not secrets.compare_digest(token, expected.get_secret_value()):
        raise NodeOdmError("Invalid authentication token: token does not match.")


TokenDep = Depends(check_token)
