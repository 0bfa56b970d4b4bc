"""`llm-data prepare`: text source -> tokenizer -> memory-mapped token shards.

Deterministic: shard contents depend only on the source, the tokenizer and `shard_tokens`
(not on `workers` or batch sizes), and a shard closes after the document that brings it
to `shard_tokens` tokens (documents never straddle shards). Resumable: each shard records
the source cursor after its last document, so a rerun of the same command skips the
records behind the last committed shard and produces byte-identical output.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from llm import storage
from llm.data.encoding import EncodeError, ParallelEncoder, split_is_exact, split_text
from llm.data.shards import (
    FORMAT_VERSION,
    INDEX,
    PREPARE,
    TOKENIZER_DIR,
    ShardIndex,
    ShardInfo,
    TokenizerInfo,
    committed_shards,
    read_index,
    shard_dtype,
    write_json,
    write_shard,
)
from llm.data.sources import DataError, Record, SourceSpec, iter_records, resolve, total_bytes
from llm.data.tokenizers import BaseTokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)
MAX_WARNINGS = 20  # malformed records logged one by one; after that only counted


class PrepareConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    source: SourceSpec
    out: str = Field(description="output directory: local path or s3:// URI")
    shard_tokens: int = Field(default=1 << 25, gt=0, description="tokens per shard (about)")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    chunk_chars: int = Field(default=1 << 16, gt=0, description="piece size for long documents")
    batch_chars: int = Field(default=1 << 20, gt=0, description="text per worker task")
    strict: bool = Field(default=False, description="stop at the first malformed record")
    fast_bpe: bool = Field(
        default=True, description="use the cached byte-level BPE encoder where it applies"
    )
    overwrite: bool = Field(default=False, description="discard an existing preparation in out")


@dataclass
class PrepareResult:
    index: ShardIndex
    resumed_shards: int  # shards found committed from an earlier, interrupted run
    seconds: float
    bytes_in: int  # UTF-8 bytes of text tokenized by this run


@dataclass
class _Shards:
    """Accumulates documents into shards and writes each one when it is full."""

    out: str
    dtype: str
    vocab_size: int
    shard_tokens: int
    on_shard: Callable[[ShardInfo], None] | None
    done: list[ShardInfo]
    parts: list[np.ndarray] = field(default_factory=list)
    doc_ends: list[int] = field(default_factory=list)
    n: int = 0
    stats: dict[str, int] = field(
        default_factory=lambda: {"records": 0, "malformed": 0, "empty": 0, "unk_tokens": 0}
    )

    def add_doc(self, tokens: np.ndarray, record: int) -> None:
        self.parts.append(tokens)
        self.n += len(tokens)
        self.doc_ends.append(self.n)
        if self.n >= self.shard_tokens:
            self.flush(record + 1)

    def flush(self, records_end: int) -> None:
        if not self.doc_ends:
            return
        tokens = np.concatenate(self.parts)
        if int(tokens.max(initial=0)) >= self.vocab_size:
            raise DataError(
                f"tokenizer produced id {int(tokens.max())} >= vocab_size {self.vocab_size}"
            )
        info = write_shard(
            self.out,
            len(self.done),
            tokens.astype(self.dtype),
            np.asarray(self.doc_ends),
            records_end,
            self.stats,
        )
        self.done.append(info)
        log.info("wrote %s: %d tokens, %d documents", info.name, info.n_tokens, info.n_docs)
        self.parts, self.doc_ends, self.n = [], [], 0
        self.stats = dict.fromkeys(self.stats, 0)
        if self.on_shard is not None:
            self.on_shard(info)


def _identity(cfg: PrepareConfig, tok: TokenizerInfo, dtype: str) -> dict:
    return {
        "version": FORMAT_VERSION,
        "source": cfg.source.model_dump(),
        "tokenizer": tok.model_dump(),
        "dtype": dtype,
        "shard_tokens": cfg.shard_tokens,
    }


def _start(cfg: PrepareConfig, identity: dict, tokenizer: BaseTokenizer) -> None:
    """Claim `out` for this preparation, or check an earlier run there was the same one."""
    if cfg.overwrite and storage.exists(cfg.out):
        fs, root = storage.url_to_fs(cfg.out)
        fs.rm(root, recursive=True)
    prep = storage.join(cfg.out, PREPARE)
    if storage.exists(prep):
        import json

        old = json.loads(storage.read_bytes(prep))
        diff = sorted(k for k in identity.keys() | old.keys() if identity.get(k) != old.get(k))
        if diff:
            raise DataError(
                f"{cfg.out} holds a different preparation (differs in: {', '.join(diff)});"
                " pass --overwrite to replace it, or choose another --out"
            )
        return
    write_json(prep, identity)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        for f in sorted(Path(tmp).iterdir()):
            storage.write_bytes(storage.join(cfg.out, TOKENIZER_DIR, f.name), f.read_bytes())


def prepare(
    cfg: PrepareConfig,
    tokenizer: BaseTokenizer,
    *,
    progress: bool = True,
    on_shard: Callable[[ShardInfo], None] | None = None,
) -> PrepareResult:
    """Tokenize `cfg.source` into shards under `cfg.out`, resuming an interrupted run."""
    t0 = time.perf_counter()
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no EOS token, which marks document boundaries in shards")
    dtype = shard_dtype(tokenizer.vocab_size)
    tok_info = TokenizerInfo(
        fingerprint=tokenizer_fingerprint(tokenizer),
        kind=type(tokenizer).__name__,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        bos_id=tokenizer.bos_id,
        pad_id=tokenizer.pad_id,
    )
    fmt, files = resolve(cfg.source)  # fails early on a missing path or mixed formats
    identity = _identity(cfg, tok_info, dtype)
    _start(cfg, identity, tokenizer)
    if storage.exists(storage.join(cfg.out, INDEX)):
        log.info("%s: already prepared", cfg.out)
        return PrepareResult(read_index(cfg.out), 0, time.perf_counter() - t0, 0)

    done = committed_shards(cfg.out, np.dtype(dtype).itemsize)
    cursor = done[-1].records_end if done else 0
    if done:
        log.info("resuming after %d committed shards (source record %d)", len(done), cursor)
    shards = _Shards(cfg.out, dtype, tokenizer.vocab_size, cfg.shard_tokens, on_shard, list(done))
    unk_id = getattr(tokenizer, "unk_id", None)
    head, records = _peek(iter_records(cfg.source, start=cursor))
    sample = next((r.text for r in head if r.text), "")[:200_000]  # real text to probe with
    splittable = bool(sample) and split_is_exact(tokenizer, sample)
    batches = _batches(itertools.chain(head, records), cfg, splittable)
    encoder: BaseTokenizer = tokenizer
    if cfg.fast_bpe and sample:
        from llm.data.fastbpe import ByteLevelBPE

        encoder = ByteLevelBPE.from_tokenizer(tokenizer, sample) or tokenizer
        if encoder is not tokenizer:
            log.info("encoding with the cached byte-level BPE (checked against the tokenizer)")

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_bytes(files) if fmt != "hf" else None,
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        disable=not progress,
        mininterval=1.0,
    )
    state = {"bytes_in": 0, "warned": 0, "last_record": cursor - 1, "doc": []}
    with bar, ParallelEncoder(encoder, cfg.workers) as pool:
        try:
            for arrays, events in pool.map(batches):
                _consume(arrays, events, shards, state, tokenizer.eos_id, unk_id, bar)
        except EncodeError as e:
            raise _encode_error(e) from None
        if bar.total:  # separators and skipped records were never counted as tokenized
            bar.update(bar.total - bar.n)
    shards.flush(state["last_record"] + 1)
    return _finish(
        cfg, shards.done, tok_info, dtype, shards.stats, state["bytes_in"], len(done), t0
    )


def _consume(
    arrays: list[np.ndarray],
    events: list,
    shards: _Shards,
    state: dict,
    eos_id: int,
    unk_id: int | None,
    bar,
) -> None:
    """Apply one encoded batch's events in source order: documents go to shards, the rest is counted."""
    it = iter(arrays)
    for kind, rec, where, nbytes, last in events:
        state["last_record"] = rec
        if kind != "chunk":
            shards.stats["records"] += 1
            shards.stats[kind] += 1
            if kind == "malformed":
                state["warned"] += 1
                if state["warned"] <= MAX_WARNINGS:
                    log.warning("%s (skipped)", where)
            continue
        state["doc"].append(next(it))
        bar.update(nbytes)
        state["bytes_in"] += nbytes
        if last:
            tokens = np.concatenate([*state["doc"], np.array([eos_id], np.uint32)])
            state["doc"] = []
            shards.stats["records"] += 1
            if unk_id is not None:
                shards.stats["unk_tokens"] += int(np.count_nonzero(tokens == unk_id))
            shards.add_doc(tokens, rec)


def _peek(records: Iterator[Record], limit: int = 1000) -> tuple[list[Record], Iterator[Record]]:
    """Records up to the first one with text (at most `limit`), and the rest of the stream."""
    head: list[Record] = []
    for rec in records:
        head.append(rec)
        if rec.text or len(head) >= limit:
            break
    return head, records


def _batches(
    records: Iterator, cfg: PrepareConfig, splittable: bool
) -> Iterator[tuple[list[str], list]]:
    """Group records into worker tasks of about `batch_chars`: (texts, events in order)."""
    texts: list[str] = []
    events: list[tuple] = []
    size = 0
    for rec in records:
        if rec.error is not None:
            if cfg.strict:
                raise DataError(f"{rec.where}: {rec.error}")
            events.append(("malformed", rec.index, f"{rec.where}: {rec.error}", 0, True))
        elif not rec.text.strip():
            events.append(("empty", rec.index, rec.where, 0, True))
        else:
            pieces = split_text(rec.text, cfg.chunk_chars) if splittable else [rec.text]
            offset = 0
            for k, piece in enumerate(pieces):
                texts.append(piece)
                # where carries the piece's character offset, to locate an encoding error
                events.append(
                    (
                        "chunk",
                        rec.index,
                        (rec.where, offset),
                        len(piece.encode("utf-8", "surrogatepass")),
                        k == len(pieces) - 1,
                    )
                )
                offset += len(piece)
                size += len(piece)
                if size >= cfg.batch_chars:
                    yield texts, events
                    texts, events, size = [], [], 0
            continue
        if len(events) >= 4096:  # many malformed/empty records: do not hold them forever
            yield texts, events
            texts, events, size = [], [], 0
    if events:
        yield texts, events


def _encode_error(e: EncodeError) -> DataError:
    """A worker's EncodeError as a DataError naming the record and character offset."""
    chunks = [ev[2] for ev in getattr(e, "tag", []) if ev[0] == "chunk"]
    if e.index >= len(chunks):
        return DataError(e.message)
    where, offset = chunks[e.index]
    at = f" (character {offset + e.offset})" if e.offset is not None else ""
    return DataError(f"{where}: {e.message}{at}")


def _finish(cfg, done, tok_info, dtype, pending, bytes_in, resumed, t0) -> PrepareResult:
    stats = dict(pending)
    for info in done:
        for k, v in info.stats.items():
            stats[k] = stats.get(k, 0) + v
    n_docs = sum(s.n_docs for s in done)
    if n_docs == 0:
        raise DataError(
            f"{cfg.source.path}: corpus is empty ({stats['records']} records:"
            f" {stats['malformed']} malformed, {stats['empty']} empty)"
        )
    index = ShardIndex(
        dtype=dtype,
        n_tokens=sum(s.n_tokens for s in done),
        n_docs=n_docs,
        tokenizer=tok_info,
        shards=done,
        source=cfg.source.model_dump(),
        stats=stats,
    )
    write_json(storage.join(cfg.out, INDEX), index.model_dump())
    seconds = time.perf_counter() - t0
    log.info(
        "prepared %s: %d tokens in %d shards (%.1f s)", cfg.out, index.n_tokens, len(done), seconds
    )
    return PrepareResult(index, resumed, seconds, bytes_in)
