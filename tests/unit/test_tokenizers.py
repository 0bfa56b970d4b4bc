"""Tokenizers round-trip text, say what they do with unknown characters, reload, and fingerprint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llm import storage
from llm.checkpoint import checkpoint_dir
from llm.checkpoint.commit import commit
from llm.data.bpe import train_bpe
from llm.data.corpus import default_corpus, load_corpus
from llm.data.tokenizers import (
    CHATML_TEMPLATE,
    HFTokenizer,
    SimpleCharacterTokenizer,
    UnknownCharacterError,
    load_tokenizer,
    tokenizer_fingerprint,
)

TRICKY = "The assert statement, é and ✓ 🙂\n\n  indented\tx = 1_000 # ünïcödé\r\nend"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe(default_corpus()[:40], out, vocab_size=600)
    return out


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


def test_char_unknown_error_policy_is_explicit_and_saved(tmp_path: Path) -> None:
    tok = SimpleCharacterTokenizer.train("abc \n", unknown="error")
    with pytest.raises(UnknownCharacterError, match=r"'é' \(U\+00E9\) at offset 2"):
        tok.encode("abé")
    long = "ab " * 300 + "\ud800"  # a lone surrogate on the vectorized path: an error, not a crash
    with pytest.raises(UnknownCharacterError, match="offset 900"):
        tok.encode(long)
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).unknown == "error"
    with pytest.raises(ValueError, match="unknown must be"):
        SimpleCharacterTokenizer(["a"], unknown="ignore")


def test_char_vectorized_encoding_matches_the_dict_path() -> None:
    tok = SimpleCharacterTokenizer.train("".join(default_corpus()[:30]))
    text = TRICKY * 40
    expected = [tok._stoi.get(ch, tok.unk_id) for ch in text]
    assert tok.encode(text) == expected
    assert [a.tolist() for a in tok.encode_batch([text, "", "a"])] == [
        expected,
        [],
        tok.encode("a"),
    ]


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


def test_special_tokens_are_added_only_when_asked(tmp_path: Path) -> None:
    """Training and generation encode without the tokenizer's specials; /tokenize's
    `add_special_tokens` asks for them (here a BOS its post-processor adds)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    word = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=word, bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    ).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hello world") == [3, 4]
    assert tok.encode("hello world", add_special_tokens=True) == [0, 3, 4]
    chars = SimpleCharacterTokenizer.train("hello")
    assert chars.encode("hello", add_special_tokens=True) == chars.encode("hello")  # no BOS


def test_trained_bpe_loads_with_autotokenizer_offline(bpe_dir: Path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    auto = AutoTokenizer.from_pretrained(str(bpe_dir))
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == (
        "<|begin_of_text|>",
        "<|endoftext|>",
        "<|pad|>",
    )
    assert auto.chat_template == CHATML_TEMPLATE and len(auto) == 600
    tok = HFTokenizer(bpe_dir)
    assert tok.decode(tok.encode(TRICKY)) == TRICKY  # byte-level: every string round-trips
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode("<|im_end|>") == [tok.stop_ids[1]] and tok.stop_ids[0] == tok.eos_id
    batch = tok.encode_batch([TRICKY, "", "abc"])
    assert [b.tolist() for b in batch] == [tok.encode(TRICKY), [], tok.encode("abc")]


def test_fingerprints_survive_save_load_and_tell_tokenizers_apart(
    bpe_dir: Path, tmp_path: Path
) -> None:
    hf = HFTokenizer(bpe_dir)
    hf.save(tmp_path / "hf")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "hf")) == hf.fingerprint()
    char = SimpleCharacterTokenizer.train("abc")
    char.save(tmp_path)
    assert load_tokenizer(tmp_path).fingerprint() == char.fingerprint()
    assert SimpleCharacterTokenizer.train("abd").fingerprint() != char.fingerprint()
    assert (
        SimpleCharacterTokenizer.train("abc", unknown="error").fingerprint() == char.fingerprint()
    )
    assert hf.fingerprint() != char.fingerprint()


def test_load_tokenizer_from_a_checkpoint_or_run_dir(tmp_path: Path) -> None:
    tok = SimpleCharacterTokenizer.train("hello world")
    ckpt = checkpoint_dir(str(tmp_path / "run"), 7)
    staging = tmp_path / "staging"
    staging.mkdir()
    tok.save(staging)
    (staging / "config.json").write_text("{}")
    commit(ckpt, storage.upload(staging, ckpt))
    for where in (ckpt, str(tmp_path / "run")):
        assert load_tokenizer(where).fingerprint() == tok.fingerprint()
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        load_tokenizer(tmp_path / "empty")


def test_encode_batch_arrays_are_uint32(bpe_dir: Path) -> None:
    assert HFTokenizer(bpe_dir).encode_batch(["x y"])[0].dtype == np.uint32
    assert SimpleCharacterTokenizer.train("xy").encode_batch(["xy"])[0].dtype == np.uint32
