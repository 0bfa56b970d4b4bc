"""The engine's span continues the caller's trace from the gRPC metadata (in-process
grpc.aio server, real channel)."""

from __future__ import annotations

import asyncio

import grpc
from opentelemetry import propagate, trace

from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.proto.v1 import engine_pb2_grpc as pb_grpc
from llm_engine.server import start_engine


def test_generate_span_is_a_child_of_the_callers_span(tiny_checkpoint: str, span_exporter) -> None:
    async def call() -> tuple[int, int]:
        engine = await start_engine("127.0.0.1", 0)
        await engine.load(tiny_checkpoint, n_slots=1)
        try:
            tracer = trace.get_tracer("test")
            with tracer.start_as_current_span("caller") as parent:
                metadata: dict[str, str] = {}
                propagate.inject(metadata)
                async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
                    stub = pb_grpc.EngineStub(channel)
                    request = pb.GenerateRequest(
                        text="The ", sampling=pb.SamplingParams(temperature=0),
                        stopping=pb.StoppingCriteria(max_tokens=3, ignore_eos=True),
                    )  # fmt: skip
                    chunks = [
                        c async for c in stub.Generate(request, metadata=tuple(metadata.items()))
                    ]
            assert chunks[-1].usage.completion_tokens == 3
            ctx = parent.get_span_context()
            return ctx.trace_id, ctx.span_id
        finally:
            await engine.stop(0)

    trace_id, parent_id = asyncio.run(call())
    (span,) = [s for s in span_exporter.get_finished_spans() if s.name == "llm.engine.Generate"]
    assert span.context.trace_id == trace_id
    assert span.parent is not None and span.parent.span_id == parent_id
    assert span.kind == trace.SpanKind.SERVER
    assert span.attributes["llm.completion_tokens"] == 3
    assert span.attributes["llm.finish_reason"] == "FINISH_REASON_LENGTH"


def test_one_trace_spans_gateway_and_engine(tiny_checkpoint: str, span_exporter) -> None:
    """The real gateway app and the real engine server in one process, one exporter: the
    engine's span is a child of the gateway's request span."""
    import threading

    from fastapi.testclient import TestClient

    from llm_gateway.app import create_app
    from llm_gateway.settings import GatewaySettings

    ready, stop = threading.Event(), threading.Event()
    port: list[int] = []

    def serve() -> None:
        async def main() -> None:
            engine = await start_engine("127.0.0.1", 0)
            await engine.load(tiny_checkpoint, n_slots=1)
            port.append(engine.port)
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            await engine.stop(0)

        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(60)
    try:
        app = create_app(GatewaySettings(engine=f"127.0.0.1:{port[0]}"))
        with TestClient(app) as client:
            body = {"model": "tiny", "prompt": "The ", "max_tokens": 3, "temperature": 0}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
    finally:
        stop.set()
        thread.join(30)
    spans = span_exporter.get_finished_spans()
    gateway = [
        s for s in spans
        if s.name == "POST /v1/completions" and s.instrumentation_scope.name == "llm_gateway"
    ][-1]  # fmt: skip
    # FastAPI's own telemetry (a second server span, operation spans) is off: the trace
    # holds the gateway's span and the engine's.
    in_trace = [s for s in spans if s.context.trace_id == gateway.context.trace_id]
    assert sorted(s.name for s in in_trace) == ["POST /v1/completions", "llm.engine.Generate"]
    engine_spans = [s for s in spans if s.name == "llm.engine.Generate"]
    mine = [s for s in engine_spans if s.context.trace_id == gateway.context.trace_id]
    assert len(mine) == 1 and mine[0].parent.span_id == gateway.context.span_id
