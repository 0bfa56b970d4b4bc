"""Optimizers and lr schedules.

adamw: AdamW with decay/no-decay groups; adamw8bit: the same through bitsandbytes' 8-bit
AdamW; muon: torch's Muon (Newton-Schulz orthogonalized momentum) for the hidden matrices of
the transformer blocks and AdamW for the rest (embeddings, LM head, norms, biases, routers,
expert tensors), as the modded-nanoGPT speedrun splits them, in one `MuonAdamW` optimizer.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)


def param_groups(
    model: nn.Module, weight_decay: float, exclude: set[int] | None = None
) -> list[dict]:
    """Decay matrices (linear and embedding weights); never decay norms and biases.
    Parameters whose id is in `exclude` are left out (another optimizer takes them)."""
    seen: set[int] = set(exclude or ())
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


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """The hidden matrices Muon takes: the trainable weights of the plain `nn.Linear`
    layers inside transformer blocks (attention and MLP projections), less MoE routers and
    any weight that is also used outside the blocks (tied)."""
    from llm.core.moe import MoE
    from llm.core.transformer_block import TransformerBlock

    blocks = [
        (name + ".", m)
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, TransformerBlock)
    ]
    outside = {
        id(p)
        for name, p in model.named_parameters(remove_duplicate=False)
        if not any(name.startswith(prefix) for prefix, _ in blocks)
    }
    taken: dict[int, nn.Parameter] = {}
    for _, block in blocks:
        routers = {
            id(g.weight)
            for m in block.modules()
            if isinstance(m, MoE)
            for g in (m.gate, m.shared_expert_gate)
            if g is not None
        }
        for m in block.modules():
            w = m.weight if type(m) is nn.Linear else None
            if w is not None and w.requires_grad and id(w) not in routers | outside:
                taken[id(w)] = w
    return list(taken.values())


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over some parameters and AdamW over the others, as one optimizer.

    Both children share this optimizer's `param_groups` (AdamW's first, then Muon's) and
    its `state`, so `state_dict`/`load_state_dict`/`zero_grad` are torch's own over all
    parameters; an lr scheduler scales every group (each from its own initial lr), a grad
    scaler unscales them all, and distributed checkpointing sees one ordinary optimizer.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon) -> None:
        self._adamw, self._muon = adamw, muon
        self._n_adamw = len(adamw.param_groups)
        super().__init__([*adamw.param_groups, *muon.param_groups], {})
        self._link()

    def _link(self) -> None:
        """Point the children at this optimizer's groups and state (load_state_dict
        replaces both)."""
        self._adamw.param_groups = self.param_groups[: self._n_adamw]
        self._muon.param_groups = self.param_groups[self._n_adamw :]
        self._adamw.state = self._muon.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._adamw.step()
        self._muon.step()
        return loss


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    kind: str = "adamw",
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
    muon_weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """`kind`: adamw, adamw8bit or muon (muon_* settings apply to Muon's matrices only)."""
    if kind == "muon":
        hidden = muon_params(model)
        if not hidden:
            raise ValueError("optimizer=muon: the model has no hidden matrices for Muon")
        taken = {id(p) for p in hidden}
        rest = [g for g in param_groups(model, weight_decay, exclude=taken) if g["params"]]
        adamw = torch.optim.AdamW(rest, lr=lr, betas=betas, fused=True)
        muon = torch.optim.Muon(
            hidden, lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay
        )
        return MuonAdamW(adamw, muon)
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
        raise ValueError(f"optimizer={kind!r}: choose adamw, adamw8bit or muon")
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
