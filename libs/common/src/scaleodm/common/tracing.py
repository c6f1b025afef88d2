"""OpenTelemetry traces: off unless the standard ``OTEL_*`` variables ask for them.

``configure(service, traces_file)`` installs the process's tracer provider when
``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``: OTLP over HTTP, configured by
``OTEL_EXPORTER_OTLP_*``; ``console``), or when ``traces_file`` (``SCALEODM_TRACES_FILE``) names a
file (JSON lines, one span each: for tests and local debugging); ``OTEL_SDK_DISABLED=true``
wins. Otherwise nothing is installed and the
OpenTelemetry API stays a no-op: FastAPI's and FastStream's instrumentation then cost a lookup.

Spans leave through a ``BatchSpanProcessor`` with a bounded queue: an exporter that is slow or
unreachable never holds a request up nor fails it (spans beyond the queue are dropped, and the
SDK logs that at most once per batch). The service name is ``scaleodm-<service>`` unless
``OTEL_SERVICE_NAME`` says otherwise.

Log lines carry ``trace_id`` and ``span_id`` while a span is current (``add_trace_ids``, a
structlog processor), so a trace and the log lines of its operations can be joined.

**One task, one trace.** The context travels as a W3C ``traceparent``: the gateway keeps its
request's in the task's document (creation, restart); the emitter puts the one current when an
event is queued into the NATS headers of the event and of the command it carries; the admission
pass continues the task document's; the scheduler continues a command's, and puts it in the run
(``run.json``; on Kubernetes the Workflow's annotation ``scaleodm.io/traceparent``); the watcher
continues the run's while it follows it; the notifier continues a terminal event's, and sends
it with the webhook (``traceparent`` header). With traces off all of this is a ``None``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["add_trace_ids", "configure", "continued", "current_traceparent", "enabled", "span"]

TRACEPARENT: Final = "traceparent"
_PROPAGATOR: Final = TraceContextTextMapPropagator()

MAX_QUEUE: Final = 2048  # spans waiting for the exporter; beyond, dropped (never blocking)

_provider: TracerProvider | None = None


class JsonLinesExporter(SpanExporter):
    """Spans as JSON lines appended to a file: trace and span ids, parent, name, service, kind,
    start/end (ns), attributes. Thread-safe (the batch processor exports from its thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            parent = span.parent
            lines.append(json.dumps({
                "trace_id": f"{ctx.trace_id:032x}" if ctx else None,
                "span_id": f"{ctx.span_id:016x}" if ctx else None,
                "parent_id": f"{parent.span_id:016x}" if parent else None,
                "name": span.name,
                "service": span.resource.attributes.get("service.name"),
                "kind": span.kind.name,
                "start_ns": span.start_time,
                "end_ns": span.end_time,
                "attributes": {k: str(v) for k, v in (span.attributes or {}).items()},
            }))
        with self._lock, self.path.open("a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _exporters(environ: MutableMapping[str, str], traces_file: Path | None
               ) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in (n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",")):
        if name == "otlp":
            # Imported only when asked for: it pulls protobuf in.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
    if traces_file is not None:
        exporters.append(JsonLinesExporter(traces_file))
    return exporters


def configure(service: str, traces_file: Path | None = None,
              environ: MutableMapping[str, str] | None = None) -> bool:
    """Install this process's tracer provider if the environment asks for traces; whether it
    did. Called once per process, before the app is built."""
    global _provider
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporters(env, traces_file)
    if not exporters:
        return False
    name = env.get("OTEL_SERVICE_NAME") or f"scaleodm-{service}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(
            exporter, max_queue_size=MAX_QUEUE, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider = provider
    return True


def enabled() -> bool:
    """Whether ``configure`` installed a provider in this process."""
    return _provider is not None


def add_trace_ids(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]
                  ) -> MutableMapping[str, Any]:
    """structlog processor: the current span's ``trace_id`` and ``span_id``, when there is one."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", f"{ctx.trace_id:032x}")
        event_dict.setdefault("span_id", f"{ctx.span_id:016x}")
    return event_dict


def current_traceparent() -> str | None:
    """The current span's W3C ``traceparent``, None without one (or with traces off)."""
    if _provider is None:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT)


@contextlib.contextmanager
def span(name: str, traceparent: str | None = None, *, consumer: bool = False,
         **attributes: str | int) -> Iterator[None]:
    """A span named ``name``, child of ``traceparent`` when given (else of the current span);
    nothing with traces off. ``consumer``: the span handles a message."""
    if _provider is None:
        yield
        return
    context = _PROPAGATOR.extract({TRACEPARENT: traceparent}) if traceparent else None
    tracer = trace.get_tracer("scaleodm")
    with tracer.start_as_current_span(
            name, context=context, kind=SpanKind.CONSUMER if consumer else SpanKind.INTERNAL,
            attributes=attributes or None):
        yield


@contextlib.contextmanager
def continued(traceparent: str | None) -> Iterator[None]:
    """Make ``traceparent`` the current context, without a span of its own (a loop that works
    for a run in many small steps: its events join the run's trace, no span per step)."""
    if _provider is None or not traceparent:
        yield
        return
    token = otel_context.attach(_PROPAGATOR.extract({TRACEPARENT: traceparent}))
    try:
        yield
    finally:
        otel_context.detach(token)
