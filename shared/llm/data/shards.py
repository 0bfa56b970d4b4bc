"""Token shards: flat `uint16`/`uint32` arrays on disk, memory-mapped for reading.

Layout of a prepared directory (local or `s3://`), as `llm-data prepare` writes it:

    prepare.json              what was asked (source, tokenizer fingerprint, dtype, shard size)
    shard-00000.bin           tokens, little-endian, every document followed by EOS
    shard-00000.idx.npy       int64 end offset (exclusive, in the shard) of each document
    shard-00000.json          the shard's commit marker: counts, sha256, resume cursor
    ...
    tokenizer/                the tokenizer files, so the shards describe themselves
    index.json                written last: all shards, totals, tokenizer info, stats

A shard exists once its `.json` marker does (written after its data), and the whole
preparation once `index.json` does, so an interrupted run leaves nothing a reader trusts
and a rerun continues after the last committed shard. Remote shards are downloaded once
to a local cache (checked against their sha256) and memory-mapped from there.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from llm import storage

log = logging.getLogger(__name__)

INDEX, PREPARE, TOKENIZER_DIR = "index.json", "prepare.json", "tokenizer"
FORMAT_VERSION = 1


class FingerprintMismatchError(ValueError):
    """Shards were tokenized with a different tokenizer than the one the model uses."""


class TokenizerInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    fingerprint: str
    kind: str
    vocab_size: int
    eos_id: int
    bos_id: int | None = None
    pad_id: int | None = None


class ShardInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    # What `shard_name` writes, nothing else: the name becomes local and remote paths, and
    # an index from storage must not point outside its directory ("../../etc/...").
    name: str = Field(pattern=r"^shard-[0-9]{5,}$")
    n_tokens: int
    n_docs: int
    sha256: str
    records_end: int  # source records consumed up to the end of this shard: the resume cursor
    stats: dict[str, int]


class ShardIndex(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: int = FORMAT_VERSION
    dtype: Literal["uint16", "uint32"]
    n_tokens: int
    n_docs: int
    tokenizer: TokenizerInfo
    shards: list[ShardInfo]
    source: dict[str, Any]
    stats: dict[str, int]


def shard_dtype(vocab_size: int) -> Literal["uint16", "uint32"]:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def write_shard(
    out: str,
    i: int,
    tokens: np.ndarray,
    doc_ends: np.ndarray,
    records_end: int,
    stats: dict[str, int],
) -> ShardInfo:
    """Write one shard's data, then its marker (the marker makes it exist for a resume)."""
    name = shard_name(i)
    data = tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes()
    buf = io.BytesIO()
    np.save(buf, doc_ends.astype(np.int64), allow_pickle=False)
    storage.write_bytes(storage.join(out, f"{name}.bin"), data)
    storage.write_bytes(storage.join(out, f"{name}.idx.npy"), buf.getvalue())
    info = ShardInfo(
        name=name,
        n_tokens=len(tokens),
        n_docs=len(doc_ends),
        sha256=hashlib.sha256(data).hexdigest(),
        records_end=records_end,
        stats=stats,
    )
    storage.write_bytes(storage.join(out, f"{name}.json"), info.model_dump_json().encode())
    return info


def committed_shards(out: str, itemsize: int) -> list[ShardInfo]:
    """Shards 0..k-1 whose marker and data are both complete, in order."""
    fs, root = storage.url_to_fs(out)
    found: list[ShardInfo] = []
    while True:
        name = shard_name(len(found))
        try:
            info = ShardInfo.model_validate_json(
                storage.read_bytes(storage.join(out, f"{name}.json"))
            )
            size = fs.size(f"{root}/{name}.bin")
        except (FileNotFoundError, ValueError):
            return found
        if size != info.n_tokens * itemsize:
            return found
        found.append(info)


def read_index(uri: str) -> ShardIndex:
    try:
        raw = storage.read_bytes(storage.join(uri, INDEX))
    except FileNotFoundError:
        hint = (
            " (preparation not finished: rerun `llm-data prepare` to resume it)"
            if storage.exists(storage.join(uri, PREPARE))
            else ""
        )
        raise FileNotFoundError(
            f"{uri}: no {INDEX}, not a prepared token directory{hint}"
        ) from None
    try:
        return ShardIndex.model_validate_json(raw)
    except ValueError as e:
        raise ValueError(f"{storage.join(uri, INDEX)}: invalid index ({e})") from None


def check_fingerprint(index: ShardIndex, uri: str, expected: str | None) -> None:
    if expected is not None and index.tokenizer.fingerprint != expected:
        raise FingerprintMismatchError(
            f"{uri}: shards were tokenized with tokenizer {index.tokenizer.fingerprint}"
            f" ({index.tokenizer.kind}, vocab {index.tokenizer.vocab_size}), but the model's"
            f" tokenizer is {expected}: rerun `llm-data prepare` with the model's tokenizer, or"
            f" train with the tokenizer saved in {storage.join(uri, TOKENIZER_DIR)}"
        )


def _local_dir(uri: str, cache_dir: str | None) -> Path:
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    root = Path(cache_dir or os.environ.get("LLM_DATA_CACHE", "~/.cache/llm/shards")).expanduser()
    return root / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _corrupt(message: str) -> Exception:
    """The error a damaged shard raises: a damaged checkpoint's, `CheckpointError`. Imported
    late: `llm.checkpoint` imports torch, which preparing shards does not need."""
    from llm.checkpoint import CheckpointError

    return CheckpointError(message)


def _fetch(uri: str, local: Path, info: ShardInfo) -> None:
    """Download one remote shard into the cache unless a verified copy is there."""
    local.mkdir(parents=True, exist_ok=True)
    done = local / f"{info.name}.ok"
    if done.exists() and done.read_text() == info.sha256:
        return
    fs, root = storage.url_to_fs(uri)
    for suffix in (".bin", ".idx.npy"):
        # Download beside, then rename: ranks sharing a node may fetch the same shard at once.
        dest = local / f"{info.name}{suffix}"
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        fs.get_file(f"{root}/{info.name}{suffix}", str(tmp))
        os.replace(tmp, dest)
    h = hashlib.sha256()
    with open(local / f"{info.name}.bin", "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != info.sha256:
        raise _corrupt(f"{uri}/{info.name}.bin: sha256 differs from the index (corrupt)")
    done.write_text(info.sha256)


class TokenShards:
    """All shards of a prepared directory as one token stream (memory-mapped).

    Args:
        uri: the prepared directory (local path or `s3://...`).
        expect_fingerprint: the model tokenizer's fingerprint; a mismatch raises
            `FingerprintMismatchError` before any token is read.
        cache_dir: where remote shards are downloaded (default `$LLM_DATA_CACHE` or
            `~/.cache/llm/shards`).
    """

    def __init__(
        self, uri: str, expect_fingerprint: str | None = None, cache_dir: str | None = None
    ) -> None:
        self.uri = uri
        self.index = index = read_index(uri)
        check_fingerprint(index, uri, expect_fingerprint)
        local = _local_dir(uri, cache_dir)
        self.arrays: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        offset = 0
        for info in index.shards:
            if local != Path(uri.removeprefix("file://")):
                _fetch(uri, local, info)
            path = local / f"{info.name}.bin"
            if path.stat().st_size != info.n_tokens * np.dtype(index.dtype).itemsize:
                raise _corrupt(f"{path}: size does not match the index (truncated?)")
            self.arrays.append(
                np.memmap(path, dtype=np.dtype(index.dtype).newbyteorder("<"), mode="r")
            )
            ends.append(np.load(local / f"{info.name}.idx.npy") + offset)
            offset += info.n_tokens
        self.n_tokens = offset
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])  # (n_shards+1,)
        self.doc_ends = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
        self.eos_id = index.tokenizer.eos_id

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the stream, across shard borders if need be."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(
                f"tokens [{start}, {start + length}) outside stream of {self.n_tokens}"
            )
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        lo = start - int(self.starts[i])
        arr = self.arrays[i]
        if lo + length <= len(arr):
            return arr[lo : lo + length]
        parts, need = [], length
        while need > 0:
            arr = self.arrays[i]
            piece = arr[lo : lo + need]
            parts.append(piece)
            need -= len(piece)
            i, lo = i + 1, 0
        return np.concatenate(parts)

    def summary(self) -> dict[str, Any]:
        ix = self.index
        return {
            "uri": self.uri,
            "tokens": ix.n_tokens,
            "documents": ix.n_docs,
            "shards": len(ix.shards),
            "dtype": ix.dtype,
            "tokenizer": ix.tokenizer.fingerprint,
            **ix.stats,
        }


def write_json(uri: str, obj: Any) -> None:
    storage.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())
