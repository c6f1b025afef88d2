"""``/metrics`` of every service, after real work: tasks completed (with webhooks), canceled and
failed, and an unknown route.

Scraped directly (Prometheus' text format, parsed by ``prometheus_client``): the gateway on its
HTTP port, the bus services on their health ports. Checked against what happened:

- HTTP by route template (``/task/{uuid}/info``), an unknown path as ``unmatched``, methods a
  client makes up as ``other``;
- the scheduler's admissions and FastStream's consumer metrics labelled with the service;
- runs ended by outcome (summed over the services: the one that writes a run's usage record
  counts it), their duration and queue wait histograms;
- console lines, events recorded by kind (``completed`` once however many writers saw it);
- webhook deliveries by outcome, MongoDB command latencies;
- ``scaleodm_tasks{status}`` from the store (refreshed in the background);
- no label value of any service holds a task id, and subjects are templates;
- and a real Prometheus (Debian's package; skipped with the reason where it is absent, installed
  by ``.ci/run``) scraping the four services: runs by outcome, histograms, webhook outcomes
  through its HTTP API, and the alert rules loaded, healthy and quiet.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import api, data, prometheus, servers
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import Stack, running_stack

pytestmark = pytest.mark.integration

SERVICES = ("gateway", "scheduler", "watcher", "notifier")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def metrics_stack(tmp_path_factory: pytest.TempPathFactory, mongo_url: str,
                  s3: servers.S3Endpoint) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("metrics")
    with servers.nats_server(tmp / "nats") as nats:
        stack = Stack(tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                      database=f"t_{uuid.uuid4().hex[:12]}", extra_env={
                          "SCALEODM_TEST_ENGINE_SECONDS": "1",
                          "SCALEODM_ADMISSION_INTERVAL_S": "0.5",
                      })
        with running_stack(stack, SERVICES) as running:
            yield running


def scrape(stack: Stack, service: str) -> tuple[str, Samples]:
    """The service's exposition, and its samples by (name, labels)."""
    text = httpx.get(f"http://127.0.0.1:{stack.ports[service]}/metrics", timeout=10).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all((k, val) in ls for k, val in labels.items()))


def everywhere(stack: Stack, name: str, **labels: str) -> float:
    return sum(total(scrape(stack, s)[1], name, **labels) for s in SERVICES)


async def wait_for(check: object, timeout_s: float = 20) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "metric never reached its value"
        await asyncio.sleep(0.2)


async def test_every_service_counts_what_happened(metrics_stack: Stack,
                                                  http_fixture: HttpFixture) -> None:
    stack = metrics_stack
    hook = f"/metrics-hook/{uuid.uuid4()}"
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as c:
        done = (await api.create(c, files=[(n, data.JPEG) for n in data.image_names(3)],
                                 webhook=http_fixture.url(hook)))["uuid"]
        await api.poll_until(c, done, api.status_is(40))
        canceled = (await api.create(c, files=[(n, data.JPEG) for n in data.image_names(1)]))[
            "uuid"]
        assert (await c.post("/task/cancel", data={"uuid": canceled})).json() == {
            "success": True}
        for _ in range(3):
            await api.info(c, done)
        assert (await c.get(f"/no/such/{done}")).status_code == 404
        assert (await c.request("PROPFIND", "/info")).status_code in (404, 405)

    # The gateway: routes as templates, the rest as ``unmatched``.
    text, gateway = scrape(stack, "gateway")
    assert total(gateway, "scaleodm_http_requests_total", route="/task/{uuid}/info",
                 method="GET", status="200") >= 3
    assert total(gateway, "scaleodm_http_requests_total", route="/task/new",
                 method="POST", status="200") == 2
    assert total(gateway, "scaleodm_http_requests_total", route="unmatched", status="404") >= 1
    assert total(gateway, "scaleodm_http_requests_total", method="other") >= 1
    assert total(gateway, "scaleodm_http_request_duration_seconds_count",
                 route="/task/{uuid}/info") >= 3
    assert total(gateway, "scaleodm_upload_bytes_total") >= 4 * len(data.JPEG)
    assert total(gateway, "scaleodm_uploads_active") == 0
    assert total(gateway, "faststream_published_messages_total", app_name="gateway") >= 1
    assert total(gateway, "scaleodm_s3_request_duration_seconds_count",
                 operation="PutObject") >= 1

    # The scheduler admitted the completed task's run (the canceled one may not have been).
    _, scheduler = scrape(stack, "scheduler")
    assert total(scheduler, "scaleodm_runs_admitted_total") >= 1
    # The durable consumers' backlog (what KEDA scales on): read, and drained by now.
    await wait_for(lambda: ("scaleodm_jetstream_pending", (("consumer", "scheduler"),)) in (
        scrape(stack, "scheduler")[1]))
    assert total(scrape(stack, "scheduler")[1], "scaleodm_jetstream_pending") == 0
    assert total(scheduler, "faststream_received_messages_total", app_name="scheduler") >= 1

    # Runs ended, once each, in whichever service wrote their usage record.
    await wait_for(lambda: everywhere(stack, "scaleodm_runs_ended_total") == 2)
    assert everywhere(stack, "scaleodm_runs_ended_total", outcome="completed") == 1
    assert everywhere(stack, "scaleodm_runs_ended_total", outcome="canceled") == 1
    assert everywhere(stack, "scaleodm_run_duration_seconds_count", outcome="completed") == 1
    assert everywhere(stack, "scaleodm_queue_wait_seconds_count") >= 1
    assert everywhere(stack, "scaleodm_events_recorded_total", kind="completed") == 1
    assert everywhere(stack, "scaleodm_events_recorded_total", kind="queued") == 2

    _, watcher = scrape(stack, "watcher")
    assert total(watcher, "scaleodm_console_lines_total") > 10

    await wait_for(lambda: total(scrape(stack, "notifier")[1],
                                 "scaleodm_webhook_deliveries_total", outcome="delivered") == 1)
    _, notifier = scrape(stack, "notifier")
    assert total(notifier, "scaleodm_webhook_delivery_attempts_count") == 1
    assert total(notifier, "faststream_received_processed_messages_total",
                 app_name="notifier") >= 1

    # MongoDB calls, by command, in every service.
    for service in SERVICES:
        assert total(scrape(stack, service)[1], "scaleodm_mongo_command_duration_seconds_count",
                     command="find") > 0, service

    # The task counts come from the store, refreshed in the background (every 15 s).
    await wait_for(lambda: total(scrape(stack, "gateway")[1], "scaleodm_tasks",
                                 status="completed") == 1, timeout_s=40)
    assert total(scrape(stack, "gateway")[1], "scaleodm_tasks_stale") == 0

    # Low cardinality: no task id anywhere, subjects as templates.
    for service in SERVICES:
        text, _ = scrape(stack, service)
        for task_id in (done, canceled):
            assert task_id not in text, (service, task_id)
        assert "events.task.*." in text or service == "scheduler", service


async def test_a_real_prometheus_scrapes_the_stack(metrics_stack: Stack, http_fixture: HttpFixture,
                                                   tmp_path: Path) -> None:
    """Debian's ``prometheus`` scrapes the four services (and loads the alert rules): after
    three more tasks — completed, failed on purpose, and one whose webhook answers 503 once —
    its HTTP API answers with the runs, their histograms and the webhook outcomes as they
    happened, and every rule evaluates without error (none of them firing)."""
    reason = prometheus.prometheus_available()
    if reason is not None:
        pytest.skip(reason)
    stack = metrics_stack
    targets = {s: f"127.0.0.1:{stack.ports[s]}" for s in SERVICES}
    rules = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "alerts.yaml"
    with prometheus.prometheus_server(tmp_path / "prom", targets, rule_files=[rules]) as prom:
        prom.wait_for("up", lambda r: len(r) == 4 and all(s.value == 1 for s in r))
        def now(expr: str) -> float:  # an empty result (no such series yet) is 0
            value = prom.value(expr)
            return 0.0 if math.isnan(value) else value

        base_completed = now('sum(scaleodm_runs_ended_total{outcome="completed"})')
        base_failed = now('sum(scaleodm_runs_ended_total{outcome="failed"})')
        base_delivered = now('sum(scaleodm_webhook_deliveries_total{outcome="delivered"})')
        hook = f"/prom-hook/{uuid.uuid4()}"
        http_fixture.fail_times(hook, 1, 503)
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as c:
            ok = (await api.create(c, files=[(n, data.JPEG) for n in data.image_names(2)],
                                   webhook=http_fixture.url(hook)))["uuid"]
            failing = (await api.create(c, files=[
                ("odm-test-engine-fail-1.jpg", data.JPEG)]))["uuid"]
            for task_id, code in ((ok, 40), (failing, 30)):
                await api.poll_until(c, task_id, api.status_is(code))
        prom.wait_for('sum(scaleodm_runs_ended_total{outcome="completed"})',
                      lambda r: bool(r) and r[0].value == base_completed + 1)
        prom.wait_for('sum(scaleodm_runs_ended_total{outcome="failed"})',
                      lambda r: bool(r) and r[0].value == base_failed + 1)
        # The webhook: one failed attempt (503), then delivered, in two POSTs.
        prom.wait_for('sum(scaleodm_webhook_deliveries_total{outcome="delivered"})',
                      lambda r: bool(r) and r[0].value == base_delivered + 1)
        assert prom.value('sum(scaleodm_webhook_deliveries_total{outcome="failed"})') >= 1
        assert prom.value("sum(scaleodm_webhook_delivery_attempts_bucket{le=\"2.0\"})") >= 1
        # Histograms: every completed run has a duration, within the buckets' range.
        count = prom.value('sum(scaleodm_run_duration_seconds_count{outcome="completed"})')
        assert count == base_completed + 1
        p50 = prom.value('histogram_quantile(0.5, sum by (le) '
                         '(scaleodm_run_duration_seconds_bucket{outcome="completed"}))')
        assert 0 < p50 <= 15, p50
        # HTTP by route template; FastStream's consumers labelled by service.
        assert prom.value('sum(scaleodm_http_requests_total{route="/task/new"})') >= 2
        consumers = prom.query("sum by (app_name) (faststream_received_messages_total)")
        assert {s.labels["app_name"] for s in consumers} >= {"scheduler", "notifier"}
        # The alert rules: loaded, evaluated, healthy, and quiet on a healthy stack.
        with urllib.request.urlopen(f"{prom.url}/api/v1/rules", timeout=5) as resp:  # noqa: S310
            groups = json.load(resp)["data"]["groups"]
        evaluated = [r for g in groups for r in g["rules"]]
        assert evaluated and all(r["health"] == "ok" for r in evaluated), evaluated
        assert not [r["name"] for r in evaluated if r.get("state") == "firing"]
