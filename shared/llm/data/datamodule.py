"""`TextDataModule`: the one object a training loop asks for batches, configured by `DataConfig`.

Rank-aware and exactly resumable: global batch `step` is a pure function of the config and
`step` (see `llm.data.batch_order`); rank `r` of `N` gets rows `[r*B, (r+1)*B)` of it, with
`B = global_batch_size / N`, served in `B / micro_batch_size` consecutive micro-batches
(gradient accumulation). The data order thus depends on the global batch and the seed
only: every global batch is the same set of rows whichever ranks exist. `state_dict()` is
the position (global batch, micro-batch) plus what must not change for it to mean the same
batches; `load_state_dict` refuses a state that would not resume exactly, and accepts a
different world size or micro-batch size (elastic restarts) at a global-batch boundary.

    dm = TextDataModule(DataConfig(dataset_path="data/tok", seq_len=256), tokenizer, rank, world)
    for step, batch in zip(range(max_steps), dm):    # Batch: input_ids, labels, ...
        ...
    state = dm.state_dict()                          # save with the checkpoint
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from llm.data.batch import IGNORE_INDEX, Batch
from llm.data.batch_order import rank_slice
from llm.data.packing import SFTData, pack_samples
from llm.data.pretrain import PretrainData
from llm.data.sft import SFTReport, load_sft
from llm.data.shards import TOKENIZER_DIR, TokenShards
from llm.data.tokenizers import BaseTokenizer, load_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)
STATE_VERSION = 1


class DataConfig(BaseModel):
    """Which data, how it is cut into batches, and how it is split."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: Literal["pretrain", "sft"] = "pretrain"
    dataset_path: str = Field(
        description="pretrain: a directory written by `llm-data prepare` (local or s3://);"
        " sft: a chat JSONL file, directory or glob"
    )
    tokenizer_path: str | None = Field(
        default=None,
        description="tokenizer directory or checkpoint; default: the one saved with the shards",
    )
    seq_len: int = Field(default=256, gt=1, description="tokens per row (inputs)")
    global_batch_size: int = Field(default=16, gt=0, description="rows per step, all ranks")
    micro_batch_size: int | None = Field(
        default=None,
        gt=0,
        description="rows per next_batch() on each rank: a rank's share of a global batch"
        " (global_batch_size / world_size) comes in share / micro_batch_size micro-batches;"
        " None: the whole share at once",
    )
    seed: int = 1337
    val_fraction: float = Field(default=0.05, gt=0, lt=1)
    sampling: Literal["random", "shuffled"] = Field(
        default="random",
        description="pretrain: random window starts, or each window once per epoch",
    )
    document_masking: bool = Field(
        default=False, description="pretrain: reset positions and attention at each EOS"
    )
    pack: bool = Field(default=True, description="sft: several samples per row")
    truncation: Literal["truncate", "drop"] = Field(
        default="truncate", description="sft: what to do with a sample longer than seq_len"
    )
    strict: bool = Field(default=False, description="sft: stop at the first malformed line")
    max_val_batches: int | None = Field(
        default=None, gt=0, description="cap on validation batches per evaluation (None: all)"
    )
    cache_dir: str | None = Field(default=None, description="local copies of remote shards")


class TextDataModule:
    """Batches for one rank; see the module docstring.

    Args:
        config: the data settings.
        tokenizer: the model's tokenizer. Pretraining shards must have been made with it
            (checked by fingerprint). None: load `config.tokenizer_path`, or for
            pretraining the tokenizer saved with the shards.
        rank, world_size: this process's place in data-parallel training.
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer: BaseTokenizer | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if config.global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size {config.global_batch_size} is not divisible by"
                f" world_size {world_size}"
            )
        share = config.global_batch_size // world_size
        micro = config.micro_batch_size or share
        if share % micro:
            raise ValueError(
                f"global_batch_size {config.global_batch_size} / world_size {world_size} ="
                f" {share} rows per rank, not divisible by micro_batch_size {micro}"
            )
        self.config, self.rank, self.world_size = config, rank, world_size
        self.batch_size = micro  # rows per next_batch()
        self.micro_batches = share // micro  # next_batch() calls per global batch
        self.step = 0  # the global batch being served
        self.micro = 0  # the next micro-batch of it
        # Debugging aid: a list here collects the sample ids next_batch() serves (pretrain:
        # window starts in the token stream; sft: packed row indices); None: not recorded.
        self.consumed: list[int] | None = None
        self.report: SFTReport | None = None
        c = config
        if tokenizer is None and c.tokenizer_path is not None:
            tokenizer = load_tokenizer(c.tokenizer_path)
        if c.task == "pretrain":
            if tokenizer is None:
                from llm import storage

                tokenizer = load_tokenizer(storage.join(c.dataset_path, TOKENIZER_DIR))
            shards = TokenShards(c.dataset_path, tokenizer_fingerprint(tokenizer), c.cache_dir)
            self._data: PretrainData | SFTData = PretrainData(
                shards, c.seq_len, c.val_fraction, c.seed, c.sampling, c.document_masking
            )
            self._signature = {"tokens": shards.n_tokens}
        else:
            if tokenizer is None:
                raise ValueError("sft needs a tokenizer: pass one or set tokenizer_path")
            self._data, self.report = _sft_data(c, tokenizer)
            self._signature = {"rows": self._data.n_train}
        self.tokenizer = tokenizer
        self.fingerprint = tokenizer_fingerprint(tokenizer)

    # -- batches ----------------------------------------------------------------------------

    def train_ids(self, step: int) -> np.ndarray:
        """Sample ids of global batch `step`, all ranks (pretrain: window starts; sft: rows)."""
        G, d = self.config.global_batch_size, self._data
        return d.train_starts(step, G) if isinstance(d, PretrainData) else d.train_rows(step, G)

    def train_batch(self, step: int, micro: int | None = None) -> Batch:
        """This rank's part of global batch `step`: all of it, or micro-batch `micro` of it
        (pure: no state is read or changed)."""
        return self._batch(self._rank_ids(step, micro))

    def _rank_ids(self, step: int, micro: int | None) -> np.ndarray:
        ids = rank_slice(self.train_ids(step), self.rank, self.world_size)
        if micro is None:
            return ids
        return ids[micro * self.batch_size : (micro + 1) * self.batch_size]

    def _batch(self, ids: np.ndarray) -> Batch:
        d = self._data
        return d.batch(ids) if isinstance(d, PretrainData) else d.batch(d.train, ids)

    def next_batch(self) -> Batch:
        ids = self._rank_ids(self.step, self.micro)
        if self.consumed is not None:
            self.consumed.extend(int(i) for i in ids)
        self.micro += 1
        if self.micro == self.micro_batches:
            self.step, self.micro = self.step + 1, 0
        return self._batch(ids)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def val_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        """The same validation batches on every call (deterministic split and order); each
        rank's part of a validation batch is one micro-batch."""
        G, d = self.batch_size * self.world_size, self._data
        cap = max_batches if max_batches is not None else self.config.max_val_batches
        for k in range(min(d.n_val_batches(G), cap or d.n_val_batches(G))):
            if isinstance(d, PretrainData):
                yield d.batch(rank_slice(d.val_starts(k, G), self.rank, self.world_size))
            else:
                yield d.batch(d.val, rank_slice(d.val_rows(k, G), self.rank, self.world_size))

    # -- resume -----------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        c = self.config
        keys = (
            "task",
            "seq_len",
            "global_batch_size",
            "seed",
            "val_fraction",
            "sampling",
            "document_masking",
            "pack",
            "truncation",
        )
        return {
            **{k: getattr(c, k) for k in keys},
            **self._signature,
            "tokenizer": self.fingerprint,
        }

    def state_dict(self) -> dict[str, Any]:
        split = {"micro": self.micro, "world_size": self.world_size, "micro_size": self.batch_size}
        return {"version": STATE_VERSION, "step": self.step, **split, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} != {STATE_VERSION}")
        mine = self._identity()
        diff = sorted(k for k in mine if state.get(k) != mine[k])
        if diff:
            details = ", ".join(f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in diff)
            raise ValueError(f"cannot resume the data position exactly; changed: {details}")
        micro = int(state.get("micro", 0))  # absent: saved before micro-batches were served
        if micro and (state["world_size"], state["micro_size"]) != (
            self.world_size,
            self.batch_size,
        ):
            raise ValueError(
                f"cannot resume the data position exactly: it was saved inside global batch"
                f" {state['step']} (micro-batch {micro} of {state['micro_size']} rows on each of"
                f" {state['world_size']} ranks), now {self.batch_size} rows on each of"
                f" {self.world_size} ranks"
            )
        self.step, self.micro = int(state["step"]), micro


def _sft_data(c: DataConfig, tokenizer: BaseTokenizer) -> tuple[SFTData, SFTReport]:
    train, val, report = load_sft(
        c.dataset_path,
        tokenizer,
        c.seq_len,
        truncation=c.truncation,
        strict=c.strict,
        val_fraction=c.val_fraction,
    )
    if not val:
        log.warning(
            "sft: no sample fell in the validation split; validating on the first train sample"
        )
        val = train[:1]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    rows_t = pack_samples(train, c.seq_len, pad, c.pack)
    rows_v = pack_samples(val, c.seq_len, pad, c.pack)
    labels = rows_t["labels"]
    report.sequences, report.tokens = labels.shape[0], labels.size
    report.loss_tokens = int((labels != IGNORE_INDEX).sum())
    report.pad_tokens = labels.size - sum(len(ids) - 1 for ids, _ in train)
    report.log()
    return SFTData(rows_t, rows_v, c.seed), report
