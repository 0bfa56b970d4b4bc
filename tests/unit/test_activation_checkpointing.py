"""Activation checkpointing: the same gradients as without it (eager and compiled, dense and
MoE with its aux loss), fewer tensors kept for backward, and set up by the trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.support import CPU, tiny_settings
from tests.unit.test_trainer_paths import FAST, SMALL

from llm.config import ModelConfig
from llm.models.decoder import DecoderModel
from llm.training.data import build_data
from llm.training.distributed import apply_activation_checkpointing
from llm.training.run import run_training


def _grads(preset: str, mode: str, backend: str | None = None) -> tuple[dict, int]:
    """Gradients of one batch (same seed, same tokens) and the bytes saved for backward."""
    torch.manual_seed(0)
    model = DecoderModel(ModelConfig.from_preset(preset, n_layers=4, dropout=0.1))
    apply_activation_checkpointing(model, mode)
    forward = torch.compile(model, backend=backend) if backend else model
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(2)  # dropout draws the same masks in every run
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = forward(x)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss = loss + model.aux_loss()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, saved[0]


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_gradients_equal_and_memory_drops(preset: str) -> None:
    ref, saved_none = _grads(preset, "none")
    saved: dict[str, int] = {}
    for mode in ("full", "selective"):
        grads, saved[mode] = _grads(preset, mode)
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    # full keeps each block's input only; selective about half of the blocks' activations
    assert saved["full"] < 0.25 * saved_none, (saved, saved_none)
    assert saved["full"] < saved["selective"] < 0.7 * saved_none, (saved, saved_none)


def test_gradients_equal_under_compile() -> None:
    ref, _ = _grads("tiny-moe", "none")
    grads, _ = _grads("tiny-moe", "full", backend="aot_eager")  # dynamo + AOT autograd
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_modes_pick_blocks_and_eval_runs_plain() -> None:
    model = DecoderModel(ModelConfig.from_preset("tiny", n_layers=4))
    apply_activation_checkpointing(model, "selective")
    assert [b.activation_checkpointing for b in model.layers] == [True, False, True, False]
    apply_activation_checkpointing(model, "full")
    assert all(b.activation_checkpointing for b in model.layers)
    with pytest.raises(ValueError, match="activation_checkpointing='some'"):
        apply_activation_checkpointing(model, "some")
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():  # nothing to recompute: the plain forward, same logits
        out = model(x)
    apply_activation_checkpointing(model, "none")
    torch.testing.assert_close(out, model(x))


def test_trainer_applies_it(tmp_path: Path) -> None:
    settings = tiny_settings(
        tmp_path, 4, training={**SMALL, "eval_interval": 4},
        optimization={**FAST, "activation_checkpointing": "full"}, checkpoint={"interval": 4},
    )  # fmt: skip
    tok, data = build_data(settings)
    engine = run_training(settings, tok, data, CPU)
    assert all(b.activation_checkpointing for b in engine.model.layers)
    assert engine.step == 4 and engine.skipped_steps == 0
