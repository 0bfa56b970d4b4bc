"""Tokenizers behind one protocol: a character tokenizer built from a corpus, and HF's.

Both are saved beside a checkpoint's weights, so a served model always decodes with the
tokenizer it was trained with. `load_tokenizer(dir)` picks the right one from the files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

CHAR_TOKENIZER_FILE = "char_tokenizer.json"

# A plain-text conversation format for tokenizers without a chat template of their own.
# Character models see text; this renders a chat as text they can continue.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@runtime_checkable
class BaseTokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    has_chat_template: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str: ...

    def save(self, directory: str | os.PathLike) -> None: ...


def _render_chat(template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )


class SimpleCharacterTokenizer:
    """One id per character seen in the corpus, plus special tokens.

    Characters outside the vocabulary map to `<unk>` (an explicit policy: the text still
    encodes, and `decode` shows U+FFFD where they were).
    """

    SPECIALS = ("<pad>", "<unk>", "<eos>")

    def __init__(self, chars: Sequence[str], chat_template: str = PLAIN_CHAT_TEMPLATE) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("character vocabulary has duplicates")
        self.chars = list(chars)
        self.pad_id, self.unk_id, self.eos_id = 0, 1, 2
        self.bos_id: int | None = None
        offset = len(self.SPECIALS)
        self._stoi = {ch: i + offset for i, ch in enumerate(self.chars)}
        self._itos = {i + offset: ch for i, ch in enumerate(self.chars)}
        self._itos[self.unk_id] = "\ufffd"
        self.vocab_size = offset + len(self.chars)
        self.chat_template = chat_template
        self.has_chat_template = bool(chat_template)

    @classmethod
    def train(cls, text: str) -> SimpleCharacterTokenizer:
        if not text:
            raise ValueError("cannot build a character vocabulary from an empty corpus")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        unk = self.unk_id
        return [self._stoi.get(ch, unk) for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        # Specials other than <unk> decode to nothing, as HF's skip_special_tokens does.
        return "".join(self._itos.get(int(i), "") for i in ids)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return _render_chat(self.chat_template, messages, add_generation_prompt)

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / CHAR_TOKENIZER_FILE
        data = {"type": "char", "chars": self.chars, "chat_template": self.chat_template}
        path.write_text(json.dumps(data, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SimpleCharacterTokenizer:
        path = Path(directory) / CHAR_TOKENIZER_FILE
        try:
            data = json.loads(path.read_text())
            return cls(data["chars"], data.get("chat_template", PLAIN_CHAT_TEMPLATE))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a character tokenizer file ({e})") from e


class HFTokenizer:
    """`transformers.AutoTokenizer` from a local directory, offline."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.vocab_size = len(self.tok)
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id
        self.has_chat_template = bool(getattr(self.tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self.has_chat_template:
            return self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        return _render_chat(PLAIN_CHAT_TEMPLATE, messages, add_generation_prompt)

    def save(self, directory: str | os.PathLike) -> None:
        self.tok.save_pretrained(str(directory))


def load_tokenizer(directory: str | os.PathLike) -> BaseTokenizer:
    """Load whichever tokenizer was saved in `directory`."""
    d = Path(directory)
    if (d / CHAR_TOKENIZER_FILE).exists():
        return SimpleCharacterTokenizer.load(d)
    if (d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists():
        return HFTokenizer(d)
    raise FileNotFoundError(
        f"{d}: no tokenizer found (expected {CHAR_TOKENIZER_FILE} or tokenizer.json)"
    )
