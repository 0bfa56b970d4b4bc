"""The generation handlers, as vLLM's `OpenAIServingChat`: `ServingCompletions` for
/v1/completions and `ServingChat` for /v1/chat/completions, each a `Serving`, and
`ServingModels` for /v1/models.

`Serving.run` checks a request, builds one engine `Generate` call per choice (`n` per
prompt) carrying the request's trace context, holds its tokens under the key's limit, then
answers with the full generator (every choice run to its end, at most `MAX_N` at once: one
JSON body) or the stream generator (server-sent events ending in `data: [DONE]`: the
choices run concurrently and their chunks interleave, tagged by choice index). The two
endpoints differ only in the request model and the response format (`responses.py`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from llm_common.proto.v1 import engine_pb2 as pb
from llm_gateway import best_of
from llm_gateway.dispatch import ClientWatch, Dispatcher, Started
from llm_gateway.engine_client import Lease, Metadata
from llm_gateway.errors import OpenAIError
from llm_gateway.lora import adapter_of, model_cards
from llm_gateway.ratelimit import hold_tokens
from llm_gateway.responses import ChatFormat, Choice, Generation, ResponseFormat
from llm_gateway.schemas import MAX_N, ChatCompletionRequest, CompletionRequest
from llm_gateway.telemetry import Metrics, trace_metadata

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
GenerateBody = CompletionRequest | ChatCompletionRequest
# A choice's next chunk, its failure (sent in-band), or None at its end.
Item = tuple[int, pb.GenerateChunk | OpenAIError | None]


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


class ServingModels:
    """/v1/models and the model check of every request that names one."""

    def __init__(self, dispatch: Dispatcher) -> None:
        self.dispatch = dispatch

    async def check(self, name: str, metadata: Metadata = ()) -> pb.ModelInfoResponse:
        """The engines' ModelInfo, when `name` is the base model or one of its adapters."""
        info = await self.dispatch.model_info(metadata)
        if adapter_of(name, info) is None:
            raise OpenAIError(
                404, f"the model {name!r} does not exist", param="model", code="model_not_found"
            )
        return info

    async def listing(self) -> dict[str, Any]:
        """GET /v1/models: the base model's card and one per adapter."""
        info = await self.dispatch.model_info(trace_metadata())
        return {"object": "list", "data": model_cards(info)}

    async def card(self, model_id: str) -> dict[str, Any]:
        """GET /v1/models/{model_id}."""
        cards = model_cards(await self.check(model_id, trace_metadata()))
        return next(card for card in cards if card["id"] == model_id)


@dataclass
class Job:
    """One request's generation: what the full and the stream generator work on."""

    body: GenerateBody
    fmt: ResponseFormat
    g: Generation  # its choices, as far as they have been read
    info: pb.ModelInfoResponse
    requests: list[pb.GenerateRequest]  # one engine call per choice, in choice order
    metadata: Metadata  # the request's trace context
    deadline: float  # time.monotonic() by which the engines must have answered
    echo: bool  # completions: each choice starts with its prompt

    @property
    def param(self) -> str:
        """The request's input parameter ("prompt" or "messages"), named by input errors."""
        return self.fmt.input_param


class Arrivals:
    """A stream's chunks in batches, as they arrive. One choice (the common case) is read
    in place. Several are read by a task each into one queue, and a batch is every chunk
    that arrived meanwhile: when the gateway falls behind, tokens share one socket write
    instead of paying a syscall each (the engine merges a lagging stream's tokens into one
    chunk likewise)."""

    def __init__(self, dispatch: Dispatcher, streams: list[Started], param: str) -> None:
        self.dispatch, self.streams, self.param = dispatch, streams, param
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        several = len(streams) > 1
        self.pumps = [
            asyncio.create_task(self._pump(i, lease))
            for i, (lease, first) in enumerate(streams)
            if first is not None and several
        ]

    def first(self) -> list[Item]:
        """Every choice's first chunk (read when the stream started)."""
        return [(i, first) for i, (_, first) in enumerate(self.streams)]

    async def _pump(self, i: int, lease: Lease) -> None:
        try:
            while (chunk := await self.dispatch.read(lease, None, self.param)) is not None:
                self.queue.put_nowait((i, chunk))
            self.queue.put_nowait((i, None))
        except OpenAIError as e:
            self.queue.put_nowait((i, e))

    async def next(self) -> list[Item]:
        """Waits for the next chunk; also takes every other that has arrived meanwhile."""
        if not self.pumps:
            try:
                return [(0, await self.dispatch.read(self.streams[0][0], None, self.param))]
            except OpenAIError as e:
                return [(0, e)]
        batch = [await self.queue.get()]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch

    def close(self) -> None:
        """Stop reading and free the engine slots (the client may have gone away)."""
        for p in self.pumps:
            p.cancel()
        for lease, _ in self.streams:
            lease.release()


class EventStream(StreamingResponse):
    """Server-sent events whose engine streams are freed however the response ends. The
    generator frees them in its `finally` once it has started; a client that left before
    the first event was sent cancels the response before the generator starts, and a
    generator that never started runs no `finally`, so the response frees them too."""

    def __init__(self, events: AsyncIterator[bytes], leases: list[Lease]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        self.leases = leases

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for lease in self.leases:  # idempotent: a no-op where the generator did it
                lease.release()


class Serving:
    """What both generation endpoints do; a subclass's `create` picks the response format."""

    def __init__(
        self, dispatch: Dispatcher, models: ServingModels, metrics: Metrics, timeout_s: float
    ) -> None:
        self.dispatch, self.models, self.metrics = dispatch, models, metrics
        self.timeout_s = timeout_s

    async def run(
        self, request: Request, body: GenerateBody, fmt: ResponseFormat, echo: bool = False
    ) -> Any:
        """Answer `body` whole, or (`stream`) as events once every choice has started."""
        started = time.monotonic()
        job = await self.prepare(request, body, fmt, echo, started + self.timeout_s)
        watch = ClientWatch(request)
        try:
            if not body.stream:
                return await self.full_generator(job, watch)
            streams = await self.start_stream(job, watch)
        finally:
            watch.stop()
        self.metrics.first_token.labels(request.url.path).observe(time.monotonic() - started)
        return EventStream(self.stream_generator(job, streams), [lease for lease, _ in streams])

    async def prepare(
        self, request: Request, body: GenerateBody, fmt: ResponseFormat, echo: bool,
        deadline: float,
    ) -> Job:  # fmt: skip
        """Check `body`, build its engine calls and hold their tokens (the key's tokens per
        minute: a 429 when they do not fit)."""
        body.check_supported()
        metadata = trace_metadata()
        info = await self.models.check(body.model, metadata)
        fmt.use_model(info)  # chat: tool calls in the format of the model's chat template
        g = Generation(f"{fmt.id_prefix}-{uuid.uuid4().hex}", body.model, int(time.time()))
        request.state.request_id = g.id
        body.check_size(info)  # before anything is tokenized or built
        encoded = await self.encode_once(body, metadata, deadline, fmt.input_param)
        calls = body.engine_calls(g.id, info, encoded)
        for call in calls:
            call.request.model = adapter_of(body.model, info) or ""  # a LoRA adapter's name
        g.choices = [Choice.of(call) for call in calls]
        await hold_tokens(request, g, calls, info)
        requests = [c.request for c in calls]
        return Job(body, fmt, g, info, requests, metadata, deadline, echo)

    async def encode_once(
        self, body: GenerateBody, metadata: Metadata, deadline: float, param: str
    ) -> list[list[int] | None] | None:
        """With several choices per prompt, an engine tokenizes each text prompt once (off
        its event loop) and the choices share the ids: n copies of a long text are never
        built, sent, or tokenized n times."""
        inputs = body.shared_inputs()
        if not any(inputs):
            return None

        async def encode(request: pb.TokenizeRequest | None) -> list[int] | None:
            if request is None:  # token ids already
                return None
            remaining = deadline - time.monotonic()
            return await self.dispatch.tokenize(request, metadata, remaining, param)

        return list(await asyncio.gather(*(encode(r) for r in inputs)))

    async def full_generator(self, job: Job, watch: ClientWatch) -> dict[str, Any]:
        """Every choice run to its end, then the answer as one object."""
        await self.dispatch.generate_all(
            job.requests, job.g.choices, job.metadata, job.deadline, watch, job.param, MAX_N
        )
        if job.echo:
            await self.name_first_tokens(job, watch)
        self.count_tokens(job.g)
        return job.fmt.whole(job.g)

    async def start_stream(self, job: Job, watch: ClientWatch) -> list[Started]:
        """A stream starts (or fails with a status) once every choice has its first chunk."""
        d = self.dispatch
        streams = await d.start_all(job.requests, job.metadata, job.deadline, watch, job.param)
        if job.echo:
            try:
                await self.name_first_tokens(job, watch)
            except BaseException:
                for lease, _ in streams:
                    lease.release()
                raise
        return streams

    async def stream_generator(self, job: Job, streams: list[Started]) -> AsyncIterator[bytes]:
        """The choices' chunks as events, then the usage (`stream_options.include_usage`)
        and `[DONE]`; a failure mid-stream is an error event. Closing it (the client went
        away) frees the engine slots."""
        g, fmt = job.g, job.fmt
        # With stream_options.include_usage every chunk has "usage": null until the last.
        usage = {"usage": None} if job.body.include_usage() else {}
        arrivals = Arrivals(self.dispatch, streams, job.param)
        try:
            out = [_sse({**o, **usage}) for c in g.choices if (o := fmt.opening(g, c))]
            batch = arrivals.first()
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
                    self.count_tokens(g)
                    if usage:
                        out.append(_sse(fmt.usage_chunk(g)))
                    out.append(_sse("[DONE]"))
                    yield b"".join(out)
                    return
                if out:
                    yield b"".join(out)
                    out = []
                batch = await arrivals.next()
        finally:
            arrivals.close()

    async def name_first_tokens(self, job: Job, watch: ClientWatch) -> None:
        """Echoing token ids shows their text: the engine names prompt tokens 1..P-1 (prompt
        logprobs) but not token 0, which is looked up here."""
        g = job.g
        firsts = [c.prompt[0] for c in g.choices if isinstance(c.prompt, list) and c.prompt]
        if not firsts:
            return
        texts = await self.dispatch.token_texts(
            firsts, job.info.context_length, g.id, job.metadata, job.deadline, watch
        )
        for c in g.choices:
            if isinstance(c.prompt, list) and c.prompt:
                c.first_token = texts.get(c.prompt[0], "")

    def count_tokens(self, g: Generation) -> None:
        self.metrics.tokens.labels("prompt").inc(g.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(g.completion_tokens)


class ServingCompletions(Serving):
    async def create(self, request: Request, body: CompletionRequest) -> Any:
        """/v1/completions; with `best_of`, its candidates run as choices (`best_of.plan`)."""
        candidates, fmt = best_of.plan(body)
        return await self.run(request, candidates, fmt, echo=body.echo)


class ServingChat(Serving):
    async def create(self, request: Request, body: ChatCompletionRequest) -> Any:
        """/v1/chat/completions; with `tools`, the answer's calls parsed into `tool_calls`."""
        fmt = ChatFormat(logprobs=body.logprobs, tools=body.parses_tool_calls())
        return await self.run(request, body, fmt)
