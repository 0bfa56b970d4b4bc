"""Several LoRA adapters served in one batch (S-LoRA, Sheng et al. 2023, arXiv:2311.03285;
Punica, Chen et al. 2023, arXiv:2310.18547): each row of a model call picks its adapter.

`apply_multi_lora(model, n_adapters, max_rank)` swaps every linear layer an adapter may
target for a `MultiLoRALinear` holding stacked low-rank weights, one entry per adapter
index and index 0 the base (all zeros):

    A  (n_adapters + 1, R, in)     B  (n_adapters + 1, out, R)     R = parts * max_rank

and computes, for row b of the call with adapter index ids[b],

    y[b] = base(x[b]) + B[ids[b]] @ (A[ids[b]] @ x[b])

with the adapter's alpha / r folded into B. A fused layer (attention's `qkv_proj`) holds
its parts' updates side by side: part j's A in rows [j*max_rank, j*max_rank + r) of A and
its B in those columns of B over the part's rows only, so a block-structured update per
part, exactly `LoRALinear`'s. An adapter of a lower rank is padded with zeros; ranks may
differ between adapters and between layers.

The indices live in one `AdapterRows` the layers share: the caller sets `rows.ids` (B,)
before each model call. Every shape is fixed when applying (the capacity, not the adapters
loaded), so loading an adapter is an in-place copy into its index (`set_adapter`) and a
compiled model call sees the new weights without compiling again. The stacks are plain
tensor attributes, not parameters or buffers: they are not the model's weights (not in its
`state_dict`), and a compiler that freezes weights as constants reads them as inputs.

Layers whose input is not (B, T, in) rows of the call are not wrapped: MoE routers and
shared experts (tokens flattened) and MLA's latent projections (read as weights by its
absorbed decode); nor is `lm_head`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llm.core.lora import OUTPUT_LAYER, LoRALinear, Part, linear_layers


class AdapterRows:
    """The adapter index of each row of the next model call, shared by the model's
    `MultiLoRALinear`s: `ids` (B,) int64, 0 for the base."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.ids = torch.zeros(1, dtype=torch.long, device=device)


class MultiLoRALinear(nn.Module):
    """A linear layer plus, per row of the call, the low-rank update of that row's adapter."""

    def __init__(
        self, base: nn.Module, layout: Sequence[Part], rows: AdapterRows, n_adapters: int,
        max_rank: int,
    ) -> None:  # fmt: skip
        super().__init__()
        if n_adapters < 1 or max_rank < 1:
            raise ValueError(f"n_adapters ({n_adapters}) and max_rank ({max_rank}) must be >= 1")
        self.base, self.layout, self.rows, self.max_rank = base, tuple(layout), rows, max_rank
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        rank = len(self.layout) * max_rank
        self.lora_A = w.new_zeros(n_adapters + 1, rank, self.in_features)  # plain attributes:
        self.lora_B = w.new_zeros(n_adapters + 1, self.out_features, rank)  # module doc
        for t in (self.lora_A, self.lora_B):  # fixed sizes: a compiler must not make them
            torch._dynamo.mark_static(t)  # symbolic (nor equal to a batch size by chance)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @torch.no_grad()
    def set_adapter(self, index: int, lora: LoRALinear | None) -> None:
        """Put `lora`'s update (a standalone `LoRALinear` over this layer's layout) at
        `index`, or zeros (None: an adapter that leaves this layer alone, or none)."""
        if index < 1 or index >= self.lora_A.shape[0]:
            raise IndexError(f"adapter index {index} outside 1..{self.lora_A.shape[0] - 1}")
        self.lora_A[index].zero_()
        self.lora_B[index].zero_()
        if lora is None:
            return
        if lora.r > self.max_rank:
            raise ValueError(f"adapter rank {lora.r} is above the served maximum {self.max_rank}")
        for p in lora.parts:
            at = self.layout.index(p) * self.max_rank
            a, b = self.lora_A[index], self.lora_B[index]
            a[at : at + lora.r] = lora.lora_A[p.name].to(a.dtype)
            b[p.start : p.stop, at : at + lora.r] = (lora.lora_B[p.name] * lora.scaling).to(b.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, in), row b with adapter `rows.ids[b]` -> (B, T, out)."""
        y = self.base(x)
        ids = self.rows.ids
        a = self.lora_A.index_select(0, ids)  # (B, R, in)
        b = self.lora_B.index_select(0, ids)  # (B, out, R)
        h = torch.bmm(x.to(a.dtype), a.transpose(1, 2))  # (B, T, R)
        return y + torch.bmm(h, b.transpose(1, 2)).to(y.dtype)  # (B, T, out)

    def extra_repr(self) -> str:
        n = self.lora_A.shape[0] - 1
        return f"adapters={n}, max_rank={self.max_rank}, parts=[{', '.join(p.name for p in self.layout)}]"


def _excluded(model: nn.Module, name: str) -> bool:
    from llm.core.attn.mla import MultiHeadLatentAttention
    from llm.core.moe import MoE

    if name == OUTPUT_LAYER or name.endswith("." + OUTPUT_LAYER):
        return True
    path = name.split(".")
    parents = [model.get_submodule(".".join(path[:i])) for i in range(1, len(path))]
    return any(isinstance(p, MoE | MultiHeadLatentAttention) for p in parents)


def apply_multi_lora(model: nn.Module, n_adapters: int, max_rank: int) -> AdapterRows:
    """Wrap the model's linear layers (see the module doc for which) in `MultiLoRALinear`s
    with room for `n_adapters` adapters of rank up to `max_rank`, all zero. Returns the
    `AdapterRows` to set before each call. Apply after loading weights, before compile."""
    device = next(model.parameters()).device
    rows = AdapterRows(device)
    for name, layer, layout in list(linear_layers(model)):
        if isinstance(layer, LoRALinear | MultiLoRALinear) or _excluded(model, name):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, MultiLoRALinear(layer, layout, rows, n_adapters, max_rank))
    return rows


def multi_lora_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
