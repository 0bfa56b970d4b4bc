"""LoRA adapters in PEFT's on-disk layout, for `DecoderModel`s wrapped by `llm.core.lora`.

A PEFT adapter directory holds `adapter_config.json` (a `LoraConfig`) and
`adapter_model.safetensors` with `base_model.model.<HF module>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r) per adapted module of the Hugging Face model, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` for a Llama export.

Our layers map onto HF modules through the same key map `llm.interop.hf` converts weights
with (`Family.mapper`), applied to row indices: each HF module holds some rows of one of
our layers, maybe permuted (DeepSeek's rope rows) or transposed (GPT-2's Conv1D, then
`fan_in_fan_out`). A LoRA part maps onto the HF modules holding its rows:
- one HF module per part (Llama's q_proj/k_proj/v_proj of our fused qkv_proj, every
  unfused layer): the part's A and B as they are (B's rows permuted if the weight's are);
- one HF module over several parts (GPT-2's `c_attn`, BLOOM's `query_key_value`): one
  LoRA of rank `n_parts * r` with A the parts' A stacked and B block-diagonal (zero blocks
  for unadapted parts), `alpha` scaled alike so alpha / r is unchanged; `rank_pattern` and
  `alpha_pattern` say so. That is exactly the per-part update, in PEFT's form.

`load_adapter` reads the same mapping back, also for adapters PEFT trained, as long as
each HF module's update fits our parts (a block-structured update on a fused HF module).

One PEFT limit to know: for MoE families laid out like Qwen2-MoE (qwen2_moe, qwen3_moe,
deepseek_v2, deepseek_v3), PEFT >= 0.19 reads `gate_proj`/`up_proj`/`down_proj` targets as the fused
routed experts' parameters, so an adapter on those models' dense or shared-expert MLPs
does not load in PEFT as written; attention targets do. Phi-3's `gate_up_proj` holds
two of our layers (gate_proj, up_proj), which one PEFT LoRA cannot express per part:
adapters on them raise `NotImplementedError`; attention and `down_proj` targets work.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llm.core.lora import LoRALinear, Part, apply_lora, linear_layers, lora_modules, merge_lora
from llm.interop._common import Family, param_names
from llm.interop.hf import _family, infer_model_type
from llm.models.decoder import DecoderModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF causal LM


class HFModule(NamedTuple):
    """A Hugging Face linear module holding some rows of one of our layers."""

    name: str  # e.g. model.layers.0.self_attn.q_proj
    rows: torch.Tensor  # (n,) int64: our output rows, in the HF module's row order
    transposed: bool  # stored (in, out), as GPT-2's Conv1D


def hf_modules(name: str, out_features: int, model: DecoderModel, family: Family) -> list[HFModule]:
    """The HF modules our linear layer `name` is exported as, with the rows each holds."""
    m = family.mapper(f"{name}.weight", model.config)
    if m.chunk is not None:
        raise NotImplementedError(
            f"LoRA on {name} has no PEFT form for {family.model_type}: its HF module "
            f"{m.keys[0].removesuffix('.weight')} fuses it with another of our layers"
        )
    probe = torch.arange(out_features, dtype=torch.float64)[:, None]  # (out, 1): row ids
    out = []
    for key, piece in zip(m.keys, m.split(probe), strict=True):
        transposed = piece.shape[0] == 1 and out_features > 1  # (1, out): Conv1D layout
        out.append(HFModule(key.removesuffix(".weight"), piece.reshape(-1).long(), transposed))
    return out


def _overlapping(hf: HFModule, layout: tuple[Part, ...]) -> list[Part]:
    return [p for p in layout if bool(((hf.rows >= p.start) & (hf.rows < p.stop)).any())]


def _resolve_family(model: DecoderModel, model_type: str | None) -> Family:
    return _family(model_type or infer_model_type(model.config))


# -- save -----------------------------------------------------------------------------------


def adapter_tensors(
    model: DecoderModel, model_type: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """PEFT-keyed adapter tensors, and per HF module its rank, alpha and layout flag."""
    family = _resolve_family(model, model_type)
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, lora in lora_modules(model):
        r = lora.r
        for hf in hf_modules(name, lora.out_features, model, family):
            over = _overlapping(hf, lora.layout)
            if not any(p in lora.parts for p in over):
                continue
            blocks = over if len(over) > 1 else [p for p in over if p in lora.parts]
            a = torch.zeros(len(blocks) * r, lora.in_features)
            b = torch.zeros(len(hf.rows), len(blocks) * r)
            for j, p in enumerate(blocks):
                if p not in lora.parts:
                    continue  # a zero block: this part of the fused HF module is not adapted
                sel = (hf.rows >= p.start) & (hf.rows < p.stop)
                a[j * r : (j + 1) * r] = lora.lora_A[p.name].detach().float().cpu()
                b[sel, j * r : (j + 1) * r] = (
                    lora.lora_B[p.name].detach().float().cpu()[hf.rows[sel] - p.start]
                )
            tensors[f"{PREFIX}{hf.name}.lora_A.weight"] = a
            tensors[f"{PREFIX}{hf.name}.lora_B.weight"] = b
            dropout = getattr(lora.dropout, "p", 0.0)
            info[hf.name] = dict(
                r=len(blocks) * r, alpha=len(blocks) * lora.alpha, dropout=dropout,
                transposed=hf.transposed,
            )  # fmt: skip
    if not tensors:
        raise ValueError("the model has no LoRA layers (apply_lora first)")
    return tensors, info


def _target_modules(model: DecoderModel, family: Family, adapted: set[str]) -> list[str]:
    """Leaf names (["q_proj", "v_proj"]) when they select exactly the adapted HF modules
    among all the checkpoint's (MoE experts included), else the adapted modules' full names."""
    every = {
        key.removesuffix(".weight")
        for name in param_names(model.config)
        for key in family.mapper(name, model.config).keys
        if key.endswith(".weight")
    }
    leaves = {n.rpartition(".")[2] for n in adapted}
    if {n for n in every if n.rpartition(".")[2] in leaves} == adapted:
        return sorted(leaves)
    return sorted(adapted)


def save_adapter(
    model: DecoderModel,
    out_dir: str | os.PathLike[str],
    base_model_name_or_path: str | None = None,
    model_type: str | None = None,
) -> Path:
    """Write the model's LoRA adapter in PEFT's layout for the HF export of `model_type`
    (default: `infer_model_type`); `PeftModel.from_pretrained(hf_model, out_dir)` loads it."""
    family = _resolve_family(model, model_type)
    tensors, info = adapter_tensors(model, family.model_type)
    r, _ = Counter(i["r"] for i in info.values()).most_common(1)[0]
    alpha, _ = Counter(i["alpha"] for i in info.values()).most_common(1)[0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(i["dropout"] for i in info.values()),
        "target_modules": _target_modules(model, family, set(info)),
        "rank_pattern": {k: i["r"] for k, i in info.items() if i["r"] != r},
        "alpha_pattern": {k: i["alpha"] for k, i in info.items() if i["alpha"] != alpha},
        "fan_in_fan_out": any(i["transposed"] for i in info.values()),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


# -- load -----------------------------------------------------------------------------------


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The adapter's config, refusing what `LoRALinear` does not compute (ValueError)."""
    path = Path(adapter_dir, ADAPTER_CONFIG)
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter)")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={cfg.get('peft_type')!r}, only LORA is supported")
    unsupported = {
        "use_rslora": False, "use_dora": False, "bias": "none", "modules_to_save": None,
        "layer_replication": None, "target_parameters": None, "lora_bias": False,
        "trainable_token_indices": None,
    }  # fmt: skip
    for key, plain in unsupported.items():
        if cfg.get(key, plain) not in (plain, [], {}):
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported (needs {plain!r})")
    return cfg


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first pattern key matching the module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_rank_alpha(cfg: dict[str, Any], module: str) -> tuple[int, float]:
    r = _pattern(cfg.get("rank_pattern") or {}, module, cfg["r"])
    return r, _pattern(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])


def _read_tensors(adapter_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    path = Path(adapter_dir, ADAPTER_WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    # PEFT drops the adapter name when saving; accept it in case a tool kept it.
    return {k.replace(".default.weight", ".weight"): v for k, v in load_file(str(path)).items()}


def _adapted_modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    out = set()
    for key in tensors:
        if not key.startswith(PREFIX) or ".lora_" not in key:
            raise ValueError(f"unexpected tensor {key!r} in the adapter (not a LoRA weight)")
        out.add(key[len(PREFIX) :].rsplit(".lora_", 1)[0])
    return out


def _load_layer(
    name: str,
    lora: LoRALinear,
    mods: list[HFModule],
    tensors: dict[str, torch.Tensor],
    cfg: dict[str, Any],
) -> set[str]:
    """Copy the HF modules' A/B into `lora`'s parts; return the HF modules used."""
    r, used = lora.r, set()
    a_new: dict[str, torch.Tensor] = {}
    b_new = {p.name: torch.zeros_like(lora.lora_B[p.name], device="cpu") for p in lora.parts}
    covered = {p.name: torch.zeros(p.stop - p.start, dtype=torch.bool) for p in lora.parts}
    for hf in mods:
        over = _overlapping(hf, lora.layout)
        adapted = [p for p in over if p in lora.parts]
        key_a, key_b = f"{PREFIX}{hf.name}.lora_A.weight", f"{PREFIX}{hf.name}.lora_B.weight"
        if key_a not in tensors:
            if adapted:
                raise KeyError(f"adapter has no weights for {hf.name} (LoRA on our {name})")
            continue
        if not adapted:
            continue  # weights for rows without LoRA here: reported as unused below
        blocks = over if len(over) > 1 else adapted
        a, b = tensors[key_a].float(), tensors[key_b].float()
        want_a, want_b = (len(blocks) * r, lora.in_features), (len(hf.rows), len(blocks) * r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(
                f"adapter {hf.name}: A {tuple(a.shape)}, B {tuple(b.shape)}; our {name} "
                f"needs A {want_a}, B {want_b}"
            )
        r_k, alpha_k = _module_rank_alpha(cfg, hf.name)
        if not abs(alpha_k / r_k - lora.scaling) <= 1e-9 * abs(lora.scaling):
            raise ValueError(f"adapter {hf.name}: alpha/r={alpha_k}/{r_k}, ours {lora.scaling}")
        for j, p in enumerate(blocks):
            sel = (hf.rows >= p.start) & (hf.rows < p.stop)
            a_j, b_j = a[j * r : (j + 1) * r], b[:, j * r : (j + 1) * r]
            if b_j[~sel].any():
                raise ValueError(
                    f"adapter {hf.name}: its update mixes our parts of {name} (not block-"
                    "structured); merge it into the base with PEFT instead"
                )
            if p not in lora.parts:
                if b_j.any():
                    raise ValueError(f"adapter updates {hf.name} rows of {p.name}, ours has none")
                continue
            if p.name in a_new and not torch.equal(a_new[p.name], a_j):
                raise ValueError(f"adapter: {p.name} of {name} gets different A from two modules")
            a_new[p.name] = a_j
            b_new[p.name][hf.rows[sel] - p.start] = b_j[sel]
            covered[p.name][hf.rows[sel] - p.start] = True
        used.add(hf.name)
    if missing := [p for p, c in covered.items() if not bool(c.all())]:
        raise KeyError(f"adapter does not cover {missing} of our {name}")
    with torch.no_grad():
        for p in lora.parts:
            lora.lora_A[p.name].copy_(a_new[p.name])
            lora.lora_B[p.name].copy_(b_new[p.name])
    return used


def load_adapter(
    model: DecoderModel, adapter_dir: str | os.PathLike[str], model_type: str | None = None
) -> None:
    """Load adapter weights into a model whose LoRA layers (`apply_lora`) match them.

    Every adapted HF module must map onto LoRA parts of the model and every part must be
    covered; ranks and alpha/r must agree. Mismatches raise, naming the module.
    """
    cfg = read_adapter_config(adapter_dir)
    family = _resolve_family(model, model_type)
    tensors = _read_tensors(adapter_dir)
    used: set[str] = set()
    for name, lora in lora_modules(model):
        if lora.merged:
            raise ValueError(f"{name}: unmerge before loading adapter weights")
        mods = hf_modules(name, lora.out_features, model, family)
        used |= _load_layer(name, lora, mods, tensors, cfg)
    if extra := sorted(_adapted_modules(tensors) - used):
        raise ValueError(f"adapter has weights for modules without LoRA in the model: {extra}")


def _plan(
    model: DecoderModel, cfg: dict[str, Any], family: Family, tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[nn.Module, tuple[int, float], tuple[Part, ...], tuple[Part, ...]]]:
    """Per linear layer of `model` the adapter touches: (layer, (r, alpha), adapted parts,
    layout). A LoRA wrapper counts as its base (`linear_layers`)."""
    adapted = _adapted_modules(tensors)
    plan: dict[str, tuple[nn.Module, tuple[int, float], tuple[Part, ...], tuple[Part, ...]]] = {}
    seen: set[str] = set()
    for name, layer, layout in linear_layers(model):
        parts: list[Part] = []
        for hf in hf_modules(name, layer.out_features, model, family):
            if hf.name not in adapted:
                continue
            over = _overlapping(hf, layout)
            r_k = tensors[f"{PREFIX}{hf.name}.lora_A.weight"].shape[0]
            _, alpha_k = _module_rank_alpha(cfg, hf.name)
            if r_k % len(over):
                raise ValueError(f"adapter {hf.name}: rank {r_k} is not a multiple of {len(over)}")
            group = (r_k // len(over), alpha_k / len(over))
            if plan.setdefault(name, (layer, group, (), layout))[1] != group:
                raise ValueError(f"adapter gives the parts of our {name} different ranks/alphas")
            parts += [p for p in over if p not in parts]
            seen.add(hf.name)
        if parts:
            plan[name] = (layer, plan[name][1], tuple(sorted(parts, key=lambda p: p.start)), layout)
    if unknown := sorted(adapted - seen):
        raise ValueError(f"adapter adapts modules the model does not have: {unknown}")
    return plan


def load_with_adapter(
    model: DecoderModel,
    adapter_dir: str | os.PathLike[str],
    *,
    merge: bool = False,
    model_type: str | None = None,
) -> DecoderModel:
    """Wrap `model` (the adapter's base, plain) in the LoRA layers a PEFT adapter directory
    describes, load its weights, and optionally merge them (what an engine serves with
    `--adapter`). Returns `model`, changed in place; its parameters end frozen.
    """
    cfg = read_adapter_config(adapter_dir)
    family = _resolve_family(model, model_type)
    plan = _plan(model, cfg, family, _read_tensors(adapter_dir))
    groups: dict[tuple[int, float], list[str]] = defaultdict(list)
    for name, (layer, group, parts, _) in plan.items():
        if isinstance(layer, LoRALinear):
            raise ValueError(f"{name} already has LoRA; load_with_adapter takes the plain base")
        parent = name.rpartition(".")[0]
        groups[group] += [f"{parent}.{p.name}" if parent else p.name for p in parts]
    for (r, alpha), targets in groups.items():
        apply_lora(model, sorted(set(targets)), r=r, alpha=alpha, dropout=cfg["lora_dropout"])
    load_adapter(model, adapter_dir, family.model_type)
    if merge:
        merge_lora(model)
    return model


def adapter_layers(
    model: DecoderModel, adapter_dir: str | os.PathLike[str], model_type: str | None = None
) -> dict[str, LoRALinear]:
    """A PEFT adapter directory as one standalone `LoRALinear` per layer of `model` it
    adapts (by our layer name), each around the model's layer but not put in the model:
    what serving several adapters at once (`llm.core.multi_lora`) stacks. The model is not
    changed; checks as `load_adapter`."""
    cfg = read_adapter_config(adapter_dir)
    family = _resolve_family(model, model_type)
    tensors = _read_tensors(adapter_dir)
    out, used = {}, set()
    for name, (layer, (r, alpha), parts, layout) in _plan(model, cfg, family, tensors).items():
        base = getattr(layer, "base", layer)  # a LoRA wrapper's base
        lora = LoRALinear(base, r, alpha, parts=parts, layout=layout)
        mods = hf_modules(name, lora.out_features, model, family)
        used |= _load_layer(name, lora, mods, tensors, cfg)
        out[name] = lora.requires_grad_(False)
    if extra := sorted(_adapted_modules(tensors) - used):
        raise ValueError(f"adapter has weights for modules without LoRA in the model: {extra}")
    return out
