"""optimization.optimizer=muon: Muon's update on the block matrices, AdamW on the rest,
one optimizer that checkpoints and resumes like AdamW."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tests.support import train_tiny

from llm.checkpoint import MANIFEST, checkpoint_dir, latest_checkpoint, load_checkpoint
from llm.config import ModelConfig
from llm.models import DecoderModel
from llm.training.optim import MuonAdamW, build_optimizer, build_scheduler, muon_params

NS = (3.4445, -4.7750, 2.0315)  # the quintic Newton-Schulz coefficients, 5 iterations


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The formula in float64: X <- aX + (bA + cA^2)X with A = X X^T, from X = G/|G|_F,
    on the wide orientation of G."""
    a, b, c = NS
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def tiny_model() -> DecoderModel:
    torch.manual_seed(0)
    return DecoderModel(ModelConfig.from_preset("tiny"))


def test_muon_takes_the_block_matrices_and_adamw_the_rest() -> None:
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = sorted(names[id(p)] for p in muon_params(model))
    assert hidden == sorted(
        f"layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                  "mlp.down_proj")
    )  # fmt: skip
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, kind="muon")
    assert isinstance(opt, MuonAdamW)
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    # AdamW first (the tied embedding/LM head decays; norms do not), then Muon's matrices.
    assert groups[0] == ["embed_tokens.weight"] and opt.param_groups[0]["weight_decay"] == 0.1
    assert all(n.endswith("norm.weight") for n in groups[1])
    assert sorted(groups[2]) == hidden and opt.param_groups[2]["lr"] == 0.02
    assert sum(map(len, groups)) == len(names)  # every parameter exactly once


def test_muon_step_is_the_orthogonalized_nesterov_momentum_update() -> None:
    """Two steps with given gradients: each block matrix moves by -lr * sqrt(max(1, rows/cols))
    * NS5(g + momentum-ish Nesterov blend) after decoupled decay, as torch's Muon defines it;
    the other parameters move exactly as a plain AdamW moves them."""
    model = tiny_model()
    lr, mlr, mom, mwd = 1e-3, 0.05, 0.9, 0.1
    opt = build_optimizer(
        model, lr, weight_decay=0.1, kind="muon", muon_lr=mlr, muon_momentum=mom,
        muon_weight_decay=mwd,
    )  # fmt: skip
    hidden = {id(p) for p in muon_params(model)}
    params = list(model.parameters())
    others = [p for p in params if id(p) not in hidden]
    ref_others = [p.detach().clone().requires_grad_() for p in others]
    pairs = list(zip(others, ref_others, strict=True))
    ref_adamw = torch.optim.AdamW(
        [{"params": [q for p, q in pairs if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [q for p, q in pairs if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), fused=True,
    )  # fmt: skip
    buf = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params if id(p) in hidden}
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        before = {id(p): p.detach().double().clone() for p in params}
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        for p, q in pairs:
            q.grad = p.grad.clone()
        opt.step()
        ref_adamw.step()
        for p in params:
            if id(p) not in hidden:
                continue
            g = p.grad.double()
            b = buf[id(p)] = mom * buf[id(p)] + (1 - mom) * g  # torch keeps an EMA buffer
            update = newton_schulz((1 - mom) * g + mom * b)  # Nesterov
            rows, cols = p.shape
            expected = before[id(p)] * (1 - mlr * mwd) - mlr * math.sqrt(max(1, rows / cols)) * (
                update
            )
            moved, want = p.detach().double() - before[id(p)], expected - before[id(p)]
            # Newton-Schulz runs in bfloat16 (as torch and the speedrun do): ~1.5% off the
            # float64 formula, where 4 or 6 iterations, no Nesterov blend or another lr
            # scale are 30% or more off.
            assert (moved - want).norm() < 0.03 * want.norm(), p.shape
        for p, q in pairs:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in params)


def test_state_dict_round_trips_and_the_schedule_scales_every_group() -> None:
    model = tiny_model()
    opt = build_optimizer(model, 1e-3, kind="muon", muon_lr=0.02)
    sched = build_scheduler(opt, warmup_steps=4, max_steps=20, schedule="linear", min_lr_ratio=0.5)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 0.02])
    saved = opt.state_dict()
    fresh = build_optimizer(tiny_model(), 1e-3, kind="muon", muon_lr=0.02)
    fresh.load_state_dict(saved)
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in opt.param_groups]
    # The loaded momentum buffers are the ones the Muon child steps with.
    hidden = fresh.param_groups[-1]["params"]
    assert fresh._muon.state is fresh.state and fresh._muon.param_groups[0]["params"] is hidden
    a = saved["state"]
    b = fresh.state_dict()["state"]
    assert a.keys() == b.keys()
    for k in a:
        for name, v in a[k].items():
            torch.testing.assert_close(b[k][name], v, rtol=0, atol=0)


def test_muon_run_resumes_exactly(tmp_path: Path) -> None:
    """A muon run that lost its last checkpoint resumes from step 20 and ends where 40
    straight steps do: the Muon momentum and AdamW moments came back."""
    kw = {
        "checkpoint": {"interval": 20},
        "optimization": {"optimizer": "muon", "lr": 3e-3, "warmup_steps": 5},
        "training": {"eval_interval": 20, "eval_batches": 2},
    }
    straight = train_tiny(tmp_path / "straight", max_steps=40, **kw)
    train_tiny(tmp_path / "resumed", max_steps=40, **kw)
    (Path(checkpoint_dir(str(tmp_path / "resumed"), 40)) / MANIFEST).unlink()
    assert latest_checkpoint(str(tmp_path / "resumed")).endswith("step-00000020")
    resumed = train_tiny(tmp_path / "resumed", max_steps=40, **kw)
    assert resumed.step == 40
    assert latest_checkpoint(str(tmp_path / "resumed")).endswith("step-00000040")
    a = load_checkpoint(str(tmp_path / "straight")).model.state_dict()
    b = load_checkpoint(str(tmp_path / "resumed")).model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.history[-1] == straight.history[-1]
