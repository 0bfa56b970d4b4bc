"""Rotary position embeddings (Su et al. 2021, RoFormer), in the rotate-half layout HF uses.

Frequency scaling variants follow `transformers.modeling_rope_utils` formula for formula:
linear (position interpolation, Chen et al. 2023), dynamic NTK (bloc97/emozilla), YaRN
(Peng et al. 2023), Llama 3.1's wavelength bands and LongRoPE (Phi-3). Tables are built once for
`max_seq_len` and indexed by position, never rebuilt in forward. Checkpoints that use the
interleaved layout (DeepSeek) are permuted into this one at import (`llm.interop`).
"""

from __future__ import annotations

import math

import torch


def rope_inv_freq(
    dim: int,
    theta: float,
    *,
    scaling: str | None = None,
    factor: float = 1.0,
    original_max_seq_len: int | None = None,
    max_seq_len: int | None = None,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Inverse frequencies (dim/2,), fp32, for the given scaling variant (None: plain rope)."""
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim  # (dim/2,)
    if scaling == "dynamic":
        # NTK-aware: a larger base for a longer context, fixed at the table length.
        seq_len = max(max_seq_len, original_max_seq_len)
        theta = theta * (factor * seq_len / original_max_seq_len - (factor - 1)) ** (
            dim / (dim - 2)
        )
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None or scaling == "dynamic":
        return inv_freq
    if scaling == "linear":
        return inv_freq / factor
    if scaling == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = original_max_seq_len / low_freq_factor
        high_wavelen = original_max_seq_len / high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_max_seq_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    if scaling == "yarn":
        low, high = _yarn_correction_range(
            beta_fast, beta_slow, dim, theta, original_max_seq_len, truncate
        )
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = (
            (torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)
        ).clamp(0, 1)
        extrapolate = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low ones (interpolated)
        pos_freqs = theta**exponents
        return 1.0 / (factor * pos_freqs) * (1 - extrapolate) + 1.0 / pos_freqs * extrapolate
    raise ValueError(f"unknown rope scaling {scaling!r}")


def _yarn_correction_range(
    beta_fast: float,
    beta_slow: float,
    dim: int,
    theta: float,
    original_max_seq_len: int,
    truncate: bool,
) -> tuple[float, float]:
    def correction_dim(n_rotations: float) -> float:
        return (
            dim
            * math.log(original_max_seq_len / (n_rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def longrope_inv_freq(
    dim: int, theta: float, ext_factors: tuple[float, ...], device: torch.device | str | None = None
) -> torch.Tensor:
    """LongRoPE (Phi-3): each frequency divided by its own rescale factor, (dim/2,) fp32."""
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    factors = torch.tensor(ext_factors, device=device, dtype=torch.float32)
    return 1.0 / (factors * theta**exponents)


def longrope_tables(
    dim: int,
    theta: float,
    short_factor: tuple[float, ...],
    long_factor: tuple[float, ...],
    original_max_seq_len: int,
    max_seq_len: int,
    attention_factor: float,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) tables: positions below `original_max_seq_len` rotate with the short
    factors, later ones with the long factors (one static table, see `RopeScaling`)."""
    short = rope_tables(
        longrope_inv_freq(dim, theta, short_factor, device), max_seq_len, attention_factor
    )
    long = rope_tables(
        longrope_inv_freq(dim, theta, long_factor, device), max_seq_len, attention_factor
    )
    n = min(original_max_seq_len, max_seq_len)
    return tuple(torch.cat([s[:n], lg[n:]]) for s, lg in zip(short, long, strict=True))


def rope_tables(
    inv_freq: torch.Tensor, max_seq_len: int, attention_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (cos, sin), each (max_seq_len, 2 * len(inv_freq)), in fp32.

    `attention_factor` scales both (YaRN's magnitude correction), as HF does.
    """
    t = torch.arange(max_seq_len, device=inv_freq.device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (L, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, d)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, T, H, d) by per-position angles; cos/sin are (T, r) or (B, T, r).

    With r < d only the leading r dims rotate and the rest pass through (partial rotary,
    Phi-3's `partial_rotary_factor`)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    cos = cos.unsqueeze(-2)  # (..., T, 1, d): broadcast over heads
    sin = sin.unsqueeze(-2)
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).type_as(x)
