"""Save and load checkpoints: weights, config, tokenizer and trainer state, committed last.

Layout of one checkpoint directory (local or `s3://`):
    model.safetensors   weights (the tied lm_head is not stored twice)
    config.json         ModelConfig
    tokenizer files     char_tokenizer.json or the HF tokenizer files
    trainer_state.pt    optimizer, scheduler, step, RNG, data position (training only)
    manifest.json       written last by `llm.storage.commit`: the directory's proof of life
"""

from __future__ import annotations

import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llm import storage
from llm.config import ModelConfig
from llm.data.tokenizers import BaseTokenizer, load_tokenizer
from llm.models.decoder import DecoderModel

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, TRAINER_STATE = "model.safetensors", "config.json", "trainer_state.pt"


@dataclass
class LoadedModel:
    model: DecoderModel
    tokenizer: BaseTokenizer
    config: ModelConfig
    uri: str  # the resolved checkpoint directory
    name: str  # the run's name, e.g. "demo" for runs/demo


def _weights(
    model: DecoderModel, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    sd = dict(state if state is not None else model.state_dict())
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_checkpoint(
    uri: str,
    model: DecoderModel,
    tokenizer: BaseTokenizer,
    trainer_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    weights: bool = True,
) -> None:
    """Write every file of a checkpoint, then commit it with its manifest.

    `model_state` overrides `model.state_dict()` (a full state gathered from DDP/FSDP);
    `weights=False` when the ranks already wrote them sharded (`llm.training.sharded`).
    """
    fs, root = storage.url_to_fs(uri)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        if weights:
            save_file(_weights(model, model_state), staging / WEIGHTS, metadata={"format": "pt"})
        (staging / CONFIG).write_text(model.config.model_dump_json(indent=2))
        tokenizer.save(staging)
        if trainer_state is not None:
            buf = io.BytesIO()
            torch.save(trainer_state, buf)
            (staging / TRAINER_STATE).write_bytes(buf.getvalue())
        fs.makedirs(root, exist_ok=True)
        for f in sorted(staging.iterdir()):
            fs.put_file(str(f), f"{root.rstrip('/')}/{f.name}")
    storage.commit(uri, extra=meta or {})


def _local_copy(uri: str, tmp: str) -> Path:
    """Checkpoint files as a local directory (remote ones are downloaded to `tmp`)."""
    fs, root = storage.url_to_fs(uri)
    if storage.is_local(uri):
        return Path(root)
    manifest = storage.read_manifest(uri)
    for rel in manifest["files"]:
        dest = Path(tmp) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{root.rstrip('/')}/{rel}", str(dest))
    return Path(tmp)


def load_checkpoint(
    uri: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load a run directory's newest committed checkpoint, or one checkpoint directory.

    Files are checked against the manifest first: a half-written or corrupt checkpoint
    raises `storage.CheckpointError` instead of loading. A sharded checkpoint (an FSDP
    run's, `llm.training.sharded`) is read whole into this one process.
    """
    ckpt = storage.resolve_checkpoint(uri)
    manifest = storage.verify(ckpt, check_hashes=True)
    if WEIGHTS not in manifest["files"]:
        return _load_sharded_checkpoint(ckpt, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        local = _local_copy(ckpt, tmp)
        try:
            config = ModelConfig.model_validate_json((local / CONFIG).read_text())
        except ValueError as e:
            raise storage.CheckpointError(f"{ckpt}/{CONFIG}: invalid model config: {e}") from e
        tokenizer = load_tokenizer(local)
        with torch.device("meta"):
            model = DecoderModel(config)
        sd = load_file(local / WEIGHTS, device=str(device))
        if config.tie_embeddings:
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            raise storage.CheckpointError(
                f"{ckpt}/{WEIGHTS}: weights do not match config: {e}"
            ) from e
    model.tie_weights()
    model.reset_buffers(device)
    if dtype is not None:
        model.to(dtype=dtype)
    model.eval()
    return LoadedModel(model, tokenizer, config, ckpt, _run_name(ckpt))


def read_config(ckpt_uri: str) -> ModelConfig:
    try:
        return ModelConfig.model_validate_json(storage.read_bytes(storage.join(ckpt_uri, CONFIG)))
    except ValueError as e:
        raise storage.CheckpointError(f"{ckpt_uri}/{CONFIG}: invalid model config: {e}") from e


def _load_sharded_checkpoint(
    ckpt: str, device: str | torch.device, dtype: torch.dtype | None
) -> LoadedModel:
    from llm.training.sharded import load_sharded_weights

    config = read_config(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(_local_copy(ckpt, tmp))
    model = DecoderModel(config).to(device)
    try:
        load_sharded_weights(ckpt, model)
    except Exception as e:  # DCP raises several kinds for a mismatch
        raise storage.CheckpointError(f"{ckpt}: sharded weights do not load: {e}") from e
    if dtype is not None:
        model.to(dtype=dtype)
    model.eval()
    return LoadedModel(model, tokenizer, config, ckpt, _run_name(ckpt))


def load_trainer_state(ckpt_uri: str) -> dict[str, Any]:
    data = storage.read_bytes(storage.join(ckpt_uri, TRAINER_STATE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _run_name(ckpt_uri: str) -> str:
    parts = [p for p in ckpt_uri.rstrip("/").split("/") if p]
    # <run>/checkpoints/step-N -> <run>; a bare checkpoint dir -> its own name.
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        return parts[-3]
    return parts[-1] if parts else "model"
