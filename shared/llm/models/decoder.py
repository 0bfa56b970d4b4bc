"""DecoderModel: a decoder-only transformer assembled from registry components.

The only module that reads `ModelConfig`. Variants are resolved once in `__init__`;
`forward` is the data path: tokens in, logits out, with an optional preallocated KV
cache for prefill and one-token decode (gpt-fast). Loss, DDP, compile, LoRA and
quantization are applied from outside (STYLE.md 5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llm.config import ModelConfig
from llm.core.kv_cache import KVCache
from llm.core.registry import ATTENTION_REGISTRY, MLP_REGISTRY, NORM_REGISTRY
from llm.core.rope import rope_tables
from llm.core.transformer_block import TransformerBlock


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        attn_cls = ATTENTION_REGISTRY.get(c.attn_impl)
        mlp_cls = MLP_REGISTRY.get(c.mlp_impl)
        norm_cls = NORM_REGISTRY.get(c.norm_impl)

        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.embed_dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(
                self_attn=attn_cls(
                    c.dim, c.n_heads, c.n_kv_heads, c.head_dim,
                    qkv_bias=c.attn_bias, out_bias=c.attn_out_bias, dropout=c.dropout,
                ),
                mlp=mlp_cls(c.dim, c.hidden_dim, bias=c.mlp_bias, dropout=c.dropout),
                input_layernorm=norm_cls(c.dim, eps=c.norm_eps),
                post_attention_layernorm=norm_cls(c.dim, eps=c.norm_eps),
                dropout=c.dropout,
            )
            for _ in range(c.n_layers)
        )  # fmt: skip
        self.norm = norm_cls(c.dim, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.cache_max_seq_len = self.cache_batch_size = 0
        if self.embed_tokens.weight.device.type != "meta":
            self.reset_buffers()
            self.init_weights()

    # -- construction helpers -------------------------------------------------------------

    def tie_weights(self) -> None:
        """Share the embedding with the output projection when the config says so."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)build non-persistent buffers, e.g. after loading onto the meta device."""
        c = self.config
        device = device or self.embed_tokens.weight.device
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, device=device)
        self.rope_cos, self.rope_sin = cos, sin

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202  (nn.Module's signature)
        # `.to(bfloat16)` would round the rope tables too; angles stay fp32 as in HF.
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32 and self.rope_cos.device.type != "meta":
            self.reset_buffers(self.rope_cos.device)
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, std) everywhere, residual output projections scaled by depth."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = std / math.sqrt(2 * self.config.n_layers)
                is_residual_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=scale if is_residual_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- KV cache ---------------------------------------------------------------------------

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate a KV cache for `batch_size` sequences of up to `max_seq_len` tokens."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's {self.config.max_seq_len}")
        w = self.embed_tokens.weight
        dtype, device = dtype or w.dtype, device or w.device
        for layer in self.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(
                batch_size, attn.n_kv_heads, max_seq_len, attn.head_dim, dtype=dtype, device=device
            )
        self.cache_max_seq_len, self.cache_batch_size = max_seq_len, batch_size

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.cache_max_seq_len = self.cache_batch_size = 0

    # -- forward ----------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            tokens: (B, T) token ids.
            input_pos: (B, T) absolute positions of `tokens`; use it with a cache set up by
                `setup_cache` (prefill: 0..T-1, decode: one position per row). Without it
                the pass is a plain causal forward over positions 0..T-1 (training).
        Returns:
            logits: (B, T, vocab_size)
        """
        B, T = tokens.shape
        if (input_pos is not None) != (self.cache_max_seq_len > 0):
            raise ValueError(
                "input_pos needs a KV cache (call setup_cache) and a set-up cache needs input_pos"
            )
        if input_pos is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hd)
            mask = None
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # (B, T, hd)
            k_pos = torch.arange(self.cache_max_seq_len, device=tokens.device)
            mask = (k_pos[None, None, :] <= input_pos[:, :, None]).unsqueeze(1)  # (B, 1, T, L)
        x = self.embed_dropout(self.embed_tokens(tokens))  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        return self.lm_head(self.norm(x))  # (B, T, V)
