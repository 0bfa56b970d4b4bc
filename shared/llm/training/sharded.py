"""Sharded checkpoints through `torch.distributed.checkpoint` (DCP), for FSDP2 runs.

Every rank writes only its own shards of the model and optimizer state (no rank ever
holds the full state) into a local staging dir of its own, hashes them there and uploads
them under `<checkpoint>/dcp/` (a local directory or `s3://`). Rank 0 gathers every rank's
manifest entries, adds the checkpoint's other files (config, tokenizer, trainer state)
and commits: the manifest lists exactly the shards of this attempt. A job killed mid-write
leaves no manifest and the checkpoint is skipped.

DCP reshards on load: a checkpoint saved by N ranks resumes on M, and a single process
(the engine, `llm.checkpoint.load_checkpoint`) reads it as full tensors.
"""

from __future__ import annotations

import tempfile
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from llm import storage

DCP_DIR = "dcp"
METADATA = ".metadata"


def is_sharded(ckpt_uri: str) -> bool:
    """Whether a committed checkpoint holds DCP shards: by its manifest, so stale files of
    an attempt that never committed cannot make a full checkpoint look sharded."""
    return f"{DCP_DIR}/{METADATA}" in storage.read_manifest(ckpt_uri)["files"]


def save_sharded(
    ckpt_uri: str, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, dict[str, Any]]:
    """Collective: every rank stages, hashes and uploads its shards of model and optimizer
    state; returns every rank's manifest entries (paths relative to the checkpoint)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with tempfile.TemporaryDirectory(prefix="llm-dcp-") as tmp:
        dcp.save(
            {"model": model_sd, "optim": optim_sd},
            storage_writer=FileSystemWriter(tmp, sync_files=False),
        )
        mine = storage.upload(tmp, storage.join(ckpt_uri, DCP_DIR))
    every = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    return {f"{DCP_DIR}/{rel}": entry for entries in every for rel, entry in entries.items()}


def load_sharded(ckpt_uri: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load model and optimizer state into an FSDP (or plain) model, each rank
    reading the pieces its shards need."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=FsspecReader(storage.join(ckpt_uri, DCP_DIR)))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def load_sharded_weights(ckpt_uri: str, model: nn.Module) -> None:
    """One process, no process group: the full model weights of a sharded checkpoint."""
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        reader = FsspecReader(storage.join(ckpt_uri, DCP_DIR))
        dcp.load(state, storage_reader=reader, no_dist=True)
    model.load_state_dict(state["model"])
