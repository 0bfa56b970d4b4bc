"""OpenTelemetry for every service: the SDK's tracer provider (so logs carry trace ids even
when no span is exported) and trace ids on every log record.

Export follows the standard variables: `OTEL_TRACES_EXPORTER` (`otlp`, `console`, `none`);
unset, spans go over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or its traces variant) is set,
else nowhere. The OTLP exporter reads its endpoint itself.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import format_span_id, format_trace_id

log = logging.getLogger(__name__)


def setup_tracing(service_name: str) -> TracerProvider:
    """Install the process's SDK TracerProvider, exporting as the environment says."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "otlp" if endpoint else "none")
    exporter = exporter.strip().lower()
    if exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.error("otel_exporter_missing", extra={"exporter": "otlp", "install": "opentelemetry-exporter-otlp-proto-grpc"})  # fmt: skip
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter not in ("", "none"):
        log.warning("otel_exporter_unknown", extra={"exporter": exporter})
    trace.set_tracer_provider(provider)
    return provider


class TraceContextFilter(logging.Filter):
    """Adds `trace_id`/`span_id` of the current span to every record (JSON fields)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = format_trace_id(ctx.trace_id)
            record.span_id = format_span_id(ctx.span_id)
        return True


def add_trace_ids_to_logs() -> None:
    """Put the filter on the root handlers (call after `setup_logging`)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, TraceContextFilter) for f in handler.filters):
            handler.addFilter(TraceContextFilter())
