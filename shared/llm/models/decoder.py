"""DecoderModel: a decoder-only transformer assembled from registry components.

The only module that reads `ModelConfig`. Variants are resolved once in `__init__`
(attention, MLP or MoE per layer, norm, positions, which layers slide); `forward` is
the data path: tokens in, logits out, with an optional preallocated KV cache for
prefill and one-token decode (gpt-fast). Loss, DDP, compile, LoRA and quantization are
applied from outside.

MoE auxiliary losses do not change `forward`'s output: each MoE layer keeps its last
routing statistics, and `router_losses()` / `aux_loss()` read them after a forward::

    logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + model.aux_loss()
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llm.config import ModelConfig, yarn_mscale
from llm.core.alibi import alibi_slopes
from llm.core.attn.masks import attention_mask
from llm.core.attn.mha import Attention
from llm.core.mlp import SwiGLU
from llm.core.moe import MoE
from llm.core.norm import LayerNorm, OffsetRMSNorm, RMSNorm
from llm.core.registry import ATTENTION_REGISTRY, MLP_REGISTRY, NORM_REGISTRY
from llm.core.rope import longrope_tables, rope_inv_freq, rope_tables
from llm.core.transformer_block import TransformerBlock


def _attention(c: ModelConfig) -> nn.Module:
    cls = ATTENTION_REGISTRY.get(c.attn_impl)
    common = dict(
        scale=c.attn_scale_factor / math.sqrt(c.attn_scale_dim or c.head_dim),
        eager=c.attn_backend == "eager",
        dropout=c.dropout,
    )
    if c.attn_impl == "mla":
        return cls(
            c.dim, c.n_heads, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
            qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
            q_lora_rank=c.q_lora_rank, bias=c.attn_bias, **common,
        )  # fmt: skip
    return cls(
        c.dim, c.n_heads, c.n_kv_heads, c.head_dim, qkv_bias=c.attn_bias,
        out_bias=c.attn_out_bias, qk_norm=c.qk_norm, norm_eps=c.norm_eps,
        qk_norm_all_heads=c.qk_norm_scope == "all_heads", norm_cls=_qk_norm_cls(c),
        softcap=c.attn_logit_softcap, sinks=c.attn_sinks,
        rope=c.position == "rope", **common,
    )  # fmt: skip


def _qk_norm_cls(c: ModelConfig) -> type[nn.Module]:
    """q/k norms follow the model's norm when it is an RMSNorm flavour ((1 + w) in Gemma 3),
    and are plain RMSNorm otherwise."""
    cls = NORM_REGISTRY.get(c.norm_impl)
    return cls if issubclass(cls, RMSNorm) else RMSNorm


def _mlp(c: ModelConfig, layer: int) -> nn.Module:
    if c.layer_is_moe(layer):
        return MoE(
            c.dim, c.moe_hidden_dim, c.n_experts, c.n_experts_per_tok,
            router_order=c.router_order, renormalize=c.router_renormalize,
            router_scale=c.router_scale, n_groups=c.router_n_groups,
            topk_groups=c.router_topk_groups, shared_hidden_dim=c.shared_expert_hidden_dim,
            shared_gate=c.shared_expert_gate, router_bias=c.router_bias,
            expert_bias=c.moe_expert_bias, activation=c.moe_activation,
            swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit,
            group_score=c.router_group_score, choice_bias=c.router_choice_bias,
        )  # fmt: skip
    if c.mlp_impl == "moe":  # a dense layer of an MoE model (DeepSeek's first layers)
        return SwiGLU(c.dim, c.hidden_dim, bias=c.mlp_bias, dropout=c.dropout)
    return MLP_REGISTRY.get(c.mlp_impl)(c.dim, c.hidden_dim, bias=c.mlp_bias, dropout=c.dropout)


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        norm_cls = NORM_REGISTRY.get(c.norm_impl)

        def norm() -> nn.Module:
            return norm_cls(c.dim, eps=c.norm_eps, bias=c.norm_bias)

        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        if c.position == "learned":
            self.embed_positions = nn.Embedding(c.max_seq_len, c.dim)
        if c.embed_norm:
            self.embed_norm = norm()
        self.embed_dropout = nn.Dropout(c.dropout)
        # Which norms each block has: before the sublayers (pre, post's after the add) and
        # on the sublayer outputs (output).
        input_norms = c.norm_position in ("pre", "post", "sandwich")
        output_norms = c.norm_position in ("output", "sandwich")
        self.layers = nn.ModuleList(
            TransformerBlock(
                self_attn=_attention(c),
                mlp=_mlp(c, i),
                input_layernorm=norm() if input_norms else None,
                post_attention_layernorm=norm() if input_norms else None,
                dropout=c.dropout,
                pre_norm=c.norm_position != "post",
                attn_output_norm=norm() if output_norms else None,
                mlp_output_norm=norm() if output_norms else None,
            )
            for i in range(c.n_layers)
        )
        # Post-LN blocks end in a norm already.
        self.norm = norm() if c.norm_position != "post" else nn.Identity()
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.tie_weights()
        # Which window each layer uses; forward builds one mask per distinct window.
        self._layer_windows = [c.layer_window(i) for i in range(c.n_layers)]
        # Which layers rotate with the sliding layers' own rope table (Gemma 3's local layers).
        self._layer_local_rope = [
            c.sliding_rope_theta is not None and w is not None for w in self._layer_windows
        ]
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.register_buffer("rope_local_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_local_sin", torch.empty(0), persistent=False)
        self.register_buffer("alibi_slopes", torch.empty(0), persistent=False)
        self.cache_max_seq_len = 0
        self.cache_batch_size = 0
        if self.embed_tokens.weight.device.type != "meta":
            self.reset_buffers()
            self.init_weights()

    # -- construction helpers -------------------------------------------------------------

    def tie_weights(self) -> None:
        """Share the embedding with the output projection when the config says so."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)build non-persistent buffers (rope tables, ALiBi slopes), e.g. after loading
        onto the meta device. They are always fp32."""
        c = self.config
        device = device or self.embed_tokens.weight.device
        # Unused tables stay empty, but on `device`: a meta leftover would fail `.to()`.
        self.rope_cos = self.rope_sin = self.alibi_slopes = torch.empty(0, device=device)
        self.rope_local_cos = self.rope_local_sin = torch.empty(0, device=device)
        if c.position == "rope" and c.sliding_rope_theta is not None:
            inv_freq = rope_inv_freq(c.rope_dim, c.sliding_rope_theta, device=device)
            self.rope_local_cos, self.rope_local_sin = rope_tables(inv_freq, c.max_seq_len)
        if (
            c.position == "rope"
            and c.rope_scaling is not None
            and c.rope_scaling.kind == "longrope"
        ):
            s = c.rope_scaling
            self.rope_cos, self.rope_sin = longrope_tables(
                c.rope_dim, c.rope_theta, s.short_factor, s.long_factor, s.original_max_seq_len,
                c.max_seq_len, _rope_attention_factor(c), device=device,
            )  # fmt: skip
        elif c.position == "rope":
            s = c.rope_scaling
            scaling = {} if s is None else dict(
                scaling=s.kind, factor=s.factor, original_max_seq_len=s.original_max_seq_len,
                max_seq_len=c.max_seq_len, low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor, beta_fast=s.beta_fast,
                beta_slow=s.beta_slow, truncate=s.truncate,
            )  # fmt: skip
            inv_freq = rope_inv_freq(c.rope_dim, c.rope_theta, device=device, **scaling)
            self.rope_cos, self.rope_sin = rope_tables(
                inv_freq, c.max_seq_len, _rope_attention_factor(c)
            )
        if c.position == "alibi":
            self.alibi_slopes = alibi_slopes(c.n_heads, device=device)

    def _apply(self, fn, recurse=True):  # nn.Module's signature, untyped
        # `.to(bfloat16)` would round the rope tables and slopes too; they stay fp32 as in HF.
        super()._apply(fn, recurse)
        buffers = (self.rope_cos, self.rope_local_cos, self.alibi_slopes)
        if any(b.numel() and b.dtype != torch.float32 and b.device.type != "meta" for b in buffers):
            self.reset_buffers(self.embed_tokens.weight.device)
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, std) everywhere, residual output projections scaled by depth,
        norms to identity."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(
                    module.weight, mean=0.0, std=residual_std if is_residual_out else std
                )
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, OffsetRMSNorm):
                nn.init.zeros_(module.weight)  # scales by 1 + weight
            elif isinstance(module, RMSNorm | LayerNorm):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MoE):
                ex = module.experts
                nn.init.normal_(ex.gate_up_proj, mean=0.0, std=std)
                nn.init.normal_(ex.down_proj, mean=0.0, std=residual_std)
                for bias in (ex.gate_up_proj_bias, ex.down_proj_bias):
                    if bias is not None:
                        nn.init.zeros_(bias)
            elif isinstance(module, Attention) and module.sinks is not None:
                nn.init.zeros_(module.sinks)

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
        """Allocate a KV cache for `batch_size` sequences of up to `max_seq_len` tokens.

        Each attention layer picks its own cache layout (full K/V, or MLA's latent).
        """
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(
                f"max_seq_len={max_seq_len} exceeds the model's {self.config.max_seq_len}"
            )
        w = self.embed_tokens.weight
        dtype, device = dtype or w.dtype, device or w.device
        for layer in self.layers:
            layer.self_attn.setup_cache(batch_size, max_seq_len, dtype, device)
        self.cache_max_seq_len, self.cache_batch_size = max_seq_len, batch_size

    def copy_cache(self, src: int, dst: int, length: int) -> None:
        """Copy positions [0, length) of cache row `src` into row `dst`, in every layer (a
        reused prompt prefix)."""
        for layer in self.layers:
            layer.self_attn.kv_cache.copy_(src, dst, length)

    def cache_bytes(self) -> int:
        """Memory the set-up KV cache holds, every layer (0 without one)."""
        caches = [layer.self_attn.kv_cache for layer in self.layers]
        return sum(
            b.numel() * b.element_size() for c in caches if c is not None for b in c.buffers()
        )

    def kv_cache_bytes(self, batch_size: int, max_seq_len: int) -> int:
        """Memory `setup_cache(batch_size, max_seq_len)` would take (in the weights' dtype),
        measured on the meta device: nothing is allocated, a set-up cache stays."""
        saved = [layer.self_attn.kv_cache for layer in self.layers]
        try:
            for layer in self.layers:
                layer.self_attn.setup_cache(
                    batch_size, max_seq_len, self.embed_tokens.weight.dtype, "meta"
                )
            return self.cache_bytes()
        finally:
            for layer, cache in zip(self.layers, saved, strict=True):
                layer.self_attn.kv_cache = cache

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.cache_max_seq_len = self.cache_batch_size = 0

    # -- MoE auxiliary losses ---------------------------------------------------------------

    def router_losses(self) -> dict[str, torch.Tensor]:
        """Unweighted router losses of the last forward (zeros for a dense model).

        `load_balance` is Switch Transformer's `E * sum_e f_e * P_e` with the routed
        fraction `f` and mean probability `P` averaged over all MoE layers first, exactly
        as transformers' `load_balancing_loss_func` (Mixtral, Qwen-MoE `aux_loss`).
        `z` is ST-MoE's router z-loss (mean squared logsumexp), averaged over layers.
        """
        stats = [
            layer.mlp.router_stats
            for layer in self.layers
            if isinstance(layer.mlp, MoE) and layer.mlp.router_stats is not None
        ]
        if not stats:
            zero = self.embed_tokens.weight.new_zeros((), dtype=torch.float32)
            return {"load_balance": zero, "z": zero}
        load = torch.stack([s.load for s in stats]).mean(0)  # (E,)
        prob = torch.stack([s.prob for s in stats]).mean(0)  # (E,)
        return {
            "load_balance": load.numel() * (load * prob).sum(),
            "z": torch.stack([s.z for s in stats]).mean(),
        }

    def expert_load(self) -> torch.Tensor | None:
        """(MoE layers, E): the share of the last forward's tokens each layer routed to each
        expert (a row sums to top_k); None for a dense model. What load balancing evens out."""
        loads = [
            layer.mlp.router_stats.load
            for layer in self.layers
            if isinstance(layer.mlp, MoE) and layer.mlp.router_stats is not None
        ]
        return torch.stack(loads).detach() if loads else None

    @torch.no_grad()
    def update_choice_bias(self, load: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing, once per optimizer step: each MoE
        layer's choice bias moves `rate` toward the mean load, `bias += rate * sign(mean -
        load)`, so overloaded experts get chosen less. `load`: `expert_load()`'s rows."""
        moes = [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]
        for moe, row in zip(moes, load, strict=True):
            if moe.e_score_correction_bias is not None:
                moe.e_score_correction_bias += rate * torch.sign(row.mean() - row)

    def aux_loss(self) -> torch.Tensor:
        """`router_aux_loss_coef * load_balance + router_z_loss_coef * z` of the last
        forward, ready to add to the language-modelling loss (0 for dense models)."""
        c, losses = self.config, self.router_losses()
        return c.router_aux_loss_coef * losses["load_balance"] + c.router_z_loss_coef * losses["z"]

    # -- forward ----------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache_rows: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        logits_at: torch.Tensor | None = None,
        kv_len: int = 0,
    ) -> torch.Tensor:
        """
        Args:
            tokens: (B, T) token ids.
            input_pos: (B, T) absolute positions of `tokens`; use it with a cache set up by
                `setup_cache` (prefill: 0..T-1, decode: one position per row). Without it
                the pass is a plain causal forward over positions 0..T-1 (training).
            position_ids, document_ids: (B, T), training only: packed rows holding several
                samples, positions restarting at 0 per sample and attention kept inside
                each sample (its `document_ids`), so nothing leaks between them.
            cache_rows: (B,) with a cache: the cache rows (slots) the B rows read and write,
                e.g. one slot's prefill while others decode; None: row b is cache row b.
            logits_to_keep: > 0: logits of the last this many positions only (a prefill
                needs the last one; the LM head over every position is wasted work).
            logits_at: (B,) the logits of position logits_at[b] of each row only, e.g. the
                last real token of each of several prompt chunks padded to one length.
            kv_len: with a cache, > 0: every query position is below kv_len, so attention
                reads only the cache's first kv_len positions instead of all of them.
        Returns:
            logits: (B, T, vocab_size); (B, logits_to_keep, ...) or (B, 1, ...) when asked
        """
        T = tokens.shape[1]
        if (input_pos is not None) != (self.cache_max_seq_len > 0):
            raise ValueError(
                "input_pos needs a KV cache (call setup_cache) and a set-up cache needs input_pos"
            )
        if input_pos is not None and (position_ids is not None or document_ids is not None):
            raise ValueError(
                "position_ids/document_ids are for packed training rows, not the cache"
            )
        c = self.config
        if input_pos is None and position_ids is not None:
            q_pos = k_pos = position_ids  # (B, T)
        elif input_pos is None:
            q_pos = torch.arange(T, device=tokens.device)[None]  # (1, T)
            k_pos = q_pos[0]  # (T,)
        else:
            q_pos = input_pos  # (B, T)
            k_pos = torch.arange(kv_len or self.cache_max_seq_len, device=tokens.device)  # (L,)

        x = self.embed_tokens(tokens)  # (B, T, dim)
        if c.embed_scale != 1.0:
            x = x * torch.tensor(c.embed_scale, dtype=x.dtype)  # rounded as the weights are
        if c.position == "learned":
            x = x + self.embed_positions(q_pos)  # (1|B, T, dim)
        if c.embed_norm:
            x = self.embed_norm(x)
        x = self.embed_dropout(x)

        cos = sin = local_cos = local_sin = None
        if c.position == "rope":
            cos, sin = self.rope_cos[q_pos], self.rope_sin[q_pos]  # (1|B, T, rope_dim)
        if any(self._layer_local_rope):
            local_cos, local_sin = self.rope_local_cos[q_pos], self.rope_local_sin[q_pos]
        slopes = self.alibi_slopes if c.position == "alibi" else None
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in dict.fromkeys(self._layer_windows):
            plain_causal = (
                input_pos is None and window is None and slopes is None and document_ids is None
            )
            masks[window] = (
                None if plain_causal else attention_mask(q_pos, k_pos, window, slopes, document_ids)
            )

        for layer, window, local in zip(
            self.layers, self._layer_windows, self._layer_local_rope, strict=True
        ):
            rope = (local_cos, local_sin) if local else (cos, sin)
            x = layer(x, *rope, input_pos, masks[window], cache_rows, kv_len)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]  # (B, 1, dim)
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.norm(x))  # (B, T or logits_to_keep, V)
        if c.final_logit_softcap is not None:
            logits = torch.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
        return logits


def _rope_attention_factor(c: ModelConfig) -> float:
    """YaRN and LongRoPE scale cos/sin by a magnitude factor; the others leave them alone."""
    s = c.rope_scaling
    if s is None or s.kind not in ("yarn", "longrope"):
        return 1.0
    if s.attention_factor is not None:
        return s.attention_factor
    if s.kind == "longrope":
        if s.factor <= 1:
            return 1.0
        return math.sqrt(1 + math.log(s.factor) / math.log(s.original_max_seq_len))
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor)
