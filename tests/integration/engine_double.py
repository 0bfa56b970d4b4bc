"""The engine double of the gateway's tests: a real grpc.aio server on 127.0.0.1 (its own
thread and event loop) serving the Engine service and the standard health service.

Tokens are characters (id = code point): Tokenize makes one id per character, a conversation
tokenizes to its contents and an end-of-turn token (0), and Generate reads token ids as the
text they spell. Generate answers by that prompt text:

    say:X       generates X, as one token
    nap:X       the same, after 50 ms
    tokens:N    streams N tokens, "NAME0 " to "NAME{N-1} ", 10 ms apart
    slow        answers "ok" after 2 s
    hang        never answers
    midstream   streams "partial", then fails UNAVAILABLE
    abort:CODE  fails with that status code (and a message naming max_tokens, as the
                engine's INVALID_ARGUMENT does)
    anything else generates "ok", as one token

`max_tokens: 0` generates nothing (the prompt is only scored). Logprobs and prompt logprobs
are made up but shaped as the engine's. Usage counts the prompt's token ids, as the engine
does, and the generated tokens. Tokenize of "old-engine" answers as an engine from before
Tokenize (UNIMPLEMENTED); Detokenize is unknown. `refuse` fails every Generate.

It records what tests read: every Generate request (`requests`, the `last` one) and its
gRPC metadata (`metadata`), every Tokenize request (`tokenized`), and counts Generate calls
(`calls`), cancellations (`cancelled`), calls in progress (`active`) and the most at once
(`peak`). GenerateMany runs each generation as its own Generate, as the engine does;
`PerCallFakeEngine` is an engine from before GenerateMany.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llm_common.proto import ENGINE_SERVICE
from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.proto.v1 import engine_pb2_grpc as pb_grpc

MODEL = "fake-model"
END_OF_TURN = 0  # the token a conversation's tokens end with

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def chat_ids(chat: pb.ChatMessages) -> list[int]:
    return [*map(ord, "".join(m.content for m in chat.messages)), END_OF_TURN]


def prompt_of(request: pb.GenerateRequest) -> tuple[str, list[int]]:
    """The prompt's script text and its token ids."""
    kind = request.WhichOneof("input")
    if kind == "chat":
        ids = chat_ids(request.chat)
        return "".join(map(chr, ids[:-1])), ids
    ids = [*map(ord, request.text)] if kind == "text" else [*request.token_ids.ids]
    return "".join(map(chr, ids)), ids


class FakeEngine(pb_grpc.EngineServicer):
    def __init__(self, name: str) -> None:
        self.name = name
        self.last: pb.GenerateRequest | None = None
        self.requests: list[pb.GenerateRequest] = []
        self.tokenized: list[pb.TokenizeRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.calls = self.cancelled = self.active = self.peak = 0
        self.refuse: grpc.StatusCode | None = None  # answer every Generate with this
        self.refuse_message: str | None = None  # ...and this text (default: "NAME refuses")

    def add_to(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_EngineServicer_to_server(self, server)

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        return pb.ModelInfoResponse(model_id=MODEL, context_length=64, created=1700000000)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        self.tokenized.append(request)
        if request.text == "old-engine":
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        if request.WhichOneof("input") == "chat":
            return pb.TokenizeResponse(token_ids=chat_ids(request.chat))
        return pb.TokenizeResponse(token_ids=[*map(ord, request.text)])

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        self.last = request
        self.requests.append(request)
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        self.calls += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            async for chunk in self._generate(request, context):
                yield chunk
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        text, ids = prompt_of(request)
        if self.refuse is not None:
            await context.abort(self.refuse, self.refuse_message or f"{self.name} refuses")
        if text.startswith("abort:"):
            code = grpc.StatusCode[text.removeprefix("abort:")]
            await context.abort(code, "stopping.max_tokens: must be >= 0, got -3")
        if text == "hang":
            await asyncio.sleep(3600)
        if text == "slow":
            await asyncio.sleep(2)
        if text.startswith("nap:"):
            await asyncio.sleep(0.05)
        if text == "midstream":
            yield pb.GenerateChunk(token_ids=[1], text="partial")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is shutting down")

        tokens = self._completion(text, request)
        first = pb.GenerateChunk()  # the prompt's logprobs come with the first token
        if request.HasField("prompt_logprobs"):
            score_prompt(first, ids, request.prompt_logprobs)
        for i, (token_id, token) in enumerate(tokens):
            chunk = first if i == 0 else pb.GenerateChunk()
            chunk.token_ids.append(token_id)
            chunk.text = token
            if request.logprobs:
                add_logprobs(chunk, token_id, token, request.top_logprobs)
            yield chunk
            if text.startswith("tokens:"):
                await asyncio.sleep(0.01)
        if not tokens:
            yield first
        yield pb.GenerateChunk(
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(prompt_tokens=len(ids), completion_tokens=len(tokens)),
        )

    def _completion(self, text: str, request: pb.GenerateRequest) -> list[tuple[int, str]]:
        """The (token id, text) of each token the script generates."""
        if request.stopping.HasField("max_tokens") and request.stopping.max_tokens == 0:
            return []
        if text.startswith("tokens:"):
            return [(i, f"{self.name}{i} ") for i in range(int(text.removeprefix("tokens:")))]
        return [(5, text.split(":", 1)[1] if text.startswith(("say:", "nap:")) else "ok")]

    async def GenerateMany(
        self, request_iterator: AsyncIterator[pb.GenerateManyRequest], context: object
    ) -> AsyncIterator[pb.GenerateManyResponse]:
        async for response in generate_many(self.Generate, request_iterator):
            yield response


def score_prompt(chunk: pb.GenerateChunk, ids: list[int], top: int) -> None:
    """Prompt token i scores -i (the first is unscored), beside `top` alternatives "z"."""
    for i, t in enumerate(ids[1:], 1):
        lp = chunk.prompt_logprobs.add(token_id=t, token=chr(t), logprob=-float(i))
        for _ in range(top):
            lp.top.add(token_id=ord("z"), token="z", logprob=-0.25)


def add_logprobs(chunk: pb.GenerateChunk, token_id: int, token: str, top: int) -> None:
    """The token scores -0.5; its alternatives are itself, "no" and "yes"."""
    lp = chunk.logprobs.add(token_id=token_id, token=token, logprob=-0.5)
    alternatives = [(token_id, token, -0.5), (6, "no", -1.5), (7, "yes", -2.5)]
    for t, text, logprob in alternatives[:top]:
        lp.top.add(token_id=t, token=text, logprob=logprob)


class PerCallFakeEngine(FakeEngine):
    """An engine from before GenerateMany (its server does not know the method): the
    gateway falls back to a Generate call per generation."""

    def add_to(self, server: grpc.aio.Server) -> None:
        def stream(method: Callable, request: type, response: type) -> grpc.RpcMethodHandler:
            return grpc.unary_stream_rpc_method_handler(
                method, request.FromString, response.SerializeToString
            )

        def unary(method: Callable, request: type, response: type) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                method, request.FromString, response.SerializeToString
            )

        handlers = {
            "Generate": stream(self.Generate, pb.GenerateRequest, pb.GenerateChunk),
            "ModelInfo": unary(self.ModelInfo, pb.ModelInfoRequest, pb.ModelInfoResponse),
            "Tokenize": unary(self.Tokenize, pb.TokenizeRequest, pb.TokenizeResponse),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ENGINE_SERVICE, handlers),)
        )


class FakeServer:
    """A `FakeEngine` served on its own event loop thread; `port`, `set_health`, `stop`."""

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
        self.engine.add_to(self.server)
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


# -- GenerateMany: each generation on the stream a Generate of its own ---------------------


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class ItemContext:
    """What Generate uses of its servicer context, for one generation of a GenerateMany."""

    def __init__(self, metadata: Mapping[str, str]) -> None:
        self.metadata = dict(metadata)

    async def abort(self, code: grpc.StatusCode, details: str) -> Any:
        raise Abort(code, details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.metadata.items())


def _ended(item_id: int, e: Abort) -> pb.GenerateManyResponse:
    done = pb.GenerateManyChunk(id=item_id, code=e.code.value[0], message=e.details)
    return pb.GenerateManyResponse(chunks=[done])


def _chunk(item_id: int, chunk: pb.GenerateChunk) -> pb.GenerateManyResponse:
    return pb.GenerateManyResponse(chunks=[pb.GenerateManyChunk(id=item_id, chunk=chunk)])


async def generate_many(
    generate: Callable[..., AsyncIterator[pb.GenerateChunk]],
    request_iterator: AsyncIterator[pb.GenerateManyRequest],
) -> AsyncIterator[pb.GenerateManyResponse]:
    """Each generation runs `generate` as a task, its chunks and the status it aborts with
    relayed tagged with the generation's id, as the engine does; a cancel cancels its task."""
    out: asyncio.Queue[pb.GenerateManyResponse | None] = asyncio.Queue()
    tasks: dict[int, asyncio.Task[None]] = {}

    async def run(item: pb.GenerateManyRequest) -> None:
        try:
            async for chunk in generate(item.generate, ItemContext(item.metadata)):
                out.put_nowait(_chunk(item.id, chunk))
        except Abort as e:
            out.put_nowait(_ended(item.id, e))

    async def read() -> None:
        try:
            async for item in request_iterator:
                if item.cancel:
                    if (task := tasks.pop(item.id, None)) is not None:
                        task.cancel()
                else:
                    tasks[item.id] = asyncio.create_task(run(item))
        finally:
            out.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (response := await out.get()) is not None:
            yield response
    finally:
        reader.cancel()
        for task in tasks.values():
            task.cancel()
