"""A checkpoint is read only when its manifest vouches for every byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tests.support import sharded_checkpoint_that_runs_code

from llm.checkpoint import MANIFEST, WEIGHTS, CheckpointError, load_checkpoint, save_checkpoint
from llm.config import ModelConfig
from llm.data.tokenizers import SimpleCharacterTokenizer
from llm.models import DecoderModel


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, DecoderModel]:
    tok = SimpleCharacterTokenizer.train("hello world")
    model = DecoderModel(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)).eval()
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    save_checkpoint(str(ckpt), model, tok, meta={"step": 1})
    return ckpt, model


def test_round_trip_gives_same_logits(saved: tuple[Path, DecoderModel]) -> None:
    ckpt, model = saved
    loaded = load_checkpoint(str(ckpt))
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight  # tie restored
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("hello")) == "hello"


def test_run_dir_resolves_to_newest_committed(saved: tuple[Path, DecoderModel]) -> None:
    ckpt, _ = saved
    newer = ckpt.parent / "step-00000002"
    shutil.copytree(ckpt, newer)
    (newer / MANIFEST).unlink()  # written but never committed
    assert load_checkpoint(str(ckpt.parent.parent)).uri == str(ckpt)


def test_directory_without_manifest_is_never_loaded(saved: tuple[Path, DecoderModel]) -> None:
    ckpt, _ = saved
    (ckpt / MANIFEST).unlink()
    with pytest.raises(CheckpointError):
        load_checkpoint(str(ckpt))
    with pytest.raises(CheckpointError):
        load_checkpoint(str(ckpt.parent.parent))


def test_truncated_weights_are_detected(saved: tuple[Path, DecoderModel]) -> None:
    ckpt, _ = saved
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=WEIGHTS):
        load_checkpoint(str(ckpt))


def test_flipped_byte_is_detected(saved: tuple[Path, DecoderModel]) -> None:
    ckpt, _ = saved
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(str(ckpt))


def test_a_truncated_or_foreign_hugging_face_shard_is_refused_before_reading(
    tmp_path: Path,
) -> None:
    """An HF directory has no manifest: each shard's size must be its header's end of
    data, and the shards' tensor bytes the index's total_size."""
    import json

    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    out = tmp_path / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(out, max_shard_size="40KB")
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = out / sorted(set(index["weight_map"].values()))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: .* truncated or corrupt"):
        load_checkpoint(str(out))
    shard.write_bytes(data)
    index["metadata"]["total_size"] += 4
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"total_size \d+, but the shards hold"):
        load_checkpoint(str(out))


def test_a_sharded_checkpoint_never_runs_code(tmp_path: Path) -> None:
    """DCP's `.metadata` is a pickle: a crafted one, committed, is refused by name when the
    engine loads the checkpoint and when a trainer resumes from it; nothing runs."""
    from llm.checkpoint.format import METADATA
    from llm.checkpoint.sharded import load_sharded

    marker = tmp_path / "pwned"
    ckpt, model, optimizer = sharded_checkpoint_that_runs_code(tmp_path / "run", marker)
    with pytest.raises(CheckpointError, match=rf"{METADATA}: refers to posix\.system"):
        load_checkpoint(str(ckpt))
    with pytest.raises(BaseException, match=r"refers to posix\.system"):
        load_sharded(str(ckpt), model, optimizer)
    assert not marker.exists()
