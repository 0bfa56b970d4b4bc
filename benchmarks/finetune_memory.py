"""Fine-tuning memory and step time: full fine-tuning, LoRA and QLoRA on one model, one run.

Each method runs in a fresh subprocess (so no allocator state leaks between them) on the
same model (a Llama-shaped ~200M-parameter `DecoderModel`, or `--preset small`), the same
random batch and the same optimizer (`llm.training.optim.build_optimizer`: fused AdamW),
with the steps `llm-train` takes: forward, next-token loss, backward, clip, step.
- full: every weight trains.
- lora: `apply_lora(model, ["all-linear"], r, alpha)`; the base is frozen.
- qlora: `quantize_base` (every linear layer but lm_head to NF4) then the same LoRA.

Memory is the process's resident set (CPU; Linux `VmHWM`, reset after set-up through
`/proc/self/clear_refs`) or `torch.cuda.max_memory_allocated` (GPU), reported above the
baseline of a process that has imported torch and llm: `resident` after set-up (weights,
quantized or not), `peak` during the steps (plus gradients, optimizer state,
activations). On the CPU each method runs twice: once with glibc told to map every
allocation over 64 KiB on its own (`MALLOC_MMAP_THRESHOLD_`), so a freed tensor leaves
the resident set and `peak` counts live tensors as the GPU number does, and once with the
default allocator for the step time and `rss peak`, the footprint as the OS sees it (heap
fragmentation included; mmap-per-tensor would slow the steps down). Set-up's own peak
(QLoRA quantizes a full-precision model layer by layer) is shown apart. Step time is the
median of `--steps` timed steps after one warm-up step.

Targets (issue 9): QLoRA peak memory <= 40% of full fine-tuning's; LoRA step time <= full
fine-tuning's.

Usage: PYTHONPATH=shared .venv/bin/python benchmarks/finetune_memory.py [--preset 200m|small]
       [--batch 2 --seq 256] [--steps 3] [--rank 16] [--device cpu|cuda] [--backend auto]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llm.config import ModelConfig
from llm.core.lora import apply_lora
from llm.core.qlora import quantize_base
from llm.models.decoder import DecoderModel
from llm.training.optim import build_optimizer

METHODS = ("full", "lora", "qlora")
PRESETS: dict[str, dict[str, Any]] = {
    # ~197M parameters: Llama-shaped, MHA, 13 layers of width 1024, tied 32k embedding.
    "200m": dict(
        vocab_size=32000, dim=1024, n_layers=13, n_heads=16, max_seq_len=1024, tie_embeddings=True
    ),
    # ~14M parameters, for a quick look.
    "small": dict(
        vocab_size=8000, dim=384, n_layers=6, n_heads=6, max_seq_len=512, tie_embeddings=True
    ),
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the resident high-water mark (Linux clear_refs "5"); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _trim() -> None:
    """Give freed heap back to the OS so RSS counts live memory only."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Meter:
    """Memory above a baseline, in MiB: RSS on the CPU, allocated bytes on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.base = self.now()

    def now(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        return _status_kb("VmRSS") / 1024

    def peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return _status_kb("VmHWM") / 1024

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif not _reset_peak():
            raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs): Linux only")


def child(method: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    tokens = torch.randint(0, PRESETS[args.preset]["vocab_size"], (args.batch, args.seq + 1))
    tokens = tokens.to(device)
    meter = Meter(device)

    model = DecoderModel(ModelConfig(**PRESETS[args.preset])).to(device)
    n_params = model.num_params()
    if method == "qlora":
        quantize_base(model, backend=args.backend)
    if method in ("lora", "qlora"):
        apply_lora(model, ["all-linear"], r=args.rank, alpha=2 * args.rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.0)
    model.train()
    _trim()
    setup_peak = meter.peak() - meter.base
    resident = meter.now() - meter.base
    meter.reset()

    times = []
    for i in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(tokens[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del logits, loss
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first step allocates optimizer state and warms caches
            times.append(time.perf_counter() - t0)
    return dict(
        method=method, params=n_params, trainable=trainable, resident_mib=resident,
        peak_mib=meter.peak() - meter.base, setup_peak_mib=setup_peak,
        step_s=statistics.median(times), tokens_per_s=args.batch * args.seq / statistics.median(times),
    )  # fmt: skip


def run_method(method: str, argv: list[str], live_memory: bool = False) -> dict[str, Any]:
    env = dict(os.environ)
    if live_memory:  # every allocation over 64 KiB its own mapping: freed = returned
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", method, *argv],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="200m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=["auto", "bitsandbytes", "torch"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0

    argv = list(sys.argv[1:])
    cpu = not args.device.startswith("cuda")
    rows = {}
    for m in METHODS:
        rows[m] = timed = run_method(m, argv)
        timed["rss_peak_mib"] = timed["peak_mib"]
        if cpu:
            live = run_method(m, [*argv, "--steps", "1"], live_memory=True)
            timed.update(resident_mib=live["resident_mib"], peak_mib=live["peak_mib"])
    full = rows["full"]
    where = "RSS above an idle torch process" if cpu else "GPU allocated"
    print(
        f"preset {args.preset} ({full['params'] / 1e6:.1f}M params), batch {args.batch}x{args.seq},"
        f" LoRA r={args.rank} on all linear layers, {args.device}, threads"
        f" {args.threads or torch.get_num_threads()}; memory = {where} (MiB)"
    )
    header = (
        f"{'method':8s} {'trainable':>11s} {'resident':>9s} {'peak':>9s} {'peak/full':>9s}"
        f" {'rss peak':>9s} {'setup peak':>10s} {'step s':>8s} {'tok/s':>8s}"
    )
    print(header)
    for r in rows.values():
        print(
            f"{r['method']:8s} {r['trainable'] / 1e6:10.2f}M {r['resident_mib']:9.0f}"
            f" {r['peak_mib']:9.0f} {r['peak_mib'] / full['peak_mib']:9.2f}"
            f" {r['rss_peak_mib']:9.0f} {r['setup_peak_mib']:10.0f} {r['step_s']:8.3f}"
            f" {r['tokens_per_s']:8.0f}"
        )
    q_ratio = rows["qlora"]["peak_mib"] / full["peak_mib"]
    l_ratio = rows["lora"]["step_s"] / full["step_s"]
    print(
        f"target QLoRA peak <= 40% of full: {q_ratio:.0%} ({'met' if q_ratio <= 0.4 else 'MISSED'})"
    )
    print(f"target LoRA step <= full step: {l_ratio:.2f}x ({'met' if l_ratio <= 1 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
