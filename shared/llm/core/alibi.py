"""ALiBi: attention with linear biases (Press et al. 2022), with BLOOM's head slopes.

Each head h adds `slope_h * (k_pos - q_pos)` to its scores: no position embeddings, a
recency bias whose strength differs per head. The bias is built from positions when the
masks are (`llm.core.attn.masks`), so cached decode and recompute see the same numbers.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(n_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-head slopes (n_heads,), fp32: a geometric series for the nearest power of two,
    then every other slope of the next power of two for the remaining heads (paper and BLOOM)."""
    pow2 = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(pow2) - 3)))
    slopes = base ** torch.arange(1, pow2 + 1, device=device, dtype=torch.float32)
    if pow2 != n_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * pow2) - 3)))
        n_extra = min(pow2, n_heads - pow2)
        extra = extra_base ** torch.arange(1, 2 * n_extra, 2, device=device, dtype=torch.float32)
        slopes = torch.cat([slopes, extra])
    return slopes
