"""Preallocated caches written in place at device-side positions (gpt-fast style).

Shapes stay static for the whole generation and each step scatters its new entries at
`input_pos` (B, T), so rows of a batch may sit at different positions. The cache's batch
rows are the engine's slots: a decode step over the first B slots passes `rows=None` (a
view, no copy); a prefill of some slots passes their row indices `rows` (B,), writes only
those rows and attends over a copy of them.

- `KVCache` holds full keys and values per KV head (MHA/GQA/MQA).
- `LatentKVCache` holds what multi-head latent attention needs: the normalised
  compressed latent and the shared rotated key, (kv_lora_rank + rope_dim) numbers per
  token instead of 2 * n_heads * head_dim (DeepSeek-V2, section 2.1).
"""

from __future__ import annotations

import torch
from torch import nn


def _scatter_at(
    cache: torch.Tensor,
    input_pos: torch.Tensor,
    new: torch.Tensor,
    dim: int,
    rows: torch.Tensor | None = None,
    kv_len: int = 0,
) -> torch.Tensor:
    """Write `new` into `cache` along `dim` at per-row positions `input_pos` (B, T), in cache
    rows `rows` (B,) or the first B rows; return those rows (a copy when `rows` is set),
    only their first `kv_len` positions when it is > 0 (attention needs no more).

    One `index_put_` on the whole cache either way: compiled, it writes in place, where a
    `scatter_` into the view `cache[:B]` was functionalized into a copy of all B rows at
    every layer of every decode step (a 16-slot decode step of a 200M model spent more
    time copying its cache than in its matmuls)."""
    B, T = input_pos.shape
    first = rows is None
    if first:
        rows = torch.arange(B, device=cache.device)
    # Index every dim before the last: rows, the dims between (heads), positions.
    index: list[torch.Tensor] = [rows.view(B, *[1] * (dim - 1), 1)]
    for d in range(1, dim):
        n = cache.shape[d]
        index.append(torch.arange(n, device=cache.device).view(1, *[1] * (d - 1), n, 1))
    index.append(input_pos.view(B, *[1] * (dim - 1), T))
    cache.index_put_(tuple(index), new.to(cache.dtype))
    kept = cache.narrow(dim, 0, kv_len) if kv_len else cache
    return kept[:B] if first else kept.index_select(0, rows)


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
        self.register_buffer(
            "k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )

    def update(
        self,
        input_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rows: torch.Tensor | None = None,
        kv_len: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at positions input_pos (B, T) of cache rows `rows`
        (B,) or of the first B rows; return those rows' caches, (B, n_kv, L, hd) each."""
        return (
            _scatter_at(self.k_cache, input_pos, k, 2, rows, kv_len),
            _scatter_at(self.v_cache, input_pos, v, 2, rows, kv_len),
        )

    def copy_(self, src: int, dst: int, length: int) -> None:
        """Positions [0, length) of row `src` into row `dst` (a shared prompt prefix)."""
        self.k_cache[dst, :, :length] = self.k_cache[src, :, :length]
        self.v_cache[dst, :, :length] = self.v_cache[src, :, :length]

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()


class LatentKVCache(nn.Module):
    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.register_buffer(
            "latent_cache",
            torch.zeros(batch_size, max_seq_len, kv_lora_rank, **kw),
            persistent=False,
        )
        self.register_buffer(
            "k_rope_cache", torch.zeros(batch_size, max_seq_len, rope_dim, **kw), persistent=False
        )

    def update(
        self,
        input_pos: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        rows: torch.Tensor | None = None,
        kv_len: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write latent (B, T, r) and k_rope (B, T, dr) at input_pos (B, T) of cache rows
        `rows` (B,) or of the first B rows; return those rows' caches."""
        return (
            _scatter_at(self.latent_cache, input_pos, latent, 1, rows, kv_len),
            _scatter_at(self.k_rope_cache, input_pos, k_rope, 1, rows, kv_len),
        )

    def copy_(self, src: int, dst: int, length: int) -> None:
        """Positions [0, length) of row `src` into row `dst` (a shared prompt prefix)."""
        self.latent_cache[dst, :length] = self.latent_cache[src, :length]
        self.k_rope_cache[dst, :length] = self.k_rope_cache[src, :length]

    def reset(self) -> None:
        self.latent_cache.zero_()
        self.k_rope_cache.zero_()
