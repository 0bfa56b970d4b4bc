"""Tokenizers round-trip text, say what they do with unknown characters, and reload."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.data.corpus import default_corpus, load_corpus
from llm.data.tokenizers import HFTokenizer, SimpleCharacterTokenizer, load_tokenizer


def test_char_round_trip_and_unknown_policy(tmp_path: Path) -> None:
    tok = SimpleCharacterTokenizer.train("abc def\n")
    assert tok.decode(tok.encode("bad cafe\n")) == "bad cafe\n"
    ids = tok.encode("abz")
    assert ids[-1] == tok.unk_id and tok.decode(ids) == "ab\ufffd"
    assert tok.decode([tok.eos_id, *tok.encode("a")]) == "a"  # specials decode to nothing
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, SimpleCharacterTokenizer)
    assert again.encode("cab") == tok.encode("cab") and again.vocab_size == tok.vocab_size


def test_char_chat_template() -> None:
    tok = SimpleCharacterTokenizer.train("".join(default_corpus()))
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    )
    assert text == "System: Be brief.\nUser: What is a list?\nAssistant:"
    assert tok.unk_id not in tok.encode(text)


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        SimpleCharacterTokenizer.train("")
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_corpus(str(tmp_path / "nope"))
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match=r"b\.txt: not UTF-8"):
        load_corpus(str(tmp_path))


def test_hf_tokenizer_from_local_directory(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(default_corpus()[:20], trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(
        tmp_path
    )
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    text = "The assert statement, é and ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == 0 and tok.vocab_size == 400
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "User: hi\nAssistant:"  # no template of its own: the plain format
