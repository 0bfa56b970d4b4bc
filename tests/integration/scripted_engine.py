"""A scripted engine for in-process gateway tests: a real (sync) gRPC server on 127.0.0.1
whose Generate answers according to the prompt text and remembers every request."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
from tests.integration.many import generate_many_sync

from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.proto.v1 import engine_pb2_grpc as pb_grpc

MODEL = "stub-model"


class ScriptedEngine(pb_grpc.EngineServicer):
    """Answers Generate according to the prompt text, and remembers the requests.

    Tokens are characters (id = code point); a conversation tokenizes to its contents and an
    end-of-turn token (0), and token ids are read as the text they spell. "say:X" generates
    X, anything else "ok", as one token ("nap:X" after 50 ms); logprobs and prompt logprobs are made up but shaped as the engine's.
    Tokenizing "old-engine" answers as an engine from before Tokenize; Detokenize is unknown."""

    def __init__(self) -> None:
        self.last: pb.GenerateRequest | None = None
        self.requests: list[pb.GenerateRequest] = []
        self.tokenized: list[pb.TokenizeRequest] = []
        self.active = self.peak = 0  # Generate calls running now, and at most so far
        self._lock = threading.Lock()

    def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfoResponse:
        return pb.ModelInfoResponse(model_id=MODEL, context_length=64, created=1700000000)

    def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.ServicerContext
    ) -> pb.TokenizeResponse:
        with self._lock:
            self.tokenized.append(request)
        if request.text == "old-engine":
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        if request.WhichOneof("input") == "chat":
            text = "".join(m.content for m in request.chat.messages)
            return pb.TokenizeResponse(token_ids=[*map(ord, text), 0])
        return pb.TokenizeResponse(token_ids=[*map(ord, request.text)])

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateChunk]:
        with self._lock:
            self.last = request
            self.requests.append(request)
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            yield from self._generate(request, context)
        finally:
            with self._lock:
                self.active -= 1

    def _generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateChunk]:
        kind = request.WhichOneof("input")
        if kind == "token_ids":
            text = "".join(map(chr, request.token_ids.ids))
        else:
            text = request.text if kind == "text" else ""
        if text.startswith("abort:"):
            code = grpc.StatusCode[text.removeprefix("abort:")]
            context.abort(code, "stopping.max_tokens: must be >= 0, got -3")
        if text == "slow":
            time.sleep(2)
        if text.startswith("nap:"):
            time.sleep(0.05)
        if text == "midstream":
            yield pb.GenerateChunk(token_ids=[1], text="partial")
            context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is shutting down")
        ids = [ord(c) for c in text] if kind == "text" else list(request.token_ids.ids)
        first = pb.GenerateChunk()
        if request.HasField("prompt_logprobs"):
            for i, t in enumerate(ids[1:], 1):
                lp = first.prompt_logprobs.add(token_id=t, token=chr(t), logprob=-float(i))
                for _ in range(request.prompt_logprobs):
                    lp.top.add(token_id=ord("z"), token="z", logprob=-0.25)
        generated = 0
        if not (request.stopping.HasField("max_tokens") and request.stopping.max_tokens == 0):
            out = text.split(":", 1)[1] if text.startswith(("say:", "nap:")) else "ok"
            first.token_ids.append(5)
            first.text = out
            generated = 1
            if request.logprobs:
                lp = first.logprobs.add(token_id=5, token=out, logprob=-0.5)
                alternatives = [(5, out, -0.5), (6, "no", -1.5), (7, "yes", -2.5)]
                for t, token, logprob in alternatives[: request.top_logprobs]:
                    lp.top.add(token_id=t, token=token, logprob=logprob)
        yield first
        yield pb.GenerateChunk(
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(
                prompt_tokens=3 if kind == "chat" else len(ids), completion_tokens=generated
            ),
        )

    def GenerateMany(
        self, request_iterator: Iterator[pb.GenerateManyRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateManyResponse]:
        return generate_many_sync(self.Generate, request_iterator)


@contextmanager
def scripted_engine() -> Iterator[tuple[int, ScriptedEngine]]:
    """(port, servicer) of a running ScriptedEngine."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    servicer = ScriptedEngine()
    pb_grpc.add_EngineServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(0)
