"""The cached byte-level BPE encoder gives the tokenizer's own ids, or is not used at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llm.data.bpe import train_bpe
from llm.data.corpus import default_corpus
from llm.data.fastbpe import ByteLevelBPE
from llm.data.prepare import PrepareConfig, prepare
from llm.data.sources import SourceSpec
from llm.data.tokenizers import HFTokenizer

TRICKY = [
    "It's 12345 o'clock, isn't it?  Yes!!\n\n\n  indented\r\n\tTabs\t\t end   ",
    "Ünïcödé, 日本語のテキスト, emoji 🙂👍🏽, combining é, Ελληνικά 123.45",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>text<|pad|>  <|im_end|>",
    "",
    " ",
    "\n",
    "a" * 3000,
]
# Llama 3 / tiktoken cl100k word pattern, as a Split before ByteLevel(use_regex=False).
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    return train_bpe(default_corpus()[:40], tmp_path_factory.mktemp("bpe"), vocab_size=700)


def _llama3_style(tmp_path: Path) -> HFTokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<eos>"], initial_alphabet=alphabet
    )
    bpe.train_from_iterator(default_corpus()[:40], trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(tmp_path)
    return HFTokenizer(tmp_path)


def test_same_ids_as_the_tokenizer_gpt2_style(gpt2_style: HFTokenizer) -> None:
    fast = ByteLevelBPE.from_tokenizer(gpt2_style, default_corpus()[50])
    assert fast is not None
    for text in [*TRICKY, *default_corpus()[60:70]]:
        assert fast.encode(text).tolist() == gpt2_style.encode(text), text[:40]


def test_same_ids_as_the_tokenizer_llama3_style(tmp_path: Path) -> None:
    tok = _llama3_style(tmp_path)
    fast = ByteLevelBPE.from_tokenizer(tok)
    assert fast is not None
    for text in [*TRICKY, *default_corpus()[60:70]]:
        assert fast.encode(text).tolist() == tok.encode(text), text[:40]


def test_other_tokenizer_shapes_are_not_taken(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Lowercase()  # a normalizer: not handled, so not used
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(
        default_corpus()[:5], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>").save_pretrained(tmp_path)
    assert ByteLevelBPE.from_tokenizer(HFTokenizer(tmp_path)) is None


def test_prepare_writes_the_same_shards_with_and_without_it(
    gpt2_style: HFTokenizer, tmp_path: Path
) -> None:
    src = tmp_path / "a.txt"
    src.write_text("\n".join(default_corpus()[:20]) + "".join(TRICKY))
    shas = []
    for fast in (True, False):
        cfg = PrepareConfig(
            source=SourceSpec(path=str(src)),
            out=str(tmp_path / str(fast)),
            workers=1,
            fast_bpe=fast,
            chunk_chars=2000,
        )
        shas.append([s.sha256 for s in prepare(cfg, gpt2_style, progress=False).index.shards])
    assert shas[0] == shas[1]


def test_a_divergence_found_by_the_spot_check_stops_the_run(gpt2_style: HFTokenizer) -> None:
    from llm.data.encoding import EncodeError

    fast = ByteLevelBPE.from_tokenizer(gpt2_style)
    fast.cache["hello"] = [1, 2, 3]  # simulate a bug on one word
    with pytest.raises(EncodeError, match="disagrees with the tokenizer"):
        fast.encode_batch(["hello"])
    assert np.array_equal(fast.encode_batch([""])[0], [])
