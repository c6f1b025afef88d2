"""The gateway's wire shapes (nodeodm-api.md), as typed dicts for the OpenAPI document.

The routes build their answers as plain dicts in NodeODM's field order and return them as they
are (``response_model=None``): these types only *describe* them, so that ``/openapi.json`` tells
the truth and schemathesis (``tests/conformance/test_schemathesis.py``) can hold every answer to
it. They are ``TypedDict``s rather than models because NodeODM leaves keys out instead of sending
``null`` (``errorMessage``, ``output``, ``noRetry``): ``NotRequired`` says exactly that. Closed
shapes forbid extra keys, as PyODM does for ``/options`` (§3.2).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import ConfigDict, Field, with_config
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

_CLOSED = ConfigDict(extra="forbid")


# Every NodeODM error, HTTP 200 (§1.1, §10); `noRetry` only on upload without a file.
@with_config(_CLOSED)
class ErrorResponse(TypedDict):
    error: str
    noRetry: NotRequired[Literal[True]]


# cancel/remove/restart failing inside the task manager: unknown task, not restartable (§1.2).
@with_config(_CLOSED)
class ActionErrorResponse(TypedDict):
    success: Literal[False]
    error: str


# upload, cancel, remove, restart succeeded (§1.2).
@with_config(_CLOSED)
class SuccessResponse(TypedDict):
    success: Literal[True]


# /task/new, init, commit succeeded: the task's uuid, as given in `set-uuid` if any (§3.5).
@with_config(_CLOSED)
class UuidResponse(TypedDict):
    uuid: str


# GET /info (§3.1).
@with_config(_CLOSED)
class NodeInfo(TypedDict):
    version: Annotated[str, Field(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")]
    taskQueueCount: Annotated[int, Field(ge=0)]
    totalMemory: Annotated[int, Field(ge=0)]
    availableMemory: Annotated[int, Field(ge=0)]
    cpuCores: Annotated[int, Field(ge=1)]
    maxImages: Annotated[int, Field(ge=1)] | None
    maxParallelTasks: int
    engineVersion: str
    engine: str


# GET /options: one engine option, exactly these five keys (§3.2).
@with_config(_CLOSED)
class OptionPublic(TypedDict):
    name: str
    type: Literal["int", "float", "bool", "string", "enum"]
    value: str
    domain: str | list[str]
    help: str


# GET /task/list (§3.3).
@with_config(_CLOSED)
class TaskListItem(TypedDict):
    uuid: str


# TaskInfo.status (§3.6, §4.1).
@with_config(_CLOSED)
class TaskStatus(TypedDict):
    code: Literal[10, 20, 30, 40, 50]
    errorMessage: NotRequired[str]


# TaskInfo.options: effective options with typed values (§5.1 step 8).
@with_config(_CLOSED)
class TaskOption(TypedDict):
    name: str
    value: Annotated[Any, Field(description="Typed: number or boolean per /options; a string "
                                "option keeps whatever JSON value was sent.")]


# GET /task/{uuid}/info (§3.6).
@with_config(_CLOSED)
class TaskInfo(TypedDict):
    uuid: str
    name: str
    dateCreated: Annotated[int, Field(description="ms since the epoch")]
    processingTime: Annotated[int, Field(ge=-1, description="ms; -1 until processing starts")]
    status: TaskStatus
    options: list[TaskOption]
    imagesCount: Annotated[int, Field(ge=0)]
    progress: Annotated[float, Field(ge=0, le=100)]
    queuePosition: NotRequired[Annotated[int, Field(
        ge=1, description="ScaleODM: while the task waits for a run slot (status 10, not "
        "admitted yet), its place in the admission order (1 = next), as of the scheduler's "
        "last admission pass.")]]
    parent: NotRequired[Annotated[str, Field(
        description="ScaleODM: the task whose run created this one, a submodel of its split "
        "(split-merge on the cluster).")]]
    children: NotRequired[Annotated[list[str], Field(
        description="ScaleODM: for a task with `split`, the tasks its run created (its "
        "submodels sent to the cluster), oldest first.")]]
    output: NotRequired[Annotated[list[str], Field(description="Only with `with_output`.")]]


# GET /auth/info (§3.12).
@with_config(_CLOSED)
class AuthInfo(TypedDict):
    message: str
    loginUrl: None
    registerUrl: None


# GET /task/{uuid}/webhooks: one attempt of a delivery.
@with_config(_CLOSED)
class WebhookAttempt(TypedDict):
    at: Annotated[str | None, Field(description="ISO 8601, UTC, ms precision")]
    statusCode: Annotated[int | None, Field(description="null when no HTTP answer came")]
    latencyMs: int | None
    error: str | None


# GET /task/{uuid}/webhooks: one (attempt of the task, target) pair.
@with_config(_CLOSED)
class WebhookDelivery(TypedDict):
    id: str
    url: Annotated[str, Field(description="scheme://host[:port]/path: no credentials or query")]
    taskAttempt: int | None
    status: Literal["pending", "delivered", "dead"]
    reason: Annotated[str | None, Field(description="Why a delivery is dead")]
    firstAttemptAt: str | None
    nextAttemptAt: Annotated[str | None, Field(description="Only while pending")]
    attempts: list[WebhookAttempt]


# GET /usage: runs of one tenant that ended in the month, by outcome.
@with_config(_CLOSED)
class UsageOutcomes(TypedDict):
    completed: int
    failed: int
    canceled: int


# GET /usage: one tenant's month (store/usage.py).
@with_config(_CLOSED)
class TenantUsagePublic(TypedDict):
    tenant: str
    runs: Annotated[int, Field(description="Attempts that ended in the month (UTC)")]
    outcomes: UsageOutcomes
    images: Annotated[int, Field(description="Images of those runs")]
    wallSeconds: Annotated[float, Field(description="Started to finished; 0 if never started")]
    coreSeconds: Annotated[float, Field(description="Requested CPU cores x wall seconds")]
    gibSeconds: Annotated[float, Field(description="Requested memory GiB x wall seconds")]
    imagesSubmitted: Annotated[int, Field(
        description="Images counted on the monthly quota (submissions of the month)")]


# GET /usage: the month and its tenants (a user: itself only).
@with_config(_CLOSED)
class UsagePublic(TypedDict):
    month: Annotated[str, Field(description="YYYY-MM, UTC")]
    tenants: list[TenantUsagePublic]
