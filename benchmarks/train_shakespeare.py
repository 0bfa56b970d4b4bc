"""Char-level Shakespeare with nanoGPT's CPU recipe: our trainer against a plain HF loop.

Sizes from nanoGPT's README ("I only have a macbook"): 4 layers, 4 heads, 128 dims, block 64,
batch 12, 2000 iterations, dropout 0 (lr 1e-3, warmup 100, cosine to 1e-4, betas 0.9/0.99,
weight decay 0.1, grad clip 1.0, from `config/train_shakespeare_char.py`).

- ours: `llm-train`'s path in-process (settings -> `build_data` -> `run_training`), our
  default architecture at those sizes, `torch.compile` (whole model: 4 layers; evaluation
  eager), fused AdamW, and bf16 autocast only when asked (`--precision bf16`; on small CPU
  matmuls it rarely helps). The compile starts from an empty inductor cache, as on a new
  machine (`--warm-cache` keeps torch's cache: a second run then skips most of it).
- reference: `transformers.GPT2LMHeadModel` of the same sizes, trained by a plain AdamW
  loop (same schedule) on the very same batches (the data module's batch `k` is a pure
  function of `k`), scored on the same validation windows.

Target (issue 5): our final val loss <= 1.88 in <= 0.7x the reference's wall time.

Usage: PYTHONPATH=shared .venv/bin/python benchmarks/train_shakespeare.py --data tinyshakespeare.txt
       [--iters 2000]
       [--warm-cache]
"""

from __future__ import annotations

import argparse
import atexit
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BATCH, BLOCK, LR, MIN_LR, WARMUP = 12, 64, 1e-3, 1e-4, 100


def settings_for(data: Path, run_dir: str, iters: int, precision: str, compile_: bool):
    from llm.settings import load_settings

    return load_settings({
        "model": {"preset": "small", "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4,
                  "dropout": 0.0},
        "data": {"source": str(data), "val_fraction": 0.1},
        "training": {"max_steps": iters, "batch_size": BATCH, "block_size": BLOCK,
                     "eval_interval": iters, "eval_batches": 200, "log_interval": 500,
                     "progress": False, "device": "cpu"},
        "optimization": {"lr": LR, "min_lr_ratio": MIN_LR / LR, "warmup_steps": WARMUP,
                         "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0,
                         "precision": precision, "compile": compile_, "peak_tflops": 1.0},
        "checkpoint": {"run_dir": run_dir, "interval": iters, "resume": False},
    })  # fmt: skip


def run_ours(text: Path, iters: int, precision: str, compile_: bool) -> tuple[float, float, object]:
    from llm.training.data import build_data
    from llm.training.distributed import DistInfo
    from llm.training.run import run_training

    with tempfile.TemporaryDirectory() as run_dir:
        settings = settings_for(text, run_dir, iters, precision, compile_)
        tok, data = build_data(settings)
        info = DistInfo(0, 0, 1, torch.device("cpu"))
        start = time.perf_counter()
        engine = run_training(settings, tok, data, info)
        seconds = time.perf_counter() - start
    return seconds, engine.last_val_loss, data


def run_reference(iters: int, data, vocab_size: int) -> tuple[float, float]:
    import transformers

    from llm.training.optim import lr_factor

    torch.manual_seed(1337)
    cfg = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=BLOCK, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.99),
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, WARMUP, iters, "cosine", MIN_LR / LR)
    )

    def loss_of(batch) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"]).logits
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    start = time.perf_counter()
    for step in range(iters):
        loss = loss_of(data.train_batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        losses = [loss_of(b).item() for b in data.val_batches()]
    return time.perf_counter() - start, sum(losses) / len(losses)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True,
                   help="tinyshakespeare.txt, nanoGPT's shakespeare_char input (1.1 MB)")  # fmt: skip
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--warm-cache", action="store_true", help="keep torch's inductor cache")
    args = p.parse_args()
    if not args.warm_cache:  # compiled kernels from an earlier run would hide the compile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="inductor-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    if not args.data.is_file():
        print(f"train_shakespeare: --data {args.data}: not found", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    t_ours, val_ours, data = run_ours(args.data, args.iters, args.precision, not args.no_compile)
    t_ref, val_ref = run_reference(args.iters, data, data.tokenizer.vocab_size)
    ratio = t_ours / t_ref
    cache = "warm" if args.warm_cache else "cold"
    print(f"tinyshakespeare char, {args.iters} iters, batch {BATCH}x{BLOCK}, 4L/4H/128d, "
          f"{torch.get_num_threads()} threads, {cache} compile cache")  # fmt: skip
    print(f"{'':22}{'wall s':>9}{'val loss':>10}")
    print(f"{'ours (llm-train)':22}{t_ours:9.1f}{val_ours:10.4f}")
    print(f"{'GPT2LMHeadModel loop':22}{t_ref:9.1f}{val_ref:10.4f}")
    ok = val_ours <= 1.88 and ratio <= 0.7
    print(f"time ratio ours/ref {ratio:.2f}x (target <= 0.7x), val {val_ours:.4f} (target <= 1.88)"
          f": {'met' if ok else 'NOT met'}")  # fmt: skip
    return 0 if math.isfinite(val_ours) else 1


if __name__ == "__main__":
    sys.exit(main())
