"""Leaf modules on their own: MLA's two computations, the attention kernels, GeGLU, post-LN."""

from __future__ import annotations

import torch
import transformers
from transformers.models.gemma.modeling_gemma import GemmaMLP

from llm.core.alibi import alibi_slopes
from llm.core.attn.kernel import attend
from llm.core.attn.masks import attention_mask
from llm.core.attn.mla import MultiHeadLatentAttention
from llm.core.mlp import GeGLU
from llm.core.norm import LayerNorm
from llm.core.rope import rope_inv_freq, rope_tables
from llm.core.transformer_block import TransformerBlock

TOL = dict(atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mla_absorbed_cache_path_matches_expanded() -> None:
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(
        29, 3, kv_lora_rank=9, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, q_lora_rank=7
    ).eval()
    for p in mla.parameters():
        p.normal_(std=0.3)
    cos, sin = rope_tables(rope_inv_freq(4, 100.0), 16)
    x = torch.randn(2, 11, 29)
    full = mla(x, cos[:11], sin[:11])  # expanded K/V, causal
    mla.setup_cache(2, 16, torch.float32, "cpu")
    pos = torch.arange(11).expand(2, -1)
    mask = attention_mask(pos, torch.arange(16))
    torch.testing.assert_close(mla(x, cos[pos], sin[pos], pos, mask), full, **TOL)


def test_eager_kernel_matches_sdpa_with_gqa_window_and_alibi() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 7, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 5)
    q_pos = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5, 6]])
    for mask in (
        attention_mask(q_pos, torch.arange(12), window=4),
        attention_mask(q_pos, torch.arange(12), alibi_slopes=alibi_slopes(6)),
    ):
        torch.testing.assert_close(
            attend(q, k, v, mask, 0.3, eager=True), attend(q, k, v, mask, 0.3), **TOL
        )
    q, k, v = torch.randn(2, 6, 7, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    torch.testing.assert_close(
        attend(q, k, v, None, 0.3, eager=True), attend(q, k, v, None, 0.3), **TOL
    )


def test_a_decode_step_attends_by_kv_group_as_per_head() -> None:
    """One query per head (a decode step) over GQA/MQA keys, with a per-row mask or an
    ALiBi bias: the grouped form (a group's queries as rows over its K/V) gives the
    per-head reference."""
    torch.manual_seed(0)
    for kv_heads, dv in ((2, 8), (1, 5)):
        q, k, v = (
            torch.randn(3, 6, 1, 8),
            torch.randn(3, kv_heads, 12, 8),
            torch.randn(3, kv_heads, 12, dv),
        )
        q_pos = torch.tensor([[11], [4], [7]])  # rows see 12, 5 and 8 keys
        for mask in (
            attention_mask(q_pos, torch.arange(12)),
            attention_mask(q_pos, torch.arange(12), alibi_slopes=alibi_slopes(6)),
        ):
            torch.testing.assert_close(
                attend(q, k, v, mask, 0.3), attend(q, k, v, mask, 0.3, eager=True), **TOL
            )


def test_a_prefill_chunk_after_a_cache_attends_by_kv_group_as_per_head() -> None:
    """Several queries per head at per-row positions (a prompt chunk after cached tokens)
    over GQA/MQA keys, with a per-row mask, one mask for every row, or an ALiBi bias:
    the grouped form (a group's queries x positions as rows) gives the per-head
    reference."""
    torch.manual_seed(0)
    for kv_heads in (2, 1):
        q = torch.randn(3, 6, 4, 8)
        k, v = torch.randn(3, kv_heads, 12, 8), torch.randn(3, kv_heads, 12, 8)
        q_pos = torch.tensor([[8, 9, 10, 11], [2, 3, 4, 5], [5, 6, 7, 8]])
        for mask in (
            attention_mask(q_pos, torch.arange(12)),
            attention_mask(q_pos[:1], torch.arange(12)),  # broadcast over the rows
            attention_mask(q_pos, torch.arange(12), alibi_slopes=alibi_slopes(6)),
        ):
            torch.testing.assert_close(
                attend(q, k, v, mask, 0.3), attend(q, k, v, mask, 0.3, eager=True), **TOL
            )


@torch.no_grad()
def test_geglu_matches_gemma_mlp() -> None:
    cfg = transformers.GemmaConfig(
        hidden_size=13, intermediate_size=21, hidden_activation="gelu_pytorch_tanh"
    )
    ref = GemmaMLP(cfg)
    ours = GeGLU(13, 21)
    ours.load_state_dict({k: v for k, v in ref.state_dict().items()})
    x = torch.randn(3, 13)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


class _Linear(torch.nn.Linear):
    """Stands in for attention: takes (and ignores) the position arguments."""

    def forward(self, x: torch.Tensor, *_: object) -> torch.Tensor:
        return super().forward(x)


@torch.no_grad()
def test_post_ln_block_formula() -> None:
    torch.manual_seed(0)
    attn, mlp = _Linear(8, 8), torch.nn.Linear(8, 8)
    n1, n2 = LayerNorm(8), LayerNorm(8, bias=False)
    block = TransformerBlock(attn, mlp, n1, n2, pre_norm=False)
    x = torch.randn(2, 3, 8)
    h = n1(x + attn(x))
    torch.testing.assert_close(block(x, None, None), n2(h + mlp(h)))
