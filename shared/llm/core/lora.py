"""LoRA (Hu et al. 2021, arXiv:2106.09685), swapped in from outside the model.

`LoRALinear(base, r, alpha, dropout)` computes PEFT's LoRA exactly:

    y = base(x) + B(A(dropout(x))) * alpha / r

with A (r, in) kaiming-uniform (a=sqrt(5), PEFT's default init) and B (out, r) zeros, so a
freshly wrapped model equals its base. Adapter weights are fp32 whatever the base dtype
(PEFT's `autocast_adapter_dtype`); the base may be an `nn.Linear` or an `NF4Linear`
(QLoRA: `llm.core.qlora.quantize_base` first).

Targets and fused layers. `apply_lora(model, targets=[...])` matches module names by
suffix as PEFT's `target_modules` does: a target matches `name` when it equals it or
`name` ends with `"." + target`; `"all-linear"` is every linear layer but `lm_head`.
Our names are the checkpoint standard's except where a projection is fused:
attention's `qkv_proj` holds q_proj | k_proj | v_proj stacked by rows (`interop/_llama`
splits it the same way). A fused layer answers to its parts' names as if they were
modules beside it (`layers.0.self_attn.q_proj`), and each matched part gets its own A and
B over its rows only:

    target                         our layer                  LoRA
    q_proj / k_proj / v_proj       self_attn.qkv_proj         per-part A_i (r, dim), B_i (rows_i, r)
    qkv_proj                       self_attn.qkv_proj         all three parts
    o_proj, gate_proj, up_proj,    the module of that name    one A, B
    down_proj, q_a_proj, ...

so LoRA on q_proj and v_proj of our model is exactly PEFT's LoRA on the separate q_proj
and v_proj of the Hugging Face export (the rows of k get no update). The parts of a
fused layer share one dropout mask in training (PEFT draws one per separate module);
with dropout 0 or in eval the two are identical. MoE routed experts are stacked tensors,
not linear layers, and take no LoRA (as in transformers 5, whose experts are fused too);
an MoE layer's router `gate` and shared-expert projections are linear and can.

`llm.interop.peft` writes and reads adapters in PEFT's layout (`save_adapter`,
`load_adapter`, `load_with_adapter`); this module knows only our names.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llm.core.attn.mha import Attention
from llm.core.qlora import NF4Linear

ALL_LINEAR = "all-linear"
OUTPUT_LAYER = "lm_head"


class Part(NamedTuple):
    """A block of output rows of a (possibly fused) linear layer, named as its own module."""

    name: str
    start: int
    stop: int


def fused_parts(parent: nn.Module, leaf: str, out_features: int) -> tuple[Part, ...]:
    """The parts of linear layer `leaf` of `parent`: q/k/v for attention's fused `qkv_proj`,
    else the layer itself as one part."""
    if leaf == "qkv_proj" and isinstance(parent, Attention):
        q, kv = parent.n_heads * parent.head_dim, parent.n_kv_heads * parent.head_dim
        return (Part("q_proj", 0, q), Part("k_proj", q, q + kv), Part("v_proj", q + kv, q + 2 * kv))
    return (Part(leaf, 0, out_features),)


class LoRALinear(nn.Module):
    """A linear layer plus low-rank updates on some of its row blocks (`parts`).

    `layout` is every part of the layer (for a fused layer: q, k, v); `parts` the adapted
    ones, in row order. Without either the whole layer is one part named "default".
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        parts: Sequence[Part] | None = None,
        layout: Sequence[Part] | None = None,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.layout = tuple(layout or parts or (Part("default", 0, self.out_features),))
        self.parts = tuple(sorted(parts or self.layout, key=lambda p: p.start))
        if any(p not in self.layout for p in self.parts) or not self.parts:
            raise ValueError(f"parts {self.parts} are not a non-empty subset of {self.layout}")
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        device = (base.weight_packed if isinstance(base, NF4Linear) else base.weight).device
        self.lora_A = nn.ParameterDict(
            {p.name: nn.Parameter(torch.empty(r, self.in_features, device=device)) for p in self.parts}
        )  # fmt: skip
        self.lora_B = nn.ParameterDict(
            {p.name: nn.Parameter(torch.zeros(p.stop - p.start, r, device=device)) for p in self.parts}
        )  # fmt: skip
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        """PEFT's init: A kaiming-uniform (a=sqrt(5), as nn.Linear), B zeros: no change yet."""
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for b in self.lora_B.values():
            nn.init.zeros_(b)

    # -- weights ----------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A over the whole layer, (out_features, in_features), zero rows where
        no part is adapted; fp32."""
        delta = self.lora_A[self.parts[0].name].new_zeros(self.out_features, self.in_features)
        for p in self.parts:
            delta[p.start : p.stop] = self.lora_B[p.name] @ self.lora_A[p.name]
        return delta * self.scaling

    def base_weight(self) -> torch.Tensor:
        base = self.base
        return base.dequantize() if isinstance(base, NF4Linear) else base.weight

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer applies (base + update unless merged). Code that reads
        `.weight` directly (MLA's absorbed decode) thus sees the adapted layer."""
        w = self.base_weight()
        return w if self.merged else w + self.delta_weight().to(w.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (exact up to rounding); forward then runs
        the base alone. An NF4 base cannot take it without requantizing: merge into the
        full-precision weights instead (`llm.interop.peft.load_with_adapter`)."""
        if self.merged:
            return
        if not isinstance(self.base, nn.Linear):
            raise TypeError(f"cannot merge LoRA into a {type(self.base).__name__} base")
        w = self.base.weight
        w += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base.weight
        w -= self.delta_weight().to(w.dtype)
        self.merged = False

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        y = self.base(x)
        if self.merged:
            return y
        a = self.lora_A
        h = self.dropout(x).to(a[self.parts[0].name].dtype)
        if len(self.parts) == 1:
            a_all = a[self.parts[0].name]
        else:
            a_all = torch.cat([a[p.name] for p in self.parts])  # (P*r, in)
        z = F.linear(h, a_all)  # (..., P*r)
        pieces, pos = [], 0
        for p, zp in zip(self.parts, z.split(self.r, dim=-1), strict=True):
            if p.start > pos:  # rows of an unadapted part: no update
                pieces.append(z.new_zeros(*z.shape[:-1], p.start - pos))
            pieces.append(F.linear(zp, self.lora_B[p.name]))  # (..., rows_p)
            pos = p.stop
        if pos < self.out_features:
            pieces.append(z.new_zeros(*z.shape[:-1], self.out_features - pos))
        delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)  # (..., out)
        return y + (delta * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        parts = ", ".join(p.name for p in self.parts)
        return f"r={self.r}, alpha={self.alpha}, parts=[{parts}]"


# -- applying to a model --------------------------------------------------------------------


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _is_wrapper(m: nn.Module) -> bool:
    return isinstance(getattr(m, "layout", None), tuple) and isinstance(m.base, nn.Module)


def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or isinstance(m, NF4Linear)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) of every `LoRALinear` in `model`."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, tuple[Part, ...]]]:
    """(name, layer, parts) of every linear layer, a LoRA wrapper (`LoRALinear`,
    `llm.core.multi_lora.MultiLoRALinear`: a `base` and its `layout`) counting as its base."""
    for name, m in model.named_modules():
        if _is_wrapper(m):
            yield name, m, m.layout
        elif _is_linear(m) and not name.endswith(".base"):
            parent_name, _, leaf = name.rpartition(".")
            yield name, m, fused_parts(model.get_submodule(parent_name), leaf, m.out_features)


def apply_lora(
    model: nn.Module,
    targets: Sequence[str],
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap the linear layers `targets` select in `LoRALinear` and freeze everything else.

    Returns the adapted names (a fused layer's parts by their own names). A target that
    matches nothing is named in a warning; if no target matches anything, ValueError.
    Apply after loading weights (and after `quantize_base` for QLoRA), before compile and
    DDP/FSDP.
    """
    if isinstance(targets, str):
        targets = [targets]
    used: set[str] = set()
    plan: list[tuple[str, tuple[Part, ...], tuple[Part, ...]]] = []
    for name, m, layout in list(linear_layers(model)):
        if _is_wrapper(m):
            continue
        parent = name.rpartition(".")[0]
        chosen = []
        for part in layout:
            part_name = f"{parent}.{part.name}" if parent else part.name
            hits = [t for t in targets if _matches(name, t) or _matches(part_name, t)]
            if ALL_LINEAR in targets and not _matches(name, OUTPUT_LAYER):
                hits.append(ALL_LINEAR)
            if hits:
                used.update(hits)
                chosen.append(part)
        if chosen:
            plan.append((name, tuple(chosen), layout))
    if not plan:
        raise ValueError(f"apply_lora: targets {list(targets)} match no linear layer of the model")
    if unused := [t for t in targets if t not in used]:
        warnings.warn(
            f"apply_lora: target(s) {unused} match no linear layer of the model", stacklevel=2
        )
    adapted = []
    for name, parts, layout in plan:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), r, alpha, dropout, parts, layout))
        adapted += [f"{parent_name}.{p.name}" if parent_name else p.name for p in parts]
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_A." in pname or ".lora_B." in pname)
    return adapted


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under our names (`...qkv_proj.lora_A.q_proj`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (see `LoRALinear.merge`)."""
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Swap every `LoRALinear` back for its base, merged first unless `merge=False`; the
    base weights become trainable again. Returns `model` (changed in place)."""
    for name, m in list(lora_modules(model)):
        if merge:
            m.merge()
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, m.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
