"""OpenTelemetry for the engine: one server span per Generate call, continuing the
caller's trace from the W3C `traceparent` in the gRPC metadata (the gateway puts it there).

Spans go through the global tracer provider: a no-op unless `setup_tracing` installed the
SDK's (when `OTEL_TRACES_EXPORTER` is `console` or `otlp`, the standard variable; the
OTLP exporter reads `OTEL_EXPORTER_OTLP_ENDPOINT` itself) or a test installed its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

log = logging.getLogger(__name__)


def setup_tracing(service_name: str) -> None:
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if exporter_name in ("", "none"):
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.error("otel_exporter_missing", extra={"exporter": "otlp", "install": "opentelemetry-exporter-otlp-proto-grpc"})  # fmt: skip
            return
        exporter = OTLPSpanExporter()
    else:
        log.error("otel_exporter_unknown", extra={"exporter": exporter_name})
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def start_span(
    name: str, metadata: Iterable[tuple[str, str | bytes]] | None, attributes: dict
) -> Span:
    """A server span whose parent is the trace context in the call's metadata, if any."""
    carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
    parent = propagate.extract(carrier)
    tracer = trace.get_tracer("llm_engine")
    return tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
