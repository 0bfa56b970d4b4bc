"""What a checkpoint is: its files, its manifest, and where a run keeps its checkpoints.

A run directory (local or `s3://`) holds `checkpoints/step-<8 digits>/`, one per save.
One checkpoint directory:
    model.safetensors   weights (the tied lm_head is not stored twice)
    dcp/                instead of the weights, an FSDP run's DCP shards (`.metadata` and
                        `*.distcp`, every rank's own; `llm.checkpoint.sharded`)
    config.json         ModelConfig
    tokenizer files     char_tokenizer.json or the HF tokenizer files
    trainer_state.pt    optimizer, scheduler, step, RNG, data position (training only)
    adapter/            a fine-tuning run's LoRA adapter (`llm.training.finetune`)
    manifest.json       written last (`llm.checkpoint.commit`): the directory's proof of
                        life, listing exactly the files the save wrote (size and sha256 of
                        the staged bytes), plus the save's metadata (step, val_loss, settings)
"""

from __future__ import annotations

import json
import re

from llm import storage

WEIGHTS, CONFIG, TRAINER_STATE = "model.safetensors", "config.json", "trainer_state.pt"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
CHECKPOINTS = "checkpoints"  # a run's checkpoint dirs live under <run>/checkpoints/
DCP_DIR = "dcp"  # a sharded checkpoint's DCP files
METADATA = ".metadata"  # DCP's index of the shards, under DCP_DIR
_STEP_RE = re.compile(r"^step-(\d+)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or corrupt; the message names the path and why."""


def checkpoint_dir(run_uri: str, step: int) -> str:
    """Where step ``step`` of a run is saved; zero-padded so names sort like steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return storage.join(run_uri, CHECKPOINTS, f"step-{step:08d}")


def step_of(name: str) -> int | None:
    """The step of a checkpoint directory's name (``step-00000042`` -> 42), else None."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def read_manifest(dir_uri: str) -> dict:
    """Read and shape-check ``manifest.json``; any problem is a CheckpointError."""
    uri = storage.join(dir_uri, MANIFEST)
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise CheckpointError(f"{dir_uri}: no {MANIFEST} (not committed or incomplete)") from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{uri}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointError(f"{uri}: not a version {MANIFEST_VERSION} manifest object")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{uri}: 'files' must be a non-empty object")
    for rel, entry in files.items():
        parts = rel.split("/")
        if rel.startswith("/") or ".." in parts or "" in parts or rel == MANIFEST:
            raise CheckpointError(f"{uri}: invalid file path {rel!r}")
        ok = isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
        if not ok or not _SHA256_RE.match(str(entry.get("sha256"))):
            raise CheckpointError(f"{uri}: bad entry for {rel!r} (need size and sha256)")
    return manifest


def is_sharded(ckpt_uri: str) -> bool:
    """Whether a committed checkpoint holds DCP shards: by its manifest, so stale files of
    an attempt that never committed cannot make a full checkpoint look sharded."""
    return f"{DCP_DIR}/{METADATA}" in read_manifest(ckpt_uri)["files"]
