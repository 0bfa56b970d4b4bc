"""AdamW with decay/no-decay groups (optionally bitsandbytes' 8-bit) and lr schedules."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); never decay norms and biases."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    kind: str = "adamw",
) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise RuntimeError(
                "optimization.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes);"
                f" it could not be imported here: {e}"
            ) from e
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas)
    if kind != "adamw":
        raise ValueError(f"optimizer={kind!r}: choose adamw or adamw8bit")
    # fused is the fastest path where it exists (CUDA, and CPU in recent torch).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(
    step: int,
    warmup_steps: int,
    max_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then cosine/linear decay or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: choose one of {SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    max_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, warmup_steps, max_steps, schedule, min_lr_ratio)  # validate the name now
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, max_steps, schedule, min_lr_ratio)
    )
