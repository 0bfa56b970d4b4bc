"""Char-level Shakespeare with nanoGPT's CPU recipe: time to a quality, ours against a plain HF loop.

Sizes from nanoGPT's README ("I only have a macbook"): 4 layers, 4 heads, 128 dims, block 64,
batch 12, 2000 iterations, dropout 0 (lr 1e-3, warmup 100, cosine to 1e-4, betas 0.9/0.99,
weight decay 0.1, grad clip 1.0, from `config/train_shakespeare_char.py`); nanoGPT
reports val loss 1.88 after those 2000 iterations.

Speed as a user measures it: the wall time, start-up and compile included, at which a run
first scores val loss <= 1.88, with both runs evaluated every 100 iterations on the same
validation windows (`--eval-batches` of them; the time to evaluate counts).

- ours: `llm-train`'s path in-process (settings -> `build_data` -> `run_training`), our
  default architecture at those sizes, one run per `--routes` entry: the optimizer, adamw
  (fused) or muon (Muon on the blocks' matrices at `--muon-lr`, AdamW on the rest), eager or
  `+compile` (`torch.compile` of the whole model, 4 layers; evaluation eager). Whether
  compiling pays is measured, not assumed: at this size a cold compile costs more than it
  saves over a few hundred steps. `--ours-iters` sets the schedule's length. bf16 autocast
  only when asked (`--precision bf16`). A compile starts from an empty inductor cache, as
  on a new machine (`--warm-cache` keeps torch's cache). Our defaults, chosen by
  measurement on this recipe: peak lr 2e-3 (`--lr`; the reference keeps the recipe's 1e-3)
  on a 700-step cosine schedule to the recipe's 1e-4 (`--ours-iters`). Measured (2 cores,
  one quiet run): AdamW reaches 1.88 at step 600, Muon at step 500 (its Newton-Schulz
  steps cost ~10% more per step, repaid by the 100 steps saved); a cold compile costs more
  than it saves over 700 steps; bf16 autocast is slower than fp32 at these matrix sizes;
  QK-norm and an untied head took no fewer steps to 1.88.
- reference: `transformers.GPT2LMHeadModel` of the same sizes, trained by a plain AdamW
  loop (same schedule) for 2000 iterations on the very same batches (the data module's
  batch `k` is a pure function of `k`), scored on the same validation windows.

Target (issue 18): ours reaches 1.88 in <= 0.35x the reference's time for its 2000
iterations (its training alone: its periodic evaluations are left out of that time).

Usage: PYTHONPATH=shared .venv/bin/python benchmarks/train_shakespeare.py --data tinyshakespeare.txt
       [--routes adamw adamw+compile muon] [--ours-iters 700] [--lr 2e-3] [--iters 2000]
       [--eval-batches 50] [--warm-cache]
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BATCH, BLOCK, LR, MIN_LR, WARMUP = 12, 64, 1e-3, 1e-4, 100
TARGET, EVAL_EVERY = 1.88, 100


class Route(NamedTuple):
    name: str
    seconds: float  # the whole run: start-up, compile, training, evaluations
    to_target: float | None  # wall seconds at which val loss first <= TARGET
    target_step: int | None
    final_val: float


def settings_for(data: Path, run_dir: str, args: argparse.Namespace, optimizer: str, compile: bool):
    from llm.settings import load_settings

    return load_settings({
        "model": {"preset": "small", "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4,
                  "dropout": 0.0},
        "data": {"source": str(data), "val_fraction": 0.1},
        "training": {"max_steps": args.ours_iters, "batch_size": BATCH, "block_size": BLOCK,
                     "eval_interval": EVAL_EVERY, "eval_batches": args.eval_batches,
                     "log_interval": 500, "progress": False, "device": "cpu"},
        "optimization": {"optimizer": optimizer, "lr": args.lr, "min_lr_ratio": MIN_LR / args.lr,
                         "warmup_steps": WARMUP, "beta2": 0.99, "weight_decay": 0.1,
                         "muon_lr": args.muon_lr, "grad_clip": 1.0,
                         "precision": args.precision, "compile": compile,
                         "peak_tflops": 1.0},
        "checkpoint": {"run_dir": run_dir, "interval": args.ours_iters, "resume": False},
    })  # fmt: skip


def run_ours(text: Path, args: argparse.Namespace, route: str) -> tuple[Route, object]:
    from llm.training.data import build_data
    from llm.training.distributed import DistInfo
    from llm.training.run import run_training

    optimizer, _, compiled = route.partition("+")
    with tempfile.TemporaryDirectory() as run_dir:
        start_wall, start = time.time(), time.perf_counter()  # start-up counts
        settings = settings_for(text, run_dir, args, optimizer, compiled == "compile")
        tok, data = build_data(settings)
        info = DistInfo(0, 0, 1, torch.device("cpu"))
        engine = run_training(settings, tok, data, info)
        seconds = time.perf_counter() - start
        evals = [
            json.loads(line)
            for line in (Path(run_dir) / "metrics.jsonl").open()
            if '"eval"' in line
        ]
    hit = next((e for e in evals if e["val_loss"] <= TARGET), None)
    name = f"ours {optimizer}" + (" compiled" if compiled else "")
    return Route(
        name, seconds, hit["time"] - start_wall if hit else None, hit["step"] if hit else None,
        engine.last_val_loss,
    ), data  # fmt: skip


def run_reference(iters: int, data, vocab_size: int) -> tuple[Route, float]:
    """The route, and its time for `iters` iterations less its periodic evaluations."""
    import transformers

    from llm.training.optim import lr_factor

    start = time.perf_counter()
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

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            losses = [loss_of(b).item() for b in data.val_batches()]
        model.train()
        return sum(losses) / len(losses)

    eval_s, to_target, target_step, val = 0.0, None, None, math.nan
    for step in range(1, iters + 1):
        loss = loss_of(data.train_batch(step - 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % EVAL_EVERY == 0 or step == iters:
            t0 = time.perf_counter()
            val = evaluate()
            if step != iters:  # the last one is part of any run
                eval_s += time.perf_counter() - t0
            if to_target is None and val <= TARGET:
                to_target, target_step = time.perf_counter() - start, step
    seconds = time.perf_counter() - start
    route = Route("GPT2LMHeadModel loop", seconds, to_target, target_step, val)
    return route, seconds - eval_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True,
                   help="tinyshakespeare.txt, nanoGPT's shakespeare_char input (1.1 MB)")  # fmt: skip
    p.add_argument("--iters", type=int, default=2000, help="the reference's iterations")
    p.add_argument("--ours-iters", type=int, default=700, help="our schedule's length")
    p.add_argument("--routes", nargs="+", default=["adamw", "muon"],
                   choices=["adamw", "adamw+compile", "muon", "muon+compile"],
                   help="our runs, one each (with one reference run)")  # fmt: skip
    p.add_argument("--lr", type=float, default=2e-3, help="our peak lr (AdamW's parameters)")
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--eval-batches", type=int, default=50, help="validation batches per eval")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
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
    routes, data = [], None
    for name in args.routes:
        route, data = run_ours(args.data, args, name)
        routes.append(route)
    ref, ref_train_s = run_reference(args.iters, data, data.tokenizer.vocab_size)
    cache = "warm" if args.warm_cache else "cold"
    print(f"tinyshakespeare char, batch {BATCH}x{BLOCK}, 4L/4H/128d, {torch.get_num_threads()}"
          f" threads, {cache} compile cache, eval every {EVAL_EVERY} iters on"
          f" {args.eval_batches} batches")  # fmt: skip
    print(f"{'':26}{'iters':>6}{'wall s':>9}{'val loss':>10}{f'to {TARGET} s':>11}{'at iter':>9}")
    for r in [*routes, ref]:
        iters = args.iters if r is ref else args.ours_iters
        hit = (
            f"{r.to_target:11.1f}{r.target_step:9d}"
            if r.to_target is not None
            else (f"{'never':>11}{'-':>9}")
        )
        print(f"{r.name:26}{iters:6d}{r.seconds:9.1f}{r.final_val:10.4f}{hit}")
    print(f"reference: {ref_train_s:.1f} s for its {args.iters} iterations"
          " (training and its final evaluation; periodic evaluations left out)")  # fmt: skip
    for r in routes:
        if r.to_target is None:
            print(f"{r.name}: never reached {TARGET}: target NOT met")
            continue
        ratio = r.to_target / ref_train_s
        met = ratio <= 0.35
        print(f"{r.name}: {TARGET} in {r.to_target:.1f} s = {ratio:.2f}x the reference's"
              f" {args.iters} iterations (target <= 0.35x): {'met' if met else 'NOT met'}")  # fmt: skip
    return 0 if all(math.isfinite(r.final_val) for r in routes) else 1


if __name__ == "__main__":
    sys.exit(main())
