"""The OpenAI-compatible FastAPI app: `create_app(settings)`.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions
(both with `"stream": true` as server-sent events ending in `data: [DONE]`), GET /healthz
(the process is up) and GET /readyz (the engine is SERVING). Every request maps to one
engine `Generate` call; the gateway never touches tensors.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from fastapi import Depends, FastAPI, Header
from fastapi.responses import JSONResponse, StreamingResponse

from llm_engine.proto.v1 import engine_pb2 as pb
from llm_gateway import errors
from llm_gateway.engine_client import EngineClient
from llm_gateway.errors import OpenAIError
from llm_gateway.responses import ChatFormat, CompletionFormat, Generation, ResponseFormat
from llm_gateway.schemas import ChatCompletionRequest, CompletionRequest
from llm_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def _read(call: grpc.aio.UnaryStreamCall, input_param: str) -> pb.GenerateChunk | None:
    """Next chunk, None at the end; engine errors become OpenAI errors."""
    try:
        chunk = await call.read()
    except grpc.aio.AioRpcError as e:
        raise errors.from_grpc(e, input_param) from None
    return None if chunk is grpc.aio.EOF else chunk


def create_app(settings: GatewaySettings, client: EngineClient | None = None) -> FastAPI:
    engine = client or EngineClient(
        settings.engine,
        timeout_s=settings.request_timeout_s,
        model_info_ttl_s=settings.model_info_ttl_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.close()

    app = FastAPI(title="llm gateway", version="1", lifespan=lifespan)
    errors.install(app)
    keys = [k.encode() for k in settings.api_keys]

    async def authorize(authorization: str | None = Header(default=None)) -> None:
        if not keys:
            return
        token = (authorization or "").removeprefix("Bearer ").strip().encode()
        # compare_digest against every key: no early exit that leaks which prefix matched.
        if not any([hmac.compare_digest(token, k) for k in keys]):
            raise OpenAIError(401, "invalid API key", code="invalid_api_key")

    async def model_info() -> pb.ModelInfoResponse:
        try:
            return await engine.model_info()
        except grpc.aio.AioRpcError as e:
            raise errors.from_grpc(e, "model") from None

    async def check_model(name: str) -> pb.ModelInfoResponse:
        info = await model_info()
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
        ready = await engine.serving()
        return JSONResponse(
            {"status": "ready" if ready else "engine not serving"}, 200 if ready else 503
        )

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(await model_info())]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str) -> dict[str, Any]:
        return model_card(await check_model(model_id))

    async def run(body: CompletionRequest | ChatCompletionRequest, fmt: ResponseFormat) -> Any:
        body.check_supported()
        info = await check_model(body.model)
        g = Generation(f"{fmt.id_prefix}-{uuid.uuid4().hex}", info.model_id, int(time.time()))
        call = engine.generate(body.to_engine(g.id))
        if not body.stream:
            while (chunk := await _read(call, fmt.input_param)) is not None:
                g.add(chunk)
            return fmt.whole(g)
        # Read the first chunk before answering so that an engine error (bad input, queue
        # full) is a proper HTTP status, not a 200 stream that fails.
        try:
            first = await _read(call, fmt.input_param)
        except BaseException:
            call.cancel()
            raise
        # With stream_options.include_usage every chunk has "usage": null until the last.
        usage = {"usage": None} if body.include_usage() else {}

        async def events() -> AsyncIterator[bytes]:
            try:
                if (opening := fmt.opening(g)) is not None:
                    yield _sse({**opening, **usage})
                chunk = first
                while chunk is not None:
                    g.add(chunk)
                    if chunk.text or chunk.logprobs or chunk.finish_reason:
                        yield _sse({**fmt.chunk(g, chunk), **usage})
                    chunk = await _read(call, fmt.input_param)
                if usage:
                    yield _sse(fmt.usage_chunk(g))
                yield _sse("[DONE]")
            except OpenAIError as e:  # mid-stream engine failure: report it in-band
                yield _sse(e.body())
            finally:
                call.cancel()  # no-op when finished; frees the engine slot on disconnect

        return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest) -> Any:
        return await run(body, CompletionFormat())

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        return await run(body, ChatFormat(logprobs=body.logprobs))

    return app
