"""Sharded checkpoints through `torch.distributed.checkpoint` (DCP), for FSDP2 runs.

Every rank writes only its own shards of the model and optimizer state (no rank ever
holds the full state) into a local staging dir of its own, hashes them there and uploads
them under `<checkpoint>/dcp/` (a local directory or `s3://`). Rank 0 gathers every rank's
manifest entries, adds the checkpoint's other files (config, tokenizer, trainer state)
and commits: the manifest lists exactly the shards of this attempt. A job killed mid-write
leaves no manifest and the checkpoint is skipped.

DCP reshards on load: a checkpoint saved by N ranks resumes on M, and a single process
(the engine, `llm.checkpoint.load_checkpoint`) reads it as full tensors.

DCP pickles its `.metadata` and the non-tensor values of a state (optimizer settings), and
reads both back with `pickle`/`torch.load(weights_only=False)`: a crafted checkpoint
would run code in the trainer or the engine. Everything here reads through `_Reader`
(metadata unpickled with an allow-list of DCP's own metadata classes) and `_Planner`
(values with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import importlib
import io
import pickle
import tempfile
import warnings
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from llm import storage
from llm.checkpoint.format import DCP_DIR, CheckpointError


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
    dcp.load(state, storage_reader=_Reader(storage.join(ckpt_uri, DCP_DIR)), planner=_Planner())
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def load_sharded_weights(ckpt_uri: str, model: nn.Module) -> None:
    """One process, no process group: the full model weights of a sharded checkpoint."""
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        reader = _Reader(storage.join(ckpt_uri, DCP_DIR))
        dcp.load(state, storage_reader=reader, planner=_Planner(), no_dist=True)
    model.load_state_dict(state["model"])


# What DCP's metadata pickles hold: its own dataclasses and enums, tensor sizes, dtypes,
# layouts and the path it was written to. Anything else (os.system, builtins.eval, ...) is
# refused before it is resolved.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),  # the checkpoint id FileSystemWriter records
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, where: str) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES or (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(importlib.import_module(module), name, None), torch.dtype
        ):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.where}: refers to {module}.{name}, which a checkpoint's metadata never "
            "holds (refused: unpickling it could run code)"
        )


class _Reader(FsspecReader):
    """DCP's fsspec reader with the metadata read through `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f, str(path)).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not a checkpoint's metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Planner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values read by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
