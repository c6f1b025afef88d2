"""Prometheus metrics: the one registry of a service process, what it counts, and ``/metrics``.

Every service is one process, so ``prometheus_client``'s default registry is the service's (with
its ``process_*`` and ``python_*`` collectors). ``/metrics`` serves it in the text format: on the
gateway's HTTP port, on the bus services' health port (``runtime.make_app``).

**Low cardinality.** No label holds a task id, a tenant, a raw path or a subject with an id:
HTTP routes are templates (``unmatched`` for the rest), NATS subjects of one task's events are
reduced to ``events.task.*.<kind>`` (``subject_template``), outcomes and size classes are small
closed sets (size classes are the operator's).

**The metrics** (README "Operating" has the table, with the alerts that use them):

- FastStream's own for every consumer and publisher (``faststream_*``, label ``app_name`` = the
  service): received, processed by status, latency, exceptions, published by destination.
- ``scaleodm_http_*``: the gateway's requests by method, route template and status.
- ``scaleodm_events_recorded_total{kind}``: task events recorded by this process (first time).
- ``scaleodm_runs_admitted_total`` (the scheduler's admission), ``scaleodm_runs_ended_total``,
  ``scaleodm_run_duration_seconds``, ``scaleodm_queue_wait_seconds``: runs by size class (and
  outcome), counted where the run's usage record is written (once per attempt,
  ``store/usage.py``).
- ``scaleodm_console_lines_total``, ``scaleodm_webhook_*``, ``scaleodm_events_set_aside_total``,
  ``scaleodm_commands_given_up_total``, ``scaleodm_outbox_*``, ``scaleodm_sse_clients``,
  ``scaleodm_upload*``, ``scaleodm_mongo_command_*``, ``scaleodm_s3_request_*``,
  ``scaleodm_kubernetes_request_*``, ``scaleodm_jetstream_*`` (the service's durable consumer's
  backlog, read every ``CONSUMER_LAG_EVERY_S``), ``scaleodm_tasks{status}`` and
  ``scaleodm_tasks_stale``.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from pymongo import monitoring

__all__ = [
    "CONTENT_TYPE_LATEST",
    "METRIC_NAMES",
    "exposition",
    "mongo_listener",
    "subject_template",
]

# Seconds: from a 5 ms MongoDB command or HTTP request to a day-long run.
FAST_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RUN_BUCKETS: Final = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
                      43200.0, 86400.0)
WAIT_BUCKETS: Final = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)

HTTP_REQUESTS = Counter("scaleodm_http_requests", "HTTP requests answered by the gateway.",
                        ["method", "route", "status"])
HTTP_DURATION = Histogram("scaleodm_http_request_duration_seconds",
                          "HTTP request handling time (to the end of the response).",
                          ["method", "route"], buckets=FAST_BUCKETS)
EVENTS_RECORDED = Counter("scaleodm_events_recorded", "Task events recorded by this process "
                          "(the first time; a redelivery or a second writer counts nothing).",
                          ["kind"])
RUNS_ADMITTED = Counter("scaleodm_runs_admitted", "Runs given a slot by admission.",
                        ["size_class"])
RUNS_ENDED = Counter("scaleodm_runs_ended", "Runs ended, by outcome.",
                     ["outcome", "size_class"])
RUN_DURATION = Histogram("scaleodm_run_duration_seconds", "Run wall time (running to its end).",
                         ["outcome", "size_class"], buckets=RUN_BUCKETS)
QUEUE_WAIT = Histogram("scaleodm_queue_wait_seconds",
                       "Time from a task (or restart) queued to its run started.",
                       ["size_class"], buckets=WAIT_BUCKETS)
CONSOLE_LINES = Counter("scaleodm_console_lines", "Console lines of runs turned into events.")
WEBHOOK_DELIVERIES = Counter("scaleodm_webhook_deliveries", "Webhook deliveries finished.",
                             ["outcome"])
WEBHOOK_ATTEMPTS = Histogram("scaleodm_webhook_delivery_attempts",
                             "POSTs a finished webhook delivery took.",
                             buckets=(1, 2, 3, 4, 5, 6, 8, 10, 15, 20))
EVENTS_SET_ASIDE = Counter("scaleodm_events_set_aside",
                           "Recorded events the outbox relay gave up on (dead letters).")
COMMANDS_GIVEN_UP = Counter("scaleodm_commands_given_up",
                            "Commands whose last delivery failed (dead letters).", ["verb"])
OUTBOX_BACKLOG = Gauge("scaleodm_outbox_backlog",
                       "Recorded events not published yet, as the relay last saw them.")
OUTBOX_OLDEST = Gauge("scaleodm_outbox_oldest_seconds",
                      "Age of the oldest recorded event not published yet (0: none).")
SSE_CLIENTS = Gauge("scaleodm_sse_clients", "Event streams open on this gateway.")
UPLOAD_BYTES = Counter("scaleodm_upload_bytes", "Bytes of uploaded files stored.")
UPLOADS_ACTIVE = Gauge("scaleodm_uploads_active", "Upload requests in progress.")
TILES = Counter("scaleodm_tiles", "Map tiles answered: from the memory cache, rendered from S3, "
                "or blank (outside the raster).", ["layer", "source"])
TILE_RENDER_DURATION = Histogram("scaleodm_tile_render_seconds",
                                 "Time to render one map tile from S3 (thread wait included).",
                                 ["layer"], buckets=FAST_BUCKETS)
MONGO_DURATION = Histogram("scaleodm_mongo_command_duration_seconds",
                           "MongoDB command round trips.", ["command"], buckets=FAST_BUCKETS)
MONGO_ERRORS = Counter("scaleodm_mongo_command_errors", "MongoDB commands that failed.",
                       ["command"])
S3_DURATION = Histogram("scaleodm_s3_request_duration_seconds",
                        "S3 requests, by operation (a multipart part included).",
                        ["operation"], buckets=FAST_BUCKETS)
S3_ERRORS = Counter("scaleodm_s3_request_errors",
                    "S3 requests that failed (S3 away, refused; not a missing key).",
                    ["operation"])
K8S_DURATION = Histogram("scaleodm_kubernetes_request_duration_seconds",
                         "Kubernetes API requests of the Argo executor, by verb and resource.",
                         ["verb", "resource"], buckets=FAST_BUCKETS)
K8S_ERRORS = Counter("scaleodm_kubernetes_request_errors",
                     "Kubernetes API requests that failed (a 404 or 409 answer is no failure).",
                     ["verb", "resource"])
JS_PENDING = Gauge("scaleodm_jetstream_pending",
                   "Messages of a durable consumer not delivered yet (what KEDA scales on).",
                   ["consumer"])
JS_ACK_PENDING = Gauge("scaleodm_jetstream_ack_pending",
                       "Messages of a durable consumer delivered and not acknowledged yet.",
                       ["consumer"])
TASKS = Gauge("scaleodm_tasks", "Tasks by status, as the store last answered (not removed).",
              ["status"])
TASKS_STALE = Gauge("scaleodm_tasks_stale",
                    "1 when the last refresh of scaleodm_tasks failed (its values are older).")

# Every name a service exports (what dashboards and alerts may use), FastStream's included.
METRIC_NAMES: Final = (
    "scaleodm_http_requests_total", "scaleodm_http_request_duration_seconds",
    "scaleodm_events_recorded_total", "scaleodm_runs_admitted_total", "scaleodm_runs_ended_total",
    "scaleodm_run_duration_seconds", "scaleodm_queue_wait_seconds",
    "scaleodm_console_lines_total", "scaleodm_webhook_deliveries_total",
    "scaleodm_webhook_delivery_attempts", "scaleodm_events_set_aside_total",
    "scaleodm_commands_given_up_total", "scaleodm_outbox_backlog",
    "scaleodm_outbox_oldest_seconds", "scaleodm_sse_clients", "scaleodm_upload_bytes_total",
    "scaleodm_uploads_active", "scaleodm_tiles_total", "scaleodm_tile_render_seconds",
    "scaleodm_mongo_command_duration_seconds",
    "scaleodm_mongo_command_errors_total", "scaleodm_tasks", "scaleodm_tasks_stale",
    "scaleodm_s3_request_duration_seconds", "scaleodm_s3_request_errors_total",
    "scaleodm_kubernetes_request_duration_seconds", "scaleodm_kubernetes_request_errors_total",
    "scaleodm_jetstream_pending", "scaleodm_jetstream_ack_pending",
    "faststream_received_messages_total", "faststream_received_messages_size_bytes",
    "faststream_received_messages_in_process", "faststream_received_processed_messages_total",
    "faststream_received_processed_messages_duration_seconds",
    "faststream_received_processed_messages_exceptions_total",
    "faststream_published_messages_total", "faststream_published_messages_duration_seconds",
    "faststream_published_messages_exceptions_total",
)

_TASK_SUBJECT = re.compile(r"^(events\.task\.)[^.]+(\.[a-z]+)$")


def subject_template(subject: str) -> str:
    """A NATS subject as a label: one task's ``events.task.<id>.<kind>`` as
    ``events.task.*.<kind>``; command subjects (``tasks.commands.<verb>``) stay."""
    return _TASK_SUBJECT.sub(r"\1*\2", subject)


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(registry)


class _MongoListener(monitoring.CommandListener):
    """Every MongoDB command's round trip and failure, by command name (a closed set)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        MONGO_DURATION.labels(event.command_name).observe(event.duration_micros / 1e6)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        MONGO_DURATION.labels(event.command_name).observe(event.duration_micros / 1e6)
        MONGO_ERRORS.labels(event.command_name).inc()


_LISTENER: Final = _MongoListener()


def mongo_listener() -> monitoring.CommandListener:
    """The command listener a service's MongoDB client is built with (``event_listeners``)."""
    return _LISTENER


def run_ended(record: dict[str, Any], size_class: str | None, queued_at_ms: int | None) -> None:
    """Count a run's end from its usage record (written once per attempt)."""
    label = size_class or "none"
    outcome = str(record["outcome"])
    RUNS_ENDED.labels(outcome, label).inc()
    if record.get("started_at_ms") is not None:
        RUN_DURATION.labels(outcome, label).observe(int(record["wall_ms"]) / 1000)
        if queued_at_ms is not None:
            QUEUE_WAIT.labels(label).observe(
                max(0, int(record["started_at_ms"]) - int(queued_at_ms)) / 1000)


@contextlib.contextmanager
def kubernetes_call(verb: str, resource: str) -> Iterator[None]:
    """Time one Kubernetes API request; count it failed unless it answered 404 or 409 (the
    executor's idempotent creates and deletes expect those)."""
    started = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        if getattr(exc, "status", None) not in (404, 409):
            K8S_ERRORS.labels(verb, resource).inc()
        raise
    finally:
        K8S_DURATION.labels(verb, resource).observe(time.perf_counter() - started)
