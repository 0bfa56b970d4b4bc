"""`GenerateMany` for the gateway tests' engine doubles: each generation on the stream runs
the double's own `Generate` (a task on an aio server, a thread on a sync one), its chunks
and the status it aborts with relayed tagged with the generation's id, as the engine does."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import grpc

from llm_common.proto.v1 import engine_pb2 as pb


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class ItemContext:
    """What a double's Generate uses of its servicer context, for one generation."""

    def __init__(self, metadata: Mapping[str, str], aio: bool) -> None:
        self.metadata, self.aio = dict(metadata), aio

    def abort(self, code: grpc.StatusCode, details: str) -> Any:
        if self.aio:

            async def abort() -> None:
                raise Abort(code, details)

            return abort()
        raise Abort(code, details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.metadata.items())


def _ended(item_id: int, e: Abort) -> pb.GenerateManyResponse:
    done = pb.GenerateManyChunk(id=item_id, code=e.code.value[0], message=e.details)
    return pb.GenerateManyResponse(chunks=[done])


def _chunk(item_id: int, chunk: pb.GenerateChunk) -> pb.GenerateManyResponse:
    return pb.GenerateManyResponse(chunks=[pb.GenerateManyChunk(id=item_id, chunk=chunk)])


async def generate_many_aio(
    generate: Callable[..., AsyncIterator[pb.GenerateChunk]],
    request_iterator: AsyncIterator[pb.GenerateManyRequest],
) -> AsyncIterator[pb.GenerateManyResponse]:
    out: asyncio.Queue[pb.GenerateManyResponse | None] = asyncio.Queue()
    tasks: dict[int, asyncio.Task[None]] = {}

    async def run(item: pb.GenerateManyRequest) -> None:
        try:
            async for chunk in generate(item.generate, ItemContext(item.metadata, aio=True)):
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


def generate_many_sync(
    generate: Callable[..., Iterator[pb.GenerateChunk]],
    request_iterator: Iterator[pb.GenerateManyRequest],
) -> Iterator[pb.GenerateManyResponse]:
    out: queue.Queue[pb.GenerateManyResponse | None] = queue.Queue()

    def run(item: pb.GenerateManyRequest) -> None:
        # Generate runs to its end first, so that whatever it counts in `finally` is
        # counted out before the gateway learns the generation finished.
        responses = []
        try:
            for chunk in generate(item.generate, ItemContext(item.metadata, aio=False)):
                responses.append(_chunk(item.id, chunk))
        except Abort as e:
            responses.append(_ended(item.id, e))
        for r in responses:
            out.put(r)

    def read() -> None:
        try:
            for item in request_iterator:
                if not item.cancel:
                    threading.Thread(target=run, args=(item,), daemon=True).start()
        except grpc.RpcError:
            pass  # the stream was cancelled (the gateway went away)
        finally:
            out.put(None)

    threading.Thread(target=read, daemon=True).start()
    while (response := out.get()) is not None:
        yield response
