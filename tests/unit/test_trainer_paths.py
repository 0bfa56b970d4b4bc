"""Trainer paths beyond the plain fp32 loop: bf16, compile (whole model or per block), the NaN guard, early
stopping, and clear errors for what the platform cannot do."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.unit.test_trainer_data import train

from llm.checkpoint import load_checkpoint
from llm.training.distributed import compile_scope
from llm.training.run import preflight
from llm.training.trainer import NonFiniteLossError, causal_lm_loss

SMALL: dict[str, Any] = {"batch_size": 4, "block_size": 32, "eval_batches": 2, "log_interval": 1}
FAST = {"peak_tflops": 1.0, "warmup_steps": 2}  # no matmul timing for MFU


def test_bf16_autocast_trains_on_cpu(tmp_path: Path) -> None:
    trainer = train(
        tmp_path, 30, training={**SMALL, "eval_interval": 2},
        optimization={**FAST, "precision": "bf16"}, checkpoint={"interval": 30},
    )  # fmt: skip
    losses = [h["val_loss"] for h in trainer.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, trainer.history


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_training_trains(tmp_path: Path, scope: str) -> None:
    torch._dynamo.utils.counters.clear()
    trainer = train(
        tmp_path, 6, training={**SMALL, "eval_interval": 3},
        optimization={**FAST, "compile": True, "compile_scope": scope},
        checkpoint={"interval": 6},
    )  # fmt: skip
    model = trainer.model
    compiled = [m for m in (model, *model.layers) if getattr(m, "_compiled_call_impl", None)]
    assert compiled == ([model] if scope == "model" else list(model.layers))
    assert trainer.history[-1]["val_loss"] < trainer.history[0]["val_loss"]
    # one graph, the training one: evaluation runs the same modules eagerly, not compiling
    # an inference graph (optimization.compile_eval)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    # the checkpoint holds the plain parameter names (no compile wrapper prefix)
    saved = load_checkpoint(str(tmp_path)).model.state_dict()
    assert saved.keys() == model.state_dict().keys()


def test_compile_scope_auto() -> None:
    assert compile_scope("auto", 4, fsdp=False) == "model"
    assert compile_scope("auto", 4, fsdp=True) == "blocks"  # FSDP shards block by block
    assert compile_scope("auto", 32, fsdp=False) == "blocks"  # one block's compile, reused
    assert compile_scope("model", 32, fsdp=False) == "model"


def nan_on(calls: set[int]) -> Any:
    """A loss_fn that returns NaN on the given training calls (1-based), the true loss else."""
    count = {"n": 0}

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        loss = causal_lm_loss(model, batch)
        if not model.training:
            return loss
        count["n"] += 1
        return loss * math.nan if count["n"] in calls else loss

    return loss_fn


def test_nan_guard_skips_and_counts(tmp_path: Path) -> None:
    trainer = train(
        tmp_path, 8, nan_on({3, 4}), training={**SMALL, "eval_interval": 8},
        optimization=FAST, checkpoint={"interval": 8},
    )  # fmt: skip
    assert trainer.step == 8 and trainer.skipped_steps == 2 and trainer.bad_steps == 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # no NaN applied


def test_nan_guard_stops_after_max_bad_steps(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps"):
        train(
            tmp_path, 20, nan_on(set(range(5, 100))), optimization=FAST,
            training={**SMALL, "eval_interval": 20, "max_bad_steps": 3},
        )  # fmt: skip


def test_early_stopping_stops_without_improvement(tmp_path: Path) -> None:
    def flat_val(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        loss = causal_lm_loss(model, batch)
        return loss if model.training else loss.detach() * 0 + 5.0  # val never improves

    trainer = train(
        tmp_path, 100, flat_val, optimization=FAST, checkpoint={"interval": 100},
        training={**SMALL, "eval_interval": 2, "early_stopping_patience": 2},
    )  # fmt: skip
    assert trainer.step == 6  # best at 2, no better at 4 and 6
    assert trainer.history[-1]["step"] == 6


def test_fp16_on_cpu_and_missing_bitsandbytes_are_clear_errors(tmp_path: Path) -> None:
    from tests.support import tiny_settings

    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="precision=fp16 needs a GPU"):
        preflight(tiny_settings(tmp_path, optimization={"precision": "fp16"}), cpu)
    settings = tiny_settings(tmp_path, optimization={"optimizer": "adamw8bit"})
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="adamw8bit needs bitsandbytes"):
            preflight(settings, cpu)
    else:
        preflight(settings, cpu)
