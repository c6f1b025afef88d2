"""Commands to the scheduler (imperative names); subjects ``tasks.commands.<verb>``.

A command is self-contained: the scheduler can start a run from it without reading MongoDB.
Every publish carries ``Nats-Msg-Id`` = ``idempotency_key()`` so a retried publish deduplicates.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from scaleodm.common.contracts.ids import TaskId


class _Command(BaseModel):
    model_config = ConfigDict(frozen=True)
    schema_version: Literal[1] = 1
    task_id: TaskId


class RunSpec(_Command):
    """Everything one attempt's run needs."""

    attempt: int = Field(ge=1)
    name: str
    options: list[dict[str, Any]] = Field(
        default_factory=list, description="Validated NodeODM options, typed values."
    )
    sources: list[str] = Field(
        description="Inputs: http(s) zip URLs, s3:// zip objects or s3://bucket/prefix/ folders."
    )
    output_prefix: str = Field(description="s3://bucket/prefix/ receiving the outputs.")
    skip_post_processing: bool = False
    outputs: list[str] | None = None
    images_count: int | None = Field(
        None, description="Images known at submission (uploads), for sizing; None = unknown."
    )
    priority: int = Field(0, description="The task's priority (higher first; Workflow "
                          "`spec.priority`).")
    size_class: str | None = Field(
        None, description="The size class whose slot the run holds (its admission).")


# Carried by a task's admission (scheduler/admission.py); consumed by the scheduler.
class CreateTask(RunSpec):
    verb: Literal["create"] = "create"


# The same, for a new attempt under the same uuid (after /task/restart).
class RestartTask(RunSpec):
    verb: Literal["restart"] = "restart"


# Used by the gateway on /task/cancel.
class CancelTask(_Command):
    verb: Literal["cancel"] = "cancel"
    attempt: int = Field(ge=1)


# Used by the gateway on /task/remove.
class RemoveTask(_Command):
    verb: Literal["remove"] = "remove"
    attempt: int = Field(ge=1)


Command = CreateTask | RestartTask | CancelTask | RemoveTask
AnyCommand = Annotated[Command, Field(discriminator="verb")]
COMMAND_ADAPTER: TypeAdapter[AnyCommand] = TypeAdapter(AnyCommand)


def idempotency_key(cmd: Command) -> str:
    # A run command is "start" whatever its verb: nodes before admission control published
    # ":create"/":restart" for the same attempt, which would deduplicate away the admission's.
    kind = "start" if isinstance(cmd, RunSpec) else cmd.verb
    return f"{cmd.task_id}:{cmd.attempt}:{kind}"
