"""What ``/openapi.json`` declares beyond what FastAPI infers: responses, request bodies, no 422.

- Responses: NodeODM answers errors as HTTP 200 ``{"error"}`` (nodeodm-api §1.1), so the 200
  response of a route is its success shape *or* an error shape (``ok``). Routes with path
  parameters can also meet Express's 404 page: a parameter holding ``/`` is another path.
- Request bodies: the routes read their bodies themselves (multipart streamed to S3, urlencoded
  or JSON action bodies), so FastAPI sees none; ``openapi_extra`` declares them.
- 422: FastAPI documents a validation error response on every route with parameters, but this
  API answers validation problems NodeODM-style (``errors.py``); ``drop_validation_responses``
  removes them.
"""

from __future__ import annotations

from typing import Any

from scaleodm.gateway import models

Responses = dict[int | str, dict[str, Any]]

NOT_FOUND_HTML: Responses = {
    404: {
        "description": "Unknown route, as Express answers it (`<pre>Cannot GET /path</pre>`): "
        "also what a path parameter containing `/` leads to (nodeodm-api §1.1).",
        "content": {"text/html": {"schema": {"type": "string"}}},
    },
}


def ok(success: Any, description: str, *, path_params: bool = False,
       errors: Any = models.ErrorResponse) -> Responses:
    """HTTP 200 with the success shape or a NodeODM error (§1.1); plus 404 with path params."""
    responses: Responses = {
        200: {"model": success | errors, "description": f"{description} Errors are HTTP 200 "
              "too: `{\"error\": ...}` (nodeodm-api §1.1, §10)."},
    }
    return {**responses, **NOT_FOUND_HTML} if path_params else responses


def action_ok(description: str) -> Responses:
    """cancel/remove/restart: success; a parameter error, or a failure inside the task manager
    (``{"success": false, "error"}``, §1.2)."""
    return ok(models.SuccessResponse, description,
              errors=models.ErrorResponse | models.ActionErrorResponse)


# GET /task/{uuid}/download/{asset}: all.zip, streamed, or a NodeODM error (§3.8).
DOWNLOAD_RESPONSES: Responses = {
    200: {
        "model": models.ErrorResponse,
        "description": "`all.zip` with `Content-Disposition: attachment; filename=all.zip` and "
        "its `Content-Length`, no `Accept-Ranges`; or a NodeODM error (`<uuid> not found`, "
        "`Invalid asset`, `Asset not ready`) as HTTP 200 JSON (nodeodm-api §3.8). Also "
        "`orthophoto.tif`, `dsm.tif`, `dtm.tif` (Cloud-Optimized GeoTIFFs) alone, with "
        "`Accept-Ranges: bytes`.",
        "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}},
                    "image/tiff": {"schema": {"type": "string", "format": "binary"}}},
    },
    206: {
        "description": "One byte range of `orthophoto.tif`, `dsm.tif` or `dtm.tif` "
        "(`Range: bytes=...`, one range), with `Content-Range`.",
        "content": {"image/tiff": {"schema": {"type": "string", "format": "binary"}}},
    },
    416: {"description": "A `Range` starting past the end of the file "
          "(`Content-Range: bytes */<size>`)."},
    **NOT_FOUND_HTML,
}


def _text(description: str, *examples: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "description": description}
    if examples:
        schema["examples"] = list(examples)
    return schema


OPTIONS_EXAMPLE = '[{"name":"dsm","value":true},{"name":"orthophoto-resolution","value":2.5}]'
TASK_FIELDS: dict[str, Any] = {
    "name": _text("Task name; empty or absent: `Task of <ISO 8601 time>` (§4.6).", "brighton"),
    "options": _text("JSON array of `{\"name\", \"value\"}` (§5); unknown names are ignored.",
                     OPTIONS_EXAMPLE),
    "skipPostProcessing": _text("Only the exact string `true` skips the auto options (§5.4).",
                                "true"),
    "webhook": _text("URL that receives the task info when the task ends (§8).",
                     "https://example.com/hooks/odm"),
    "outputs": _text("JSON array of project-relative paths to put in all.zip (§7.2).",
                     '["odm_orthophoto/odm_orthophoto.tif"]'),
    "dateCreated": _text("Creation time in ms since the epoch; anything else means now.",
                         "1795323496602"),
    "priority": _text("ScaleODM: admission order, an integer from -100 to 100 (higher first); "
                      "absent: the tenant's default; above the tenant's ceiling: refused.", "10"),
}
_FILES: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string", "format": "binary"},
    "description": "Image (and GCP, geo) files; duplicate names get `_` before the extension.",
}


# `set-uuid` values accepted (nodeodm-api §3.5): version 1-7, variant 8-b, any case.
UUID_PATTERN = (
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[1-7][0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$"
)
SET_UUID: dict[str, Any] = {
    "name": "set-uuid",
    "in": "header",
    "required": False,
    "description": "The uuid to give the task (kept as given); refused if a task or another "
    "upload has it. Re-init of the caller's own upload not yet committed is allowed (§3.5).",
    "schema": {"type": "string", "pattern": UUID_PATTERN},
}


def _multipart(properties: dict[str, Any], *, required: list[str] | None = None,
               body_required: bool = False, set_uuid: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    extra: dict[str, Any] = {"requestBody": {
        "required": body_required,
        "content": {"multipart/form-data": {"schema": schema}},
    }}
    if set_uuid:
        extra["parameters"] = [SET_UUID]
    return extra


# POST /task/new: files and/or a zip URL plus the task fields (§3.4).
CREATE_BODY = _multipart({
    "images": _FILES,
    "zipurl": _text("URL (http, https or s3) of a zip of images, fetched by the run.",
                    "s3://datasets/brighton.zip"),
    **TASK_FIELDS,
}, set_uuid=True)
# POST /task/new/init: the task fields, no files (§3.5).
INIT_BODY = _multipart(TASK_FIELDS, set_uuid=True)
# POST /task/new/upload/{uuid}: files in `images` (§3.5).
UPLOAD_BODY = _multipart({"images": _FILES}, required=["images"], body_required=True)


def action_body(*, restart: bool = False) -> dict[str, Any]:
    """cancel/remove/restart: urlencoded (PyODM) or JSON (ClusterODM, CloudODM) (§1.5)."""
    properties: dict[str, Any] = {
        "uuid": _text("The task's uuid.", "6824c890-2dc7-444d-ab9b-f0e50b88eea9"),
    }
    form = dict(properties)
    if restart:
        options_doc = "New options (§5), replacing the old ones; absent or empty: keep them."
        properties["options"] = {
            "description": options_doc,
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "object", "properties": {
                    "name": {"type": "string"}, "value": {}}}},
            ],
        }
        form["options"] = _text(f"JSON array. {options_doc}", OPTIONS_EXAMPLE)
    return {"requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {"type": "object", "properties": form, "required": ["uuid"]},
            },
            "application/json": {
                "schema": {"type": "object", "properties": properties, "required": ["uuid"]},
            },
        },
    }}


def drop_validation_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Remove FastAPI's 422 responses and their schemas: this API never answers 422."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            ref = str(responses.get("422", {}).get("content", {}).get("application/json", {}))
            if "HTTPValidationError" in ref:
                del responses["422"]
    schemas = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return schema
