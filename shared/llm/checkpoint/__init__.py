"""Checkpoints, written by training and read by serving: one package for both.

format      what a checkpoint holds: its files, the manifest, the run's step dirs
io          save_checkpoint / load_checkpoint (full, sharded or a Hugging Face directory)
sharded     an FSDP run's DCP shards: every rank saves and loads its own
commit      the manifest written last; discovery reads only committed checkpoints
retention   delete all but a run's newest checkpoints

Plain file I/O over fsspec (local, `s3://`) is `llm.storage`. `commit` (the function) is
imported from `llm.checkpoint.commit`, so that name stays the module's here; `sharded`
(torch.distributed.checkpoint) is imported only by whoever reads or writes shards.
"""

from llm.checkpoint.commit import (
    is_committed,
    latest_checkpoint,
    list_checkpoints,
    prepare,
    resolve_checkpoint,
    resume_checkpoint,
    verify,
)
from llm.checkpoint.format import (
    CONFIG,
    MANIFEST,
    TRAINER_STATE,
    WEIGHTS,
    CheckpointError,
    checkpoint_dir,
    is_sharded,
    read_manifest,
)
from llm.checkpoint.io import (
    LoadedModel,
    is_hf_dir,
    load_checkpoint,
    load_trainer_state,
    read_config,
    save_checkpoint,
)
from llm.checkpoint.retention import retain

__all__ = [
    "CONFIG",
    "MANIFEST",
    "TRAINER_STATE",
    "WEIGHTS",
    "CheckpointError",
    "LoadedModel",
    "checkpoint_dir",
    "is_committed",
    "is_hf_dir",
    "is_sharded",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_trainer_state",
    "prepare",
    "read_config",
    "read_manifest",
    "resolve_checkpoint",
    "resume_checkpoint",
    "retain",
    "save_checkpoint",
    "verify",
]
