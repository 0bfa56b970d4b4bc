"""OpenTelemetry for the engine: one server span per Generate call, continuing the
caller's trace from the W3C `traceparent` in the gRPC metadata (the gateway puts it there).

Spans go through the global tracer provider: the SDK's once `llm_common.tracing.setup_tracing`
installed it (as `llm-engine` does), else a no-op, or a test's own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

log = logging.getLogger(__name__)


def start_span(
    name: str, metadata: Iterable[tuple[str, str | bytes]] | None, attributes: dict
) -> Span:
    """A server span whose parent is the trace context in the call's metadata, if any."""
    carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
    parent = propagate.extract(carrier)
    tracer = trace.get_tracer("llm_engine")
    return tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
