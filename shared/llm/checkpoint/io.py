"""Save and load checkpoints: weights, config, tokenizer and trainer state, committed last.

`save_checkpoint` stages a checkpoint's files (`llm.checkpoint.format`) and commits them;
`load_checkpoint` reads a committed one, full or sharded, into one process. It also takes
a Hugging Face model directory (local or remote): its `config.json` (with a `model_type`),
one or sharded safetensors, the tokenizer files and `generation_config.json` (every EOS id
it lists ends generation; its temperature, top_p, top_k, min_p and repetition_penalty
become `LoadedModel.generation_defaults`). Pickle weights (`*.bin`) are refused, never
unpickled.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llm import storage
from llm.checkpoint.commit import commit, resolve_checkpoint, verify
from llm.checkpoint.format import (
    CONFIG,
    MANIFEST,
    TRAINER_STATE,
    WEIGHTS,
    CheckpointError,
    read_manifest,
)
from llm.config import ModelConfig
from llm.data.tokenizers import BaseTokenizer, load_tokenizer
from llm.models.decoder import DecoderModel

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: DecoderModel
    tokenizer: BaseTokenizer
    config: ModelConfig
    uri: str  # the resolved checkpoint directory
    name: str  # the run's name, e.g. "demo" for runs/demo
    # Sampling defaults the model ships with (generation_config.json of a Hugging Face
    # directory: temperature, top_p, top_k, min_p, repetition_penalty), for requests that
    # set none.
    generation_defaults: dict[str, float] = field(default_factory=dict)


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
    written: dict[str, dict[str, Any]] | None = None,
) -> dict:
    """Stage every file of a checkpoint locally, upload it, then commit it; the manifest.

    `model_state` overrides `model.state_dict()` (a full state gathered from DDP/FSDP);
    `weights=False` when the ranks already wrote them sharded (`llm.checkpoint.sharded`),
    whose manifest entries they pass as `written`.
    """
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
        files = storage.upload(staging, uri)
    return commit(uri, {**(written or {}), **files}, extra=meta or {})


def _local_copy(uri: str, tmp: str) -> Path:
    """Checkpoint files as a local directory (remote ones are downloaded to `tmp`)."""
    fs, root = storage.url_to_fs(uri)
    if storage.is_local(uri):
        return Path(root)
    manifest = read_manifest(uri)
    for rel in manifest["files"]:
        dest = Path(tmp) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{root.rstrip('/')}/{rel}", str(dest))
    return Path(tmp)


def load_checkpoint(
    uri: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load a run directory's newest committed checkpoint, one checkpoint directory, or a
    Hugging Face model directory (module doc).

    Files are checked against the manifest first: a half-written or corrupt checkpoint
    raises `CheckpointError` instead of loading. `dtype=None` is "auto": the weights'
    dtype, but float32 for half-precision weights on the CPU. A sharded checkpoint (an
    FSDP run's, `llm.checkpoint.sharded`) is read whole into this one process.
    """
    if is_hf_dir(uri):
        return _load_hf_dir(uri, device, dtype)
    ckpt = resolve_checkpoint(uri)
    manifest = verify(ckpt, check_hashes=True)
    if WEIGHTS not in manifest["files"]:
        return _load_sharded_checkpoint(ckpt, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        local = _local_copy(ckpt, tmp)
        try:
            config = ModelConfig.model_validate_json((local / CONFIG).read_text())
        except ValueError as e:
            raise CheckpointError(f"{ckpt}/{CONFIG}: invalid model config: {e}") from e
        tokenizer = load_tokenizer(local)
        with torch.device("meta"):
            model = DecoderModel(config)
        sd = load_file(local / WEIGHTS, device=str(device))
        if config.tie_embeddings:
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"{ckpt}/{WEIGHTS}: weights do not match config: {e}") from e
    model.tie_weights()
    model.reset_buffers(device)
    _to_dtype(model, device, dtype)
    return LoadedModel(model, tokenizer, config, ckpt, _run_name(ckpt))


def _to_dtype(model: DecoderModel, device: str | torch.device, dtype: torch.dtype | None) -> None:
    """Cast to `dtype`; None ("auto") keeps the weights' dtype, except half precision on
    the CPU, which runs float32 (CPUs without fast half-precision matmuls are common)."""
    half = model.embed_tokens.weight.dtype in (torch.float16, torch.bfloat16)
    if dtype is None and half and torch.device(device).type == "cpu":
        dtype = torch.float32
    if dtype is not None:
        model.to(dtype=dtype)
    model.eval()


def is_hf_dir(uri: str) -> bool:
    """A Hugging Face model directory: a `config.json` with a `model_type`, no manifest."""
    if storage.exists(storage.join(uri, MANIFEST)):
        return False
    try:
        return "model_type" in json.loads(storage.read_bytes(storage.join(uri, CONFIG)))
    except (OSError, ValueError, TypeError):
        return False


_HF_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HF_INDEX = "model.safetensors.index.json"
# generation_config.json keys that serve as per-request sampling defaults (as vLLM reads them).
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _load_hf_dir(uri: str, device: str | torch.device, dtype: torch.dtype | None) -> LoadedModel:
    """A Hugging Face directory, its files checked before any is read."""
    from llm.data.tokenizers import HFTokenizer
    from llm.interop.hf import from_hf

    fs, root = storage.url_to_fs(uri)
    sizes = {r: n for r, n in storage.list_files(fs, root).items() if "/" not in r}
    weights = sorted(r for r in sizes if r.endswith(".safetensors"))
    if not weights:
        pickled = sorted(r for r in sizes if r.endswith(_PICKLES))
        if pickled:
            raise CheckpointError(
                f"{uri}/{pickled[0]}: pickle weights are refused (loading them can run code); "
                "save the model as safetensors (save_pretrained(safe_serialization=True))"
            )
        raise CheckpointError(f"{uri}: a Hugging Face directory without *.safetensors")
    index: dict[str, Any] = {}
    if HF_INDEX in sizes:
        index = json.loads(storage.read_bytes(storage.join(uri, HF_INDEX)))
        for name in sorted(set(index.get("weight_map", {}).values())):
            if name not in sizes:
                raise CheckpointError(f"{uri}/{HF_INDEX}: lists {name}, which is missing")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(root)
        if not storage.is_local(uri):  # every file whole before any is read
            local = Path(tmp)
            for rel in (r for r in sizes if r.endswith(_HF_SUFFIXES)):
                fs.get_file(f"{root.rstrip('/')}/{rel}", str(local / rel))
                if (local / rel).stat().st_size != sizes[rel]:
                    raise CheckpointError(f"{uri}/{rel}: changed while it was read")
        shards = sorted(set(index.get("weight_map", {}).values())) or weights
        _check_safetensors(uri, local, shards, index)
        try:
            model = from_hf(local, device=device)
            tokenizer = HFTokenizer(local)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{uri}: not a model this library loads: {e}") from e
        generation = local / "generation_config.json"
        defaults: dict[str, float] = {}
        if generation.exists():
            config = json.loads(generation.read_text())
            eos = config.get("eos_token_id")
            tokenizer.extra_stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
            defaults = {
                k: config[k] for k in GENERATION_DEFAULTS if isinstance(config.get(k), int | float)
            }
    _to_dtype(model, device, dtype)
    return LoadedModel(model, tokenizer, model.config, uri, _run_name(uri), defaults)


def _check_safetensors(uri: str, local: Path, files: list[str], index: dict[str, Any]) -> None:
    """Each safetensors file whole (its size is its header's end of data) and, with an
    index, the tensors' bytes its `total_size`: a truncated upload or a shard from another
    save fails here, naming the file, before any weight is read."""
    total = 0
    for name in files:
        path = local / name
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                header = json.loads(f.read(n)) if 0 < n < 100 << 20 else None
            except ValueError:
                header = None
        if not isinstance(header, dict):
            raise CheckpointError(f"{uri}/{name}: not a safetensors file (bad header)")
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        size, want = path.stat().st_size, 8 + n + max(ends, default=0)
        if size != want:
            raise CheckpointError(
                f"{uri}/{name}: {size} bytes, its header says {want}: truncated or corrupt"
            )
        total += max(ends, default=0)
    declared = index.get("metadata", {}).get("total_size")
    if isinstance(declared, int) and declared != total:
        raise CheckpointError(
            f"{uri}/{HF_INDEX}: total_size {declared}, but the shards hold {total} bytes of "
            "tensors (a shard from another save?)"
        )


def read_config(ckpt_uri: str) -> ModelConfig:
    try:
        return ModelConfig.model_validate_json(storage.read_bytes(storage.join(ckpt_uri, CONFIG)))
    except ValueError as e:
        raise CheckpointError(f"{ckpt_uri}/{CONFIG}: invalid model config: {e}") from e


def _load_sharded_checkpoint(
    ckpt: str, device: str | torch.device, dtype: torch.dtype | None
) -> LoadedModel:
    from torch.distributed.checkpoint.api import CheckpointException

    from llm.checkpoint.sharded import load_sharded_weights

    config = read_config(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(_local_copy(ckpt, tmp))
    model = DecoderModel(config).to(device)
    try:
        load_sharded_weights(ckpt, model)
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        raise CheckpointError(f"{ckpt}: sharded weights do not load: {e}") from e
    _to_dtype(model, device, dtype)
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
