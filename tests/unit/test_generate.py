"""KV-cached generation and incremental detokenization."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from llm.config import ModelConfig
from llm.data.tokenizers import SimpleCharacterTokenizer
from llm.inference import (
    IncrementalDecoder,
    SamplingParams,
    generate,
    max_new_tokens_for,
    stream_generate,
)
from llm.models.decoder import DecoderModel

GREEDY = SamplingParams(temperature=0)
PROMPT = [5, 17, 3, 99, 42, 7]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> DecoderModel:
    torch.manual_seed(0)
    # Larger init than the default so the random model's logits are far from uniform.
    config = ModelConfig.from_preset("tiny", max_seq_len=64, init_std=0.2)
    return DecoderModel(config).eval()


def test_greedy_equals_argmax_of_full_recompute(model: DecoderModel) -> None:
    out = list(stream_generate(model, PROMPT, max_new_tokens=20, sampling=GREEDY))
    assert len(out) == 20
    seq = list(PROMPT)
    model.clear_cache()  # the plain forward below must not see the cache
    with torch.no_grad():
        for token, logprob in out:
            logits = model(torch.tensor([seq]))[0, -1]  # no cache: plain causal forward
            assert token == int(logits.argmax())
            assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]), abs=1e-4)
            seq.append(token)
    assert len(set(t for t, _ in out)) > 1  # not a degenerate constant stream


def test_cache_reuse_across_requests_is_clean(model: DecoderModel) -> None:
    first = generate(model, PROMPT, max_new_tokens=15, sampling=GREEDY)
    generate(model, list(range(40)), max_new_tokens=20, sampling=GREEDY)  # longer, dirties cache
    assert generate(model, PROMPT, max_new_tokens=15, sampling=GREEDY) == first


def test_seed_reproducible(model: DecoderModel) -> None:
    params = SamplingParams(temperature=1.0, seed=11)
    a = generate(model, PROMPT, max_new_tokens=30, sampling=params)
    b = generate(model, PROMPT, max_new_tokens=30, sampling=params)
    c = generate(model, PROMPT, max_new_tokens=30, sampling=params, seed=12)
    d = generate(
        model, PROMPT, max_new_tokens=30, sampling=SamplingParams(temperature=1.0), seed=12
    )
    assert a == b
    assert c == d  # the seed argument overrides sampling.seed
    assert a != c


def test_top_k_one_equals_greedy(model: DecoderModel) -> None:
    greedy = generate(model, PROMPT, max_new_tokens=25, sampling=GREEDY)
    topk1 = generate(
        model, PROMPT, max_new_tokens=25, sampling=SamplingParams(temperature=1.5, top_k=1)
    )
    assert topk1 == greedy


def test_stop_token_ends_generation_and_is_yielded(model: DecoderModel) -> None:
    free = generate(model, PROMPT, max_new_tokens=20, sampling=GREEDY)
    stop = free[4]
    first = free.index(stop)
    out = generate(model, PROMPT, max_new_tokens=20, sampling=GREEDY, stop_token_ids=[stop])
    assert out == free[: first + 1]


def test_length_is_capped_by_context(model: DecoderModel) -> None:
    context = model.config.max_seq_len
    prompt = [1] * (context - 3)
    assert len(generate(model, prompt, max_new_tokens=10, sampling=GREEDY)) == 3
    assert max_new_tokens_for(context, context - 3, 10) == 3
    assert max_new_tokens_for(context, 5, 10) == 10
    assert generate(model, PROMPT, max_new_tokens=0, sampling=GREEDY) == []


@pytest.mark.parametrize(
    ("prompt_len", "max_new", "field"),
    [
        (0, 5, "prompt_ids"),
        (64, 5, "prompt_ids"),
        (100, 5, "prompt_ids"),
        (3, -1, "max_new_tokens"),
    ],
)
def test_bad_arguments_raise_naming_them(
    model: DecoderModel, prompt_len: int, max_new: int, field: str
) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        generate(model, [1] * prompt_len, max_new_tokens=max_new, sampling=GREEDY)


# -- IncrementalDecoder -------------------------------------------------------------------


class ByteTokenizer:
    """One token per UTF-8 byte, as byte-level BPE ends up for rare characters."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode(errors="replace")


def _stream(decoder: IncrementalDecoder, pieces: Sequence[Sequence[int]]) -> list[str]:
    deltas = [decoder.add(p) for p in pieces]
    return [*deltas, decoder.flush()]


def test_never_emits_half_a_character() -> None:
    text = "héllo 世界 🙂!"
    tok = ByteTokenizer()
    deltas = _stream(IncrementalDecoder(tok), [[b] for b in tok.encode(text)])
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[1] == ""  # first byte of "é" alone is held back
    assert max(len(d) for d in deltas) == 1  # each character released once complete


def test_context_ids_are_not_emitted() -> None:
    tok = ByteTokenizer()
    decoder = IncrementalDecoder(tok, context_ids=tok.encode("prompt "))
    assert "".join(_stream(decoder, [tok.encode("ab"), tok.encode("c")])) == "abc"


def test_stop_string_split_across_tokens() -> None:
    tok = SimpleCharacterTokenizer.train("abcdefghijklmnopqrstuvwxyz ENDX\n")
    decoder = IncrementalDecoder(tok, stop=["END"])
    pieces = ["hello E", "N", "D and more", "ignored"]
    deltas = [decoder.add(tok.encode(p)) for p in pieces]
    assert deltas == ["hello ", "", "", ""]  # "E", "EN" held back, then stop
    assert decoder.stopped
    assert decoder.flush() == ""
    assert decoder.text == "hello "


def test_held_back_prefix_is_released_when_it_is_not_a_stop() -> None:
    tok = SimpleCharacterTokenizer.train("abcdefghijklmnopqrstuvwxyz ENDX\n")
    decoder = IncrementalDecoder(tok, stop=["END"])
    assert decoder.add(tok.encode("a E")) == "a "
    assert decoder.add(tok.encode("N")) == ""
    assert decoder.add(tok.encode("X")) == "ENX"
    assert decoder.add(tok.encode("EN")) == ""
    assert decoder.flush() == "EN"  # generation ended: held text is real output
    assert not decoder.stopped
    assert decoder.text == "a ENXEN"


def test_earliest_of_several_stop_strings_wins() -> None:
    tok = SimpleCharacterTokenizer.train("abcdefghijklmnopqrstuvwxyz \n")
    decoder = IncrementalDecoder(tok, stop=["cd", "b"])
    assert decoder.add(tok.encode("xabcd")) == "xa"
    assert decoder.stopped


def test_include_stop_emits_the_stop_string() -> None:
    tok = SimpleCharacterTokenizer.train("abcdefghijklmnopqrstuvwxyz ENDX\n")
    decoder = IncrementalDecoder(tok, stop=["END", "D"], include_stop=True)
    assert [decoder.add(tok.encode(p)) for p in ["hello E", "N", "D and more"]] == [
        "hello ", "", "END",
    ]  # fmt: skip
    assert decoder.stopped and decoder.text == "hello END"


def test_stop_strings_count_only_after_min_tokens() -> None:
    tok = SimpleCharacterTokenizer.train("abcdefghijklmnopqrstuvwxyz \n")
    decoder = IncrementalDecoder(tok, stop=["a"], min_tokens=3)
    # Tokens 1-3 are emitted whole, stop string or not; the 4th "a" stops.
    assert [decoder.add(tok.encode(c)) for c in "abaca"] == ["a", "b", "a", "c", ""]
    assert decoder.stopped and decoder.text == "abac"


def test_special_tokens_are_skipped_unless_asked() -> None:
    tok = SimpleCharacterTokenizer.train("ab")
    ids = [*tok.encode("a"), tok.eos_id, *tok.encode("b")]
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "a<eos>b"
    decoder = IncrementalDecoder(tok, skip_special_tokens=False)
    assert "".join(_stream(decoder, [[i] for i in ids])) == "a<eos>b"
    # A stop token's text is emitted by flush(last_ids), when a caller includes it.
    decoder = IncrementalDecoder(tok, skip_special_tokens=False)
    assert decoder.add(tok.encode("a")) + decoder.flush([tok.eos_id]) == "a<eos>"


def test_stop_string_over_multibyte_boundary() -> None:
    tok = ByteTokenizer()
    decoder = IncrementalDecoder(tok, stop=["界!"])
    deltas = _stream(decoder, [[b] for b in tok.encode("世界 世界!tail")])
    assert "".join(deltas) == "世界 世"
    assert decoder.stopped


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"^stop:"):
        IncrementalDecoder(ByteTokenizer(), stop=[""])


def test_decodes_generated_stream_like_full_decode(model: DecoderModel) -> None:
    tok = SimpleCharacterTokenizer([chr(c) for c in range(0x61, 0x61 + 26)] + list("é 世🙂"))
    # Model ids map onto this tokenizer's vocabulary; out-of-vocab ids decode to "".
    ids = [t % tok.vocab_size for t in generate(model, PROMPT, max_new_tokens=30, sampling=GREEDY)]
    decoder = IncrementalDecoder(tok)
    text = "".join(decoder.add([i]) for i in ids) + decoder.flush()
    assert text == tok.decode(ids)
