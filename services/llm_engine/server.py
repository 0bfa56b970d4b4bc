"""The grpc.aio server: Engine servicer, standard health service, model loading.

The server binds and answers health checks (NOT_SERVING) before the model is loaded,
so a supervisor sees a live process during a long load; Engine RPCs answer UNAVAILABLE
until the model is ready, then health turns SERVING. Handlers never touch the model:
they validate, hand a request to the scheduler thread and relay its events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.trace import Span

from llm import storage
from llm.checkpoint import LoadedModel
from llm.inference.grammar import tool_call_format
from llm.interop.peft import load_with_adapter
from llm.models.decoder import DecoderModel
from llm_common import tool_calls
from llm_common.proto import ENGINE_SERVICE, MAX_MESSAGE_BYTES
from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.proto.v1 import engine_pb2_grpc as pb_grpc
from llm_common.security import TokenInterceptor
from llm_engine import metrics, tracing, validation
from llm_engine.core import CoreOptions, EngineCore, ModelFacts, build
from llm_engine.scheduler import (
    AdapterError,
    Event,
    Failed,
    Finished,
    GenerationRequest,
    PromptLogprobs,
    QueueFull,
    Scheduler,
)

log = logging.getLogger(__name__)

LIVENESS = "liveness"
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
_ADAPTER_CODES = {
    "disabled": grpc.StatusCode.FAILED_PRECONDITION, "not_found": grpc.StatusCode.NOT_FOUND,
    "exists": grpc.StatusCode.ALREADY_EXISTS, "full": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
}  # fmt: skip
Metadata = Iterable[tuple[str, str | bytes]]
T = TypeVar("T")


@dataclass
class EngineState:
    """Everything that exists once the model is loaded."""

    model: ModelFacts  # the tokenizer and facts; the weights are in the engine core
    scheduler: Scheduler | EngineCore
    model_id: str
    created: int
    max_token_bytes: int = 0  # the most UTF-8 bytes one token decodes to

    @property
    def dtype(self) -> str:
        return self.model.dtype

    @property
    def context_length(self) -> int:  # what a prompt plus its new tokens may take
        return self.model.context_length


class EngineServicer(pb_grpc.EngineServicer):
    def __init__(self) -> None:
        self.state: EngineState | None = None
        self.draining = False  # SIGTERM: GenerateMany streams refuse new generations
        # Generations this server has taken (from the refusal checks on) and not yet ended:
        # a drain stops the server as soon as this is 0.
        self.in_flight = 0

    async def drained(self) -> None:
        """Return once no generation is in flight."""
        while self.in_flight:
            await asyncio.sleep(0.02)

    async def _ready(self, context: grpc.aio.ServicerContext) -> EngineState:
        if self.state is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        assert self.state is not None
        return self.state

    async def _start(
        self, state: EngineState, request: pb.GenerateRequest, metadata: Metadata,
        sink: Callable[[Event], None],
    ) -> tuple[GenerationRequest, Span]:  # fmt: skip
        """Validate and queue one generation; its events go to `sink` (on the scheduler
        thread). Raises `_Refused` with the status a call ends with. Tokenizing runs off
        the event loop: a long prompt does not stall the streams this server relays."""
        if self.draining:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, "the engine is shutting down")
        self.in_flight += 1  # the caller counts it down when the generation ends
        try:
            return await self._submit(state, request, metadata, sink)
        except BaseException:
            self.in_flight -= 1
            raise

    async def _submit(
        self, state: EngineState, request: pb.GenerateRequest, metadata: Metadata,
        sink: Callable[[Event], None],
    ) -> tuple[GenerationRequest, Span]:  # fmt: skip
        config = state.model.config
        adapter = request.model if request.model != state.model_id else ""
        if adapter and adapter not in state.scheduler.lora_adapters:
            raise _Refused(grpc.StatusCode.NOT_FOUND, f"the model {adapter!r} does not exist")
        try:
            spec = await asyncio.to_thread(
                validation.generation_spec,
                request,
                state.model.tokenizer,
                vocab_size=config.vocab_size,
                context_length=state.context_length,
            )
        except validation.InvalidArgument as e:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if adapter:
            spec = dataclasses.replace(spec, adapter=adapter)
        job = GenerationRequest(spec, sink)
        if request.request_id:
            job.request_id = request.request_id
        try:
            state.scheduler.submit(job)
        except QueueFull as e:
            log.warning("queue_full", extra={"request_id": job.request_id, "reason": str(e)})
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"engine queue is full: {e}"
            ) from None
        span = tracing.start_span(
            "llm.engine.Generate",
            metadata,
            {
                "llm.request_id": job.request_id,
                "llm.prompt_tokens": len(spec.prompt_ids),
                "llm.max_new_tokens": spec.max_new_tokens,
            },
        )
        return job, span

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        """A `GenerateMany` of one: its chunks, and its status as the call's."""
        state = await self._ready(context)
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}

        async def one() -> AsyncIterator[pb.GenerateManyRequest]:
            yield pb.GenerateManyRequest(id=1, generate=request, metadata=metadata)

        async with contextlib.aclosing(self._relay(state, one())) as messages:
            async for message in messages:
                for item in message.chunks:
                    if not item.code or item.chunk.token_ids:
                        yield item.chunk
                    if item.code:
                        await context.abort(_STATUS[item.code], item.message)

    async def GenerateMany(
        self,
        request_iterator: AsyncIterator[pb.GenerateManyRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.GenerateManyResponse]:
        """Many generations over one stream: each message down carries what every running
        generation produced since the last one, so a gateway pays one message per step
        instead of one per token per request."""
        state = await self._ready(context)
        async with contextlib.aclosing(self._relay(state, request_iterator)) as messages:
            async for message in messages:
                yield message

    async def _relay(
        self, state: EngineState, requests: AsyncIterator[pb.GenerateManyRequest]
    ) -> AsyncIterator[pb.GenerateManyResponse]:
        """Start and cancel generations as `requests` say; one message per batch of events
        that arrived together (a slow reader gets fewer, larger messages instead of an ever
        longer backlog). Ends once `requests` ended and every generation did; a generation
        still running when the caller goes away is cancelled."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event | _Refused | None]] = asyncio.Queue()
        running: dict[int, _Stream] = {}

        async def start(item: pb.GenerateManyRequest) -> None:
            def sink(event: Event, i: int = item.id) -> None:  # on the scheduler thread
                loop.call_soon_threadsafe(events.put_nowait, (i, event))

            if item.id in running:
                events.put_nowait((item.id, _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"id {item.id} is already running")))  # fmt: skip
                return
            try:
                job, span = await self._start(state, item.generate, item.metadata.items(), sink)
            except _Refused as e:
                events.put_nowait((item.id, e))
                return
            running[item.id] = _Stream(job, span, item.generate.whole)

        def end(i: int, cancelled: bool) -> None:
            running.pop(i).end(cancelled)
            self.in_flight -= 1

        async def read() -> None:
            async for item in requests:
                if not item.cancel:
                    await start(item)
                elif item.id in running:
                    end(item.id, cancelled=True)
            events.put_nowait((0, None))  # half-closed: end once the running ones end

        reader = asyncio.create_task(read())
        decode = state.model.tokenizer.decode
        closed = False
        try:
            while True:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                per_id: dict[int, list[Event]] = {}
                out = pb.GenerateManyResponse()
                for i, event in batch:
                    if event is None:
                        closed = True
                    elif isinstance(event, _Refused):
                        out.chunks.add(id=i, code=event.code.value[0], message=event.message)
                    elif i in running:  # else cancelled meanwhile: nothing more is sent
                        per_id.setdefault(i, []).append(event)
                for i, evs in per_id.items():
                    sent = running[i].take(evs, decode)
                    if sent is None:
                        continue  # a whole generation: held until its end
                    chunk, failure, ended = sent
                    item = out.chunks.add(id=i, chunk=chunk)
                    if failure is not None:
                        item.code, item.message = _failure_code(failure).value[0], failure.message
                    if ended:
                        end(i, cancelled=False)
                if out.chunks:
                    yield out
                if closed and not running:
                    return
        finally:
            reader.cancel()
            for i in list(running):
                end(i, cancelled=True)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        state = await self._ready(context)
        try:  # off the event loop: a long text does not stall the streams this server relays
            ids = await asyncio.to_thread(validation.tokenize, request, state.model.tokenizer)
        except validation.InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        state = await self._ready(context)
        try:  # off the event loop: a long list does not stall the streams this server relays
            text = await asyncio.to_thread(
                validation.detokenize, request, state.model.tokenizer, state.model.config.vocab_size
            )
        except validation.InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.DetokenizeResponse(text=text)

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        state = await self._ready(context)
        model = state.model
        return pb.ModelInfoResponse(
            model_id=state.model_id,
            context_length=state.context_length,
            vocab_size=model.config.vocab_size,
            slots=state.scheduler.n_slots,
            dtype=state.dtype,
            has_chat_template=model.tokenizer.has_chat_template,
            tool_call_format=tool_call_format(validation.chat_template(model.tokenizer)),
            n_params=model.n_params,
            created=state.created,
            generation_defaults=pb.GenerationDefaults(**model.generation_defaults),
            max_token_bytes=state.max_token_bytes,
            lora_adapters=[
                pb.LoRAAdapter(name=name, path=path)
                for name, path in sorted(state.scheduler.lora_adapters.items())
            ],
        )

    async def LoadLoRAAdapter(
        self, request: pb.LoadLoRAAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadLoRAAdapterResponse:
        state = await self._ready(context)
        if not request.lora_name or not request.lora_path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "lora_name and lora_path are required")  # fmt: skip
        if request.lora_name == state.model_id:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{request.lora_name!r} is the base model's name")  # fmt: skip
        await self._adapter_call(context, state.scheduler.load_lora, request.lora_name, request.lora_path)  # fmt: skip
        return pb.LoadLoRAAdapterResponse()

    async def UnloadLoRAAdapter(
        self, request: pb.UnloadLoRAAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadLoRAAdapterResponse:
        state = await self._ready(context)
        running = await self._adapter_call(context, state.scheduler.unload_lora, request.lora_name)  # fmt: skip
        return pb.UnloadLoRAAdapterResponse(running_requests=running)

    async def _adapter_call(
        self, context: grpc.aio.ServicerContext, call: Callable[..., T], *args: str
    ) -> T:
        try:
            return await asyncio.to_thread(call, *args)
        except AdapterError as e:
            await context.abort(_ADAPTER_CODES[e.kind], e.message)
            raise  # abort raises; this only tells type checkers so


def _merge(
    events: list[Event], decode: Callable[[list[int]], str]
) -> tuple[pb.GenerateChunk, Failed | None]:
    """Fold scheduler events into one chunk; stop at a failure or the finish."""
    chunk = pb.GenerateChunk()
    for event in events:
        if isinstance(event, Failed):
            return chunk, event
        if isinstance(event, PromptLogprobs):
            for token_id, logprob, top in event.entries:
                lp = chunk.prompt_logprobs.add(
                    token_id=token_id, token=decode([token_id]), logprob=logprob
                )
                for alt_id, alt in top:
                    lp.top.add(token_id=alt_id, token=decode([alt_id]), logprob=alt)
            continue
        if isinstance(event, Finished):
            chunk.token_ids.extend(event.token_ids)
            chunk.text += event.text
            chunk.finish_reason = _FINISH[event.reason]
            chunk.usage.prompt_tokens = event.prompt_tokens
            chunk.usage.completion_tokens = event.completion_tokens
            return chunk, None
        chunk.token_ids.append(event.token_id)
        chunk.text += event.text
        if event.logprob is not None:
            lp = pb.TokenLogprob(
                token_id=event.token_id, token=decode([event.token_id]), logprob=event.logprob
            )
            for token_id, logprob in event.top:
                lp.top.add(token_id=token_id, token=decode([token_id]), logprob=logprob)
            chunk.logprobs.append(lp)
    return chunk, None


class _Stream:
    """One running generation as a stream relays it: its scheduler job, its span, (sent
    `whole`) the events held until its end, and (a chat with tools) its answer's calls
    parsed as the text arrives."""

    def __init__(self, job: GenerationRequest, span: Span, whole: bool) -> None:
        self.job, self.span, self.whole = job, span, whole
        self.held: list[Event] = []
        fmt = job.spec.tool_call_format
        self.tools = tool_calls.Parser(fmt) if fmt else None
        self.tool_events: list[tool_calls.Event] = []

    def take(
        self, events: list[Event], decode: Callable[[list[int]], str]
    ) -> tuple[pb.GenerateChunk, Failed | None, bool] | None:
        """The chunk these events make, the failure it ends with, and whether the
        generation ended; None while a whole generation is held."""
        if self.whole:
            self.held.extend(events)
            if not isinstance(self.held[-1], (Finished, Failed)):
                return None
            events, self.held = self.held, []
        chunk, failure = _merge(events, decode)
        if self.tools is not None and failure is None:
            self._parse(chunk)
        return chunk, failure, failure is not None or _finished(chunk, self.span)

    def _parse(self, chunk: pb.GenerateChunk) -> None:
        """Feed the chunk's text to the tool call parser; the last chunk gets the calls and
        the content around them (the text stays in `text`, for callers from before)."""
        assert self.tools is not None
        self.tool_events += self.tools.feed(chunk.text)
        if chunk.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
            return
        content, calls = tool_calls.accumulate(self.tool_events + self.tools.finish())
        chunk.content = content or ""
        for call in calls:
            function = call["function"]
            chunk.tool_calls.add(id=call["id"], name=function["name"], arguments=function["arguments"])  # fmt: skip

    def end(self, cancelled: bool) -> None:
        if cancelled:
            # The client went away, the deadline passed, or the caller cancelled it: the
            # slot is freed at the next step.
            self.job.cancel()
            self.span.set_attribute("llm.cancelled", True)
            log.info("request_cancel_requested", extra={"request_id": self.job.request_id})
        self.span.end()


_STATUS = {code.value[0]: code for code in grpc.StatusCode}


class _Refused(Exception):
    """A generation that cannot start: the status its call ends with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _failure_code(failure: Failed) -> grpc.StatusCode:
    if failure.not_found:  # its LoRA adapter was unloaded while it waited
        return grpc.StatusCode.NOT_FOUND
    return grpc.StatusCode.UNAVAILABLE if failure.unavailable else grpc.StatusCode.INTERNAL


def _finished(chunk: pb.GenerateChunk, span: Span) -> bool:
    """True on the last chunk of a generation (and its span says how it ended)."""
    if chunk.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        return False
    span.set_attribute("llm.completion_tokens", chunk.usage.completion_tokens)
    span.set_attribute("llm.finish_reason", pb.FinishReason.Name(chunk.finish_reason))
    return True


@contextlib.contextmanager
def local_copy(directory: str) -> Iterator[str]:
    """A local directory: `directory` itself, or a temporary copy of a remote one."""
    if storage.is_local(directory):
        yield directory
        return
    with tempfile.TemporaryDirectory() as tmp:
        fs, root = storage.url_to_fs(directory)
        fs.get(root.rstrip("/") + "/", tmp, recursive=True)
        yield tmp


def _apply_adapter(loaded: LoadedModel, adapter: str, merge: bool) -> None:
    """Put a PEFT-layout LoRA adapter (local or remote directory) on the loaded base."""
    with local_copy(adapter) as local:
        load_with_adapter(loaded.model, local, merge=merge)
    loaded.model.eval()
    log.info("adapter_loaded", extra={"adapter": adapter, "merged": merge})


BLOCK = 16  # a capped context is a multiple of the prefix cache's block


def kv_cache_context(
    model: DecoderModel, n_slots: int, max_model_len: int | None, budget: int
) -> int:
    """The context to serve: `max_model_len`, else the model's, capped so that the KV cache
    of `n_slots` (+ 1 scratch row) fits in `budget` bytes. Raises ValueError, saying what
    it needs, when an asked-for context does not fit, or not even `BLOCK` tokens do."""
    context = model.config.max_seq_len
    if max_model_len is not None and max_model_len > context:
        raise ValueError(
            f"max_model_len={max_model_len}: longer than the model's context ({context})"
        )
    rows = n_slots + 1
    per_token = model.kv_cache_bytes(rows, 1)
    want = max_model_len or context
    if per_token * want <= budget:
        return want
    fit = budget // per_token // BLOCK * BLOCK
    if max_model_len is not None or fit < BLOCK:
        raise ValueError(
            f"the KV cache for {n_slots} slots x {want} tokens needs "
            f"{_gib(per_token * want)} GiB, but {_gib(budget)} GiB is available for it: lower "
            f"--max-model-len (at most {fit} fits) or --slots, or raise --kv-cache-gib"
        )
    log.warning(
        "max_model_len_capped",
        extra={"max_model_len": fit, "model_context": context, "budget_mib": budget >> 20,
               "needed_mib": per_token * context >> 20},
    )  # fmt: skip
    return fit


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g}"


def free_memory(device: str | torch.device) -> int:
    """Bytes this process may still allocate on `device`: the GPU's free memory; on the CPU
    the smaller of the kernel's MemAvailable and what the cgroup's limit leaves (a pod's
    memory limit is what kills it, not the node's memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = 1 << 62
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # fmt: skip
        try:
            cap = Path("/sys/fs/cgroup", limit).read_text().strip()
            used = int(Path("/sys/fs/cgroup", usage).read_text())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 1 << 60:
            free = min(free, int(cap) - used)
        break
    return max(free, 0)


@dataclass
class RunningEngine:
    server: grpc.aio.Server
    port: int
    servicer: EngineServicer
    health: health.aio.HealthServicer
    # Set when the engine-core process died: the engine cannot serve any more (exit 1).
    died: asyncio.Event = field(default_factory=asyncio.Event)
    _core: EngineCore | None = None
    _pending: set[asyncio.Future] = field(default_factory=set)

    async def load(
        self,
        checkpoint: str,
        *,
        model_name: str | None = None,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_queue: int = 64,
        n_slots: int = 8,
        prefill_chunk: int = 512,
        compile: bool = False,
        adapter: str | None = None,
        merge_adapter: bool = True,
        max_model_len: int | None = None,
        kv_cache_gib: float | None = None,
        engine_process: bool = True,
        threads: int = 0,
        loras: tuple[tuple[str, str], ...] = (),
        enable_lora: bool = False,
        max_loras: int = 4,
        max_lora_rank: int = 16,
    ) -> EngineState:
        """Load the checkpoint (and a LoRA adapter on it), size the KV cache
        (`kv_cache_context`), start the scheduler, go SERVING. With `engine_process` all
        of that happens in a child process (`llm_engine.core`), which gets `threads`
        torch threads; this process keeps only the tokenizer."""
        started = time.monotonic()
        metrics.SLOTS.set(n_slots)
        options = CoreOptions(
            checkpoint, device=device, dtype=dtype, adapter=adapter, merge_adapter=merge_adapter,
            max_queue=max_queue, n_slots=n_slots, prefill_chunk=prefill_chunk, compile=compile,
            max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, threads=threads,
            loras=tuple(loras), enable_lora=enable_lora, max_loras=max_loras,
            max_lora_rank=max_lora_rank, log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        )  # fmt: skip
        scheduler: Scheduler | EngineCore
        if engine_process:
            loop = asyncio.get_running_loop()
            self._core = scheduler = EngineCore(
                options, on_death=lambda reason: loop.call_soon_threadsafe(self._core_died)
            )
            facts = await asyncio.to_thread(scheduler.load)
        else:
            scheduler, facts = await asyncio.to_thread(build, options)
        # The model's thread (here or the core's reader) shares the GIL with the event
        # loop: a thread that wants the GIL waits up to the switch interval for the other.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        scheduler.start()
        state = EngineState(
            model=facts, scheduler=scheduler, model_id=model_name or facts.name,
            created=int(time.time()),
            max_token_bytes=await asyncio.to_thread(
                validation.max_token_bytes, facts.tokenizer, facts.config.vocab_size
            ),
        )  # fmt: skip
        self.servicer.state = state
        for service in ("", ENGINE_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        metrics.READY.set(1)
        log.info(
            "model_loaded",
            extra={
                "model_id": state.model_id,
                "checkpoint": facts.uri,
                "n_params": facts.n_params,
                "device": device,
                "dtype": state.dtype,
                "engine_process": engine_process,
                "load_s": round(time.monotonic() - started, 3),
            },
        )
        return state

    def _core_died(self) -> None:
        """On the event loop: the engine core is gone; refuse everything, go NOT_SERVING."""
        self.servicer.draining = True
        metrics.READY.set(0)
        for service in ("", ENGINE_SERVICE):  # HealthServicer.set only notifies watchers
            self._pending.add(asyncio.ensure_future(
                self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            ))  # fmt: skip
        self.died.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking requests, let running generations finish for up to `grace` s, stop
        the server and the core. The server stops as soon as the generations are done:
        streams that stay open while idle (the gateways' health watches and GenerateMany
        streams) would otherwise hold every stop for the whole grace period."""
        await self.health.enter_graceful_shutdown()
        self.servicer.draining = True
        metrics.READY.set(0)
        log.info("engine_draining", extra={"in_flight": self.servicer.in_flight, "grace_s": grace})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.servicer.drained(), grace)
        # A moment for the last messages and for unary calls, then idle streams end.
        await self.server.stop(min(grace, 1.0))
        if self.servicer.state is not None:
            await asyncio.to_thread(self.servicer.state.scheduler.stop)
        elif self._core is not None:  # still loading: no model to wait for
            await asyncio.to_thread(self._core.stop, 0)
        log.info("engine_stopped")


async def start_engine(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    tls: grpc.ServerCredentials | None = None,
) -> RunningEngine:
    """Bind and start the server (health NOT_SERVING, no model yet); port 0 picks a free one.
    With `token`, every Engine RPC must carry it (`llm_common.security`); with `tls`, the
    port speaks TLS only."""
    # so_reuseport=0: a second engine on a taken port must fail, not silently share it.
    server = grpc.aio.server(
        interceptors=[TokenInterceptor(token)] if token else None,
        options=[
            ("grpc.so_reuseport", 0),
            # Above anything a gateway forwards, which checks its messages against the same
            # limit: an oversized message would tear down a stream other requests share.
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Gateways ping every few seconds to notice a vanished engine: allow it.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 1000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    servicer = EngineServicer()
    pb_grpc.add_EngineServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", ENGINE_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    # For a liveness probe: answered from the event loop that serves every RPC, SERVING
    # while the model loads too (readiness is the other two).
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls) if tls else server.add_insecure_port(address)
    await server.start()
    log.info(
        "engine_started",
        extra={"host": host, "port": bound, "tls": tls is not None, "token": token is not None},
    )
    return RunningEngine(server, bound, servicer, health_servicer)
