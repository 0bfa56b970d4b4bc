"""Shared machinery of the Hugging Face families: key maps, the conversion loop, rope fields.

A family describes each of our parameters as a `Map`: the HF keys holding it, how to
join them into our tensor (import) and how to split ours back (export). One
description serves both directions, so importer and exporter cannot drift apart.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from llm.config import ModelConfig, RopeScaling
from llm.models.decoder import DecoderModel

Tensor = torch.Tensor

# Buffers some checkpoints saved; we rebuild them from the config instead.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def _first(ts: Sequence[Tensor]) -> Tensor:
    return ts[0]


def _single(t: Tensor) -> list[Tensor]:
    return [t]


@dataclass(frozen=True)
class Map:
    """Where one of our tensors lives in a Hugging Face state dict."""

    keys: tuple[str, ...]
    join: Callable[[Sequence[Tensor]], Tensor] = _first  # HF tensors -> ours
    split: Callable[[Tensor], Sequence[Tensor]] = _single  # ours -> HF tensors, in `keys` order
    # A key holding our tensor as it is, tried first on import (transformers 5 keeps MoE
    # experts fused in memory while checkpoints on disk store one tensor per expert).
    fused: str | None = None
    # (i, n): ours is chunk i of n of the one HF tensor along dim 0, the other chunks
    # being other tensors of ours (Phi-3's gate_up_proj holds our gate_proj | up_proj).
    chunk: tuple[int, int] | None = None


Mapper = Callable[[str, ModelConfig], Map]


# Config fields only some families express, at the value every other family needs.
OPTIONAL_FIELDS: dict[str, Any] = dict(
    qk_norm_scope="head", rotary_dim=None, embed_scale=1.0, final_logit_softcap=None,
    attn_scale_dim=None, attn_logit_softcap=None, attn_sinks=False, sliding_rope_theta=None,
    router_bias=False, moe_expert_bias=False, moe_activation="swiglu", swiglu_alpha=1.702,
    swiglu_limit=7.0, router_choice_bias=False, router_group_score="max",
)  # fmt: skip


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture: config translation both ways plus the key map.

    `features` names the `OPTIONAL_FIELDS` the family expresses; `config_to_hf` refuses
    a config that sets any other (so no export silently drops, say, attention sinks).
    """

    model_type: str
    config_from_hf: Callable[[Any], ModelConfig]
    config_to_hf: Callable[[ModelConfig], transformers.PretrainedConfig]
    mapper: Mapper
    ignored: tuple[str, ...] = field(default=IGNORED_SUFFIXES)
    features: frozenset[str] = frozenset()
    # HF keys import leaves out on purpose: the reason (warned once per reason), or None.
    skip: Callable[[str, ModelConfig], str | None] | None = None

    def __post_init__(self) -> None:
        export = self.config_to_hf

        def checked(config: ModelConfig) -> transformers.PretrainedConfig:
            for name, default in OPTIONAL_FIELDS.items():
                if name not in self.features and getattr(config, name) != default:
                    raise ValueError(
                        f"{name}={getattr(config, name)!r} cannot be expressed as "
                        f"{self.model_type} (needs {default!r})"
                    )
            return export(config)

        object.__setattr__(self, "config_to_hf", checked)


# -- key-map helpers --------------------------------------------------------------------------


def concat(keys: Sequence[str], sizes: Sequence[int]) -> Map:
    """Ours is the HF tensors concatenated along dim 0 (fused q/k/v)."""
    return Map(
        tuple(keys), join=lambda ts: torch.cat(list(ts)), split=lambda t: t.split(list(sizes))
    )


def permuted(key: str, perm: Tensor) -> Map:
    """Ours is the HF tensor with its dim-0 rows reordered by `perm`."""
    inverse = torch.argsort(perm)
    return Map((key,), join=lambda ts: ts[0][perm], split=lambda t: [t[inverse]])


def chunk_of(key: str, index: int, n: int) -> Map:
    """Ours is chunk `index` of `n` equal parts of the HF tensor along dim 0 (a copy: two
    parameters sharing one storage would not save as safetensors)."""
    return Map((key,), join=lambda ts: ts[0].chunk(n)[index].clone(), chunk=(index, n))


def transposed(key: str) -> Map:
    """Ours is the HF tensor transposed (GPT-2's Conv1D stores weights as (in, out))."""
    return Map((key,), join=lambda ts: ts[0].t(), split=lambda t: [t.t()])


def experts(n_experts: int, gate_up: tuple[str, str] | None, down: str | None, fused: str) -> Map:
    """Ours is (E, 2H, D) gate|up or (E, D, H) down; HF stores one 2-D tensor per expert.

    `gate_up` / `down` are format strings with `{e}` for the expert index.
    """
    if gate_up is not None:
        keys = tuple(k.format(e=e) for e in range(n_experts) for k in gate_up)
        return Map(
            keys,
            join=lambda ts: torch.stack(
                [torch.cat([g, u]) for g, u in zip(ts[::2], ts[1::2], strict=True)]
            ),
            split=lambda t: [half for w in t for half in w.chunk(2)],
            fused=fused,
        )
    return Map(
        tuple(down.format(e=e) for e in range(n_experts)),
        join=lambda ts: torch.stack(list(ts)),
        split=lambda t: list(t.unbind(0)),
        fused=fused,
    )


def qkv_sizes(config: ModelConfig) -> list[int]:
    kv = config.n_kv_heads * config.head_dim
    return [config.n_heads * config.head_dim, kv, kv]


# -- conversion loop --------------------------------------------------------------------------


def param_names(config: ModelConfig) -> list[str]:
    """Our state-dict names for `config`, without a tied lm_head (it is the embedding)."""
    with torch.device("meta"):  # names only: allocate nothing
        names = list(DecoderModel(config).state_dict())
    return [n for n in names if not (config.tie_embeddings and n == "lm_head.weight")]


def to_hf_tensors(model: DecoderModel, family: Family) -> dict[str, Tensor]:
    config, sd = model.config, model.state_dict()
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[int, Tensor]] = {}  # HF tensors assembled from several of ours
    for name in param_names(config):
        m = family.mapper(name, config)
        if m.chunk is not None:
            index, n = m.chunk
            parts.setdefault(m.keys[0], {})[index] = sd[name]
            if len(parts[m.keys[0]]) == n:
                chunks = parts.pop(m.keys[0])
                out[m.keys[0]] = torch.cat([chunks[i] for i in range(n)]).detach().contiguous()
            continue
        for key, t in zip(m.keys, m.split(sd[name]), strict=True):
            out[key] = t.detach().contiguous()
    if parts:
        raise ValueError(f"HF tensors with missing parts: {sorted(parts)}")
    return out


def from_hf_tensors(
    sd: Mapping[str, Tensor], config: ModelConfig, family: Family
) -> dict[str, Tensor]:
    """Map HF tensors to exactly `DecoderModel(config).state_dict()`'s keys.

    A missing tensor raises `KeyError` naming the HF key; a tensor nothing maps to
    raises `ValueError` (rather than silently dropping weights).
    """
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for name in param_names(config):
        m = family.mapper(name, config)
        if m.fused is not None and m.fused in sd:
            out[name], keys = sd[m.fused], (m.fused,)
        else:
            if missing := [k for k in m.keys if k not in sd]:
                raise KeyError(
                    f"Hugging Face checkpoint has no tensor {missing[0]!r} (for {name!r})"
                )
            out[name], keys = m.join([sd[k] for k in m.keys]), m.keys
        used.update(keys)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
        used.add("lm_head.weight")  # tied HF models may still list it (the same tensor)
    extra = sorted(k for k in sd if k not in used and not k.endswith(family.ignored))
    if family.skip is not None:
        skipped: dict[str, list[str]] = {}
        for key in extra:
            if (reason := family.skip(key, config)) is not None:
                skipped.setdefault(reason, []).append(key)
        for reason, keys in skipped.items():
            warnings.warn(
                f"{family.model_type}: leaving out {len(keys)} tensors of {reason}, "
                f"e.g. {keys[0]!r}",
                stacklevel=3,
            )
        extra = [k for k in extra if not any(k in keys for keys in skipped.values())]
    if extra:
        raise ValueError(f"unexpected tensors in the Hugging Face checkpoint: {extra}")
    return out


# -- config helpers ---------------------------------------------------------------------------


def require(config: ModelConfig, family: str, **expected: Any) -> None:
    """Raise `ValueError` naming the first field whose value `family` cannot express."""
    for name, value in expected.items():
        if getattr(config, name) != value:
            raise ValueError(
                f"{name}={getattr(config, name)!r} cannot be expressed as {family} (needs {value!r})"
            )


def check_act(hf_config: Any, *allowed: str, field_name: str = "hidden_act") -> None:
    act = getattr(hf_config, field_name)
    if act not in allowed:
        raise ValueError(f"{field_name}={act!r} is not supported (expected one of {list(allowed)})")


_SCALING_KEYS = (
    "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
    "attention_factor", "truncate",
)  # fmt: skip


def rope_params(hf_config: Any) -> dict[str, Any]:
    # transformers 5 keeps rope settings in `rope_parameters`; 4.x has a `rope_theta`
    # attribute plus an optional `rope_scaling` dict (`type` in old configs).
    return (
        getattr(hf_config, "rope_parameters", None)
        or getattr(hf_config, "rope_scaling", None)
        or {}
    )


_ROPE_KINDS = ("linear", "dynamic", "yarn", "llama3")


def rope_fields(
    hf_config: Any, kinds: tuple[str, ...] = _ROPE_KINDS, partial_rotary: bool = False
) -> dict[str, Any]:
    """`rope_theta`, `rope_scaling` and `max_seq_len` from an HF config; `kinds` are the
    scaling types the family's reference computes as we do, `partial_rotary` whether it
    reads `partial_rotary_factor` (the caller then sets `rotary_dim`)."""
    params = rope_params(hf_config)
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    max_len = hf_config.max_position_embeddings
    out: dict[str, Any] = dict(rope_theta=theta, max_seq_len=max_len)
    if kind == "default":
        return out
    if kind not in kinds:
        raise NotImplementedError(
            f"rope_type={kind!r} is not supported ({', '.join(('default', *kinds))})"
        )
    if not partial_rotary and params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not supported")
    original = params.get("original_max_position_embeddings")
    factor = params.get("factor") or max_len / original
    if kind == "dynamic":
        # HF stretches from max_position_embeddings by the current length; our tables are
        # static, so they span factor * that (see `RopeScaling`).
        original, out["max_seq_len"] = max_len, int(factor * max_len)
    extra = {k: params[k] for k in _SCALING_KEYS if params.get(k) is not None}
    if kind == "longrope":
        extra.update(
            short_factor=tuple(params["short_factor"]), long_factor=tuple(params["long_factor"])
        )
    out["rope_scaling"] = RopeScaling(
        kind=kind, factor=factor, original_max_seq_len=original, **extra
    )
    return out


def require_rope(
    config: ModelConfig,
    family: str,
    kinds: tuple[str, ...] = _ROPE_KINDS,
    partial_rotary: bool = False,
) -> None:
    """Raise `ValueError` when `family` cannot express the config's rope (the inverse of
    what `rope_fields` accepts for it)."""
    s = config.rope_scaling
    if s is not None and s.kind not in kinds:
        raise ValueError(f"rope_scaling kind={s.kind!r} cannot be expressed as {family}")
    if config.rotary_dim is not None and not partial_rotary:
        raise ValueError(f"rotary_dim={config.rotary_dim} cannot be expressed as {family}")


def rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    """`rope_theta`, `rope_scaling` and `max_position_embeddings` kwargs for an HF config."""
    s = config.rope_scaling
    if s is None:
        return dict(rope_theta=config.rope_theta, max_position_embeddings=config.max_seq_len)
    params: dict[str, Any] = dict(rope_type=s.kind, factor=s.factor, rope_theta=config.rope_theta)
    max_len = config.max_seq_len
    if s.kind == "dynamic":
        max_len = s.original_max_seq_len
    else:
        params["original_max_position_embeddings"] = s.original_max_seq_len
    if s.kind == "llama3":
        params.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.kind == "longrope":
        params.update(short_factor=list(s.short_factor), long_factor=list(s.long_factor))
        if s.attention_factor is not None:
            params["attention_factor"] = s.attention_factor
    if s.kind == "yarn":
        params.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
        params.update(
            {
                k: getattr(s, k)
                for k in ("mscale", "mscale_all_dim", "attention_factor")
                if getattr(s, k) is not None
            }
        )
    # `rope_scaling` is the spelling transformers 4 reads and 5 converts.
    return dict(rope_theta=config.rope_theta, rope_scaling=params, max_position_embeddings=max_len)


def common_hf_kwargs(config: ModelConfig, architecture: str) -> dict[str, Any]:
    return dict(
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        # Token ids belong to the tokenizer, not ModelConfig; family defaults would lie.
        bos_token_id=None,
        eos_token_id=None,
        architectures=[architecture],
    )
