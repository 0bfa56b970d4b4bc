"""`TextDataModule` over token shards: exact resume (1 and 2 ranks), disjoint rank shares,
a deterministic validation split, document masking, and the fingerprint check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llm.data.batch import block_causal_mask
from llm.data.corpus import default_corpus
from llm.data.datamodule import DataConfig, TextDataModule
from llm.data.prepare import PrepareConfig, prepare
from llm.data.shards import FingerprintMismatchError
from llm.data.sources import SourceSpec
from llm.data.tokenizers import SimpleCharacterTokenizer

STEPS, CUT = 8, 3


@pytest.fixture(scope="module")
def tok() -> SimpleCharacterTokenizer:
    return SimpleCharacterTokenizer.train("".join(default_corpus()))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, tok: SimpleCharacterTokenizer) -> str:
    src = tmp_path_factory.mktemp("src")
    for i, doc in enumerate(default_corpus()[:30]):
        (src / f"{i:02d}.txt").write_text(doc)
    out = str(tmp_path_factory.mktemp("tokens"))
    cfg = PrepareConfig(source=SourceSpec(path=str(src)), out=out, shard_tokens=5000, workers=1)
    prepare(cfg, tok, progress=False)
    return out


def _cfg(path: str, **kw) -> DataConfig:
    return DataConfig(**{"dataset_path": path, "seq_len": 32, "global_batch_size": 8, **kw})


def _rows(batches: list) -> list[torch.Tensor]:
    return [b.input_ids for b in batches]


@pytest.mark.parametrize("sampling", ["random", "shuffled"])
def test_resume_continues_with_the_uninterrupted_batches_one_rank(
    shards: str, tok, sampling: str
) -> None:
    cfg = _cfg(shards, sampling=sampling, document_masking=True)
    dm = TextDataModule(cfg, tok)
    ref = [dm.next_batch() for _ in range(STEPS)]
    first = TextDataModule(cfg, tok)
    for _ in range(CUT):
        first.next_batch()
    state = first.state_dict()
    resumed = TextDataModule(cfg, tok)
    resumed.load_state_dict(state)
    after = [resumed.next_batch() for _ in range(STEPS - CUT)]
    for a, b in zip(after, ref[CUT:], strict=True):
        for field in ("input_ids", "labels", "position_ids", "document_ids"):
            assert torch.equal(getattr(a, field), getattr(b, field))
    assert torch.equal(ref[0].labels[:, :-1], ref[0].input_ids[:, 1:])  # next-token labels


def test_two_ranks_split_each_global_batch_and_resume_exactly(shards: str, tok) -> None:
    cfg = _cfg(shards)
    single = TextDataModule(cfg, tok)
    global_rows = [single.next_batch().input_ids for _ in range(STEPS)]
    ranks = [TextDataModule(cfg, tok, rank=r, world_size=2) for r in range(2)]
    per_rank = [[dm.next_batch() for _ in range(CUT)] for dm in ranks]
    states = [dm.state_dict() for dm in ranks]
    for r, dm in enumerate(ranks):  # a fresh process per rank, restored from the checkpoint
        fresh = TextDataModule(cfg, tok, rank=r, world_size=2)
        fresh.load_state_dict(states[r])
        per_rank[r] += [fresh.next_batch() for _ in range(STEPS - CUT)]
        del dm
    for step in range(STEPS):
        a, b = per_rank[0][step].input_ids, per_rank[1][step].input_ids
        assert a.shape == (4, 32) and torch.equal(torch.cat([a, b]), global_rows[step])
    # Elastic restart: a world-2 state resumes on one rank with the same global sequence.
    one = TextDataModule(cfg, tok)
    one.load_state_dict(states[0])
    assert torch.equal(one.next_batch().input_ids, global_rows[CUT])


def test_validation_is_deterministic_and_disjoint_from_training(shards: str, tok) -> None:
    dm = TextDataModule(_cfg(shards), tok)
    v1, v2 = _rows(list(dm.val_batches())), _rows(list(dm.val_batches(max_batches=2)))
    assert len(v1) >= 2 and all(torch.equal(a, b) for a, b in zip(v1, v2, strict=False))
    data = dm._data
    starts = np.concatenate([data.train_starts(s, 8) for s in range(200)])
    assert starts.max() + 32 + 1 <= data.n_train  # every train window (with its label) in train
    assert data.val_starts(0, 8).min() == data.n_train
    assert data.n_train in set(data.shards.doc_ends.tolist())  # the split is at a document start


def test_shuffled_sampling_visits_every_window_once_per_epoch(shards: str, tok) -> None:
    dm = TextDataModule(_cfg(shards, sampling="shuffled"), tok)
    n_windows = (dm._data.n_train - 1) // 32
    steps = n_windows // 8
    starts = np.concatenate([dm._data.train_starts(s, 8) for s in range(steps)])
    assert len(set(starts.tolist())) == len(starts) == steps * 8


def test_state_that_would_not_resume_exactly_is_refused(shards: str, tok) -> None:
    state = TextDataModule(_cfg(shards), tok).state_dict()
    other = TextDataModule(_cfg(shards, seed=7, seq_len=16), tok)
    with pytest.raises(ValueError, match=r"seed: saved 1337, now 7|seq_len: saved 32, now 16"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not divisible by world_size 3"):
        TextDataModule(_cfg(shards), tok, rank=0, world_size=3)


def test_document_masking_restarts_positions_after_each_eos(shards: str, tok) -> None:
    dm = TextDataModule(_cfg(shards, document_masking=True, seq_len=128), tok)
    for step in range(100):
        batch = dm.train_batch(step)
        hits = (batch.input_ids[:, :-1] == tok.eos_id).nonzero().tolist()
        if hits:
            break
    r, i = hits[0]  # an EOS with a token of the next document after it
    pos, doc = batch.position_ids[r], batch.document_ids[r]
    assert pos[i + 1] == 0 and doc[i + 1] == doc[i] + 1
    assert torch.equal(pos[: i + 1], pos[0] + torch.arange(i + 1))
    mask = block_causal_mask(batch.document_ids)[r, 0]  # (T, T)
    assert not mask[i + 1 :, : i + 1].any()  # the new document sees nothing of the old one
    assert mask[i, : i + 1].all()


def test_shards_from_another_tokenizer_are_refused(shards: str) -> None:
    other = SimpleCharacterTokenizer.train("abc")
    with pytest.raises(FingerprintMismatchError, match="model's tokenizer is"):
        TextDataModule(_cfg(shards), other)
    own = TextDataModule(_cfg(shards))  # no tokenizer given: the one saved with the shards
    assert (
        own.tokenizer.vocab_size
        == SimpleCharacterTokenizer.train("".join(default_corpus())).vocab_size
    )


def test_too_little_data_is_a_clear_error(tmp_path: Path, tok) -> None:
    (tmp_path / "a.txt").write_text("just a few words")
    cfg = PrepareConfig(
        source=SourceSpec(path=str(tmp_path / "a.txt")), out=str(tmp_path / "o"), workers=1
    )
    prepare(cfg, tok, progress=False)
    with pytest.raises(ValueError, match=r"split has .* tokens, fewer than seq_len"):
        TextDataModule(_cfg(str(tmp_path / "o")), tok)


def test_batches_read_like_the_dicts_the_training_engine_takes(shards: str, tok) -> None:
    dm = TextDataModule(_cfg(shards, max_val_batches=1), tok)
    batch = dm.next_batch()
    as_dict = {k: v.to("cpu") for k, v in batch.items()}
    assert sorted(as_dict) == ["input_ids", "labels"] and batch["labels"] is batch.labels
    masked = TextDataModule(_cfg(shards, document_masking=True), tok).next_batch()
    assert sorted(masked) == ["document_ids", "input_ids", "labels", "position_ids"]
    assert len(list(dm.val_batches())) == 1


def test_micro_batches_split_each_global_batch_whatever_the_world_size(shards: str, tok) -> None:
    """Global batch `step` is the same rows at 1, 2 or 4 ranks and any micro-batch size: each
    rank serves its slice in micro-batches, and a position saved at one world size resumes at
    another (elastic restarts) with the next global batch."""
    whole = TextDataModule(_cfg(shards, sampling="shuffled"), tok)
    ref = [whole.train_ids(s) for s in range(STEPS)]

    def served(world: int, micro: int, steps: range, state: dict | None = None) -> list:
        cfg = _cfg(shards, sampling="shuffled", micro_batch_size=micro)
        dms = [TextDataModule(cfg, tok, rank=r, world_size=world) for r in range(world)]
        for dm in dms:
            dm.consumed = []
            if state is not None:
                dm.load_state_dict(state)
        out = []
        for _ in steps:
            rows = [dm.next_batch().input_ids for dm in dms for _ in range(dm.micro_batches)]
            assert all(r.shape == (micro, 32) for r in rows)
            out.append(torch.cat(rows))
        return out, dms[0].state_dict(), [i for dm in dms for i in dm.consumed]

    a, state, ids_a = served(2, 2, range(CUT))  # 2 ranks x 2 micro-batches of 2
    assert state["step"] == CUT and state["micro"] == 0
    b, state, ids_b = served(1, 4, range(CUT, 2 * CUT), state)  # 1 rank x 2 micro of 4
    c, _, ids_c = served(4, 1, range(2 * CUT, STEPS), state)  # 4 ranks x 2 micro of 1
    for step, rows in enumerate(a + b + c):
        assert torch.equal(rows, whole.train_batch(step).input_ids), step
    assert sorted(ids_a + ids_b + ids_c) == sorted(np.concatenate(ref).tolist())
    assert whole.batch_size == 8 and whole.micro_batches == 1  # unset: one batch per step


def test_a_position_inside_a_global_batch_resumes_only_with_the_same_split(
    shards: str, tok
) -> None:
    dm = TextDataModule(_cfg(shards, micro_batch_size=2), tok, rank=0, world_size=2)
    dm.next_batch()
    state = dm.state_dict()
    assert (state["step"], state["micro"]) == (0, 1)
    same = TextDataModule(_cfg(shards, micro_batch_size=2), tok, rank=1, world_size=2)
    same.load_state_dict(state)
    assert torch.equal(same.next_batch().input_ids, same.train_batch(0, 1).input_ids)
    other = TextDataModule(_cfg(shards, micro_batch_size=2), tok)
    with pytest.raises(ValueError, match="saved inside global batch 0"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not divisible by micro_batch_size 3"):
        TextDataModule(_cfg(shards, micro_batch_size=3), tok, rank=0, world_size=2)
