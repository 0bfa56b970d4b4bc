"""Parallel, exact tokenization of large text: split at safe points, encode in workers.

A long document is cut into pieces only where the tokenizer is known to break tokens
anyway: after a newline that follows a non-space character and precedes one. Byte-level
BPE (GPT-2, Llama 3, Qwen) and the character tokenizer never merge across such a point,
so encoding the pieces and concatenating gives the ids of the whole text. That is
checked on the real text before it is relied on (`split_is_exact`); a tokenizer for
which it fails (e.g. SentencePiece, which prefixes every piece with a space) gets whole
documents only, and is then parallel across documents but not within one.
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

import numpy as np

from llm.data.tokenizers import BaseTokenizer, UnknownCharacterError

log = logging.getLogger(__name__)

_SAFE_SPLIT = re.compile(r"(?<=\S\n)(?=\S)")
T = TypeVar("T")


class EncodeError(Exception):
    """Text `index` of a batch could not be encoded; args stay picklable across processes."""

    def __init__(self, index: int, message: str, offset: int | None = None) -> None:
        super().__init__(index, message, offset)
        self.index, self.message, self.offset = index, message, offset


def split_text(text: str, target: int) -> list[str]:
    """Cut `text` into pieces of about `target` characters at safe points (see module doc)."""
    if len(text) <= target + target // 2:
        return [text]
    pieces, pos = [], 0
    while len(text) - pos > target + target // 2:
        m = _SAFE_SPLIT.search(text, pos + target)
        if m is None:
            break
        pieces.append(text[pos : m.start()])
        pos = m.start()
    pieces.append(text[pos:])
    return pieces


def split_is_exact(
    tokenizer: BaseTokenizer, sample: str, probes: int = 16, context: int = 400
) -> bool:
    """Whether encoding pieces cut at safe points equals encoding the whole, on `sample`."""
    points = [
        m.start()
        for _, m in zip(range(probes), _SAFE_SPLIT.finditer(sample, context), strict=False)
    ]
    for p in points:
        left, right = sample[max(0, p - context) : p], sample[p : p + context]
        if list(tokenizer.encode(left + right)) != list(tokenizer.encode(left)) + list(
            tokenizer.encode(right)
        ):
            log.warning(
                "tokenizer merges across line breaks: documents will not be split for parallel encoding"
            )
            return False
    return True


def encode_texts(tokenizer: BaseTokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Encode `texts` to uint32 arrays, in one batch call when the tokenizer has one."""
    if not texts:
        return []
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        try:
            return list(batch(texts))
        except (UnknownCharacterError, ValueError, TypeError):
            pass  # encode one by one below, to say which text failed and why
    out = []
    for i, text in enumerate(texts):
        try:
            out.append(np.asarray(tokenizer.encode(text), dtype=np.uint32))
        except UnknownCharacterError as e:
            msg = f"character {e.char!r} (U+{ord(e.char):04X}) is not in the vocabulary (unknown='error')"
            raise EncodeError(i, msg, e.index) from None
        except Exception as e:  # any tokenizer failure becomes a located error
            raise EncodeError(
                i, f"tokenizer cannot encode this text: {type(e).__name__}: {e}"
            ) from None
    return out


_worker_tokenizer: BaseTokenizer | None = None


def _init_worker(tokenizer: BaseTokenizer) -> None:
    global _worker_tokenizer
    # One Rust thread per worker process: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None
    return encode_texts(_worker_tokenizer, texts)


class ParallelEncoder:
    """Encode batches of texts in `workers` processes, yielding results in input order.

    At most `2 * workers` batches are in flight, so memory stays bounded however large the
    source. `workers=1` encodes on one background thread (Rust and numpy release the GIL,
    so reading overlaps encoding, and HF's Rust backend still uses every core itself).
    """

    def __init__(self, tokenizer: BaseTokenizer, workers: int) -> None:
        self.tokenizer, self.workers = tokenizer, workers
        self._pool: Executor | None = None

    def __enter__(self) -> ParallelEncoder:
        if self.workers > 1:
            # fork: workers inherit the loaded tokenizer instead of unpickling it.
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=get_context("fork"),
                initializer=_init_worker,
                initargs=(self.tokenizer,),
            )
        else:
            self._pool = ThreadPoolExecutor(1)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, texts: list[str]) -> Future:
        assert self._pool is not None
        if self.workers > 1:
            return self._pool.submit(_encode_in_worker, texts)
        return self._pool.submit(encode_texts, self.tokenizer, texts)

    def map(self, batches: Iterable[tuple[list[str], T]]) -> Iterator[tuple[list[np.ndarray], T]]:
        """(texts, tag) in, (arrays, tag) out, same order; an `EncodeError` is re-raised."""
        pending: deque[tuple[Future, Any]] = deque()
        for texts, tag in batches:
            pending.append((self._submit(texts), tag))
            while len(pending) > 2 * self.workers:
                yield self._result(*pending.popleft())
        while pending:
            yield self._result(*pending.popleft())

    @staticmethod
    def _result(fut: Future, tag: T) -> tuple[list[np.ndarray], T]:
        try:
            return fut.result(), tag
        except EncodeError as e:
            e.tag = tag  # the caller maps the text's index back to where it came from
            raise
