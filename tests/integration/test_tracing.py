"""Traces, as far as they go today (``scaleodm.common.tracing``): off by default; with the
standard ``OTEL_*`` variables (or ``SCALEODM_TRACES_FILE``) the gateway records a server span per
request, named by route template, and its log lines carry that span's trace and span ids; an
exporter that cannot be reached never holds a request up.

And one task, one trace: from ``POST /task/new`` through the admission pass, the scheduler's
handling of the run command, the watcher's events of the run, to the notifier's delivery, whose
webhook request carries the trace in its ``traceparent`` header.

The Argo path's carrier (the Workflow's annotation and ODM's ``TRACEPARENT``) is checked in
``tests/golden/test_workflows.py``. Not yet: a cancel request's own trace through to the run.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import api, data, servers
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import Stack, running_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, mongo_url: str,
           s3: servers.S3Endpoint) -> Iterator[tuple[Stack, Path]]:
    tmp = tmp_path_factory.mktemp("traced")
    spans = tmp / "spans.jsonl"
    with servers.nats_server(tmp / "nats") as nats:
        stack = Stack(tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                      database=f"t_{uuid.uuid4().hex[:12]}", extra_env={
                          "SCALEODM_TRACES_FILE": str(spans),
                          # an OTLP collector that is not there: spans to it are dropped
                          "OTEL_TRACES_EXPORTER": "otlp",
                          "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{servers.free_port()}",
                          "SCALEODM_LOG_LEVEL": "DEBUG",
                      })
        with running_stack(stack, ("gateway", "scheduler", "watcher", "notifier")) as running:
            yield running, spans


def read_spans(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_the_gateway_traces_requests_by_route(traced: tuple[Stack, Path]) -> None:
    stack, spans_file = traced
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as c:
        task_id = (await api.create(c, files=[(n, data.JPEG) for n in data.image_names(2)]))[
            "uuid"]
        # An exporter that cannot be reached holds nothing up: 30 polls, each answered.
        slowest = 0.0
        for _ in range(30):
            started = time.monotonic()
            assert (await c.get(f"/task/{task_id}/info")).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 2.0, slowest  # the OTLP exporter's own timeout is 10 s
    deadline = time.monotonic() + 10
    while True:
        spans = read_spans(spans_file)
        names = {str(s["name"]) for s in spans}
        if {"POST /task/new", "GET /task/{uuid}/info"} <= names or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert {"POST /task/new", "GET /task/{uuid}/info"} <= names, names
    assert {"scaleodm-gateway"} <= {str(s["service"]) for s in spans}
    assert not any(task_id in str(s["name"]) for s in spans)  # route templates, never paths
    created = next(s for s in spans if s["name"] == "POST /task/new" and s["kind"] == "SERVER")
    # The log lines of that request carry its trace id.
    lines = [json.loads(line) for line in stack.log("gateway").splitlines()
             if line.startswith("{")]
    traced_lines = [ln for ln in lines if ln.get("trace_id") == created["trace_id"]]
    assert any(ln.get("event") == "task created" for ln in traced_lines), traced_lines[:5]


def test_traces_are_off_by_default(tmp_path: Path) -> None:
    """No OTEL_TRACES_EXPORTER, no file: nothing installed (the API stays a no-op)."""
    from scaleodm.common import tracing

    assert tracing.configure("gateway", None, {}) is False
    assert tracing.configure("gateway", tmp_path / "x", {"OTEL_SDK_DISABLED": "true"}) is False
    assert not (tmp_path / "x").exists()


async def test_one_task_is_one_trace_across_the_services(traced: tuple[Stack, Path],
                                                         http_fixture: HttpFixture) -> None:
    stack, spans_file = traced
    hook = f"/traced-hook/{uuid.uuid4()}"
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as c:
        task_id = (await api.create(c, files=[(n, data.JPEG) for n in data.image_names(2)],
                                    webhook=http_fixture.url(hook)))["uuid"]
        await api.poll_until(c, task_id, api.status_is(40))
    deadline = time.monotonic() + 15
    while not (received := [r for r in http_fixture.received if r.path.startswith(hook)]):
        assert time.monotonic() < deadline, "no webhook"
        await asyncio.sleep(0.2)
    # The trace the webhook carries (W3C: 00-<trace id>-<span id>-<flags>).
    traceparent = received[-1].headers.get("traceparent", "")
    assert traceparent.startswith("00-"), received[-1].headers
    trace_id = traceparent.split("-")[1]
    while True:  # spans leave in batches (every 0.5 s): the notifier's ends after the POST
        spans = read_spans(spans_file)
        if any(s["trace_id"] == trace_id and s["name"] == "notifier.deliver" for s in spans) or (
                time.monotonic() > deadline):
            break
        await asyncio.sleep(0.2)
    created = [s for s in spans if s["name"] == "POST /task/new" and s["kind"] == "SERVER"
               and s["trace_id"] == trace_id]
    assert created, "the webhook's trace does not start at the creating request"
    in_trace = {(str(s["service"]), str(s["name"])) for s in spans if s["trace_id"] == trace_id}
    assert {("scaleodm-scheduler", "admission.admit"), ("scaleodm-scheduler", "scheduler.create"),
            ("scaleodm-notifier", "notifier.deliver")} <= in_trace, in_trace
    # The watcher joined it: its log lines of the run carry the trace id.
    watcher_lines = [json.loads(line) for line in stack.log("watcher").splitlines()
                     if line.startswith("{")]
    assert any(ln.get("trace_id") == trace_id and ln.get("task_id") == task_id
               for ln in watcher_lines), "the watcher's work is not in the task's trace"
