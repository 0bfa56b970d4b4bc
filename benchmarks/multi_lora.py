"""Decode throughput of 16 streams spread over 4 LoRA adapters against 16 streams on the
base, in one run, through `BatchGenerator` (one decode step for all 16 rows either way).

Both runs serve the same model wrapped for 4 adapters (`AdapterSet`, rank `--rank` on
every linear layer): the base's rows use adapter index 0, so the difference is what the
per-row low-rank products cost, not the wrapping. A plain model without LoRA layers is
measured too, as the floor. Decode tokens/s counts new tokens after each stream's first,
best of `--repeats`.

Usage: PYTHONPATH=shared .venv/bin/python benchmarks/multi_lora.py
       [--preset tiny] [--device cpu] [--new-tokens 32] [--rank 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from llm.config import ModelConfig
from llm.core.lora import apply_lora
from llm.inference import BatchGenerator, Request, SamplingParams
from llm.inference.adapters import AdapterSet
from llm.interop.peft import save_adapter
from llm.models.decoder import DecoderModel

STREAMS, ADAPTERS, PROMPT_LEN = 16, 4, 16


def decode_tok_s(batch: BatchGenerator, adapters: list[int], new: int, vocab: int) -> float:
    """All streams at once; decode tokens/s after every stream's first token."""
    g = torch.Generator().manual_seed(0)
    requests = [
        Request(torch.randint(vocab, (PROMPT_LEN,), generator=g).tolist(),
                SamplingParams(temperature=0), new, adapter=a)
        for a in adapters
    ]  # fmt: skip
    for r in requests:
        batch.add(r)
    while any(r.generated == 0 for r in requests):
        batch.step()
    start, done = time.perf_counter(), sum(r.generated for r in requests)
    while batch.active:
        batch.step()
    if batch.model.embed_tokens.weight.is_cuda:
        torch.cuda.synchronize()
    return (sum(r.generated for r in requests) - done) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = ModelConfig.from_preset(args.preset)
    base = DecoderModel(config).to(args.device).eval()
    vocab = config.vocab_size

    served = copy.deepcopy(base)
    adapters = AdapterSet(served, max_loras=ADAPTERS, max_rank=args.rank)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(ADAPTERS):
            model = copy.deepcopy(base).cpu()
            apply_lora(model, ["all-linear"], r=args.rank, alpha=2.0 * args.rank)
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    torch.nn.init.normal_(p, std=0.02)
            save_adapter(model, Path(tmp, f"a{i}"))
            adapters.load(f"a{i}", Path(tmp, f"a{i}"))

    runs = {
        "plain model, no LoRA layers": (base, None, [0] * STREAMS),
        f"base rows of a {ADAPTERS}-adapter model": (served, adapters, [0] * STREAMS),
        f"{STREAMS} streams over {ADAPTERS} adapters": (
            served, adapters, [1 + i % ADAPTERS for i in range(STREAMS)],
        ),
    }  # fmt: skip
    print(f"{args.preset} on {args.device}, {STREAMS} streams, rank {args.rank}, "
          f"{args.new_tokens} new tokens each; decode tokens/s (best of {args.repeats}):")  # fmt: skip
    results = {}
    for label, (model, lora, ids) in runs.items():
        batch = BatchGenerator(model, n_slots=STREAMS, adapters=lora)
        with torch.inference_mode():
            results[label] = max(
                decode_tok_s(batch, ids, args.new_tokens, vocab) for _ in range(args.repeats)
            )
    base_rate = results[f"base rows of a {ADAPTERS}-adapter model"]
    for label, rate in results.items():
        print(f"  {label:<36} {rate:10.1f} tok/s   {rate / base_rate:5.2f}x the base rows")


if __name__ == "__main__":
    main()
