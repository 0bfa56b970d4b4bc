"""SFT data: both JSONL formats, loss only on assistant tokens, packing that leaks nothing
between samples (masks, positions, and the model's loss), and the truncation report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm.config import ModelConfig
from llm.data.batch import IGNORE_INDEX, Batch, block_causal_mask
from llm.data.bpe import train_bpe
from llm.data.corpus import default_corpus
from llm.data.datamodule import DataConfig, TextDataModule
from llm.data.packing import pack_samples
from llm.data.sft import load_sft, to_messages
from llm.data.sources import DataError
from llm.data.tokenizers import SimpleCharacterTokenizer, load_tokenizer
from llm.models.decoder import DecoderModel

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A mutable sequence."},
        {"role": "user", "content": "And a tuple?"},
        {"role": "assistant", "content": "An immutable one."},
    ]
}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


@pytest.fixture(scope="module")
def char() -> SimpleCharacterTokenizer:
    return SimpleCharacterTokenizer.train("".join(default_corpus()) + "?")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe(default_corpus()[:30], out, vocab_size=500)
    return out


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _loss_text(tok, ids, labels) -> str:
    return tok.decode([int(t) for t in labels if t != IGNORE_INDEX])


def test_instruction_format_becomes_a_chat() -> None:
    assert to_messages(ALPACA) == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    with pytest.raises(ValueError, match="no assistant message"):
        to_messages({"messages": [{"role": "user", "content": "hi"}]})


def test_loss_only_on_assistant_tokens_char_template(tmp_path: Path, char) -> None:
    train, _, _ = load_sft(str(_write(tmp_path / "a.jsonl", [CHAT])), char, 256, val_fraction=1e-9)
    ids, mask = train[0]
    rows = pack_samples(train, 256, char.pad_id)
    assert (
        _loss_text(char, rows["input_ids"][0], rows["labels"][0])
        == " A mutable sequence.\n An immutable one.\n"
    )
    assert char.decode(ids[~mask]).endswith("User: And a tuple?\nAssistant:")


def test_loss_only_on_assistant_tokens_chatml(tmp_path: Path, bpe_dir: Path) -> None:
    tok = load_tokenizer(bpe_dir)
    path = _write(tmp_path / "a.jsonl", [CHAT, ALPACA])
    train, _, _ = load_sft(str(path), tok, 256, val_fraction=1e-9)
    (ids, mask), (ids2, _) = train
    assert tok.decode(ids[mask]) == "A mutable sequence.\nAn immutable one.\n"  # specials skipped
    im_end = tok.encode("<|im_end|>")[0]
    assert (ids[mask] == im_end).sum() == 2  # the model learns to end its turn
    assert tok.tok.decode(ids[~mask].tolist()).endswith("<|im_start|>assistant\n")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Add the numbers.\n\n2 and 3"}])
    assert ids2[: len(tok.encode(prompt))].tolist() == tok.encode(
        prompt
    )  # as the engine encodes it


def test_chatml_is_installed_and_saved_when_the_tokenizer_has_none(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = (
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    bpe.train_from_iterator(
        default_corpus()[:5],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(tmp_path / "t")
    tok = load_tokenizer(tmp_path / "t")
    assert not tok.has_chat_template
    load_sft(str(_write(tmp_path / "a.jsonl", [ALPACA])), tok, 128, val_fraction=1e-9)
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.has_chat_template and again.apply_chat_template(
        [{"role": "user", "content": "x"}]
    ).startswith("<|im_start|>user")


def test_malformed_lines_are_reported_with_file_and_line(tmp_path: Path, char) -> None:
    rows = [
        CHAT,
        "{oops",
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"prompt": "x"},
        ALPACA,
    ]
    path = _write(tmp_path / "mixed.jsonl", rows)
    train, _, report = load_sft(str(path), char, 256, val_fraction=1e-9)
    assert len(train) == 2 and report.lines == 5 and sum(report.malformed.values()) == 3
    assert report.examples[0].endswith(
        "mixed.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)"
    )
    assert any("mixed.jsonl:3: messages[0]: role must be one of" in e for e in report.examples)
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: invalid JSON"):
        load_sft(str(path), char, 256, strict=True)
    with pytest.raises(DataError, match="no usable SFT samples"):
        load_sft(str(_write(tmp_path / "bad.jsonl", ["{oops"])), char, 256)


def test_truncation_and_drops_are_counted_with_reasons(tmp_path: Path, char) -> None:
    long_answer = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 200}]
    }
    long_prompt = {
        "messages": [{"role": "user", "content": "y" * 200}, {"role": "assistant", "content": "ok"}]
    }
    path = _write(tmp_path / "a.jsonl", [long_answer, long_prompt, ALPACA])
    train, _, report = load_sft(str(path), char, 64, val_fraction=1e-9)
    assert report.truncated == 2 and dict(report.dropped) == {
        "no assistant tokens within seq_len": 1
    }
    assert len(train) == 2 and all(len(ids) == 65 for ids, _ in train[:1])
    _, _, report = load_sft(str(path), char, 64, truncation="drop", val_fraction=1e-9)
    assert dict(report.dropped) == {"longer than seq_len=64": 2} and report.truncated == 0


def test_packing_positions_documents_and_mask(tmp_path: Path, char) -> None:
    samples = [CHAT, ALPACA, ALPACA | {"output": "five"}, CHAT]
    train, _, _ = load_sft(str(_write(tmp_path / "a.jsonl", samples)), char, 256, val_fraction=1e-9)
    rows = pack_samples(train, 256, char.pad_id)
    assert len(rows["input_ids"]) < len(train)  # several samples share a row
    lengths = sorted(len(ids) - 1 for ids, _ in train)
    seen = []
    for r in range(len(rows["input_ids"])):
        doc, pos = (
            torch.from_numpy(rows["document_ids"][r]),
            torch.from_numpy(rows["position_ids"][r]),
        )
        for d in doc.unique().tolist():
            sel = doc == d
            assert torch.equal(pos[sel], torch.arange(int(sel.sum())))  # positions restart
            if (torch.from_numpy(rows["labels"][r])[sel] != IGNORE_INDEX).any():
                seen.append(int(sel.sum()))
        mask = block_causal_mask(doc[None])[0, 0]
        different = doc[:, None] != doc[None, :]
        assert not (mask & different).any()  # no token attends across samples
    assert sorted(seen) == lengths


# -- the model's loss on a packed batch equals the sum over the unpacked samples -----------


def _packed_and_unpacked(tmp_path: Path, char) -> tuple[DecoderModel, Batch, Batch]:
    torch.manual_seed(0)
    model = DecoderModel(
        ModelConfig.from_preset("tiny", vocab_size=char.vocab_size, init_std=0.2)
    ).eval()
    path = _write(tmp_path / "a.jsonl", [CHAT, ALPACA, ALPACA | {"output": "five"}])
    train, _, _ = load_sft(str(path), char, 256, val_fraction=1e-9)
    packed = pack_samples(train, 256, char.pad_id, pack=True)
    alone = pack_samples(train, 256, char.pad_id, pack=False)
    assert len(packed["input_ids"]) == 1 and len(alone["input_ids"]) == 3
    keys = ("input_ids", "labels", "position_ids", "document_ids")
    packed_b = Batch(*(torch.from_numpy(packed[k]) for k in keys))
    alone_b = Batch(*(torch.from_numpy(alone[k]) for k in keys))
    return model, packed_b, alone_b


def _sum_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), reduction="sum")


@torch.no_grad()
def test_packed_loss_equals_the_sum_over_unpacked_samples(tmp_path: Path, char) -> None:
    model, packed, alone = _packed_and_unpacked(tmp_path, char)
    logits = model(
        packed.input_ids, position_ids=packed.position_ids, document_ids=packed.document_ids
    )
    loss_packed = _sum_loss(logits, packed.labels)
    loss_alone = _sum_loss(model(alone.input_ids), alone.labels)  # each row: one sample + padding
    assert packed.n_loss_tokens == alone.n_loss_tokens > 0
    torch.testing.assert_close(loss_packed, loss_alone, rtol=1e-5, atol=1e-4)
    # Without document ids and restarted positions the samples would leak into each other:
    leaky = _sum_loss(model(packed.input_ids), packed.labels)
    assert not torch.allclose(leaky, loss_alone, rtol=1e-3)
    # The model's block-diagonal mask is the one the packing module describes.
    from llm.core.attn.masks import attention_mask

    ours = attention_mask(packed.position_ids, packed.position_ids, None, None, packed.document_ids)
    assert torch.equal(ours, packed.attention_mask())


def test_sft_datamodule_resumes_exactly_on_two_ranks(tmp_path: Path, char) -> None:
    rows = [ALPACA | {"output": f"answer number {i}", "input": f"case {i}"} for i in range(40)]
    cfg = DataConfig(
        task="sft",
        dataset_path=str(_write(tmp_path / "a.jsonl", rows)),
        seq_len=128,
        global_batch_size=4,
        val_fraction=0.2,
    )
    ref = TextDataModule(cfg, char)
    assert ref.report.val_samples > 0 and ref.report.train_samples + ref.report.val_samples == 40
    global_rows = [ref.next_batch().input_ids for _ in range(6)]
    for rank in range(2):
        dm = TextDataModule(cfg, char, rank=rank, world_size=2)
        got = [dm.next_batch().input_ids for _ in range(2)]
        again = TextDataModule(cfg, char, rank=rank, world_size=2)
        again.load_state_dict(dm.state_dict())
        got += [again.next_batch().input_ids for _ in range(4)]
        for step, g in enumerate(got):
            assert torch.equal(g, global_rows[step][2 * rank : 2 * rank + 2])
    val = list(ref.val_batches())
    assert val and all(b.labels.ne(IGNORE_INDEX).any() for b in val)
