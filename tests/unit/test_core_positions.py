"""RoPE scaling variants and ALiBi slopes against the `transformers` formulas they follow."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from llm.core.alibi import alibi_slopes
from llm.core.rope import rope_inv_freq

HEAD_DIM, THETA = 24, 5000.0

SCALINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (HF rope_parameters beyond type/theta, our rope_inv_freq kwargs)
    "linear": (dict(factor=3.0), dict(factor=3.0)),
    "llama3": (
        dict(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64),
    ),
    "yarn": (
        dict(factor=4.0, original_max_position_embeddings=64, beta_fast=16.0, beta_slow=2.0),
        dict(factor=4.0, original_max_seq_len=64, beta_fast=16.0, beta_slow=2.0),
    ),
    "yarn-no-truncate": (
        dict(factor=4.0, original_max_position_embeddings=64, truncate=False),
        dict(factor=4.0, original_max_seq_len=64, truncate=False),
    ),
}


def _hf_config(rope_type: str, params: dict[str, Any], max_pos: int = 256) -> Any:
    return transformers.LlamaConfig(
        hidden_size=4 * HEAD_DIM, num_attention_heads=4, head_dim=HEAD_DIM,
        max_position_embeddings=max_pos,
        rope_parameters=dict(rope_type=rope_type, rope_theta=THETA, **params),
    )  # fmt: skip


@pytest.mark.parametrize("name", SCALINGS)
def test_inv_freq_matches_transformers(name: str) -> None:
    hf_params, ours = SCALINGS[name]
    rope_type = name.split("-")[0]
    expected, _ = ROPE_INIT_FUNCTIONS[rope_type](_hf_config(rope_type, hf_params), "cpu")
    got = rope_inv_freq(HEAD_DIM, THETA, scaling=rope_type, **ours)
    torch.testing.assert_close(got, expected, atol=0, rtol=1e-6)


def test_dynamic_ntk_is_hf_at_the_table_length() -> None:
    # HF re-derives the base from the current length; ours is fixed at max_seq_len.
    hf = _hf_config("dynamic", dict(factor=2.0), max_pos=64)
    expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=200)
    got = rope_inv_freq(
        HEAD_DIM, THETA, scaling="dynamic", factor=2.0, original_max_seq_len=64, max_seq_len=200
    )
    torch.testing.assert_close(got, expected, atol=0, rtol=1e-6)


@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 33])
def test_alibi_slopes_match_bloom(n_heads: int) -> None:
    torch.testing.assert_close(alibi_slopes(n_heads), _get_alibi_slopes(n_heads, "cpu"))
