"""Save the whole training state as one committed checkpoint, and restore it.

`torch.distributed.checkpoint.state_dict` gives full (unsharded, unprefixed) model and
optimizer state for plain, DDP and FSDP2 models alike; rank 0 writes, every rank waits,
and the manifest goes last (`llm.checkpoint.commit`), so a job killed mid-write resumes
from the previous checkpoint. With `sharded=True` (FSDP) every rank writes its own shards
of model and optimizer instead (`llm.checkpoint.sharded`) and rank 0 adds the rest and
the manifest.

Before any rank writes, rank 0 checks it still holds the run's lease and prepares the
step dir (`prepare`: never over a commit, debris of a dead attempt removed), and
tells every rank the outcome. After the commit rank 0 reads the checkpoint back against
its manifest (one read of it per save): retention never deletes the newest checkpoint
known to verify, so a bad write can never cost the run its last good one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)

from llm.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    prepare,
    retain,
    save_checkpoint,
    verify,
)
from llm.data.tokenizers import BaseTokenizer
from llm.training.distributed import barrier, broadcast_object

if TYPE_CHECKING:
    import torch

    from llm.training.finetune import AdapterWriter
    from llm.training.lease import RunLease
    from llm.training.trainer import Trainer

log = logging.getLogger(__name__)

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Checkpointer:
    def __init__(
        self,
        run_dir: str,
        model: nn.Module,
        tokenizer: BaseTokenizer,
        keep_last: int,
        settings: Any,
        adapter: AdapterWriter | None = None,
        sharded: bool = False,
        lease: RunLease | None = None,
        verified: str | None = None,
    ) -> None:
        """`lease`: the run's lease (rank 0); `verified`: the checkpoint resumed from."""
        self.run_dir, self.model, self.tokenizer, self.keep_last = (
            run_dir,
            model,
            tokenizer,
            keep_last,
        )
        self.settings, self.adapter, self.sharded = settings, adapter, sharded
        self.lease, self.verified = lease, verified

    def __call__(self, trainer: Trainer) -> None:
        uri = checkpoint_dir(self.run_dir, trainer.step)
        self._prepare(uri, trainer.dist.is_main)
        if self.sharded:
            self._save_sharded(uri, trainer)
            return
        if self.adapter is not None:  # fine-tuning: the frozen base is not saved again
            model_sd = None
            optim_sd = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=_FULL)
        else:
            model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer, options=_FULL)
        state = {**trainer.state_dict(), "optimizer": optim_sd}  # collective: gathers RNG states
        if trainer.dist.is_main:
            meta = {"step": trainer.step, "val_loss": trainer.last_val_loss,
                    "settings": self.settings.model_dump(mode="json")}  # fmt: skip
            if self.adapter is not None:
                final = trainer.step >= trainer.max_steps or trainer.should_stop
                self.adapter.save(uri, self.model, self.tokenizer, state, meta, final)
            else:
                save_checkpoint(uri, self.model, self.tokenizer, state, meta, model_state=model_sd)
            self._after_commit(uri)
        barrier()

    def _prepare(self, uri: str, is_main: bool) -> None:
        """Rank 0 checks the lease and readies the step dir; every rank learns the outcome."""
        error = None
        if is_main:
            try:
                if self.lease is not None:
                    self.lease.check()
                prepare(uri)
            except Exception as e:
                error = e
        message = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"rank 0 cannot save {uri}: {message}")

    def _after_commit(self, uri: str) -> None:
        """Read the new checkpoint back, then retention (best effort: never raises)."""
        try:
            verify(uri, check_hashes=True)
            self.verified = uri
        except CheckpointError as e:
            log.warning("%s does not read back as written, older ones are kept: %s", uri, e)
        try:
            deleted = retain(self.run_dir, self.keep_last, keep=self.verified)
        except Exception as e:  # retention only frees space: training goes on
            log.warning("retention in %s failed, old checkpoints kept: %s", self.run_dir, e)
            deleted = []
        log.info(
            "checkpoint %s committed%s", uri, f", removed {len(deleted)} old" if deleted else ""
        )

    def _save_sharded(self, uri: str, trainer: Trainer) -> None:
        from llm.checkpoint.sharded import save_sharded

        shards = save_sharded(uri, trainer.model, trainer.optimizer)  # collective: every rank's
        state = {**trainer.state_dict(), "optimizer": None}  # collective: gathers RNG states
        if trainer.dist.is_main:
            meta = {"step": trainer.step, "val_loss": trainer.last_val_loss, "sharded": True,
                    "settings": self.settings.model_dump(mode="json")}  # fmt: skip
            save_checkpoint(
                uri, self.model, self.tokenizer, state, meta, weights=False, written=shards
            )
            self._after_commit(uri)
        barrier()


def restore_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, optim_state: dict[str, Any]
) -> None:
    """Load a full optimizer state saved by `Checkpointer` into a plain, DDP or FSDP model."""
    set_state_dict(
        model, optimizer, model_state_dict={}, optim_state_dict=optim_state, options=_FULL
    )
