"""The gateway's side of the engine's gRPC API (grpc.aio, one channel per process)."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_engine.proto.v1 import engine_pb2 as pb
from llm_engine.proto.v1 import engine_pb2_grpc as pb_grpc

# Round robin over every address the target resolves to (a headless Service's pods).
_CHANNEL_OPTIONS = [("grpc.lb_policy_name", "round_robin")]


class EngineClient:
    def __init__(
        self, target: str, *, timeout_s: float = 600.0, model_info_ttl_s: float = 10.0
    ) -> None:
        self.target, self.timeout_s, self.model_info_ttl_s = target, timeout_s, model_info_ttl_s
        self._channel: grpc.aio.Channel | None = None
        self._info: tuple[float, pb.ModelInfoResponse] | None = None
        self._info_lock: asyncio.Lock | None = None

    def _stub(self) -> pb_grpc.EngineStub:
        # Created lazily: a grpc.aio channel belongs to the event loop that first uses it.
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        return pb_grpc.EngineStub(self._channel)

    async def model_info(self) -> pb.ModelInfoResponse:
        """ModelInfo, cached for `model_info_ttl_s` (one call per TTL under concurrency)."""
        if self._info_lock is None:
            self._info_lock = asyncio.Lock()
        async with self._info_lock:
            if self._info is not None and time.monotonic() - self._info[0] < self.model_info_ttl_s:
                return self._info[1]
            info = await self._stub().ModelInfo(pb.ModelInfoRequest(), timeout=10.0)
            self._info = (time.monotonic(), info)
            return info

    def generate(self, request: pb.GenerateRequest) -> grpc.aio.UnaryStreamCall:
        return self._stub().Generate(request, timeout=self.timeout_s)

    async def serving(self) -> bool:
        """True when the engine's standard health check says SERVING."""
        self._stub()
        assert self._channel is not None
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
