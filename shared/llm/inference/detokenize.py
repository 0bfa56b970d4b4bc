"""Incremental detokenization with stop strings.

Tokens are not characters: a byte-level BPE token can end in the middle of a UTF-8
sequence, and SentencePiece-style tokens decode differently depending on what precedes
them. So text is produced by decoding a short window of ids twice (with and without the
newest ids) and emitting the difference, and only once it does not end in the U+FFFD
replacement character that marks an incomplete sequence (the offsets scheme of
vLLM's `detokenize_incrementally` and HF's `TextStreamer`).

With `skip_special_tokens`, special tokens decode to nothing, except those asked to be
kept (`keep_special`: a tool call marker the caller parses calls out of). A window holding
a kept one decodes with special tokens shown, the others taken out first, so the text is
what one decode of the window would give with only the kept ones special-free.

Stop strings are matched on the text, not on tokens, so one split across tokens still
stops. Text that could be the beginning of a stop string is held back until the next
tokens decide it; the stop string itself is emitted only with `include_stop`. Before
`min_tokens` tokens, stop strings are not searched (vLLM's semantics: the earliest a stop
string can end is the token after the `min_tokens`-th).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

_INCOMPLETE = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas.

    Args:
        tokenizer: anything with `decode(ids) -> str`.
        stop: stop strings; generation text ends before the earliest one found.
        context_ids: ids that precede the generated ones (e.g. the prompt's last few):
            decoded only as context so the first generated token gets its leading space
            right; never emitted.
        include_stop: the stop string found is emitted (the text ends with it).
        min_tokens: stop strings count only in the text of tokens after this many.
        skip_special_tokens: special tokens decode to nothing (False: to their text).
        keep_special: special token ids that decode to their text all the same.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        *,
        stop: Sequence[str] = (),
        context_ids: Sequence[int] = (),
        include_stop: bool = False,
        min_tokens: int = 0,
        skip_special_tokens: bool = True,
        keep_special: Collection[int] = (),
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop: stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._include_stop = include_stop
        self._min_tokens = min_tokens
        self._added = 0  # generated ids added so far
        self._skip_special = skip_special_tokens
        self._keep = frozenset(keep_special)
        self._special: dict[int, bool] = {}  # id -> whether decoding skips it
        self._ids = list(context_ids)
        self._prefix = 0  # start of the decode window
        self._read = len(self._ids)  # ids before this are already turned into text
        self._pending = ""  # decoded but held back: it may start a stop string
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was found; further tokens are ignored

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids; return the new text that is safe to emit (maybe "")."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        self._added += len(token_ids)
        return self._release(self._decode_new(final=False), final=False)

    def flush(self, last_ids: Sequence[int] = ()) -> str:
        """Generation ended without a stop string: emit everything still held back, and
        the text of `last_ids` (a stop token, to be included in the output)."""
        if self.stopped:
            return ""
        self._ids.extend(last_ids)
        self._added += len(last_ids)
        return self._release(self._decode_new(final=True), final=True)

    def _text(self, ids: Sequence[int]) -> str:
        if not self._skip_special:
            return self._tokenizer.decode(ids, skip_special_tokens=False)
        if self._keep.isdisjoint(ids):
            return self._tokenizer.decode(ids)
        shown = [i for i in ids if i in self._keep or not self._skipped(i)]
        return self._tokenizer.decode(shown, skip_special_tokens=False)

    def _skipped(self, token_id: int) -> bool:
        """Whether decoding skips the token (a special token), asked once per id."""
        if token_id not in self._special:
            shown = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._special[token_id] = bool(shown) and self._tokenizer.decode([token_id]) == ""
        return self._special[token_id]

    def _decode_new(self, *, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._text(self._ids[self._prefix : self._read])
        full_text = self._text(self._ids[self._prefix :])
        if not final and (len(full_text) <= len(prefix_text) or full_text.endswith(_INCOMPLETE)):
            return ""  # half a character (or nothing visible yet): wait for more ids
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text) :]

    def _release(self, new_text: str, *, final: bool) -> str:
        pending = self._pending + new_text
        if self._added <= self._min_tokens:  # too early to stop: nothing is held back
            self.text += pending
            self._pending = ""
            return pending
        # Earlier emitted text cannot hold the start of a stop string (it would have been
        # held back), so searching only the pending text finds every match.
        hits = [(i, i + len(s)) for s in self._stop if (i := pending.find(s)) >= 0]
        if hits:
            start, end = min(hits)
            out = pending[: end if self._include_stop else start]
            self._pending, self.stopped = "", True
        elif final:
            out, self._pending = pending, ""
        else:
            hold = self._stop_prefix_len(pending)
            out, self._pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self.text += out
        return out

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self._stop), default=0)
        for k in range(min(len(text), longest - 1), 0, -1):
            suffix = text[-k:]
            if any(s.startswith(suffix) for s in self._stop):
                return k
        return 0
