"""Forward+backward throughput: our model library against `transformers`, in one run.

1. Dense: our `llama` preset shrunk to ~13M parameters against `LlamaForCausalLM` built
   from the same config (`config_to_hf`) with the same weights; batch 8x256, fp32, CPU,
   eager and `torch.compile`d, LM loss forward + backward.
2. MoE: our `MoE` layer against transformers' `MixtralSparseMoeBlock` at the same sizes
   (the same weights), forward + backward over 8x256 tokens, Mixtral-like (8 experts,
   top-2) and fine-grained (32 experts, top-4, DeepSeek/Qwen-MoE-like); plus a decode-
   sized forward (8 tokens). transformers runs its `eager` expert loop and, where it
   runs, its `grouped_mm` kernel; the faster one is the reference. Each MoE case also
   prints its FLOP bound: a dense SwiGLU with top_k times the expert width does the same
   expert FLOPs with no routing at all, so no MoE layer can beat its tokens/s.

Usage: PYTHONPATH=shared .venv/bin/python benchmarks/model_forward.py [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from llm.config import ModelConfig
from llm.core.mlp import SwiGLU
from llm.core.moe import MoE
from llm.interop.hf import config_to_hf, state_dict_to_hf
from llm.models.decoder import DecoderModel

BATCH, SEQ = 8, 256


def _time(step: Callable[[], object], steps: int, warmup: int = 2) -> float:
    """Best seconds per call after `warmup` calls (which include any compilation); the
    best, not the median, because the 2 shared cores make slow outliers common."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def _train_step(
    model: torch.nn.Module, tokens: torch.Tensor, logits_of: Callable
) -> Callable[[], None]:
    def step() -> None:
        logits = logits_of(model, tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def dense(steps: int) -> list[tuple[str, float, float]]:
    config = ModelConfig.from_preset(
        "llama", vocab_size=4096, dim=384, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=1024,
        max_seq_len=SEQ,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = DecoderModel(config).train()
    ref = transformers.LlamaForCausalLM(config_to_hf(config)).train()
    ref.load_state_dict(state_dict_to_hf(ours, "llama"), strict=True)
    print(
        f"dense: llama preset at {ours.num_params() / 1e6:.1f}M params, batch {BATCH}x{SEQ}, fp32"
    )
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    rows = []
    for mode in ("eager", "compiled"):
        wrap = torch.compile if mode == "compiled" else (lambda m: m)
        t_ours = _time(_train_step(wrap(ours), tokens, lambda m, t: m(t)), steps)
        t_ref = _time(_train_step(wrap(ref), tokens, lambda m, t: m(input_ids=t).logits), steps)
        rows.append((f"llama fwd+bwd, {mode}", BATCH * SEQ / t_ours, BATCH * SEQ / t_ref))
    return rows


def _moe_pair(
    dim: int, hidden: int, n_experts: int, top_k: int
) -> tuple[MoE, dict[str, torch.nn.Module]]:
    cfg = transformers.MixtralConfig(
        hidden_size=dim,
        intermediate_size=hidden,
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
    )
    torch.manual_seed(0)
    refs = {}
    for impl in ("eager", "grouped_mm"):
        cfg._experts_implementation = impl
        refs[impl] = MixtralSparseMoeBlock(cfg)
    for p in refs["eager"].parameters():
        torch.nn.init.normal_(p, std=dim**-0.5)
    refs["grouped_mm"].load_state_dict(refs["eager"].state_dict())
    ours = MoE(dim, hidden, n_experts, top_k, renormalize=True)
    ours.gate.weight.data.copy_(refs["eager"].gate.weight)
    ours.experts.load_state_dict(refs["eager"].experts.state_dict())
    return ours, refs


def _moe_step(layer: torch.nn.Module, x: torch.Tensor, backward: bool) -> Callable[[], None]:
    def step() -> None:
        if backward:
            layer(x).square().mean().backward()
            layer.zero_grad(set_to_none=True)
            x.grad = None
        else:
            with torch.no_grad():
                layer(x)

    return step


def _dense_bound(dim: int, hidden: int, top_k: int, x: torch.Tensor, backward: bool) -> float:
    """tokens/s of a dense SwiGLU doing the routed tokens' expert FLOPs (k experts each)."""
    return x.shape[1] / _time(_moe_step(SwiGLU(dim, hidden * top_k), x, backward), 3)


def moe(steps: int) -> list[tuple[str, float, float]]:
    rows = []
    cases = [
        ("mixtral-like E=8 k=2", 384, 1024, 8, 2, BATCH * SEQ, True),
        ("fine-grained E=32 k=4", 384, 256, 32, 4, BATCH * SEQ, True),
        ("mixtral-like decode (8 tok)", 384, 1024, 8, 2, BATCH, False),
    ]
    for name, dim, hidden, n_experts, top_k, n_tokens, backward in cases:
        ours, refs = _moe_pair(dim, hidden, n_experts, top_k)
        x = torch.randn(1, n_tokens, dim, requires_grad=backward)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), refs["eager"](x), atol=1e-4, rtol=1e-4)
        what = "fwd+bwd" if backward else "fwd"
        for mode in ("eager", "compiled"):
            wrap = torch.compile if mode == "compiled" else (lambda m: m)
            t_ours = _time(_moe_step(wrap(ours), x, backward), steps)
            best_ref, ref_name = float("inf"), ""
            for impl, ref in refs.items():
                try:
                    t = _time(_moe_step(wrap(ref), x, backward), steps)
                except Exception as e:  # a reference kernel that cannot run here
                    print(f"  (transformers {impl} {mode} does not run: {type(e).__name__})")
                    continue
                if t < best_ref:
                    best_ref, ref_name = t, impl
            rows.append(
                (
                    f"MoE {name} {what}, {mode} (ref: {ref_name})",
                    n_tokens / t_ours,
                    n_tokens / best_ref,
                )
            )
        bound = _dense_bound(dim, hidden, top_k, x, backward)
        print(f"  MoE {name} {what}: FLOP bound (dense SwiGLU, same FLOPs) {bound:,.0f} tok/s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    rows = dense(args.steps) + moe(args.steps)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'case':<{width}}  {'ours tok/s':>11}  {'transformers':>12}  {'ratio':>6}")
    for name, ours, ref in rows:
        print(f"{name:<{width}}  {ours:>11,.0f}  {ref:>12,.0f}  {ours / ref:>5.2f}x")


if __name__ == "__main__":
    main()
