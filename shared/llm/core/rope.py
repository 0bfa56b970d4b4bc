"""Rotary position embeddings (Su et al. 2021, RoFormer), in the rotate-half layout HF uses.

Tables are built once for `max_seq_len` and indexed by position, never rebuilt in forward.
"""

from __future__ import annotations

import torch


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (cos, sin), each (max_seq_len, head_dim), in fp32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, hd)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, T, H, hd) by per-position angles; cos/sin are (T, hd) or (B, T, hd)."""
    cos = cos.unsqueeze(-2)  # (..., T, 1, hd): broadcast over heads
    sin = sin.unsqueeze(-2)
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).type_as(x)
