"""A fake engine for gateway tests: a real grpc.aio server on 127.0.0.1 (own thread and
event loop) implementing the Engine servicer and the standard health service.

Generate answers by the prompt text (token ids read as the text they spell, as Tokenize
makes them: one id per character): `tokens:N` streams N chunks 10 ms apart, `hang`
never answers, `abort:CODE` fails with that status; anything else streams "ok". It
records every call's metadata, and counts calls, cancellations and calls in progress.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tests.integration.many import generate_many_aio

from llm_common.proto import ENGINE_SERVICE
from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.proto.v1 import engine_pb2_grpc as pb_grpc

MODEL = "fake-model"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FakeEngine(pb_grpc.EngineServicer):
    def __init__(self, name: str) -> None:
        self.name = name
        self.metadata: list[dict[str, str]] = []
        self.calls = self.cancelled = self.active = 0
        self.refuse: grpc.StatusCode | None = None  # answer every Generate with this
        self.refuse_message: str | None = None  # ...and this text (default: "NAME refuses")

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        return pb.ModelInfoResponse(model_id=MODEL, context_length=64, created=1700000000)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        return pb.TokenizeResponse(token_ids=[*map(ord, request.text)])

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        self.calls += 1
        self.active += 1
        try:
            if request.WhichOneof("input") == "token_ids":
                text = "".join(map(chr, request.token_ids.ids))
            else:
                text = request.text
            if self.refuse is not None:
                await context.abort(self.refuse, self.refuse_message or f"{self.name} refuses")
            if text.startswith("abort:"):
                await context.abort(grpc.StatusCode[text.removeprefix("abort:")], "scripted")
            if text == "hang":
                await asyncio.sleep(3600)
            n = int(text.removeprefix("tokens:")) if text.startswith("tokens:") else 1
            for i in range(n):
                yield pb.GenerateChunk(token_ids=[i], text=f"{self.name}{i} " if n > 1 else "ok")
                if n > 1:
                    await asyncio.sleep(0.01)
            yield pb.GenerateChunk(
                finish_reason=pb.FINISH_REASON_LENGTH,
                usage=pb.Usage(prompt_tokens=3, completion_tokens=n),
            )
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def GenerateMany(
        self, request_iterator: AsyncIterator[pb.GenerateManyRequest], context: object
    ) -> AsyncIterator[pb.GenerateManyResponse]:
        async for response in generate_many_aio(self.Generate, request_iterator):
            yield response


class PerCallFakeEngine(FakeEngine):
    """An engine from before GenerateMany (its server does not know the method): the
    gateway falls back to a Generate call per generation."""

    def handlers(self) -> grpc.GenericRpcHandler:
        def stream(method: Callable, request: type, response: type) -> grpc.RpcMethodHandler:
            return grpc.unary_stream_rpc_method_handler(
                method, request.FromString, response.SerializeToString
            )

        def unary(method: Callable, request: type, response: type) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                method, request.FromString, response.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            ENGINE_SERVICE,
            {
                "Generate": stream(self.Generate, pb.GenerateRequest, pb.GenerateChunk),
                "ModelInfo": unary(self.ModelInfo, pb.ModelInfoRequest, pb.ModelInfoResponse),
                "Tokenize": unary(self.Tokenize, pb.TokenizeRequest, pb.TokenizeResponse),
            },
        )


class FakeServer:
    """`FakeEngine` served on its own event loop thread; `port`, `set_health`, `stop`."""

    def __init__(
        self,
        name: str = "a",
        *,
        with_health: bool = True,
        engine_cls: type[FakeEngine] = FakeEngine,
    ) -> None:
        self.engine = engine_cls(name)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.health: health.aio.HealthServicer | None = None
        self.port = self._call(lambda: self._start(with_health))

    def _call(self, factory: Callable[[], object]) -> object:
        return asyncio.run_coroutine_threadsafe(factory(), self.loop).result(10)  # type: ignore[arg-type]

    async def _start(self, with_health: bool) -> int:
        self.server = grpc.aio.server()
        if isinstance(self.engine, PerCallFakeEngine):
            self.server.add_generic_rpc_handlers((self.engine.handlers(),))
        else:
            pb_grpc.add_EngineServicer_to_server(self.engine, self.server)
        if with_health:
            self.health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
            for service in ("", ENGINE_SERVICE):
                await self.health.set(service, SERVING)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def set_health(self, status: int) -> None:
        assert self.health is not None
        health_servicer = self.health

        async def set_all() -> None:
            for service in ("", ENGINE_SERVICE):
                await health_servicer.set(service, status)

        self._call(set_all)

    def stop(self) -> None:
        self._call(lambda: self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@contextmanager
def fake_engines(*names: str) -> Iterator[list[FakeServer]]:
    servers = [FakeServer(n) for n in names]
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextmanager
def serve_gateway(app: object) -> Iterator[str]:
    """The app on a real uvicorn server on 127.0.0.1 in a thread (real HTTP connections,
    so a client can really disconnect); yields its base URL."""
    from llm_gateway.cli import HttpServer
    from llm_gateway.settings import GatewaySettings

    settings = GatewaySettings(engine=["127.0.0.1:1"], host="127.0.0.1", port=0)
    server = HttpServer(app, settings)  # type: ignore[arg-type]
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    wait_for(lambda: server.server.started, 10, "the gateway to start")
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        thread.join(15)
