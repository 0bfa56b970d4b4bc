"""The OpenAI-compatible FastAPI app: `create_app(settings)`.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions
(both with `"stream": true` as server-sent events ending in `data: [DONE]`), GET /healthz
(the process is up), GET /readyz (at least one engine is SERVING) and GET /metrics
(Prometheus). Every request maps to one engine `Generate` call on the least busy healthy
engine, carrying the request's trace context; the gateway never touches tensors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llm_engine.proto.v1 import engine_pb2 as pb
from llm_gateway import errors
from llm_gateway.engine_client import EnginePool, Lease, Metadata, NoEngine
from llm_gateway.errors import ERROR_RESPONSES, OpenAIError
from llm_gateway.middleware import GatewayMiddleware
from llm_gateway.responses import ChatFormat, CompletionFormat, Generation, ResponseFormat
from llm_gateway.schemas import ChatCompletionRequest, CompletionRequest
from llm_gateway.settings import GatewaySettings
from llm_gateway.telemetry import Metrics, trace_metadata

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}},
          "description": "the completion, or with `stream: true` server-sent events"},
    **ERROR_RESPONSES,
}  # fmt: skip
# Engine answers worth trying on another engine, before any token was produced.
_RETRY_ELSEWHERE = (429, 503)


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


class ClientWatch:
    """Cancels the engine call when the HTTP client goes away before the response starts
    (queued, or waiting for a whole completion). Once a stream has started, Starlette's
    StreamingResponse watches for the disconnect and closes our generator."""

    def __init__(self, request: Request) -> None:
        self.gone = False
        self.lease: Lease | None = None
        self._task = asyncio.create_task(self._wait(request))

    async def _wait(self, request: Request) -> None:
        # The body has been read: the next ASGI message is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self.lease is not None:
            self.lease.release()

    def stop(self) -> None:
        self._task.cancel()


def create_app(
    settings: GatewaySettings,
    pool: EnginePool | None = None,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """The gateway app. `tracer_provider` defaults to the global one (the CLI installs the
    SDK's); `metrics` to a fresh registry exposed at /metrics."""
    engines = pool or EnginePool(
        settings.engine,
        timeout_s=settings.request_timeout_s,
        model_info_ttl_s=settings.model_info_ttl_s,
        health_retry_s=settings.health_retry_s,
        resolve_interval_s=settings.resolve_interval_s,
    )
    metrics = metrics or Metrics()
    metrics.watch_pool(engines)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engines.start()
        yield
        await engines.close()

    app = FastAPI(title="llm gateway", version="1", lifespan=lifespan)
    errors.install(app)
    app.add_middleware(
        GatewayMiddleware,
        metrics=metrics,
        tracer=trace.get_tracer("llm_gateway", tracer_provider=tracer_provider),
        api_keys=settings.load_api_keys(),
        max_body_bytes=settings.max_body_bytes,
    )

    async def model_info(metadata: Metadata) -> pb.ModelInfoResponse:
        try:
            return await engines.model_info(metadata)
        except NoEngine as e:
            raise errors.unavailable(str(e)) from None
        except grpc.aio.AioRpcError as e:
            raise errors.from_grpc(e, "model", settings.retry_after_s) from None

    async def check_model(name: str, metadata: Metadata = ()) -> pb.ModelInfoResponse:
        info = await model_info(metadata)
        if name != info.model_id:
            raise OpenAIError(
                404, f"the model {name!r} does not exist", param="model", code="model_not_found"
            )
        return info

    def model_card(info: pb.ModelInfoResponse) -> dict[str, Any]:
        return {"id": info.model_id, "object": "model", "created": info.created, "owned_by": "llm"}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = await engines.ready()
        return JSONResponse(
            {"status": "ready" if ready else "no engine is serving"}, 200 if ready else 503
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(await model_info(trace_metadata()))]}

    @app.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
    async def get_model(model_id: str) -> dict[str, Any]:
        return model_card(await check_model(model_id, trace_metadata()))

    async def read(lease: Lease, watch: ClientWatch | None, param: str) -> pb.GenerateChunk | None:
        """Next chunk, None at the end; engine errors become OpenAI errors."""
        try:
            chunk = await lease.call.read()
        except grpc.aio.AioRpcError as e:
            raise errors.from_grpc(e, param, settings.retry_after_s) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if watch is None or not watch.gone or (task is not None and task.cancelling()):
                raise
            # 499 (nginx's "client closed request"): only the logs and metrics see it.
            raise OpenAIError(499, "the client closed the request", code="client_closed") from None
        return None if chunk is grpc.aio.EOF else chunk

    async def start(
        request: pb.GenerateRequest, metadata: Metadata, deadline: float, watch: ClientWatch,
        param: str,
    ) -> tuple[Lease, pb.GenerateChunk | None]:  # fmt: skip
        """Start the generation on the least busy healthy engine and read its first chunk;
        an engine whose queue is full or that is going away is skipped for the next one."""
        refused: OpenAIError | None = None
        try:
            candidates = await engines.candidates()
        except NoEngine as e:
            raise errors.unavailable(str(e)) from None
        for ep in candidates:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            lease = watch.lease = engines.lease(ep, request, metadata, remaining)
            try:
                return lease, await read(lease, watch, param)
            except OpenAIError as e:
                lease.release()
                if e.status not in _RETRY_ELSEWHERE:
                    raise
                refused = e
            except BaseException:
                lease.release()
                raise
        if refused is not None:
            raise refused
        raise OpenAIError(504, "the engine did not answer in time", type="timeout", code="timeout")

    async def run(
        request: Request, body: CompletionRequest | ChatCompletionRequest, fmt: ResponseFormat
    ) -> Any:
        started = time.monotonic()
        deadline = started + settings.request_timeout_s
        body.check_supported()
        metadata = trace_metadata()
        info = await check_model(body.model, metadata)
        g = Generation(f"{fmt.id_prefix}-{uuid.uuid4().hex}", info.model_id, int(time.time()))
        request.state.request_id = g.id
        engine_request = body.to_engine(g.id)
        route = request.url.path
        watch = ClientWatch(request)
        try:
            lease, first = await start(engine_request, metadata, deadline, watch, fmt.input_param)
            if not body.stream:
                try:
                    chunk = first
                    while chunk is not None:
                        g.add(chunk)
                        chunk = await read(lease, watch, fmt.input_param)
                finally:
                    lease.release()
                count_tokens(g)
                return fmt.whole(g)
        finally:
            watch.stop()
        metrics.first_token.labels(route).observe(time.monotonic() - started)
        # With stream_options.include_usage every chunk has "usage": null until the last.
        usage = {"usage": None} if body.include_usage() else {}

        async def events() -> AsyncIterator[bytes]:
            # A task reads the engine's chunks into a queue, and each write sends every
            # chunk that has arrived meanwhile: when the gateway falls behind (many fast
            # streams), tokens share one socket write instead of paying a syscall each.
            arrived: asyncio.Queue[pb.GenerateChunk | OpenAIError | None] = asyncio.Queue()

            async def pump() -> None:
                try:
                    while (chunk := await read(lease, None, fmt.input_param)) is not None:
                        arrived.put_nowait(chunk)
                    arrived.put_nowait(None)
                except OpenAIError as e:
                    arrived.put_nowait(e)

            pumping = asyncio.create_task(pump())
            try:
                opening = fmt.opening(g)
                out = [] if opening is None else [_sse({**opening, **usage})]
                batch: list[pb.GenerateChunk | OpenAIError | None] = [first]
                while True:
                    for item in batch:
                        if item is None:
                            count_tokens(g)
                            if usage:
                                out.append(_sse(fmt.usage_chunk(g)))
                            out.append(_sse("[DONE]"))
                            yield b"".join(out)
                            return
                        if isinstance(item, OpenAIError):  # mid-stream failure: in-band
                            out.append(_sse(item.body()))
                            yield b"".join(out)
                            return
                        g.add(item)
                        if item.text or item.logprobs or item.finish_reason:
                            out.append(_sse({**fmt.chunk(g, item), **usage}))
                    if out:
                        yield b"".join(out)
                        out = []
                    batch = [await arrived.get()]
                    while not arrived.empty():
                        batch.append(arrived.get_nowait())
            finally:
                pumping.cancel()
                lease.release()  # frees the engine slot when the client went away

        return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)

    def count_tokens(g: Generation) -> None:
        metrics.tokens.labels("prompt").inc(g.prompt_tokens)
        metrics.tokens.labels("completion").inc(g.completion_tokens)

    @app.post("/v1/completions", responses=_GENERATE_RESPONSES)
    async def completions(request: Request, body: CompletionRequest) -> Any:
        return await run(request, body, CompletionFormat())

    @app.post("/v1/chat/completions", responses=_GENERATE_RESPONSES)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        return await run(request, body, ChatFormat(logprobs=body.logprobs))

    return app
