"""Gateway observability: a server span per request whose W3C context reaches the engine in
the gRPC metadata, trace ids in the JSON logs, Prometheus metrics, /readyz from the
engines' health service.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id
from prometheus_client.parser import text_string_to_metric_families
from tests.integration.engine_double import MODEL, NOT_SERVING, SERVING, FakeServer
from tests.support import wait_for

from llm_common.logs import JsonFormatter
from llm_common.tracing import TraceContextFilter
from llm_gateway.app import create_app
from llm_gateway.settings import GatewaySettings

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def traced(fake: FakeServer) -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(GatewaySettings(engine=f"127.0.0.1:{fake.port}"), tracer_provider=provider)
    with TestClient(app) as client:
        yield client, exporter


def chat(**overrides: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **overrides}


@pytest.mark.parametrize("stream", [False, True])
def test_the_gateway_span_is_the_parent_of_the_engine_call(
    traced: tuple[TestClient, InMemorySpanExporter], fake: FakeServer, stream: bool
) -> None:
    client, exporter = traced
    before = len(fake.engine.metadata)
    response = client.post("/v1/chat/completions", json=chat(stream=stream))
    assert response.status_code == 200, response.text
    (span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert span.name == "POST /v1/chat/completions"
    assert span.attributes["http.route"] == "/v1/chat/completions"
    assert span.attributes["http.response.status_code"] == 200
    assert span.parent is None  # the client sent no trace: the gateway starts one

    (metadata,) = fake.engine.metadata[before:]
    version, trace_id, parent_id, flags = metadata["traceparent"].split("-")
    assert trace_id == format_trace_id(span.context.trace_id)
    assert parent_id == format_span_id(span.context.span_id)  # the engine's parent
    assert version == "00" and int(flags, 16) & 1  # sampled


def test_a_client_trace_is_continued(
    traced: tuple[TestClient, InMemorySpanExporter], fake: FakeServer
) -> None:
    client, exporter = traced
    before = len(fake.engine.metadata)
    headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    assert client.post("/v1/chat/completions", json=chat(), headers=headers).status_code == 200
    (span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert format_trace_id(span.context.trace_id) == CLIENT_TRACE
    assert span.parent is not None and format_span_id(span.parent.span_id) == CLIENT_SPAN
    assert fake.engine.metadata[before]["traceparent"].split("-")[1] == CLIENT_TRACE


def test_error_responses_are_spans_too(traced: tuple[TestClient, InMemorySpanExporter]) -> None:
    client, exporter = traced
    assert client.post("/v1/chat/completions", json=chat(model="nope")).status_code == 404
    assert client.get("/no/such/path").status_code == 404
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["POST /v1/chat/completions"].attributes["http.response.status_code"] == 404
    assert spans["GET unmatched"].attributes["http.response.status_code"] == 404


def test_request_logs_carry_the_trace_id(traced: tuple[TestClient, InMemorySpanExporter]) -> None:
    client, exporter = traced
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceContextFilter())
    access = logging.getLogger("llm_gateway.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        reply = client.post("/v1/chat/completions", json=chat()).json()
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    (record,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    (span,) = exporter.get_finished_spans()
    assert record["event"] == "http_request"
    assert record["trace_id"] == format_trace_id(span.context.trace_id)
    assert (record["route"], record["status"]) == ("/v1/chat/completions", 200)
    assert record["request_id"] == reply["id"]
    assert "authorization" not in stream.getvalue().lower()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample `name{labels}` in Prometheus exposition text."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise KeyError((name, labels))


def test_metrics(fake: FakeServer) -> None:
    with TestClient(
        create_app(GatewaySettings(engine=f"127.0.0.1:{fake.port}", metrics_port=0))
    ) as client:
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=chat()).status_code == 200
        assert client.post("/v1/chat/completions", json=chat(stream=True)).status_code == 200
        assert client.post("/v1/chat/completions", json=chat(temperature=9)).status_code == 400
        assert client.get("/random/path/123").status_code == 404
        text = client.get("/metrics").text
    route = "/v1/chat/completions"
    engine = f"127.0.0.1:{fake.port}"
    requests = "llm_gateway_requests_total"
    assert metric(text, requests, route=route, method="POST", status="200") == 4
    assert metric(text, requests, route=route, method="POST", status="400") == 1
    # Unknown paths share one label: a scanner cannot blow up the series count.
    assert metric(text, requests, route="unmatched", method="GET", status="404") == 1
    assert metric(text, "llm_gateway_request_duration_seconds_count", route=route) == 5
    assert metric(text, "llm_gateway_time_to_first_token_seconds_count", route=route) == 1
    # The engine double's "hi" conversation is 3 tokens: h, i and the end of the turn.
    assert metric(text, "llm_gateway_tokens_total", type="prompt") == 4 * 3
    assert metric(text, "llm_gateway_tokens_total", type="completion") == 4 * 1
    assert metric(text, "llm_gateway_engine_healthy", engine=engine) == 1
    assert metric(text, "llm_gateway_engine_calls_in_flight", engine=engine) == 0
    assert metric(text, "llm_gateway_requests_in_flight") == 1  # the scrape itself


def test_readyz_follows_the_engine_health() -> None:
    fake = FakeServer("r")
    try:
        with TestClient(
            create_app(GatewaySettings(engine=f"127.0.0.1:{fake.port}", metrics_port=0))
        ) as client:
            assert client.get("/readyz").status_code == 200
            fake.set_health(NOT_SERVING)
            wait_for(lambda: client.get("/readyz").status_code == 503, what="not ready")
            refused = client.post("/v1/chat/completions", json=chat())
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "engine_unavailable"
            fake.set_health(SERVING)
            wait_for(lambda: client.get("/readyz").status_code == 200, what="ready again")
            assert client.post("/v1/chat/completions", json=chat()).status_code == 200
    finally:
        fake.stop()
