"""The engine as a real process on 127.0.0.1 over real gRPC, serving the tiny checkpoint."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm.checkpoint import LoadedModel, load_checkpoint
from llm.inference import SamplingParams, generate, stream_generate
from llm_engine.jsonlog import read_announcement
from llm_engine.proto.v1 import engine_pb2 as pb
from llm_engine.proto.v1 import engine_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "shared"), str(REPO / "services")])}
MAX_QUEUE = 2
GREEDY = pb.SamplingParams(temperature=0)


@dataclass
class Engine:
    proc: subprocess.Popen
    port: int
    log: Path
    stub: pb_grpc.EngineStub
    channel: grpc.Channel

    def logs(self) -> list[dict]:
        return [
            json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")
        ]


def wait_serving(channel: grpc.Channel, timeout: float = 60) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.1)
    raise TimeoutError("engine did not become SERVING")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    cmd = [sys.executable, "-m", "llm_engine", "--checkpoint", tiny_checkpoint, "--port", "0",
           "--max-queue", str(MAX_QUEUE), "--threads", "1"]  # fmt: skip
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
    try:
        port = read_announcement(proc.stdout, "engine_listening", timeout=60)["port"]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        wait_serving(channel)
        yield Engine(proc, port, log, pb_grpc.EngineStub(channel), channel)
        channel.close()
        proc.terminate()
        assert proc.wait(timeout=20) == 0, "SIGTERM should stop the engine cleanly"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: str) -> LoadedModel:
    """The same checkpoint loaded in-process: what the engine's answers must equal."""
    return load_checkpoint(tiny_checkpoint)


def run(engine: Engine, **kwargs: object) -> list[pb.GenerateChunk]:
    return list(engine.stub.Generate(pb.GenerateRequest(**kwargs), timeout=30))


def ids_of(chunks: list[pb.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_health_and_model_info(engine: Engine, reference: LoadedModel) -> None:
    health = health_pb2_grpc.HealthStub(engine.channel)
    for service in ("", "llm.engine.v1.Engine"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    info = engine.stub.ModelInfo(pb.ModelInfoRequest())
    assert info.model_id == Path(reference.uri).parents[1].name == reference.name
    assert info.context_length == reference.config.max_seq_len
    assert info.vocab_size == reference.config.vocab_size
    assert info.n_params == reference.model.num_params()
    assert (info.slots, info.dtype, info.has_chat_template) == (1, "float32", True)


def test_generate_streams_the_library_greedy_tokens(engine: Engine, reference: LoadedModel) -> None:
    tok = reference.tokenizer
    prompt = "The "
    expected = generate(
        reference.model, tok.encode(prompt), max_new_tokens=24, sampling=SamplingParams(0)
    )
    assert tok.eos_id not in expected  # else the request would stop early; pick another prompt

    chunks = run(engine, text=prompt, sampling=GREEDY, stopping=pb.StoppingCriteria(max_tokens=24))
    assert len(chunks) > 1  # streamed, not one blob
    assert ids_of(chunks) == expected
    assert "".join(c.text for c in chunks) == tok.decode(expected)
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(tok.encode(prompt)), 24)
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])


def test_token_ids_input_with_logprobs(engine: Engine, reference: LoadedModel) -> None:
    prompt = reference.tokenizer.encode("def f(x):\n    return")
    expected = list(
        stream_generate(reference.model, prompt, max_new_tokens=8, sampling=SamplingParams(0))
    )
    chunks = run(engine, token_ids=pb.TokenIds(ids=prompt), sampling=GREEDY, logprobs=True,
                 stopping=pb.StoppingCriteria(max_tokens=8, ignore_eos=True))  # fmt: skip
    got = [(lp.token_id, lp.logprob) for c in chunks for lp in c.logprobs]
    assert [t for t, _ in got] == [t for t, _ in expected]
    for (_, logprob), (_, want) in zip(got, expected, strict=True):
        assert logprob == pytest.approx(want, abs=1e-4)
    assert all(
        lp.token == reference.tokenizer.decode([lp.token_id]) for c in chunks for lp in c.logprobs
    )


def test_chat_applies_the_template(engine: Engine, reference: LoadedModel) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    chat = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages])
    tok = reference.tokenizer
    want = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    tokenized = engine.stub.Tokenize(pb.TokenizeRequest(chat=chat, add_generation_prompt=True))
    assert list(tokenized.token_ids) == want
    chunks = run(engine, chat=chat, sampling=GREEDY, stopping=pb.StoppingCriteria(max_tokens=5))
    assert chunks[-1].usage.prompt_tokens == len(want)
    assert ids_of(chunks)[:5] == generate(
        reference.model, want, max_new_tokens=5, sampling=SamplingParams(0)
    )


def test_stop_string_and_stop_token(engine: Engine, reference: LoadedModel) -> None:
    free = run(engine, text="The ", sampling=GREEDY, stopping=pb.StoppingCriteria(max_tokens=30))
    text, ids = "".join(c.text for c in free), ids_of(free)
    stop = text[5:8]  # spans several one-character tokens
    chunks = run(
        engine,
        text="The ",
        sampling=GREEDY,
        stopping=pb.StoppingCriteria(max_tokens=30, stop=[stop]),
    )
    assert "".join(c.text for c in chunks) == text[: text.index(stop)]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP

    stop_id = ids[6]
    chunks = run(engine, text="The ", sampling=GREEDY,
                 stopping=pb.StoppingCriteria(max_tokens=30, stop_token_ids=[stop_id]))  # fmt: skip
    n = ids.index(stop_id) + 1
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens == n
    assert "".join(c.text for c in chunks) == reference.tokenizer.decode(ids[: n - 1])


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    def sampled(seed: int) -> list[int]:
        params = pb.SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        return ids_of(run(engine, text="The ", sampling=params, stopping=pb.StoppingCriteria(max_tokens=40, ignore_eos=True)))  # fmt: skip

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"text": "x", "stopping": pb.StoppingCriteria(max_tokens=-1)}, "stopping.max_tokens"),
        ({"text": "x", "sampling": pb.SamplingParams(temperature=-1)}, "sampling.temperature"),
        ({"text": "x", "sampling": pb.SamplingParams(top_p=1.5)}, "sampling.top_p"),
        ({"text": "x", "sampling": pb.SamplingParams(top_p=-0.1)}, "sampling.top_p"),
        ({"text": "x", "sampling": pb.SamplingParams(top_k=-2)}, "sampling.top_k"),
        ({"text": "x", "sampling": pb.SamplingParams(min_p=0.1)}, "sampling.min_p"),
        ({"text": ""}, "text"),
        ({}, "input"),
        ({"token_ids": pb.TokenIds(ids=[])}, "token_ids.ids"),
        ({"token_ids": pb.TokenIds(ids=[3, 100000])}, "token_ids.ids[1]"),
        ({"token_ids": pb.TokenIds(ids=[3, -1])}, "token_ids.ids[1]"),
        ({"text": "x" * 300}, "input"),
        ({"text": "x", "stopping": pb.StoppingCriteria(stop=["ok", ""])}, "stopping.stop[1]"),
        (
            {"text": "x", "stopping": pb.StoppingCriteria(stop_token_ids=[999999])},
            "stopping.stop_token_ids[0]",
        ),
        ({"chat": pb.ChatMessages()}, "chat"),
        (
            {"chat": pb.ChatMessages(messages=[pb.ChatMessage(role="wizard", content="x")])},
            "chat.messages[0].role",
        ),
        ({"text": "x", "top_logprobs": 3}, "top_logprobs"),
    ],
)
def test_invalid_arguments_name_the_field(engine: Engine, request_kwargs: dict, field: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        run(engine, **request_kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}: ")


def test_cancel_frees_the_slot(engine: Engine) -> None:
    stopping = pb.StoppingCriteria(max_tokens=0, ignore_eos=True)  # the whole context
    call = engine.stub.Generate(
        pb.GenerateRequest(request_id="to-cancel", text="The ", sampling=GREEDY, stopping=stopping)
    )
    next(call)
    next(call)
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED

    # The next request runs (the slot was freed, not leaked) ...
    after = run(engine, text="The ", sampling=GREEDY, stopping=pb.StoppingCriteria(max_tokens=3))
    assert after[-1].usage.completion_tokens == 3
    # ... and the scheduler stopped the cancelled one early instead of finishing it.
    deadline = time.monotonic() + 10
    while not (ends := [r for r in engine.logs() if r.get("request_id") == "to-cancel"
                        and r["event"] in ("request_cancelled", "request_finished")]):  # fmt: skip
        assert time.monotonic() < deadline, "no log line for the cancelled request"
        time.sleep(0.05)
    assert ends[0]["event"] == "request_cancelled"
    assert ends[0]["completion_tokens"] < 256 - len("The ")


def test_full_queue_answers_resource_exhausted_and_drops_nothing(engine: Engine) -> None:
    n = 8
    stopping = pb.StoppingCriteria(max_tokens=0, ignore_eos=True)

    async def one(stub: pb_grpc.EngineStub, i: int) -> grpc.StatusCode | int:
        try:
            chunks = [c async for c in stub.Generate(pb.GenerateRequest(text="The ", sampling=GREEDY, stopping=stopping), timeout=60)]  # fmt: skip
        except grpc.aio.AioRpcError as e:
            return e.code()
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        return chunks[-1].usage.completion_tokens

    async def burst() -> list[grpc.StatusCode | int]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
            stub = pb_grpc.EngineStub(channel)
            await channel.channel_ready()
            return await asyncio.gather(*(one(stub, i) for i in range(n)))

    results = asyncio.run(burst())
    rejected = [r for r in results if r == grpc.StatusCode.RESOURCE_EXHAUSTED]
    completed = [r for r in results if isinstance(r, int)]
    # One running + MAX_QUEUE waiting fit; the rest of a simultaneous burst must be refused.
    assert rejected, results
    assert len(rejected) + len(completed) == n, results  # nothing failed any other way
    assert len(completed) >= 1 + MAX_QUEUE
    assert all(c == 256 - len("The ") for c in completed)  # every accepted request ran fully
    assert run(engine, text="The ", sampling=GREEDY, stopping=pb.StoppingCriteria(max_tokens=2))


def test_unloadable_checkpoint_exits_with_a_clear_error(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "llm_engine",
        "--checkpoint",
        str(tmp_path / "missing"),
        "--port",
        "0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 1
    errors = [
        json.loads(line) for line in proc.stderr.splitlines() if '"model_load_failed"' in line
    ]
    assert errors and str(tmp_path / "missing") in errors[0]["error"]
