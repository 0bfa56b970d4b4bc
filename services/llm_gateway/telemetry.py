"""Metrics (prometheus-client), tracing (OpenTelemetry SDK) and trace ids in the JSON logs.

Tracing follows OpenTelemetry's own environment: `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_EXPORTER`, `OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_SDK_DISABLED`. Spans are made even when none is exported, so every log line of a
request carries its trace id and the engine's span continues the gateway's trace.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING

from opentelemetry import propagate, trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from llm_gateway.engine_client import EnginePool

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The gateway's metrics in their own registry (one per app, so tests can make many)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llm_gateway_requests", "HTTP requests by route, method and status",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "llm_gateway_request_duration_seconds",
            "time from request to the last byte of the response (streams included)",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_token = Histogram(
            "llm_gateway_time_to_first_token_seconds",
            "time from request to the first generated text (streams)",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "llm_gateway_tokens", "tokens of finished generations", ["type"], registry=r
        )
        self.in_flight = Gauge(
            "llm_gateway_requests_in_flight", "HTTP requests being served", registry=r
        )

    def watch_pool(self, pool: EnginePool) -> None:
        self.registry.register(_PoolCollector(pool))


class _PoolCollector(Collector):
    """Engine health and this gateway's calls in flight per engine, read at scrape time."""

    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        healthy = GaugeMetricFamily(
            "llm_gateway_engine_healthy", "1 when the engine reports SERVING", labels=["engine"]
        )
        in_flight = GaugeMetricFamily(
            "llm_gateway_engine_calls_in_flight", "Generate calls in flight", labels=["engine"]
        )
        for ep in list(self.pool.endpoints.values()):
            healthy.add_metric([ep.address], float(ep.healthy))
            in_flight.add_metric([ep.address], float(ep.in_flight))
        yield healthy
        yield in_flight


# The request's gateway span, set by the middleware: the engine call's parent even when
# spans opened in between (FastAPI's own, under the global provider) are current.
REQUEST_SPAN: ContextVar[trace.Span | None] = ContextVar("llm_gateway_request_span", default=None)


def trace_metadata() -> Sequence[tuple[str, str]]:
    """The gateway span's trace context (W3C `traceparent`/`tracestate`) as gRPC metadata."""
    carrier: dict[str, str] = {}
    span = REQUEST_SPAN.get()
    propagate.inject(carrier, context=trace.set_span_in_context(span) if span else None)
    return tuple(carrier.items())
