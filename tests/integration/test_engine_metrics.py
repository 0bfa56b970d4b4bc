"""The engine's capacity and readiness metrics, which the chart's autoscaler and alerts read:
`llm_engine_slots`, `llm_engine_ready` and `llm_engine_kv_cache_usage_ratio`, in both engine
modes (the engine core's observations are replayed in the server process), and `/metrics`
served at that path only."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from tests.integration.test_engine import GREEDY
from tests.support import free_port

from llm_common.exposition import serve_metrics
from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.proto.v1 import engine_pb2_grpc as pb_grpc
from llm_engine.server import start_engine as start_server

LONG = pb.StoppingCriteria(ignore_eos=True)  # the whole context: runs until cancelled


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


async def _until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("engine_process", [True, False], ids=["core-process", "in-process"])
def test_slots_readiness_and_kv_usage(tiny_checkpoint: str, engine_process: bool) -> None:
    async def main() -> None:
        engine = await start_server("127.0.0.1", 0)
        assert gauge("llm_engine_ready") == 0  # bound, loading: not ready
        state = await engine.load(
            tiny_checkpoint, n_slots=3, max_queue=2, engine_process=engine_process
        )
        assert (gauge("llm_engine_ready"), gauge("llm_engine_slots")) == (1, 3)
        assert gauge("llm_engine_kv_cache_usage_ratio") == 0
        context = state.context_length
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
                stub = pb_grpc.EngineStub(channel)
                prompt = "The quick brown fox"
                call = stub.Generate(
                    pb.GenerateRequest(text=prompt, sampling=GREEDY, stopping=LONG)
                )
                received = 0
                while received < 5:
                    received += len((await call.read()).token_ids)

                # One request of three slots: its prompt and tokens so far, of 3 x context
                # (set once per step: it may trail the tokens already read by a step).
                def used() -> int:
                    return round(gauge("llm_engine_kv_cache_usage_ratio") * 3 * context)

                await _until(lambda: used() >= len(prompt) + received)
                assert used() <= context
                assert gauge("llm_engine_active_slots") == 1
                call.cancel()
                await _until(lambda: gauge("llm_engine_kv_cache_usage_ratio") == 0)
                assert gauge("llm_engine_active_slots") == 0
        finally:
            await engine.stop(0)
        assert gauge("llm_engine_ready") == 0  # stopped (a drain starts the same way)

    asyncio.run(main())


def test_metrics_are_served_at_their_path_only() -> None:
    registry = CollectorRegistry()
    Counter("probe_things", "things", registry=registry).inc(3)
    port = free_port()
    server = serve_metrics(port, "127.0.0.1", registry)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"probe_things_total 3.0" in body
        for path in ("/", "/metric", "/metrics/x", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
            assert e.value.code == 404, path
    finally:
        server.shutdown()
        server.server_close()
