"""Training a byte-level BPE tokenizer (GPT-2 style) with the `tokenizers` library.

The result is saved as a `transformers` fast tokenizer, so `AutoTokenizer.from_pretrained(dir)`
(and `HFTokenizer`, offline) loads it with BOS, EOS and PAD set, ChatML's turn markers as
special tokens, and the ChatML chat template. Byte-level means every string encodes (no
unknown token), which is why there is no `<unk>`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from llm.data.encoding import split_text
from llm.data.tokenizers import CHATML_TEMPLATE, HFTokenizer

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|begin_of_text|>", "<|endoftext|>", "<|pad|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def _pieces(texts: Iterable[str], chunk_chars: int) -> Iterator[str]:
    # Long documents are fed in pieces so the trainer never holds one huge string per item.
    for text in texts:
        yield from split_text(text, chunk_chars)


def train_bpe(
    texts: Iterable[str],
    out: str | Path,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    show_progress: bool = False,
    length: int | None = None,
) -> HFTokenizer:
    """Train on `texts`, save to `out` (created if missing) and return it loaded from there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS, BOS, PAD, *CHAT_TOKENS]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be at least {256 + len(specials)} (bytes + specials)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    bpe.train_from_iterator(_pieces(texts, 1 << 20), trainer, length=length)
    if bpe.get_vocab_size() <= len(specials) + 256:
        raise ValueError("the training text is empty: no merges were learned")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(CHAT_TOKENS),
    )
    fast.chat_template = CHATML_TEMPLATE
    Path(out).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    log.info("trained byte-level BPE: %d tokens, saved to %s", bpe.get_vocab_size(), out)
    return HFTokenizer(out)
