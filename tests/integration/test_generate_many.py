"""GenerateMany: many generations over one gRPC stream (what the gateway uses), against the
real engine server on 127.0.0.1, and the gateway's Multiplexer that drives it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.proto.v1 import engine_pb2_grpc as pb_grpc
from llm_engine.server import RunningEngine, start_engine
from llm_gateway.engine_client import EnginePool, Lease

GREEDY = pb.SamplingParams(temperature=0)


def request(text: str, max_tokens: int = 8, **kw: Any) -> pb.GenerateRequest:
    stopping = pb.StoppingCriteria(max_tokens=max_tokens)
    return pb.GenerateRequest(text=text, sampling=GREEDY, stopping=stopping, **kw)


def with_engine(
    checkpoint: str, body: Callable[[RunningEngine, pb_grpc.EngineStub], Awaitable[None]]
) -> None:
    async def main() -> None:
        engine = await start_engine("127.0.0.1", 0)
        await engine.load(checkpoint, n_slots=2, max_queue=4)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}")
        try:
            await body(engine, pb_grpc.EngineStub(channel))
        finally:
            await channel.close()
            await engine.stop(0)

    asyncio.run(main())


async def alone(stub: pb_grpc.EngineStub, r: pb.GenerateRequest) -> tuple[list[int], str, int]:
    ids, text, reason = [], "", 0
    async for chunk in stub.Generate(r):
        ids += chunk.token_ids
        text += chunk.text
        reason = chunk.finish_reason or reason
    return ids, text, reason


def test_generate_many_equals_generate_and_refuses_per_generation(tiny_checkpoint: str) -> None:
    """Three generations and a bad one on one stream: each gets exactly Generate's chunks;
    the bad one alone ends with INVALID_ARGUMENT; messages carry several generations."""
    prompts = {1: "The ", 2: "Hello world", 3: "To be or"}

    async def body(engine: RunningEngine, stub: pb_grpc.EngineStub) -> None:
        expected = {i: await alone(stub, request(p, 6 + i)) for i, p in prompts.items()}
        up = [pb.GenerateManyRequest(id=i, generate=request(p, 6 + i)) for i, p in prompts.items()]
        bad = request("x")
        bad.sampling.temperature = -1
        up.append(pb.GenerateManyRequest(id=9, generate=bad))
        # `whole`: the same generation, as one chunk at its end (Generate likewise)
        up.append(pb.GenerateManyRequest(id=4, generate=request(prompts[3], 9, whole=True)))
        expected[4] = expected[3]
        whole_chunks = [c async for c in stub.Generate(request(prompts[3], 9, whole=True))]
        assert len(whole_chunks) == 1 and whole_chunks[0].text == expected[3][1]

        async def requests():
            for item in up:
                yield item

        got: dict[int, tuple[list[int], str, int]] = {i: ([], "", 0) for i in [*prompts, 4]}
        errors: dict[int, tuple[int, str]] = {}
        shared_messages = whole_messages = 0
        async for response in stub.GenerateMany(requests()):
            shared_messages += len({c.id for c in response.chunks}) > 1
            whole_messages += sum(c.id == 4 for c in response.chunks)
            for c in response.chunks:
                if c.code:
                    errors[c.id] = (c.code, c.message)
                    continue
                ids, text, reason = got[c.id]
                got[c.id] = (ids + list(c.chunk.token_ids), text + c.chunk.text,
                             c.chunk.finish_reason or reason)  # fmt: skip
        # the stream ended by itself: requests half-closed and every generation finished
        assert got == expected
        assert whole_messages == 1
        assert list(errors) == [9]
        assert errors[9][0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "temperature" in errors[9][1]
        assert shared_messages > 0  # two slots decode together: one message, both chunks
        assert engine.servicer.state.scheduler.active_slots == 0

    with_engine(tiny_checkpoint, body)


def test_generate_many_cancel_frees_the_slot(tiny_checkpoint: str) -> None:
    async def body(engine: RunningEngine, stub: pb_grpc.EngineStub) -> None:
        outbox: asyncio.Queue[pb.GenerateManyRequest] = asyncio.Queue()

        async def requests():
            while True:
                yield await outbox.get()

        stream = stub.GenerateMany(requests())
        outbox.put_nowait(pb.GenerateManyRequest(id=1, generate=request("The ", 10_000)))
        first = await stream.read()
        assert first.chunks[0].id == 1 and not first.chunks[0].code
        scheduler = engine.servicer.state.scheduler
        assert scheduler.active_slots == 1
        outbox.put_nowait(pb.GenerateManyRequest(id=1, cancel=True))
        for _ in range(200):
            if scheduler.active_slots == 0:
                break
            await asyncio.sleep(0.02)
        assert scheduler.active_slots == 0
        stream.cancel()

    with_engine(tiny_checkpoint, body)


def test_multiplexer_reads_like_generate(tiny_checkpoint: str) -> None:
    """The gateway's pool over GenerateMany: concurrent leases equal Generate's answers; a
    deadline ends a lease with DEADLINE_EXCEEDED and frees its slot; a refused one raises
    Generate's status; after the engine drops the stream, the next lease opens a new one."""

    async def read_all(lease: Lease) -> tuple[list[int], str, int]:
        ids, text, reason = [], "", 0
        try:
            while (chunk := await lease.call.read()) is not grpc.aio.EOF:
                ids += chunk.token_ids
                text += chunk.text
                reason = chunk.finish_reason or reason
        finally:
            lease.release()
        return ids, text, reason

    async def body(engine: RunningEngine, stub: pb_grpc.EngineStub) -> None:
        pool = EnginePool([f"127.0.0.1:{engine.port}"], timeout_s=60, multiplex=True)
        await pool.start()
        (ep,) = await pool.candidates()
        assert ep.mux is not None
        texts = ["The ", "Hello", "To be or", "A"]
        expected = [await alone(stub, request(t)) for t in texts]
        leases = [pool.lease(ep, request(t), (), 60) for t in texts]
        assert ep.in_flight == 4
        assert await asyncio.gather(*map(read_all, leases)) == expected
        assert ep.in_flight == 0 and not ep.mux.calls

        slow = pool.lease(ep, request("The ", 10_000), (), 0.3)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await read_all(slow)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        bad = request("x")
        bad.sampling.top_p = 2
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await read_all(pool.lease(ep, bad, (), 60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        scheduler = engine.servicer.state.scheduler
        for _ in range(200):
            if scheduler.active_slots == 0:
                break
            await asyncio.sleep(0.02)
        assert scheduler.active_slots == 0

        # The stream breaks under a running generation: it fails UNAVAILABLE (a retryable
        # status for the gateway), and the next lease works on a fresh stream.
        running = pool.lease(ep, request("The ", 10_000), (), 60)
        await running.call.read()
        reader = ep.mux._reader
        assert reader is not None
        reader.cancel()  # as if the stream broke
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await read_all(running)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert await read_all(pool.lease(ep, request("The "), (), 60)) == expected[0]
        await pool.close()

    with_engine(tiny_checkpoint, body)
