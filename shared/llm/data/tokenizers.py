"""Tokenizers behind one protocol: a character tokenizer built from a corpus, and HF's.

Both are saved beside a checkpoint's weights, so a served model always decodes with the
tokenizer it was trained with. `load_tokenizer(dir)` picks the right one from the files,
and also accepts a checkpoint or run directory (local or `s3://`), offline.

Besides the protocol, both classes offer `encode_batch` (many texts to uint32 arrays, the
fast path `llm-data prepare` uses) and `fingerprint()` (a hash of everything that decides
the ids, stored in token shards so shards and model can be checked against each other).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

CHAR_TOKENIZER_FILE = "char_tokenizer.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# A plain-text conversation format for tokenizers without a chat template of their own.
# Character models see text; this renders a chat as text they can continue.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# ChatML (OpenAI, Qwen): what SFT installs on a subword tokenizer that has no template.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

UnknownPolicy = Literal["unk", "error"]


class UnknownCharacterError(ValueError):
    """Text holds a character the vocabulary lacks and the policy says not to map it to <unk>."""

    def __init__(self, char: str, index: int) -> None:
        self.char, self.index = char, index
        super().__init__(
            f"character {char!r} (U+{ord(char):04X}) at offset {index} is not in the vocabulary"
            " (unknown='error'; use unknown='unk' to map it to <unk>)"
        )


@runtime_checkable
class BaseTokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    has_chat_template: bool

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated turn (EOS, and the chat template's end-of-turn token)."""
        ...

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; `add_special_tokens` adds the tokenizer's own (a BOS, say), which
        training and generation never do."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (EOS, chat markers) decode to nothing unless
        `skip_special_tokens` is False."""
        ...

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:  # fmt: skip
        """The chat as the model's template renders it; `tools` (OpenAI `tools` entries)
        are rendered by templates that support them."""
        ...

    def save(self, directory: str | os.PathLike) -> None: ...


def _render_chat(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:  # fmt: skip
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, tools=tools
    )


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[
        :16
    ]


class SimpleCharacterTokenizer:
    """One id per character seen in the corpus, plus special tokens.

    Unknown characters follow an explicit policy, saved with the vocabulary: `"unk"` (the
    default) maps them to `<unk>` (the text still encodes, and `decode` shows U+FFFD where
    they were); `"error"` raises `UnknownCharacterError` naming the character and offset.
    """

    SPECIALS = ("<pad>", "<unk>", "<eos>")

    def __init__(
        self,
        chars: Sequence[str],
        chat_template: str = PLAIN_CHAT_TEMPLATE,
        unknown: UnknownPolicy = "unk",
    ) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("character vocabulary has duplicates")
        if any(len(c) != 1 for c in chars):
            raise ValueError("character vocabulary entries must be single characters")
        if unknown not in ("unk", "error"):
            raise ValueError(f"unknown must be 'unk' or 'error', got {unknown!r}")
        self.chars = list(chars)
        self.unknown: UnknownPolicy = unknown
        self.pad_id, self.unk_id, self.eos_id = 0, 1, 2
        self.bos_id: int | None = None
        offset = len(self.SPECIALS)
        self._stoi = {ch: i + offset for i, ch in enumerate(self.chars)}
        self._itos = {i + offset: ch for i, ch in enumerate(self.chars)}
        self._itos[self.unk_id] = "\ufffd"
        self.vocab_size = offset + len(self.chars)
        self.chat_template = chat_template
        self.has_chat_template = bool(chat_template)
        # Code point -> id lookup table for vectorized encoding (-1: not in the vocabulary).
        cps = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._lut = np.full(int(cps.max(initial=0)) + 1, -1, dtype=np.int64)
        self._lut[cps] = np.arange(offset, offset + len(cps))

    @property
    def stop_ids(self) -> list[int]:
        return [self.eos_id]

    @classmethod
    def train(cls, text: str, unknown: UnknownPolicy = "unk") -> SimpleCharacterTokenizer:
        if not text:
            raise ValueError("cannot build a character vocabulary from an empty corpus")
        return cls(sorted(set(text)), unknown=unknown)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # No special token goes around a text here (there is no BOS).
        if len(text) > 512:  # the table lookup beats the dict once the text is not tiny
            return self.encode_array(text).tolist()
        unk, stoi = self.unk_id, self._stoi
        if self.unknown == "error":
            for i, ch in enumerate(text):
                if ch not in stoi:
                    raise UnknownCharacterError(ch, i)
        return [stoi.get(ch, unk) for ch in text]

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array, vectorized (hundreds of MB/s)."""
        # surrogatepass: Python strings may hold lone surrogates; they are unknown, not a crash.
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        known = cps < len(self._lut)
        ids = np.full(len(cps), -1, dtype=np.int64)
        ids[known] = self._lut[cps[known]]
        missing = ids < 0
        if missing.any():
            if self.unknown == "error":
                i = int(np.argmax(missing))
                raise UnknownCharacterError(text[i], i)
            ids[missing] = self.unk_id
        return ids.astype(np.uint32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Specials other than <unk> (U+FFFD) decode to nothing, as HF's skip_special_tokens
        # does, or to their names.
        if skip_special_tokens:
            return "".join(self._itos.get(int(i), "") for i in ids)
        specials = dict(enumerate(self.SPECIALS))
        return "".join(self._itos.get(int(i)) or specials.get(int(i), "") for i in ids)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:  # fmt: skip
        return _render_chat(self.chat_template, messages, add_generation_prompt, tools)

    def fingerprint(self) -> str:
        """Hash of what decides the ids (the unknown policy only decides whether to raise)."""
        return _digest({"type": "char", "specials": self.SPECIALS, "chars": self.chars})

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / CHAR_TOKENIZER_FILE
        data = {
            "type": "char",
            "chars": self.chars,
            "chat_template": self.chat_template,
            "unknown": self.unknown,
        }
        path.write_text(json.dumps(data, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SimpleCharacterTokenizer:
        path = Path(directory) / CHAR_TOKENIZER_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                data["chars"],
                data.get("chat_template", PLAIN_CHAT_TEMPLATE),
                data.get("unknown", "unk"),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a character tokenizer file ({e})") from e


class HFTokenizer:
    """`transformers.AutoTokenizer` from a local directory, offline."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{directory}: cannot load a Hugging Face tokenizer: {e}") from e
        self.vocab_size = len(self.tok)
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id
        self.unk_id = self.tok.unk_token_id
        self.has_chat_template = bool(getattr(self.tok, "chat_template", None))
        self.extra_stop_ids: list[int] = []  # a model's generation_config EOS ids

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated turn: EOS, ChatML's `<|im_end|>` when the vocab has it,
        and `extra_stop_ids`."""
        ids = [self.eos_id] if self.eos_id is not None else []
        ids += [i for i in self.extra_stop_ids if i not in ids]
        im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.unk_id and im_end not in ids:
            ids.append(im_end)
        return ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Many texts at once; the Rust backend encodes them in parallel, without offsets."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer
            return [np.asarray(self.encode(t), dtype=np.uint32) for t in texts]
        encs = backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:  # fmt: skip
        if self.has_chat_template:
            return self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                tools=tools or None,
            )  # fmt: skip
        return _render_chat(PLAIN_CHAT_TEMPLATE, messages, add_generation_prompt, tools)

    def set_chat_template(self, template: str) -> None:
        """Install a template; `save` then writes it, so serving renders chats the same way."""
        self.tok.chat_template = template
        self.has_chat_template = True

    def fingerprint(self) -> str:
        """Hash of the normalizer, pre-tokenizer, model (vocab, merges) and special ids.

        The post-processor is left out: we never add special tokens while encoding, and
        transformers rewrites it on load, which would make equal tokenizers look different.
        """
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:
            spec = json.loads(backend.to_str())
            spec = {
                k: spec.get(k) for k in ("added_tokens", "normalizer", "pre_tokenizer", "model")
            }
        else:
            spec = {"class": type(self.tok).__name__, "vocab": sorted(self.tok.get_vocab().items())}
        spec["special_ids"] = [self.bos_id, self.eos_id, self.pad_id]
        return _digest(spec)

    def save(self, directory: str | os.PathLike) -> None:
        self.tok.save_pretrained(str(directory))


def tokenizer_fingerprint(tokenizer: BaseTokenizer) -> str:
    """A tokenizer's `fingerprint()`, or for one without it a hash of its ids on probe text."""
    fp = getattr(tokenizer, "fingerprint", None)
    if callable(fp):
        return fp()
    probe = "The quick brown fox, 1234 jumps! Ünïcödé ✓\n\tover the lazy dog."
    ids = list(tokenizer.encode(probe))
    specials = [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]
    return _digest(
        {
            "class": type(tokenizer).__name__,
            "probe": ids,
            "vocab_size": tokenizer.vocab_size,
            "special_ids": specials,
        }
    )


def _load_from_dir(d: Path) -> BaseTokenizer | None:
    if (d / CHAR_TOKENIZER_FILE).exists():
        return SimpleCharacterTokenizer.load(d)
    if any((d / f).exists() for f in HF_TOKENIZER_FILES):
        return HFTokenizer(d)
    return None


def load_tokenizer(directory: str | os.PathLike) -> BaseTokenizer:
    """Load the tokenizer saved in a directory, a checkpoint, or a run's newest checkpoint.

    `directory` may be a local path or a storage URI (`s3://...`); remote checkpoints have
    their tokenizer files (only those) downloaded. Nothing is fetched from a hub.
    """
    uri = os.fspath(directory)
    local = uri.removeprefix("file://") if "://" not in uri or uri.startswith("file://") else None
    if local is not None and (found := _load_from_dir(Path(local))) is not None:
        return found
    # late: neither is needed for the plain-directory case (and llm.checkpoint imports this)
    from llm import storage
    from llm.checkpoint import CheckpointError, read_manifest, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(uri)
    except CheckpointError:
        raise FileNotFoundError(
            f"{uri}: no tokenizer found (expected {CHAR_TOKENIZER_FILE} or tokenizer.json,"
            " or a checkpoint / run directory holding one)"
        ) from None
    # Tokenizer files only: not the weights, nor config.json (the model's, which would
    # mislead AutoTokenizer's class lookup).
    wanted = [
        r
        for r in read_manifest(ckpt)["files"]
        if "/" not in r and r.endswith((".json", ".txt", ".model", ".jinja")) and r != "config.json"
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for rel in wanted:
            (Path(tmp) / rel).write_bytes(storage.read_bytes(storage.join(ckpt, rel)))
        found = _load_from_dir(Path(tmp))
    if found is None:
        raise FileNotFoundError(f"{ckpt}: checkpoint holds no tokenizer files")
    log.info("tokenizer from checkpoint %s", ckpt)
    return found
