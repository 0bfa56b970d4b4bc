"""`llm.data.prepare`: every source kind, exact and deterministic shards, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llm.data.bpe import train_bpe
from llm.data.corpus import default_corpus
from llm.data.prepare import PrepareConfig, prepare
from llm.data.shards import FingerprintMismatchError, TokenShards, read_index
from llm.data.sources import DataError, SourceSpec
from llm.data.tokenizers import HFTokenizer, SimpleCharacterTokenizer

DOCS = default_corpus()[:24]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    return train_bpe(DOCS, tmp_path_factory.mktemp("bpe"), vocab_size=500)


@pytest.fixture(scope="module")
def char() -> SimpleCharacterTokenizer:
    return SimpleCharacterTokenizer.train("".join(default_corpus()))


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    for i, doc in enumerate(DOCS):
        (d / f"{i:03d}.txt").write_text(doc)
    return d


def _prep(src: str | Path, out: Path, tok, **kw) -> object:
    spec_keys = {"format", "field", "sample_by", "split"}
    spec = SourceSpec(path=str(src), **{k: v for k, v in kw.items() if k in spec_keys})
    rest = {k: v for k, v in kw.items() if k not in spec_keys}
    cfg = PrepareConfig(source=spec, out=str(out), **{"workers": 1, **rest})
    return prepare(cfg, tok, progress=False)


def _stream(out: Path) -> np.ndarray:
    s = TokenShards(str(out))
    return np.asarray(s.read(0, s.n_tokens))


def test_shards_hold_every_document_then_eos_exactly(
    text_dir: Path, tmp_path: Path, bpe, char
) -> None:
    for tok in (bpe, char):
        out = tmp_path / type(tok).__name__
        # small pieces and shards: documents are cut for parallel encoding and spread over shards
        res = _prep(text_dir, out, tok, shard_tokens=3000, chunk_chars=500, batch_chars=2000)
        expected = np.concatenate([[*tok.encode(d), tok.eos_id] for d in DOCS])
        assert np.array_equal(_stream(out), expected)
        shards = TokenShards(str(out))
        border = int(shards.starts[1])  # a read across the first shard border
        assert np.array_equal(shards.read(border - 5, 10), expected[border - 5 : border + 5])
        assert len(res.index.shards) > 3 and res.index.n_docs == len(DOCS)
        assert np.array_equal(shards.doc_ends, np.cumsum([len(tok.encode(d)) + 1 for d in DOCS]))
        assert res.index.dtype == "uint16" and res.index.tokenizer.fingerprint == tok.fingerprint()


def test_output_does_not_depend_on_workers_and_resume_is_byte_identical(
    text_dir: Path, tmp_path: Path, bpe
) -> None:
    kw = dict(shard_tokens=2000, chunk_chars=400, batch_chars=1500)
    clean = _prep(text_dir, tmp_path / "clean", bpe, **kw).index
    parallel = _prep(text_dir, tmp_path / "par", bpe, workers=2, **kw).index
    assert [s.sha256 for s in parallel.shards] == [s.sha256 for s in clean.shards]

    class Interrupted(Exception):
        pass

    def stop_after_two(info) -> None:
        if info.name == "shard-00001":
            raise Interrupted

    out = tmp_path / "resumed"
    cfg = PrepareConfig(source=SourceSpec(path=str(text_dir)), out=str(out), workers=1, **kw)
    with pytest.raises(Interrupted):
        prepare(cfg, bpe, progress=False, on_shard=stop_after_two)
    assert not (out / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="not finished: rerun"):
        TokenShards(str(out))
    res = prepare(cfg, bpe, progress=False)
    assert res.resumed_shards == 2
    assert [s.sha256 for s in res.index.shards] == [s.sha256 for s in clean.shards]
    assert res.index.stats == clean.stats
    again = prepare(cfg, bpe, progress=False)  # finished: a no-op
    assert again.bytes_in == 0 and again.index == res.index


def test_changed_settings_in_the_same_out_are_refused_unless_overwrite(
    text_dir: Path, tmp_path: Path, bpe, char
) -> None:
    out = tmp_path / "out"
    _prep(text_dir, out, bpe)
    with pytest.raises(DataError, match=r"different preparation.*tokenizer.*--overwrite"):
        _prep(text_dir, out, char)
    res = _prep(text_dir, out, char, overwrite=True)
    assert res.index.tokenizer.kind == "SimpleCharacterTokenizer"


def test_fingerprint_mismatch_is_an_error_that_says_so(
    text_dir: Path, tmp_path: Path, bpe, char
) -> None:
    _prep(text_dir, tmp_path / "out", char)
    with pytest.raises(
        FingerprintMismatchError, match=r"tokenized with tokenizer .* but the model's tokenizer is"
    ):
        TokenShards(str(tmp_path / "out"), expect_fingerprint=bpe.fingerprint())
    TokenShards(str(tmp_path / "out"), expect_fingerprint=char.fingerprint())


def test_jsonl_field_malformed_lines_skipped_or_strict(tmp_path: Path, char) -> None:
    src = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": "first doc"}),
        "{not json",
        json.dumps({"body": "x"}),
        json.dumps({"text": 5}),
        "",
        json.dumps({"text": "  "}),
        json.dumps({"text": "last"}),
    ]
    src.write_text("\n".join(lines) + "\n")
    res = _prep(src, tmp_path / "out", char)
    assert res.index.stats == {"records": 6, "malformed": 3, "empty": 1, "unk_tokens": 0}
    assert np.array_equal(
        _stream(tmp_path / "out"), [*char.encode("first doc"), 2, *char.encode("last"), 2]
    )
    with pytest.raises(DataError, match=r"data\.jsonl:2: invalid JSON"):
        _prep(src, tmp_path / "strict", char, strict=True)
    with pytest.raises(DataError, match=r"corpus is empty \(6 records: 6 malformed, 0 empty\)"):
        _prep(src, tmp_path / "other", char, field="nothing")


def test_parquet_column_and_missing_column(tmp_path: Path, char) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"content": ["a b", None, "c d"], "id": [1, 2, 3]}), tmp_path / "t.parquet"
    )
    res = _prep(tmp_path / "t.parquet", tmp_path / "out", char, field="content")
    assert res.index.n_docs == 2 and res.index.stats["malformed"] == 1
    with pytest.raises(DataError, match=r"t\.parquet: no column 'text' \(columns: content, id\)"):
        _prep(tmp_path / "t.parquet", tmp_path / "out2", char)


def test_saved_datasets_dataset_and_text_lines(tmp_path: Path, char) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two", "three"]}).save_to_disk(tmp_path / "ds")
    res = _prep(tmp_path / "ds", tmp_path / "out", char)
    assert res.index.n_docs == 3 and res.index.source["path"].endswith("ds")
    with pytest.raises(DataError, match="no column 'body' \\(columns: text\\)"):
        _prep(tmp_path / "ds", tmp_path / "out2", char, field="body")
    (tmp_path / "lines.txt").write_text("alpha\n\nbeta\ngamma\n")
    res = _prep(tmp_path / "lines.txt", tmp_path / "out3", char, sample_by="line")
    assert res.index.n_docs == 3 and res.index.stats["empty"] == 1


def test_text_the_tokenizer_cannot_encode_names_file_and_offset(tmp_path: Path) -> None:
    tok = SimpleCharacterTokenizer.train("abc \n", unknown="error")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("abc abc\n")
    (tmp_path / "d" / "b.txt").write_text("abc\n" * 50 + "ab é\n")
    with pytest.raises(
        DataError,
        match=r"b\.txt: character 'é' \(U\+00E9\) is not in the vocabulary.*\(character 203\)",
    ):
        _prep(tmp_path / "d", tmp_path / "out", tok, chunk_chars=40)


def test_missing_and_empty_sources_are_clear_errors(tmp_path: Path, char) -> None:
    with pytest.raises(FileNotFoundError, match="nope: no such file"):
        _prep(tmp_path / "nope", tmp_path / "out", char)
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(DataError, match="corpus is empty"):
        _prep(tmp_path / "empty.txt", tmp_path / "out", char)
    with pytest.raises(DataError, match="glob matches no files"):
        _prep(tmp_path / "*.md", tmp_path / "out2", char)
    with pytest.raises(FileNotFoundError, match="not a prepared token directory"):
        read_index(str(tmp_path / "nowhere"))


def test_prepare_to_object_storage_and_read_back(
    s3_bucket: str, text_dir: Path, tmp_path: Path, char
) -> None:
    out = f"{s3_bucket}/tokens"
    res = _prep(text_dir, out, char, shard_tokens=20_000)  # type: ignore[arg-type]
    shards = TokenShards(out, char.fingerprint(), cache_dir=str(tmp_path / "cache"))
    expected = np.concatenate([[*char.encode(d), char.eos_id] for d in DOCS])
    assert np.array_equal(np.asarray(shards.read(0, shards.n_tokens)), expected)
    assert len(res.index.shards) > 1 and (tmp_path / "cache").exists()


def test_an_index_whose_shard_names_leave_the_directory_is_refused(
    text_dir: Path, tmp_path: Path, char
) -> None:
    """Shard names become file paths: an index pointing at `../` is invalid, never read."""
    out = tmp_path / "tokens"
    _prep(text_dir, out, char)
    index_path = out / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][0]["name"] = "../../outside"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"(?s)index\.json: invalid index .*shards\.0\.name"):
        read_index(str(out))
