"""The CUDA paths CI cannot run: batching and prefix caching on the GPU, bf16, compiled
decode, bf16 + compiled training, DDP and FSDP under torchrun on a GPU (one GPU: NCCL
refuses two ranks on one device, so a multi-rank process group is not exercised here),
and the engine process serving on a GPU.

Skipped without CUDA. On a GPU machine: `pytest tests/gpu` (a few minutes).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.support import shrink, tiny_settings

from llm.config import ModelConfig
from llm.data.corpus import default_corpus
from llm.inference import BatchGenerator, Request, SamplingParams, generate
from llm.models.decoder import DecoderModel
from llm.training.data import build_data
from llm.training.distributed import DistInfo
from llm.training.run import run_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")
GREEDY = SamplingParams(temperature=0)


def _model(preset: str, dtype: torch.dtype = torch.float32) -> DecoderModel:
    torch.manual_seed(0)
    overrides = {} if preset.startswith("tiny") else shrink(preset)
    config = ModelConfig.from_preset(preset, **{**overrides, "max_seq_len": 128, "init_std": 0.2})
    return DecoderModel(config).to(CUDA, dtype).eval()


def _requests(vocab: int, n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    return [Request(p, GREEDY, rng.randint(1, 24), logprobs=True) for p in prompts]


def _clone(r: Request) -> Request:
    return Request(r.prompt_ids, r.sampling, r.max_new_tokens, r.stop_token_ids, r.logprobs)


def _run(model: DecoderModel, requests: list[Request], seed: int, **kw: object) -> dict:
    rng = random.Random(seed)
    batch = BatchGenerator(model, n_slots=4, **kw)
    waiting, out = list(requests), {id(r): [] for r in requests}
    while waiting or batch.active:
        while waiting and batch.free_slots and rng.random() < 0.5:
            batch.add(waiting.pop(0))
        for e in batch.step():
            out[id(e.request)].append(e.token_id)
    return out


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    # TF32 matmuls round to 10 mantissa bits: exact-token comparisons need full fp32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "deepseek-v2-lite", "mistral"])
@pytest.mark.parametrize("compile", [False, True])
def test_batched_equals_alone_on_cuda(preset: str, compile: bool) -> None:
    model = _model(preset)
    requests = _requests(model.config.vocab_size, 8, seed=1)
    together = _run(model, requests, seed=2, prefill_chunk=9, compile=compile)
    for r in requests:
        batch = BatchGenerator(model, n_slots=4, prefill_chunk=9)
        single = _clone(r)
        batch.add(single)
        alone = []
        while batch.active:
            alone += [e.token_id for e in batch.step()]
        assert together[id(r)] == alone
        want = generate(model, r.prompt_ids, max_new_tokens=r.max_new_tokens, sampling=GREEDY,
                        stop_token_ids=())  # fmt: skip
        assert alone == want


def test_prefix_cache_on_cuda_gives_cold_tokens() -> None:
    model = _model("tiny")
    rng = random.Random(3)
    shared = [rng.randrange(model.config.vocab_size) for _ in range(40)]
    requests = [Request([*shared[: rng.randint(20, 40)], i], GREEDY, 10) for i in range(8)]
    together = _run(model, requests, seed=4, prefill_chunk=16, block_size=8)
    assert sum(r.cached for r in requests) > 0
    for r in requests:
        want = generate(model, r.prompt_ids, max_new_tokens=10, sampling=GREEDY,
                        stop_token_ids=())  # fmt: skip
        assert together[id(r)] == want


def test_bf16_logits_follow_fp32() -> None:
    fp32, bf16 = _model("tiny"), _model("tiny", torch.bfloat16)
    tokens = torch.randint(0, fp32.config.vocab_size, (2, 50), device=CUDA)
    with torch.no_grad():
        a, b = fp32(tokens), bf16(tokens).float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    events = _run(bf16, _requests(bf16.config.vocab_size, 6, seed=5), seed=6, compile=True)
    assert all(len(tokens) > 0 for tokens in events.values())


def test_bf16_compiled_training_learns(tmp_path: Path) -> None:
    settings = tiny_settings(
        tmp_path / "run", max_steps=200,
        training={"device": "cuda"}, optimization={"precision": "bf16", "compile": True},
    )  # fmt: skip
    tok, data = build_data(settings)
    engine = run_training(settings, tok, data, DistInfo(0, 0, 1, CUDA))
    assert next(engine.model.parameters()).device.type == "cuda"
    assert engine.last_val_loss < 3.0, engine.last_val_loss


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_on_cuda(tmp_path: Path, strategy: str) -> None:
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(default_corpus()[:40]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1",
         "-m", "llm_trainer", "--data.source", str(corpus), "--model.preset", "tiny",
         "--distributed.strategy", strategy, "--training.device", "cuda",
         "--optimization.precision", "bf16", "--training.max-steps", "40",
         "--training.batch-size", "8", "--training.block-size", "64",
         "--training.eval-interval", "40", "--training.eval-batches", "2",
         "--checkpoint.run-dir", str(tmp_path / "run"), "--checkpoint.interval", "20"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 40 and summary["val_loss"] < 4.0


def test_engine_serves_on_cuda(tiny_checkpoint: str, tmp_path: Path) -> None:
    from tests.integration.test_engine import GREEDY as PB_GREEDY
    from tests.integration.test_engine import ids_of, start_engine

    from llm.checkpoint import load_checkpoint
    from llm_common.proto.v1 import engine_pb2 as pb

    reference = load_checkpoint(tiny_checkpoint, device="cuda")
    prompt = "The "
    want = generate(reference.model, reference.tokenizer.encode(prompt), max_new_tokens=24,
                    sampling=GREEDY)  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join(sys.path)}  # packages may come from PYTHONPATH here
    for flags in (["--device", "cuda"], ["--device", "cuda", "--compile"]):
        with start_engine(tiny_checkpoint, tmp_path / "engine.log", *flags, env=env) as engine:
            info = engine.stub.ModelInfo(pb.ModelInfoRequest())
            assert info.dtype == "float32"
            request = pb.GenerateRequest(
                text=prompt, sampling=PB_GREEDY, stopping=pb.StoppingCriteria(max_tokens=24)
            )
            assert ids_of(list(engine.stub.Generate(request, timeout=120))) == want, flags
    with start_engine(tiny_checkpoint, tmp_path / "bf16.log", "--device", "cuda", "--dtype",
                      "bfloat16", env=env) as engine:  # fmt: skip
        assert engine.stub.ModelInfo(pb.ModelInfoRequest()).dtype == "bfloat16"
        request = pb.GenerateRequest(
            text=prompt, sampling=PB_GREEDY, stopping=pb.StoppingCriteria(max_tokens=24)
        )
        assert len(ids_of(list(engine.stub.Generate(request, timeout=120)))) == 24
