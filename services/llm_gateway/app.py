"""The OpenAI-compatible FastAPI app: `create_app(settings)`.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions,
POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter (`llm_gateway.lora`)
(both with `"stream": true` as server-sent events ending in `data: [DONE]`), vLLM's POST
/tokenize and /detokenize, GET /healthz
(the process is up), GET /readyz (at least one engine is SERVING) and GET /metrics
(Prometheus). Every choice of a request (`n` per prompt) maps to one engine `Generate`
call on the least busy healthy engine, carrying the request's trace context; the calls run
concurrently, and a stream interleaves their chunks tagged by choice index. The gateway
never touches tensors.
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

from llm_common.proto.v1 import engine_pb2 as pb
from llm_gateway import best_of, errors
from llm_gateway.dispatch import ClientWatch, Dispatcher
from llm_gateway.engine_client import EnginePool, Lease, Metadata, NoEngine
from llm_gateway.errors import ERROR_RESPONSES, OpenAIError
from llm_gateway.lora import (
    LoadLoRAAdapterRequest,
    LoRAAdmin,
    UnloadLoRAAdapterRequest,
    adapter_of,
    model_cards,
)
from llm_gateway.middleware import ApiKeys, GatewayMiddleware
from llm_gateway.ratelimit import RateLimiter, hold_tokens
from llm_gateway.responses import (
    ChatFormat,
    Choice,
    Generation,
    ResponseFormat,
)
from llm_gateway.schemas import MAX_N, ChatCompletionRequest, CompletionRequest
from llm_gateway.settings import GatewaySettings
from llm_gateway.telemetry import Metrics, trace_metadata
from llm_gateway.tokenization import DetokenizeRequest, Tokenization, TokenizeRequest

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}},
          "description": "the completion, or with `stream: true` server-sent events"},
    **ERROR_RESPONSES,
}  # fmt: skip


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


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
        multiplex=settings.multiplex,
        keepalive_s=settings.engine_keepalive_s,
        **settings.engine_security(),
    )
    metrics = metrics or Metrics()
    metrics.watch_pool(engines)
    dispatch = Dispatcher(engines, settings.retry_after_s)
    limiter = RateLimiter.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engines.start()
        yield
        await engines.close()
        await limiter.close()

    # The span, metrics and access log are GatewayMiddleware's: FastAPI's own telemetry
    # would open a second server span and one per dependency, endpoint and serialization
    # (a sixth of the gateway's CPU per request).
    off = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    app = FastAPI(title="llm gateway", version="1", lifespan=lifespan, telemetry=off)
    errors.install(app)
    app.add_middleware(
        GatewayMiddleware,
        metrics=metrics,
        tracer=trace.get_tracer("llm_gateway", tracer_provider=tracer_provider),
        api_keys=ApiKeys(settings.load_key_limits, settings.api_keys_file),
        max_body_bytes=settings.max_body_bytes,
        limiter=limiter,
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
        if adapter_of(name, info) is None:  # neither the base nor a LoRA adapter
            raise OpenAIError(
                404, f"the model {name!r} does not exist", param="model", code="model_not_found"
            )
        return info

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = await engines.ready()
        return JSONResponse(
            {"status": "ready" if ready else "no engine is serving"}, 200 if ready else 503
        )

    if not settings.metrics_port:  # else on a port of its own (llm_gateway.cli)

        @app.get("/metrics", response_class=PlainTextResponse)
        async def prometheus() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.metrics = metrics

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": model_cards(await model_info(trace_metadata()))}

    @app.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
    async def get_model(model_id: str) -> dict[str, Any]:
        cards = model_cards(await check_model(model_id, trace_metadata()))
        return next(card for card in cards if card["id"] == model_id)

    async def encode_once(
        body: CompletionRequest | ChatCompletionRequest,
        metadata: Metadata,
        deadline: float,
        param: str,
    ) -> list[list[int] | None] | None:
        """With several choices per prompt, an engine tokenizes each text prompt once (off
        its event loop) and the choices share the ids: n copies of a long text are never
        built, sent, or tokenized n times."""
        inputs = body.shared_inputs()
        if not any(inputs):
            return None

        async def encode(request: pb.TokenizeRequest | None) -> list[int] | None:
            if request is None:
                return None
            try:
                return await engines.tokenize(request, metadata, deadline - time.monotonic())
            except NoEngine as e:
                raise errors.unavailable(str(e)) from None
            except grpc.aio.AioRpcError as e:
                raise errors.from_grpc(e, param, settings.retry_after_s) from None

        return list(await asyncio.gather(*(encode(r) for r in inputs)))

    async def run(
        request: Request, body: CompletionRequest | ChatCompletionRequest, fmt: ResponseFormat
    ) -> Any:
        started = time.monotonic()
        deadline = started + settings.request_timeout_s
        body.check_supported()
        metadata = trace_metadata()
        info = await check_model(body.model, metadata)
        if isinstance(fmt, ChatFormat):
            fmt.use_model(info)  # tool calls in the format of the model's chat template
        g = Generation(f"{fmt.id_prefix}-{uuid.uuid4().hex}", body.model, int(time.time()))
        request.state.request_id = g.id
        body.check_size(info)  # before anything is tokenized or built
        param = fmt.input_param
        encoded = await encode_once(body, metadata, deadline, param)
        calls = body.engine_calls(g.id, info, encoded)
        for call in calls:
            call.request.model = adapter_of(body.model, info) or ""  # a LoRA adapter's name
        g.choices = [Choice.of(call) for call in calls]
        requests = [c.request for c in calls]
        echo = isinstance(body, CompletionRequest) and body.echo
        await hold_tokens(request, g, calls, info)  # the key's tokens per minute (429)
        watch = ClientWatch(request)
        try:
            if not body.stream:
                await dispatch.generate_all(
                    requests, g.choices, metadata, deadline, watch, param, MAX_N
                )
                if echo:
                    await name_first_tokens(g, info, metadata, deadline, watch)
                count_tokens(g)
                return fmt.whole(g)
            # A stream starts (or fails with a status) once every choice has its first chunk.
            streams = await dispatch.start_all(requests, metadata, deadline, watch, param)
            if echo:
                try:
                    await name_first_tokens(g, info, metadata, deadline, watch)
                except BaseException:
                    for lease, _ in streams:
                        lease.release()
                    raise
        finally:
            watch.stop()
        metrics.first_token.labels(request.url.path).observe(time.monotonic() - started)
        # With stream_options.include_usage every chunk has "usage": null until the last.
        usage = {"usage": None} if body.include_usage() else {}

        async def events() -> AsyncIterator[bytes]:
            # One choice (the common case) is read in place. Several are read by a task
            # each into one queue, and each write sends every chunk that has arrived
            # meanwhile: when the gateway falls behind, tokens share one socket write
            # instead of paying a syscall each (the engine merges a lagging stream's
            # tokens into one chunk likewise).
            Item = tuple[int, pb.GenerateChunk | OpenAIError | None]
            arrived: asyncio.Queue[Item] = asyncio.Queue()

            async def pump(i: int, lease: Lease) -> None:
                try:
                    while (chunk := await dispatch.read(lease, None, param)) is not None:
                        arrived.put_nowait((i, chunk))
                    arrived.put_nowait((i, None))
                except OpenAIError as e:
                    arrived.put_nowait((i, e))

            pumps = [
                asyncio.create_task(pump(i, lease))
                for i, (lease, first) in enumerate(streams)
                if first is not None and len(streams) > 1
            ]

            async def next_batch() -> list[Item]:
                if not pumps:
                    try:
                        return [(0, await dispatch.read(streams[0][0], None, param))]
                    except OpenAIError as e:
                        return [(0, e)]
                batch = [await arrived.get()]
                while not arrived.empty():
                    batch.append(arrived.get_nowait())
                return batch

            try:
                out = [_sse({**o, **usage}) for c in g.choices if (o := fmt.opening(g, c))]
                batch: list[Item] = [(i, first) for i, (_, first) in enumerate(streams)]
                running = len(streams)
                while True:
                    for i, item in batch:
                        if isinstance(item, OpenAIError):  # mid-stream failure: in-band
                            out.append(_sse(item.body()))
                            yield b"".join(out)
                            return
                        if item is None:
                            running -= 1
                            continue
                        c = g.choices[i]
                        c.add(item)
                        if (data := fmt.chunk(g, c, item)) is not None:
                            out.append(_sse({**data, **usage}))
                    if running == 0:
                        count_tokens(g)
                        if usage:
                            out.append(_sse(fmt.usage_chunk(g)))
                        out.append(_sse("[DONE]"))
                        yield b"".join(out)
                        return
                    if out:
                        yield b"".join(out)
                        out = []
                    batch = await next_batch()
            finally:
                for p in pumps:
                    p.cancel()
                for lease, _ in streams:
                    lease.release()  # frees the engine slots when the client went away

        return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)

    async def name_first_tokens(
        g: Generation, info: pb.ModelInfoResponse, metadata: Metadata, deadline: float,
        watch: ClientWatch,
    ) -> None:  # fmt: skip
        """Echoing token ids shows their text: the engine names prompt tokens 1..P-1 (prompt
        logprobs) but not token 0, which is looked up here."""
        firsts = [c.prompt[0] for c in g.choices if isinstance(c.prompt, list) and c.prompt]
        if not firsts:
            return
        texts = await dispatch.token_texts(
            firsts, info.context_length, g.id, metadata, deadline, watch
        )
        for c in g.choices:
            if isinstance(c.prompt, list) and c.prompt:
                c.first_token = texts.get(c.prompt[0], "")

    def count_tokens(g: Generation) -> None:
        metrics.tokens.labels("prompt").inc(g.prompt_tokens)
        metrics.tokens.labels("completion").inc(g.completion_tokens)

    @app.post("/v1/completions", responses=_GENERATE_RESPONSES)
    async def completions(request: Request, body: CompletionRequest) -> Any:
        return await run(request, *best_of.plan(body))

    @app.post("/v1/chat/completions", responses=_GENERATE_RESPONSES)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        fmt = ChatFormat(logprobs=body.logprobs, tools=body.parses_tool_calls())
        return await run(request, body, fmt)

    lora = LoRAAdmin(engines, settings.load_admin_keys())

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
    async def load_lora_adapter(request: Request, body: LoadLoRAAdapterRequest) -> Response:
        return await lora.load(request, body)

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ERROR_RESPONSES)  # fmt: skip
    async def unload_lora_adapter(request: Request, body: UnloadLoRAAdapterRequest) -> Response:
        return await lora.unload(request, body)

    tokenization = Tokenization(
        engines, check_model, model_info, settings.request_timeout_s, settings.retry_after_s
    )

    @app.post("/tokenize", responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await tokenization.tokenize(body)

    @app.post("/detokenize", responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return await tokenization.detokenize(body)

    return app
