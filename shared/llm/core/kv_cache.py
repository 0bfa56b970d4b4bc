"""A preallocated KV cache written in place at device-side positions (gpt-fast style).

Shapes stay static: the buffers are (B, n_kv_heads, max_seq_len, head_dim) for the
whole generation, and each step scatters its new keys/values at `input_pos`.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at positions input_pos (B, T); return the full caches."""
        idx = input_pos[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, n_kv, T, hd)
        self.k_cache.scatter_(2, idx, k.to(self.k_cache.dtype))
        self.v_cache.scatter_(2, idx, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
