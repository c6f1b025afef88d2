"""NodeODM's ``/auth/*`` routes (§3.12): no login on this node; never token-protected."""

from __future__ import annotations

from fastapi import APIRouter

from scaleodm.gateway import models

router = APIRouter(prefix="/auth", tags=["nodeodm-auth"])


@router.get("/info", operation_id="nodeodm_auth-read_auth_info")
async def read_auth_info() -> models.AuthInfo:
    """CloudODM reads ``loginUrl``; null means no login is needed."""
    return {"message": "Authentication not available on this node", "loginUrl": None,
            "registerUrl": None}


@router.post("/login", operation_id="nodeodm_auth-login")
async def login() -> models.ErrorResponse:
    """Not available (NodeODM answers so)."""
    return {"error": "Not available"}


@router.post("/register", operation_id="nodeodm_auth-register")
async def register() -> models.ErrorResponse:
    """Not available (NodeODM answers so)."""
    return {"error": "Not available"}
