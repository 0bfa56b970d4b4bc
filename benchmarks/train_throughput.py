"""Training throughput: our trainer's step against `transformers.LlamaForCausalLM`, one run.

Both sides train the same model (our `llama` preset shrunk; the HF model is built from it
with `config_to_hf` and loaded with the same weights) on the same random batches with
AdamW at the same hyperparameters (lr 3e-4, betas 0.9/0.95, weight decay 0.1, clip 1.0).
- ours: `Trainer.train_step` (what `llm-train` runs): `torch.compile` (the
  default `compile_scope`: the whole model up to 8 layers),
  fused AdamW, decay/no-decay groups, the NaN guard, in the chosen precision.
- reference: a plain loop a transformers user writes: `model(input_ids, labels=...)`,
  backward, clip, `torch.optim.AdamW` (torch's default implementation), eager.

Tokens/s is the best of `--steps` timed steps after warm-up (compilation excluded), since
shared machines make slow outliers common. Target (issue 5): ours >= 1.3x the reference.

Usage: PYTHONPATH=shared .venv/bin/python benchmarks/train_throughput.py [--device cuda]
       [--precision bf16] [--dim 256 --layers 4 --batch 8 --seq 128] [--steps 5]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from llm.config import ModelConfig
from llm.interop.hf import config_to_hf, state_dict_to_hf
from llm.models.decoder import DecoderModel
from llm.training.config import OptimizationConfig, TrainingConfig
from llm.training.distributed import DistInfo, apply_compile, compile_scope
from llm.training.optim import build_optimizer, build_scheduler
from llm.training.trainer import Trainer

LR, BETAS, WD = 3e-4, (0.9, 0.95), 0.1


class RandomBatches:
    """Fixed random batches, cycled: the trainer's data protocol without any data cost."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches, self.i = batches, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches[:1])

    def state_dict(self) -> dict[str, Any]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.i = state["i"]


def best_seconds(step: Callable[[], object], steps: int, warmup: int, sync: Callable) -> float:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    import transformers

    config = ModelConfig.from_preset(
        "llama", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
        n_kv_heads=args.heads, hidden_dim=int(args.dim * 8 / 3) // 64 * 64 or 64,
        max_seq_len=args.seq,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = DecoderModel(config).to(device)
    ref = transformers.LlamaForCausalLM(config_to_hf(config)).to(device).train()
    ref.load_state_dict(state_dict_to_hf(ours, "llama"), strict=True)
    tokens = [torch.randint(0, args.vocab, (args.batch, args.seq + 1)) for _ in range(4)]
    batches = [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in tokens]

    # ours: the trainer's step
    training = TrainingConfig(max_steps=10**6, batch_size=args.batch, block_size=args.seq)
    optim_cfg = OptimizationConfig(
        lr=LR, weight_decay=WD, beta1=BETAS[0], beta2=BETAS[1], precision=args.precision,
        compile=not args.no_compile,
    )  # fmt: skip
    if optim_cfg.compile:
        apply_compile(ours, compile_scope(optim_cfg.compile_scope, args.layers, fsdp=False))
    opt = build_optimizer(ours, LR, WD, BETAS)
    sched = build_scheduler(opt, 0, 10**6, "constant")
    info = DistInfo(0, 0, 1, device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            ours, opt, sched, RandomBatches(batches), training, optim_cfg, info, Path(tmp)
        )
        t_ours = best_seconds(trainer.train_step, args.steps, args.warmup, sync)

    # reference: a plain transformers loop
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    it = iter(range(10**9))

    def ref_step() -> None:
        b = tokens[next(it) % len(tokens)].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            # HF shifts labels itself: same (B, seq) inputs, the loss over seq-1 positions
            loss = ref(input_ids=b[:, :-1], labels=b[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    t_ref = best_seconds(ref_step, args.steps, args.warmup, sync)
    n_tok = args.batch * args.seq
    print(
        f"{ours.num_params() / 1e6:.1f}M params ({args.layers}L {args.dim}d, vocab {args.vocab}),"
        f" batch {args.batch}x{args.seq}, {args.precision}, {device},"
        f" {torch.get_num_threads()} threads"
    )
    print(f"ours (Trainer step): {n_tok / t_ours:10.0f} tok/s")
    print(f"LlamaForCausalLM loop:      {n_tok / t_ref:10.0f} tok/s")
    ratio = t_ref / t_ours
    print(f"ratio ours/ref {ratio:.2f}x (target >= 1.3x): {'met' if ratio >= 1.3 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
