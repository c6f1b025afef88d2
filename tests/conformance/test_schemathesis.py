"""The gateway against its own OpenAPI document, with schemathesis (issue 6).

Covered, with the checks ``not_a_server_error``, ``status_code_conformance``,
``content_type_conformance`` and ``response_schema_conformance``:

- every operation of ``/openapi.json`` fuzzed (schemathesis' coverage and fuzzing phases,
  positive and negative data, a fixed seed) on a gateway of its own: no 5xx, and every answer —
  NodeODM's HTTP 200 ``{"error"}`` included — is one the document declares;
- the same on a second gateway with ``SCALEODM_TOKEN`` set, called without the token: every
  protected route answers NodeODM's token error (nodeodm-api §1.3), in its declared shape;
- success answers of every route on the session stack, for tasks in each state (completed with
  a delivered webhook, failed with ``errorMessage``, canceled, restarted, removed, a chunked
  upload): the schemas describe the real bodies, the zip and the event streams.

The fuzzed gateways run without scheduler, watcher or notifier (own NATS and database): the
tasks fuzzing creates are never run, so the rest of the suite does not wait behind them.
Event streams are read for at most ``STREAM_EVENTS`` events or ``STREAM_TIMEOUT_S`` seconds
(``/events`` never ends), so ``/events`` gets a handful of examples only.

Left out: stateful sequences (schemathesis' links; the success pass covers the flows by hand),
``/healthz`` and ``/readyz`` (probes, not in the document) and checks that judge NodeODM's
error convention as wrong (``negative_data_rejection`` wants 4xx where NodeODM answers 200).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import Case

from scaleodm.common.settings import GatewaySettings
from scaleodm.gateway import main
from tests.harness import data, servers
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration

# A fixed seed keeps the generated cases the same from run to run; a deeper search, by hand:
# SCALEODM_TEST_FUZZ_SEED=<n> SCALEODM_TEST_FUZZ_EXAMPLES=<n> pytest <this file>
SEED = int(os.environ.get("SCALEODM_TEST_FUZZ_SEED", "6"))  # 6: the number
TOKEN = "secret"
REFUSED = {"error": "Invalid authentication token: token does not match."}
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance")
MAX_EXAMPLES = int(os.environ.get("SCALEODM_TEST_FUZZ_EXAMPLES", "25"))  # per operation
STREAM_EVENTS = 3
STREAM_TIMEOUT_S = 1.0


def _config(*, max_examples: int = MAX_EXAMPLES, coverage: bool = True) -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "request-timeout": 10,
        "max-stream-events": STREAM_EVENTS,
        "suppress-health-check": ["all"],
        "generation": {
            "mode": "all",
            "max-examples": max_examples,
            "deterministic": True,
            "database": "none",
        },
        "phases": {"coverage": {"enabled": coverage}, "stateful": {"enabled": False}},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "operations": [
            {
                # Live only without a cursor: the stream never ends, each example waits.
                "include-path": "/events",
                "request-timeout": STREAM_TIMEOUT_S,
                "generation": {"max-examples": 3},
                "phases": {"coverage": {"enabled": False}},
            },
            {"include-path": "/task/{uuid}/events", "request-timeout": STREAM_TIMEOUT_S},
        ],
    })


# The document the gateway serves (test_the_gateway_serves_this_document), built at collection:
# schemathesis' eager ``parametrize`` gives one test per operation. (Its fixture-based loader,
# ``schemathesis.pytest.from_fixture``, fails on pytest 9.2: it sets ``Node._nodeid``.)
DOCUMENT = main.create_app(GatewaySettings()).openapi()
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT, config=_config())
TOKEN_SCHEMA = schemathesis.openapi.from_dict(
    DOCUMENT, config=_config(max_examples=5, coverage=False)
)


@pytest.fixture(scope="module")
def fuzzed_gateways(
    tmp_path_factory: pytest.TempPathFactory, mongo_url: str, s3: servers.S3Endpoint
) -> Iterator[tuple[Stack, Stack]]:
    """Two gateways on one NATS and database, no other service: open, and with a token."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    database = f"t_{uuid.uuid4().hex[:12]}"
    with servers.nats_server(tmp / "nats") as nats:
        gateways = []
        for name, env in (("open", {}), ("token", {"SCALEODM_TOKEN": TOKEN})):
            (tmp / name).mkdir()
            gateways.append(Stack(tmp=tmp / name, nats_url=nats.url, mongo_url=mongo_url,
                                  s3=s3, database=database, extra_env=env))
        try:
            for gw in gateways:
                gw.spawn("gateway")
            for gw in gateways:
                gw.wait_ready("gateway")
            yield gateways[0], gateways[1]
        finally:
            for gw in gateways:
                gw.stop()


def test_the_gateway_serves_this_document(fuzzed_gateways: tuple[Stack, Stack]) -> None:
    for gw in fuzzed_gateways:
        assert httpx.get(f"{gw.gateway_url}/openapi.json", timeout=10).json() == DOCUMENT


def no_internal_error(ctx: Any, response: schemathesis.Response, case: Case) -> None:  # noqa: ARG001
    """The gateway never answers 500 (``errors.py`` turns an unexpected exception into HTTP 200
    ``{"error": "Internal error: <type>"}``), so ``not_a_server_error`` alone cannot see one."""
    if "application/json" in response.headers.get("content-type", [""])[0]:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        assert not str(error).startswith("Internal error"), f"unhandled exception: {error}"


@SCHEMA.parametrize()
def test_fuzzed_requests_get_declared_answers(
    case: Case, fuzzed_gateways: tuple[Stack, Stack]
) -> None:
    case.call_and_validate(base_url=fuzzed_gateways[0].gateway_url,
                           additional_checks=[no_internal_error])


@TOKEN_SCHEMA.parametrize()
def test_requests_without_the_token_are_refused_as_declared(
    case: Case, fuzzed_gateways: tuple[Stack, Stack]
) -> None:
    response = case.call_and_validate(base_url=fuzzed_gateways[1].gateway_url,
                                      additional_checks=[no_internal_error])
    if case.operation.path.startswith("/auth/"):
        return  # never protected (§1.3)
    if "application/json" in response.headers.get("content-type", [""])[0]:
        assert response.json() == REFUSED, (case.operation.label, response.text)


def test_the_gateways_logged_no_unhandled_error(fuzzed_gateways: tuple[Stack, Stack]) -> None:
    """Also exceptions after a streamed answer started (zip, SSE): only the log shows those."""
    markers = ("unhandled error", "Exception in ASGI application")
    for gw in fuzzed_gateways:
        for line in gw.log("gateway").splitlines():
            try:
                event = json.loads(line).get("event", "")
            except ValueError:  # not a log record: a traceback printed past the logger
                assert not line.startswith("Traceback"), line
                continue
            # The record's own message, not the text of a fuzzed path that quotes a marker.
            assert not str(event).startswith(markers), line


# --- success answers on the session stack -------------------------------------------------


def _json(resp: httpx.Response) -> Any:
    assert resp.status_code == 200, resp.text
    return resp.json()


def _create(c: httpx.Client, *names: str, **fields: str) -> str:
    parts: list[tuple[str, Any]] = [(k, (None, v)) for k, v in fields.items()]
    parts += [("images", (n, data.JPEG, "image/jpeg")) for n in names]
    return str(_json(c.post("/task/new", files=parts))["uuid"])


def _wait_status(c: httpx.Client, task_id: str, *codes: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (info := _json(c.get(f"/task/{task_id}/info")))["status"]["code"] not in codes:
        assert time.monotonic() < deadline, info
        time.sleep(0.1)


def test_success_answers_match_the_schema(stack: Stack, http_fixture: HttpFixture) -> None:
    hook = f"/hooks/{uuid.uuid4()}"

    def check(path: str, method: str = "GET", *, error: bool = False,
              **parts: Any) -> schemathesis.Response:
        """Call through schemathesis (all checks); a NodeODM error only when ``error``."""
        case = SCHEMA[path][method].Case(**parts)
        response: schemathesis.Response = case.call_and_validate(
            base_url=stack.gateway_url, additional_checks=[no_internal_error]
        )
        assert response.status_code in (200, 204), (path, parts, response.text)
        if "application/json" in response.headers.get("content-type", [""])[0]:
            body = response.json()
            assert (isinstance(body, dict) and "error" in body) is error, (path, parts, body)
        return response

    with httpx.Client(base_url=stack.gateway_url, timeout=30) as c:
        done = _create(c, "A.JPG", "B.JPG", name="done", webhook=http_fixture.url(hook))
        failed = _create(c, "A.JPG", "odm-test-engine-fail-1.jpg", name="failed")
        canceled = _create(c, "A.JPG")
        assert _json(c.post("/task/cancel", data={"uuid": canceled})) == {"success": True}
        _wait_status(c, done, 40)
        _wait_status(c, failed, 30)
        http_fixture.wait_posts(hook)

    for path in ("/info", "/options", "/task/list"):
        check(path)
    for task_id in (done, failed, canceled):
        uuid_ = {"uuid": task_id}
        check("/task/{uuid}/info", path_parameters=uuid_)
        check("/task/{uuid}/info", path_parameters=uuid_, query={"with_output": "-3"})
        check("/task/{uuid}/output", path_parameters=uuid_, query={"line": "2"})
        check("/task/{uuid}/webhooks", path_parameters=uuid_)
        check("/task/{uuid}/events", path_parameters=uuid_)  # replayed, then the stream ends
    zipped = check("/task/{uuid}/download/{asset}",
                   path_parameters={"uuid": done, "asset": "all.zip"})
    assert zipped.headers["content-type"] == ["application/zip"]
    check("/task/{uuid}/download/{asset}", path_parameters={"uuid": failed, "asset": "all.zip"},
          error=True)  # Asset not ready
    assert check("/task/{uuid}/events", path_parameters={"uuid": done},
                 query={"since": "1000"}).status_code == 204
    check("/events", query={"since": "1"})  # the stream's start, cut after STREAM_EVENTS
    for task_id in (done, failed, canceled):  # results (docs/results.md)
        check("/task/{uuid}/stac", path_parameters={"uuid": task_id})
    check("/stac/search", query={"bbox": "-180,-90,180,90", "datetime": "2000-01-01T00:00:00Z/..",
                                 "limit": "5"})
    raster = check("/task/{uuid}/download/{asset}",
                   path_parameters={"uuid": done, "asset": "orthophoto.tif"})
    assert raster.headers["content-type"] == ["image/tiff"]
    tilejson = check("/task/{uuid}/tilejson.json", path_parameters={"uuid": done},
                     query={"layer": "orthophoto"})
    z, x, y = tilejson.json()["maxzoom"], 0, 0
    tile = check("/task/{uuid}/tiles/{z}/{x}/{y}.png",
                 path_parameters={"uuid": done, "z": str(z), "x": str(x), "y": str(y)})
    assert tile.headers["content-type"] == ["image/png"]

    check("/task/restart", "POST", body={"uuid": done, "options": [{"name": "dsm", "value": True}]},
          media_type="application/json")
    check("/task/restart", "POST", body={"uuid": done}, media_type="application/json",
          error=True)  # queued now: cannot be restarted
    check("/task/cancel", "POST", body={"uuid": done},
          media_type="application/x-www-form-urlencoded")
    check("/task/remove", "POST", body={"uuid": failed}, media_type="application/json")
    check("/task/remove", "POST", body={"uuid": failed}, media_type="application/json",
          error=True)  # gone

    upload_id = str(uuid.uuid4())
    check("/task/new/init", "POST", headers={"set-uuid": upload_id},
          body={"name": "chunked", "options": '[{"name": "dsm", "value": true}]'},
          media_type="multipart/form-data")
    check("/task/new/upload/{uuid}", "POST", path_parameters={"uuid": upload_id},
          body={"images": [data.JPEG, data.JPEG]}, media_type="multipart/form-data")
    check("/task/new/commit/{uuid}", "POST", path_parameters={"uuid": upload_id})
    created = check("/task/new", "POST", body={"images": [data.JPEG], "name": "one request"},
                    media_type="multipart/form-data")
    for task_id in (upload_id, created.json()["uuid"], canceled):
        check("/task/remove", "POST", body={"uuid": task_id},
              media_type="application/x-www-form-urlencoded")
