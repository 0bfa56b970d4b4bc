"""Supervised fine-tuning samples: chat JSONL -> token ids with a loss mask on assistant turns.

Accepted lines (one JSON object each):
    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}
    {"instruction": "...", "input": "..." (optional), "output": "...", "system": "..." (optional)}

A conversation is rendered with the tokenizer's chat template (ChatML is installed on a
subword tokenizer that has none, and saved with it, so serving renders chats the same
way). Each assistant turn is located by rendering the conversation up to it twice, with
and without the turn: the text between is the turn (content and end-of-turn marker), and
only its tokens get a loss. Prompts are encoded as whole pieces, exactly as the engine
encodes a prompt rendered with `add_generation_prompt=True`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from llm.data.encoding import EncodeError, encode_texts
from llm.data.sources import DataError, SourceSpec, iter_jsonl, resolve
from llm.data.tokenizers import CHATML_TEMPLATE, BaseTokenizer

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
Sample = tuple[np.ndarray, np.ndarray]  # (ids (n,) int64, loss mask (n,) bool)


@dataclass
class SFTReport:
    """What happened to every line: used, truncated, dropped (and why) or malformed."""

    lines: int = 0
    used: int = 0
    truncated: int = 0
    malformed: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    examples: list[str] = field(
        default_factory=list
    )  # the first malformed lines, file:line: reason
    train_samples: int = 0
    val_samples: int = 0
    sequences: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    pad_tokens: int = 0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "examples"}
        return {**d, "malformed": dict(self.malformed), "dropped": dict(self.dropped)}

    def log(self) -> None:
        log.info("sft data: %s", self.as_dict())
        for line in self.examples:
            log.warning("malformed: %s", line)


def to_messages(obj: object) -> list[dict[str, str]]:
    """A line's conversation as chat messages; ValueError says what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}]: role must be one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]: content must be a string")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("no assistant message (nothing to learn)")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "instruction" in obj and "output" in obj:
        parts = [obj["instruction"], obj.get("input") or ""]
        if not all(isinstance(p, str) for p in [*parts, obj["output"], obj.get("system", "")]):
            raise ValueError("instruction, input, output and system must be strings")
        user = parts[0] + (f"\n\n{parts[1]}" if parts[1] else "")
        system = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
        return [
            *system,
            {"role": "user", "content": user},
            {"role": "assistant", "content": obj["output"]},
        ]
    raise ValueError("neither 'messages' nor 'instruction' and 'output' fields")


def ensure_chat_template(tokenizer: BaseTokenizer) -> None:
    """Give a tokenizer without a chat template ChatML (saved with it by `save`)."""
    if tokenizer.has_chat_template:
        return
    setter = getattr(tokenizer, "set_chat_template", None)
    if setter is None:
        raise DataError(f"{type(tokenizer).__name__} has no chat template and cannot take one")
    setter(CHATML_TEMPLATE)
    if len(tokenizer.encode("<|im_start|>")) != 1:
        log.warning(
            "ChatML installed, but <|im_start|>/<|im_end|> are not single tokens in this vocab"
        )


def segments(tokenizer: BaseTokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_turn) pieces, in order."""
    out: list[tuple[str, bool]] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: k + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                "the chat template is not prefix-stable (rendering a longer conversation changes"
                " the text of a shorter one), so assistant tokens cannot be located"
            )
        out += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return [(t, a) for t, a in out if t]


def _is_val(line: str, val_fraction: float) -> bool:
    """Stable split by content: a line stays on its side when the file grows or is reordered."""
    h = int.from_bytes(hashlib.blake2b(line.strip().encode(), digest_size=8).digest(), "big")
    return h % 1_000_000 < val_fraction * 1_000_000


def _fit(
    ids: np.ndarray, mask: np.ndarray, seq_len: int, truncation: str, report: SFTReport
) -> Sample | None:
    """Apply the length policy; None (and a counted reason) when the sample is dropped."""
    if len(ids) > seq_len + 1:  # seq_len inputs need seq_len + 1 tokens
        if truncation == "drop":
            report.dropped[f"longer than seq_len={seq_len}"] += 1
            return None
        ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
        report.truncated += 1
    if not mask[1:].any():
        report.dropped["no assistant tokens within seq_len"] += 1
        return None
    return ids, mask


def load_sft(
    path: str,
    tokenizer: BaseTokenizer,
    seq_len: int,
    *,
    truncation: str = "truncate",
    strict: bool = False,
    val_fraction: float = 0.05,
) -> tuple[list[Sample], list[Sample], SFTReport]:
    """Read chat JSONL (file, directory or glob) into train and validation samples."""
    ensure_chat_template(tokenizer)
    _, files = resolve(SourceSpec(path=path, format="jsonl"))
    report = SFTReport()
    convs: list[tuple[str, bool, list[tuple[str, bool]]]] = []
    for uri in files:
        for lineno, line, obj, err in iter_jsonl(uri):
            report.lines += 1
            try:
                if err is not None:
                    raise ValueError(err)
                segs = segments(tokenizer, to_messages(obj))
            except ValueError as e:
                where = f"{uri}:{lineno}: {e}"
                if strict or isinstance(e, DataError):
                    raise DataError(where) from None
                report.malformed[str(e).split(" (")[0]] += 1
                if len(report.examples) < 10:
                    report.examples.append(where)
                continue
            convs.append((f"{uri}:{lineno}", _is_val(line, val_fraction), segs))
    texts = [t for _, _, segs in convs for t, _ in segs]
    try:
        encoded = iter(encode_texts(tokenizer, texts))
    except EncodeError as e:
        raise DataError(
            f"tokenizer cannot encode SFT text {texts[e.index][:60]!r}: {e.message}"
        ) from None
    train: list[Sample] = []
    val: list[Sample] = []
    for _where, is_val, segs in convs:
        pieces = [next(encoded) for _ in segs]
        if not pieces:
            report.dropped["empty conversation"] += 1
            continue
        ids = np.concatenate(pieces).astype(np.int64)
        mask = np.concatenate([np.full(len(p), a) for p, (_, a) in zip(pieces, segs, strict=True)])
        sample = _fit(ids, mask.astype(bool), seq_len, truncation, report)
        if sample is not None:
            (val if is_val else train).append(sample)
    report.used, report.train_samples, report.val_samples = (
        len(train) + len(val),
        len(train),
        len(val),
    )
    if not train:
        raise DataError(f"{path}: no usable SFT samples ({report.as_dict()})")
    return train, val, report
