"""The engine's span continues the caller's trace from the gRPC metadata (in-process
grpc.aio server, real channel)."""

from __future__ import annotations

import asyncio

import grpc
from opentelemetry import propagate, trace

from llm_engine.proto.v1 import engine_pb2 as pb
from llm_engine.proto.v1 import engine_pb2_grpc as pb_grpc
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
