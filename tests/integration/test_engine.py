"""The engine as a real process on 127.0.0.1 over real gRPC, serving the tiny checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tests.support import free_port, stop_process

from llm.checkpoint import LoadedModel, load_checkpoint
from llm.inference import SamplingParams, generate, stream_generate
from llm_common.logs import read_announcement
from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.proto.v1 import engine_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "shared"), str(REPO / "services")])}
MAX_QUEUE = 2
SLOTS = 2
GREEDY = pb.SamplingParams(temperature=0)


@dataclass
class Engine:
    proc: subprocess.Popen
    port: int
    log: Path
    stub: pb_grpc.EngineStub
    channel: grpc.Channel
    metrics_port: int = 0

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of the engine's /metrics."""
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics").read()
        return {
            s.name: s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
            if not s.labels
        }

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


@contextlib.contextmanager
def start_engine(
    checkpoint: str, log: Path, *flags: str, env: dict | None = None,
    tls: grpc.ChannelCredentials | None = None,
) -> Iterator[Engine]:  # fmt: skip
    metrics_port = free_port()
    cmd = [sys.executable, "-m", "llm_engine", "--checkpoint", checkpoint, "--port", "0",
           "--max-queue", str(MAX_QUEUE), "--slots", str(SLOTS), "--threads", "1",
           "--metrics-port", str(metrics_port), *flags]  # fmt: skip
    with log.open("w") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, env={**ENV, **(env or {})}
        )
    try:
        port = read_announcement(proc.stdout, "engine_listening", timeout=60)["port"]
        address = f"127.0.0.1:{port}"
        channel = grpc.secure_channel(address, tls) if tls else grpc.insecure_channel(address)
        wait_serving(channel)
        yield Engine(proc, port, log, pb_grpc.EngineStub(channel), channel, metrics_port)
        channel.close()
    finally:
        if proc.poll() is None:
            stop_process(proc)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    with start_engine(tiny_checkpoint, log) as running:
        yield running
        running.proc.terminate()
        assert running.proc.wait(timeout=20) == 0, "SIGTERM should stop the engine cleanly"


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
    for service in ("", "llm.engine.v1.Engine", "liveness"):  # the chart's probes
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
    assert (info.slots, info.dtype, info.has_chat_template) == (SLOTS, "float32", True)


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
        ({"text": "x", "sampling": pb.SamplingParams(min_p=1.5)}, "sampling.min_p"),
        (
            {"text": "x", "sampling": pb.SamplingParams(repetition_penalty=-1)},
            "sampling.repetition_penalty",
        ),
        (
            {"text": "x", "sampling": pb.SamplingParams(presence_penalty=3)},
            "sampling.presence_penalty",
        ),
        (
            {"text": "x", "sampling": pb.SamplingParams(frequency_penalty=float("nan"))},
            "sampling.frequency_penalty",
        ),
        ({"text": ""}, "text"),
        ({}, "input"),
        ({"token_ids": pb.TokenIds(ids=[])}, "token_ids.ids"),
        ({"token_ids": pb.TokenIds(ids=[3, 100000])}, "token_ids.ids[1]"),
        ({"token_ids": pb.TokenIds(ids=[3, -1])}, "token_ids.ids[1]"),
        ({"text": "x" * 300}, "input"),
        ({"text": "x", "stopping": pb.StoppingCriteria(stop=["ok", ""])}, "stopping.stop[1]"),
        (
            {"text": "x", "stopping": pb.StoppingCriteria(stop=["ok", "s" * 1025])},
            "stopping.stop[1]",
        ),
        (
            {"text": "x", "stopping": pb.StoppingCriteria(stop_token_ids=[999999])},
            "stopping.stop_token_ids[0]",
        ),
        ({"chat": pb.ChatMessages()}, "chat"),
        (
            {"chat": pb.ChatMessages(messages=[pb.ChatMessage(role="wizard", content="x")])},
            "chat.messages[0].role",
        ),
        ({"text": "x", "top_logprobs": 21}, "top_logprobs"),
        ({"text": "x", "top_logprobs": -1}, "top_logprobs"),
        (
            {"text": "x", "sampling": pb.SamplingParams(logit_bias={5: 1, 100000: 1})},
            "sampling.logit_bias[100000]",
        ),
        (
            {"text": "x", "sampling": pb.SamplingParams(logit_bias={5: 100.5})},
            "sampling.logit_bias[5]",
        ),
        (
            {"text": "x", "sampling": pb.SamplingParams(logit_bias={5: float("inf")})},
            "sampling.logit_bias[5]",
        ),
        (
            {"text": "x", "structured_output": pb.StructuredOutput(json_schema="{")},
            "structured_output.json_schema",
        ),
        (
            {"text": "x", "structured_output": pb.StructuredOutput(json_schema='{"not": {}}')},
            "structured_output.json_schema",
        ),
        ({"text": "x", "structured_output": pb.StructuredOutput()}, "structured_output"),
    ],
)
def test_invalid_arguments_name_the_field(engine: Engine, request_kwargs: dict, field: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        run(engine, **request_kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}: ")


def test_structured_output_is_schema_valid_json(engine: Engine, reference: LoadedModel) -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
            "ok": {"type": "boolean"},
        },
        "required": ["n", "ok"],
        "additionalProperties": False,
    }
    chunks = run(
        engine, text="Answer: ", sampling=pb.SamplingParams(temperature=1.0, seed=3),
        structured_output=pb.StructuredOutput(json_schema=json.dumps(schema)),
    )  # fmt: skip
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    document = json.loads("".join(c.text for c in chunks))
    assert set(document) == {"n", "ok"} and 0 <= document["n"] <= 9


def test_cancel_frees_the_slot(engine: Engine) -> None:
    stopping = pb.StoppingCriteria(ignore_eos=True)  # the whole context
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
    stopping = pb.StoppingCriteria(ignore_eos=True)

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
    # MAX_QUEUE waiting (plus those the scheduler moved into the SLOTS meanwhile) fit; the
    # rest of a simultaneous burst is refused.
    assert rejected, results
    assert len(rejected) + len(completed) == n, results  # nothing failed any other way
    assert len(completed) >= MAX_QUEUE
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


def test_max_model_len_caps_the_context_and_the_kv_cache(
    tiny_checkpoint: str, reference: LoadedModel, tmp_path: Path
) -> None:
    cfg = reference.config
    with start_engine(tiny_checkpoint, tmp_path / "engine.log", "--max-model-len", "24") as eng:
        assert eng.stub.ModelInfo(pb.ModelInfoRequest()).context_length == 24
        ids = reference.tokenizer.encode("The quick brown fox ")[:20]
        chunks = run(eng, token_ids=pb.TokenIds(ids=ids), sampling=GREEDY)  # no max_tokens
        assert len(ids_of(chunks)) <= 4 and chunks[-1].finish_reason in (
            pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP,
        )  # fmt: skip
        want = generate(reference.model, ids, max_new_tokens=4, sampling=SamplingParams(0),
                        stop_token_ids=reference.tokenizer.stop_ids)  # fmt: skip
        assert ids_of(chunks) == want
        with pytest.raises(grpc.RpcError) as e:
            run(eng, token_ids=pb.TokenIds(ids=[ids[0]] * 24), sampling=GREEDY)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "context length is 24" in e.value.details()
        (kv,) = [r for r in eng.logs() if r.get("event") == "kv_cache"]
        head_dim = cfg.head_dim or cfg.dim // cfg.n_heads
        per_slot = cfg.n_layers * 2 * (cfg.n_kv_heads or cfg.n_heads) * head_dim * 24 * 4
        assert kv["bytes"] == (SLOTS + 1) * per_slot  # the slots and one scratch row

    too_long = str(cfg.max_seq_len + 1)
    cmd = [sys.executable, "-m", "llm_engine", "--checkpoint", tiny_checkpoint, "--port", "0",
           "--max-model-len", too_long]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 1 and f"max_model_len={too_long}" in proc.stderr


def test_the_kv_cache_is_sized_to_the_memory_it_may_take(
    tiny_checkpoint: str, reference: LoadedModel, tmp_path: Path
) -> None:
    """No --max-model-len: the model's context, capped to what --kv-cache-gib holds (a
    multiple of 16 tokens); an asked-for context that does not fit fails at start, saying
    what it needs."""
    cfg = reference.config
    head_dim = cfg.head_dim or cfg.dim // cfg.n_heads
    per_token = (SLOTS + 1) * cfg.n_layers * 2 * (cfg.n_kv_heads or cfg.n_heads) * head_dim * 4
    assert cfg.max_seq_len > 40
    gib = str(per_token * 40 / 2**30)  # room for 40 tokens: 32 served
    with start_engine(tiny_checkpoint, tmp_path / "e.log", "--kv-cache-gib", gib) as eng:
        assert eng.stub.ModelInfo(pb.ModelInfoRequest()).context_length == 32
        (capped,) = [r for r in eng.logs() if r.get("event") == "max_model_len_capped"]
        assert capped["max_model_len"] == 32 and capped["model_context"] == cfg.max_seq_len
        (kv,) = [r for r in eng.logs() if r.get("event") == "kv_cache"]
        assert kv["bytes"] == per_token * 32
    cmd = [sys.executable, "-m", "llm_engine", "--checkpoint", tiny_checkpoint, "--port", "0",
           "--kv-cache-gib", gib, "--max-model-len", "48", "--slots", str(SLOTS)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 1
    needs = f"{per_token * 48 / 2**30:.3g} GiB"
    assert f"KV cache for {SLOTS} slots x 48 tokens needs {needs}" in proc.stderr, proc.stderr
    assert "at most 32 fits" in proc.stderr


def _stream(port: int, request: pb.GenerateRequest, timeout: float = 60) -> list:
    async def go() -> list:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EngineStub(channel)
            return [c async for c in stub.Generate(request, timeout=timeout)]

    return asyncio.run(go())


def test_concurrent_requests_equal_each_alone(engine: Engine, reference: LoadedModel) -> None:
    """Requests with different prompts, lengths and parameters arriving at different times
    share the slots; each one's tokens equal the same request run alone."""
    tok = reference.tokenizer
    cases = [
        ("The ", GREEDY, 20),
        ("def f(x):", pb.SamplingParams(temperature=0.9, top_k=20, seed=3), 30),
        ("class A:", pb.SamplingParams(temperature=0, frequency_penalty=1.5), 25),
        ("# ", pb.SamplingParams(temperature=1.0, min_p=0.05, presence_penalty=0.5, repetition_penalty=1.3, seed=5), 18),
    ]  # fmt: skip
    assert len(cases) <= SLOTS + MAX_QUEUE  # all of them fit: none is refused

    def request(i: int) -> pb.GenerateRequest:
        text, sampling, n = cases[i]
        return pb.GenerateRequest(text=text, sampling=sampling, top_logprobs=2,
                                  stopping=pb.StoppingCriteria(max_tokens=n, ignore_eos=True))  # fmt: skip

    alone = [ids_of(_stream(engine.port, request(i))) for i in range(len(cases))]

    async def together() -> list[list[int]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
            stub = pb_grpc.EngineStub(channel)

            async def one(i: int) -> list[int]:
                await asyncio.sleep(0.01 * i)  # staggered arrivals
                return ids_of([c async for c in stub.Generate(request(i), timeout=60)])

            return await asyncio.gather(*(one(i) for i in range(len(cases))))

    assert asyncio.run(together()) == alone
    assert alone[0] == generate(reference.model, tok.encode("The "), max_new_tokens=20,
                                sampling=SamplingParams(0))  # fmt: skip
    penalised, plain = alone[2], ids_of(run(engine, text="class A:", sampling=GREEDY,
                                            stopping=pb.StoppingCriteria(max_tokens=25, ignore_eos=True)))  # fmt: skip
    assert penalised != plain  # the penalty changed greedy decoding
    assert max(penalised.count(t) for t in set(penalised)) <= max(
        plain.count(t) for t in set(plain)
    )


def test_top_logprobs_are_consistent(engine: Engine) -> None:
    chunks = run(engine, text="The ", sampling=GREEDY, top_logprobs=3,
                 stopping=pb.StoppingCriteria(max_tokens=6, ignore_eos=True))  # fmt: skip
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert len(logprobs) == 6
    for lp in logprobs:
        assert len(lp.top) == 3
        assert lp.top[0].token_id == lp.token_id  # greedy took the most likely token
        assert lp.top[0].logprob == pytest.approx(lp.logprob)
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
        assert lp.top[1].token  # decoded text of the alternative


def test_deadline_frees_the_slot_and_metrics_report_it(engine: Engine) -> None:
    stopping = pb.StoppingCriteria(ignore_eos=True)
    with pytest.raises(grpc.RpcError) as e:
        for _ in engine.stub.Generate(
            pb.GenerateRequest(text="The ", sampling=GREEDY, stopping=stopping), timeout=0.05
        ):
            time.sleep(0.02)  # a slow reader: the deadline passes mid-stream
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while (m := engine.metrics())["llm_engine_active_slots"] != 0:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m["llm_engine_queue_depth"] == 0
    assert m["llm_engine_time_to_first_token_seconds_count"] >= 1
    assert m["llm_engine_decode_tokens_total"] > 0 and m["llm_engine_prefill_tokens_total"] > 0


def test_sigterm_drains_running_requests(tiny_checkpoint: str, tmp_path: Path) -> None:
    with start_engine(tiny_checkpoint, tmp_path / "engine.log",
                      env={"LLM_ENGINE_SHUTDOWN_GRACE_S": "30"}) as running:  # fmt: skip
        stopping = pb.StoppingCriteria(ignore_eos=True)  # the whole context
        stream = running.stub.Generate(
            pb.GenerateRequest(text="The ", sampling=GREEDY, stopping=stopping), timeout=60
        )
        first = next(stream)
        running.proc.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(running.channel)
        deadline = time.monotonic() + 10
        while True:  # readiness turns NOT_SERVING while the stream still runs
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            except grpc.RpcError:
                break  # already gone: the stream below must still have finished
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as refused:
            list(running.stub.Generate(pb.GenerateRequest(text="x", sampling=GREEDY), timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert len(ids_of([first, *rest])) == 256 - len("The ")
        assert running.proc.wait(timeout=30) == 0


def test_prompt_logprobs_score_the_prompt(engine: Engine, reference: LoadedModel) -> None:
    """max_tokens=0 with prompt_logprobs: what evaluation harnesses use to score text."""
    import torch

    prompt = reference.tokenizer.encode("def f(x):\n    return x")
    chunks = run(engine, token_ids=pb.TokenIds(ids=prompt), sampling=GREEDY, prompt_logprobs=1,
                 stopping=pb.StoppingCriteria(max_tokens=0))  # fmt: skip
    chunk = chunks[0]  # the prompt's logprobs come first
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH and not ids_of(chunks)
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(prompt), 0)
    reference.model.clear_cache()
    with torch.no_grad():
        want = torch.log_softmax(reference.model(torch.tensor([prompt]))[0, :-1], dim=-1)
    assert [lp.token_id for lp in chunk.prompt_logprobs] == prompt[1:]
    for i, lp in enumerate(chunk.prompt_logprobs):
        assert lp.logprob == pytest.approx(float(want[i, prompt[i + 1]]), abs=1e-4)
        assert lp.top[0].token_id == int(want[i].argmax())
    # Unset max_tokens still means "up to the context"; prompt_logprobs come first.
    chunks = run(engine, text="The ", sampling=GREEDY, prompt_logprobs=0,
                 stopping=pb.StoppingCriteria(max_tokens=2, ignore_eos=True))  # fmt: skip
    assert len(chunks[0].prompt_logprobs) == len(reference.tokenizer.encode("The ")) - 1
    assert ids_of(chunks) and chunks[-1].usage.completion_tokens == 2


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_bans_and_forces_tokens(
    engine: Engine, reference: LoadedModel, temperature: float
) -> None:
    def ids(bias: dict[int, float], **kwargs: object) -> list[int]:
        params = pb.SamplingParams(temperature=temperature, seed=3, logit_bias=bias)
        stopping = pb.StoppingCriteria(max_tokens=30, ignore_eos=True)
        return ids_of(run(engine, text="The ", sampling=params, stopping=stopping, **kwargs))

    free = ids({})
    common = max(set(free), key=free.count)  # the token this generation uses most
    banned = ids({common: -100})
    assert common not in banned and len(banned) == 30
    rare = reference.tokenizer.encode("Z")[0]
    assert rare not in free
    chunks = run(engine, text="The ", logprobs=True,
                 sampling=pb.SamplingParams(temperature=temperature, seed=3, logit_bias={rare: 100}),
                 stopping=pb.StoppingCriteria(max_tokens=5, ignore_eos=True))  # fmt: skip
    assert ids_of(chunks) == [rare] * 5
    # Logprobs stay the model's own: the forced token is as unlikely as it ever was.
    assert chunks[0].logprobs[0].logprob < -1
    assert ids({}) == free  # the bias ended with its request


def test_a_request_from_before_logit_bias_still_generates(engine: Engine) -> None:
    """An old client's GenerateRequest (a schema without the new fields, its own pool)
    reaches the engine as bytes and generates what a new client's does."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    schema = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(schema)
    sampling = next(m for m in schema.message_type if m.name == "SamplingParams")
    fields = [f for f in sampling.field if f.name != "logit_bias"]
    del sampling.field[:]
    sampling.field.extend(fields)
    del sampling.nested_type[:]  # the map's entry type
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    old = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("llm.engine.v1.GenerateRequest")
    )
    assert "logit_bias" not in old.DESCRIPTOR.fields_by_name["sampling"].message_type.fields_by_name
    request = old(text="The ")
    request.sampling.temperature = 1.0
    request.sampling.seed = 5
    request.stopping.max_tokens = 12
    request.stopping.ignore_eos = True
    generate = engine.channel.unary_stream(
        "/llm.engine.v1.Engine/Generate", response_deserializer=pb.GenerateChunk.FromString
    )
    chunks = list(generate(request.SerializeToString(), timeout=30))
    new = run(engine, text="The ", sampling=pb.SamplingParams(temperature=1.0, seed=5),
              stopping=pb.StoppingCriteria(max_tokens=12, ignore_eos=True))  # fmt: skip
    assert ids_of(chunks) == ids_of(new) and len(ids_of(chunks)) == 12


def test_detokenize_inverts_tokenize(engine: Engine, reference: LoadedModel) -> None:
    tok = reference.tokenizer
    text = "def f(x):\n    return x"
    ids = list(engine.stub.Tokenize(pb.TokenizeRequest(text=text)).token_ids)
    assert ids == tok.encode(text)
    assert engine.stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text == text
    # Special tokens show unless skipped (a round trip of a chat's ids keeps its markers).
    with_eos = pb.DetokenizeRequest(token_ids=[*ids, tok.eos_id])
    assert engine.stub.Detokenize(with_eos).text == tok.decode([*ids, tok.eos_id], False) != text
    with_eos.skip_special_tokens = True
    assert engine.stub.Detokenize(with_eos).text == text
    # The char tokenizer has no BOS: add_special_tokens adds nothing.
    asked = pb.TokenizeRequest(text=text, add_special_tokens=True)
    assert list(engine.stub.Tokenize(asked).token_ids) == ids
    assert engine.stub.Detokenize(pb.DetokenizeRequest()).text == ""
    with pytest.raises(grpc.RpcError) as e:
        engine.stub.Detokenize(pb.DetokenizeRequest(token_ids=[3, 100000]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("token_ids[1]: ")


def test_liveness_serves_before_the_model_is_loaded() -> None:
    """The chart's liveness probe asks "liveness": SERVING while the model loads, when
    readiness ("" and the Engine service) is still NOT_SERVING."""
    from llm_engine.server import start_engine as start_server

    async def go() -> list[int]:
        engine = await start_server("127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                return [
                    (await health.Check(health_pb2.HealthCheckRequest(service=s))).status
                    for s in ("liveness", "", "llm.engine.v1.Engine")
                ]
        finally:
            await engine.stop(0)

    S = health_pb2.HealthCheckResponse
    assert asyncio.run(go()) == [S.SERVING, S.NOT_SERVING, S.NOT_SERVING]
