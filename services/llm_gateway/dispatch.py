"""Engine calls for one HTTP request, with engine statuses mapped to OpenAI errors:
generations started on the least busy healthy engine (skipping one that refuses), one per
choice, concurrently (the first failure cancels the others), and cancelled when the client
goes away; and the unary calls (ModelInfo, Tokenize, Detokenize)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

import grpc
from fastapi import Request

from llm_common.proto.v1 import engine_pb2 as pb
from llm_gateway import errors
from llm_gateway.engine_client import EnginePool, Lease, Metadata, NoEngine
from llm_gateway.errors import OpenAIError
from llm_gateway.responses import Choice

T = TypeVar("T")
# Engine answers worth trying on another engine, before any token was produced.
Started = tuple[Lease, pb.GenerateChunk | None]  # a call and its first chunk (None: ended)


class ClientWatch:
    """Cancels the engine calls when the HTTP client goes away before the response starts
    (queued, or waiting for a whole completion). Once a stream has started, Starlette's
    StreamingResponse watches for the disconnect and closes our generator."""

    def __init__(self, request: Request) -> None:
        self.gone = False
        self.leases: list[Lease] = []
        self._task = asyncio.create_task(self._wait(request))

    async def _wait(self, request: Request) -> None:
        # The body has been read: the next ASGI message is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        for lease in self.leases:
            lease.release()

    def stop(self) -> None:
        self._task.cancel()


async def gather_or_fail(aws: Iterable[Awaitable[T]]) -> list[T]:
    """Await all concurrently, results in order; the first failure cancels the others and is
    raised (so one refused choice does not wait for its siblings' generations)."""
    pending = list(aws)
    if len(pending) == 1:  # the common case: no task to schedule
        return [await pending[0]]
    tasks = [asyncio.ensure_future(a) for a in pending]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and (e := t.exception()) is not None:
                raise e
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Dispatcher:
    def __init__(self, engines: EnginePool, retry_after_s: int) -> None:
        self.engines, self.retry_after_s = engines, retry_after_s

    def _error(self, e: NoEngine | grpc.aio.AioRpcError, param: str) -> OpenAIError:
        if isinstance(e, NoEngine):
            return errors.unavailable(str(e))
        return errors.from_grpc(e, param, self.retry_after_s)

    async def model_info(self, metadata: Metadata) -> pb.ModelInfoResponse:
        """The served model and its LoRA adapters (cached by the pool)."""
        try:
            return await self.engines.model_info(metadata)
        except (NoEngine, grpc.aio.AioRpcError) as e:
            raise self._error(e, "model") from None

    async def unary(
        self, method: str, request: Any, metadata: Metadata, timeout_s: float, param: str
    ) -> Any:
        """A unary Engine RPC (Tokenize, Detokenize) on the least busy healthy engine;
        `param` names the input its INVALID_ARGUMENT blames."""
        try:
            return await self.engines.unary(method, request, metadata, timeout_s)
        except NoEngine as e:
            raise self._error(e, param) from None
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # an engine older than the RPC
                raise OpenAIError(
                    501, f"the engine does not implement {method}: upgrade it",
                    type="server_error", code="not_implemented",
                ) from None  # fmt: skip
            raise self._error(e, param) from None

    async def tokenize(
        self, request: pb.TokenizeRequest, metadata: Metadata, timeout_s: float, param: str
    ) -> list[int]:
        """Token ids of a text or conversation."""
        answer = await self.unary("Tokenize", request, metadata, timeout_s, param)
        return list(answer.token_ids)

    async def read(
        self, lease: Lease, watch: ClientWatch | None, param: str
    ) -> pb.GenerateChunk | None:
        """Next chunk, None at the end; engine errors become OpenAI errors."""
        try:
            chunk = await lease.call.read()
        except grpc.aio.AioRpcError as e:
            raise errors.from_grpc(e, param, self.retry_after_s) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if watch is None or not watch.gone or (task is not None and task.cancelling()):
                raise
            # 499 (nginx's "client closed request"): only the logs and metrics see it.
            raise OpenAIError(499, "the client closed the request", code="client_closed") from None
        return None if chunk is grpc.aio.EOF else chunk

    async def start(
        self, request: pb.GenerateRequest, metadata: Metadata, deadline: float,
        watch: ClientWatch, param: str,
    ) -> Started:  # fmt: skip
        """Start the generation on the least busy healthy engine and read its first chunk.
        An engine that refuses it before admitting it (queue full, shutting down, loading)
        hands it to the next one, once; any other failure is final (it may have run)."""
        refused: OpenAIError | None = None
        try:
            candidates = await self.engines.candidates()
        except NoEngine as e:
            raise errors.unavailable(str(e)) from None
        for ep in candidates[:2]:  # one other engine at most
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            lease = self.engines.lease(ep, request, metadata, remaining)
            watch.leases.append(lease)
            try:
                return lease, await self.read(lease, watch, param)
            except OpenAIError as e:
                lease.release()
                if not e.refused:  # it may have run: never run it twice
                    raise
                refused = e
            except BaseException:
                lease.release()
                raise
        if refused is not None:
            raise refused
        raise OpenAIError(504, "the engine did not answer in time", type="timeout", code="timeout")

    async def start_all(
        self, requests: list[pb.GenerateRequest], metadata: Metadata, deadline: float,
        watch: ClientWatch, param: str,
    ) -> list[Started]:  # fmt: skip
        """One call per request, concurrently; all started or none (the rest released)."""
        started: list[Started] = []

        async def one(request: pb.GenerateRequest) -> Started:
            s = await self.start(request, metadata, deadline, watch, param)
            started.append(s)
            return s

        try:
            return await gather_or_fail(one(r) for r in requests)
        except BaseException:
            for lease, _ in started:
                lease.release()
            raise

    async def generate_all(
        self, requests: list[pb.GenerateRequest], choices: list[Choice], metadata: Metadata,
        deadline: float, watch: ClientWatch, param: str, concurrency: int,
    ) -> None:  # fmt: skip
        """Run every call to its end into its choice, at most `concurrency` at once (a
        request of many prompts must not fill the engines' queues by itself)."""
        places = asyncio.Semaphore(concurrency)

        async def generate(request: pb.GenerateRequest, choice: Choice) -> None:
            async with places:
                lease, chunk = await self.start(request, metadata, deadline, watch, param)
                try:
                    while chunk is not None:
                        choice.add(chunk)
                        chunk = await self.read(lease, watch, param)
                finally:
                    lease.release()

        await gather_or_fail(generate(r, c) for r, c in zip(requests, choices, strict=True))

    async def token_texts(
        self, ids: list[int], context_length: int, request_id: str, metadata: Metadata,
        deadline: float, watch: ClientWatch,
    ) -> dict[int, str]:  # fmt: skip
        """The text of each token id. The engine has no Detokenize call, but scoring
        `[a, a, b, c, ...]` without generating names tokens a, b, c, ... in its prompt
        logprobs (every position after the first)."""
        unique = list(dict.fromkeys(ids))
        size = max(context_length - 2, 1)  # the part, its first id again, room for a token
        texts: dict[int, str] = {}
        for i in range(0, len(unique), size):
            part = unique[i : i + size]
            request = pb.GenerateRequest(
                request_id=f"{request_id}-detokenize",
                token_ids=pb.TokenIds(ids=[part[0], *part]),
                prompt_logprobs=0,
                stopping=pb.StoppingCriteria(max_tokens=0),
            )
            lease, chunk = await self.start(request, metadata, deadline, watch, "prompt")
            try:
                while chunk is not None:
                    texts.update((lp.token_id, lp.token) for lp in chunk.prompt_logprobs)
                    chunk = await self.read(lease, watch, "prompt")
            finally:
                lease.release()
        return texts
