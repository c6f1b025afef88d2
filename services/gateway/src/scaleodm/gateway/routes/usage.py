"""Usage per tenant and month: ``GET /usage?month=YYYY-MM[&tenant=name]``.

What the month's runs used (their usage records, written when each attempt ended:
``scaleodm.common.store.usage``) and the images the quota counted, per tenant. A user sees its own
tenant only; an admin every tenant with a run or a submission that month, or one with
``?tenant=``. The default month is the current one (UTC, as the quota's). Errors follow NodeODM
(HTTP 200 ``{"error": ...}``, nodeodm-api §1.1): a malformed month, or a user asking for another
tenant — refused, not answered with zeros, so a user learns nothing of which tenants exist.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Query

from scaleodm.common import clock
from scaleodm.common.domain.text import shown
from scaleodm.common.store.usage import TenantUsage
from scaleodm.gateway import models, openapi
from scaleodm.gateway.deps import CallerDep, CallerRequired, ResourcesDep
from scaleodm.gateway.errors import NodeOdmError

router = APIRouter(tags=["usage"], dependencies=[CallerRequired])

MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
OUTCOMES = ("completed", "failed", "canceled")
NOT_YOURS = "Only an admin may read another tenant's usage."

MonthQuery = Annotated[str | None, Query(
    description="The month, `YYYY-MM` (UTC); the current one when absent.",
    examples=["2026-01"])]
TenantQuery = Annotated[str | None, Query(
    description="One tenant (admins; a user may name only itself).")]


# GET /usage: one tenant's totals
def _tenant_public(usage: TenantUsage) -> dict[str, Any]:
    return {
        "tenant": usage.tenant,
        "runs": usage.runs,
        "outcomes": {o: usage.outcomes.get(o, 0) for o in OUTCOMES},
        "images": usage.images,
        "wallSeconds": round(usage.wall_s, 3),
        "coreSeconds": round(usage.core_s, 3),
        "gibSeconds": round(usage.gib_s, 3),
        "imagesSubmitted": usage.images_submitted,
    }


@router.get("/usage", operation_id="usage-read_usage", response_model=None,
            responses=openapi.ok(models.UsagePublic, "The month's usage per tenant."))
async def read_usage(res: ResourcesDep, caller: CallerDep, month: MonthQuery = None,
                     tenant: TenantQuery = None) -> dict[str, Any]:
    """Runs (by outcome), images, wall, core- and GiB-seconds of the month, and the images the
    monthly quota counted, per tenant: the caller's own, or (admins) every tenant or one."""
    if month is None:
        month = clock.month_of(clock.now())
    elif not MONTH.match(month):
        # NodeODM: errors are HTTP 200 (nodeodm-api §1.1).
        raise NodeOdmError(f"Invalid month: {shown(month)} (expected YYYY-MM).")
    if caller.role != "admin":
        if tenant is not None and tenant != caller.name:
            raise NodeOdmError(NOT_YOURS)
        tenant = caller.name
    totals = await res.usage.month(month, tenant)
    return {"month": month, "tenants": [_tenant_public(u) for u in totals.values()]}

