"""Fine-tuning with adapters: LoRA or QLoRA over a frozen base (`finetune.method`).

Order of the `apply_*` steps: load the base from `checkpoint.init_from` (our
checkpoint or a Hugging Face directory; its architecture, not the `model` settings) ->
`quantize_base` (qlora: every linear layer but lm_head to NF4) -> `apply_lora` (freezes
the rest) -> compile -> DDP. FSDP is not offered here: the adapters are small and the
NF4 base is not sharded.

A fine-tuning checkpoint (`runs/<name>/checkpoints/step-N/`, committed by its manifest):
    adapter/            the adapter in PEFT's layout (`llm.interop.peft`)
    config.json         the base's ModelConfig
    tokenizer files     the base's tokenizer
    trainer_state.pt    optimizer (adapter weights only), schedule, step, RNG, data position
    model.safetensors   with `finetune.save_merged`, in the final checkpoint only: init_from
                        plus the adapter merged, so `load_checkpoint(run_dir)` serves it
The base is never copied: a resumed run reads it from `init_from` again and the adapter
from the newest checkpoint. The final adapter is also written to `<run_dir>/adapter/`.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llm import storage
from llm.checkpoint import CONFIG, TRAINER_STATE, WEIGHTS, is_hf_dir, load_checkpoint
from llm.checkpoint.commit import commit
from llm.config import ModelConfig
from llm.core.lora import apply_lora, unload_lora
from llm.core.qlora import bitsandbytes_available, quantize_base
from llm.data.tokenizers import BaseTokenizer
from llm.models.decoder import DecoderModel
from llm.training.config import FinetuneConfig

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def base_model_type(uri: str) -> str | None:
    """The HF family of an HF base (its adapter keys follow it); None: inferred from ours."""
    if is_hf_dir(uri):
        return json.loads(storage.read_bytes(storage.join(uri, CONFIG))).get("model_type")
    return None


def load_base(uri: str, device: torch.device | str = "cpu") -> DecoderModel:
    """The base model at `uri`: our checkpoint (run or step directory) or an HF directory
    (its weights only: a base needs no tokenizer of its own)."""
    if is_hf_dir(uri):
        from llm.interop.hf import from_hf

        return from_hf(uri, device=device)
    return load_checkpoint(uri, device=device).model


def check_finetune(
    f: FinetuneConfig, init_from: str | None, strategy: str, device_type: str
) -> None:
    """Refuse, before any work, a fine-tuning setup that cannot run (ValueError)."""
    if f.method == "none":
        return
    if not init_from:
        raise ValueError(
            f"finetune.method={f.method} needs checkpoint.init_from: the base model"
            " (our checkpoint or a Hugging Face directory)"
        )
    if strategy == "fsdp":
        raise ValueError(f"finetune.method={f.method} runs with distributed.strategy=ddp, not fsdp")
    wants_bnb = f.method == "qlora" and f.quant_backend == "bitsandbytes"
    if wants_bnb and not bitsandbytes_available(device_type):
        raise ValueError(
            "finetune.quant_backend=bitsandbytes: bitsandbytes cannot run NF4 here;"
            " use auto or torch"
        )


def build_finetune_model(
    f: FinetuneConfig, init_from: str, tokenizer: BaseTokenizer, block_size: int,
    device: torch.device,
) -> tuple[DecoderModel, int]:  # fmt: skip
    """The base with adapters applied, and the base's parameter count."""
    # QLoRA: loaded on the CPU, each linear layer quantized on its way to `device`.
    model = load_base(init_from, "cpu" if f.method == "qlora" else device)
    c = model.config
    if tokenizer.vocab_size > c.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the base model at"
            f" checkpoint.init_from={init_from} only {c.vocab_size}: use the base's tokenizer"
        )
    if block_size > c.max_seq_len:
        raise ValueError(
            f"training.block_size={block_size} exceeds the base model's max_seq_len={c.max_seq_len}"
        )
    n_params = model.num_params()
    if f.method == "qlora":
        quantized = quantize_base(model, backend=f.quant_backend, device=device)
        model.to(device)
        log.info("qlora: %d linear layers quantized to NF4", len(quantized))
    adapted = apply_lora(model, f.targets, r=f.r, alpha=f.alpha, dropout=f.dropout)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "%s: %d adapted projections, %.3fM trainable parameters (base %.2fM, frozen)",
        f.method, len(adapted), trainable / 1e6, n_params / 1e6,
    )  # fmt: skip
    return model, n_params


def resume_adapter(model: DecoderModel, ckpt: str, model_type: str | None) -> None:
    """Load the adapter of a fine-tuning checkpoint into `model` (LoRA applied)."""
    config = ModelConfig.model_validate_json(storage.read_bytes(storage.join(ckpt, CONFIG)))
    if config != model.config:
        raise ValueError(
            f"{ckpt}: its base model differs from checkpoint.init_from's;"
            " use a new checkpoint.run_dir or the same base"
        )
    if not storage.exists(storage.join(ckpt, ADAPTER_DIR, "adapter_config.json")):
        raise ValueError(
            f"{ckpt} holds no adapter (a full training run?); use a new checkpoint.run_dir"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            data = storage.read_bytes(storage.join(ckpt, ADAPTER_DIR, name))
            Path(tmp, name).write_bytes(data)
        from llm.interop.peft import load_adapter  # transformers loads for fine-tuning only

        load_adapter(model, tmp, model_type)


def merged_model(init_from: str, adapter_dir: Path, model_type: str | None) -> DecoderModel:
    """init_from plus the adapter, merged in full precision on the CPU (for QLoRA too: the
    NF4 copy was only for training)."""
    from llm.interop.peft import load_with_adapter

    base = load_base(init_from, "cpu")
    load_with_adapter(base, adapter_dir, model_type=model_type)
    return unload_lora(base, merge=True)  # plain layers again: our checkpoint's names


def _put_tree(local: Path, uri: str) -> None:
    fs, root = storage.url_to_fs(uri)
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = f.relative_to(local).as_posix()
        dest = f"{root.rstrip('/')}/{rel}"
        fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(f), dest)


class AdapterWriter:
    """Writes fine-tuning checkpoints (see the module docstring) and the final adapter."""

    def __init__(self, f: FinetuneConfig, init_from: str, run_dir: str) -> None:
        self.f, self.init_from, self.run_dir = f, init_from, run_dir
        self.model_type = base_model_type(init_from)

    def save(
        self,
        uri: str,
        model: DecoderModel,
        tokenizer: BaseTokenizer,
        trainer_state: dict[str, Any],
        meta: dict[str, Any],
        final: bool,
    ) -> None:
        from llm.interop.peft import save_adapter

        with tempfile.TemporaryDirectory() as tmp:
            staging = Path(tmp)
            adapter = save_adapter(
                model, staging / ADAPTER_DIR, self.init_from, model_type=self.model_type
            )
            (staging / CONFIG).write_text(model.config.model_dump_json(indent=2))
            tokenizer.save(staging)
            buf = io.BytesIO()
            torch.save(trainer_state, buf)
            (staging / TRAINER_STATE).write_bytes(buf.getvalue())
            if final and self.f.save_merged:
                merged = merged_model(self.init_from, adapter, self.model_type)
                sd = merged.state_dict()
                if merged.config.tie_embeddings:
                    sd.pop("lm_head.weight", None)
                tensors = {k: v.detach().contiguous() for k, v in sd.items()}
                save_file(tensors, staging / WEIGHTS, metadata={"format": "pt"})
            files = storage.upload(staging, uri)
            if final:  # the run's adapter, where users look for it
                _put_tree(staging / ADAPTER_DIR, storage.join(self.run_dir, ADAPTER_DIR))
        commit(uri, files, extra={**meta, "finetune": self.f.model_dump(mode="json")})
