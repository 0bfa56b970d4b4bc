"""Sharded checkpoints through `torch.distributed.checkpoint` (DCP), for FSDP2 runs.

Every rank writes only its own shards of the model and optimizer state (no rank ever
holds the full state), under `<checkpoint>/dcp/` through fsspec, so the same code writes
a local directory or `s3://`. The checkpoint's other files (config, tokenizer, trainer
state) and its manifest are written by rank 0 afterwards, as for full checkpoints: a job
killed mid-write leaves no manifest and the checkpoint is skipped.

DCP reshards on load: a checkpoint saved by N ranks resumes on M, and a single process
(the engine, `llm.checkpoint.load_checkpoint`) reads it as full tensors.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from llm import storage

DCP_DIR = "dcp"
METADATA = ".metadata"


def is_sharded(ckpt_uri: str) -> bool:
    return storage.exists(storage.join(ckpt_uri, DCP_DIR, METADATA))


def save_sharded(ckpt_uri: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank writes its shards of model and optimizer state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save(
        {"model": model_sd, "optim": optim_sd},
        storage_writer=FsspecWriter(storage.join(ckpt_uri, DCP_DIR), sync_files=False),
    )


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
