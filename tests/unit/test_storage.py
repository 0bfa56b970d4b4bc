"""Tests for llm.storage: the manifest-last commit protocol, locally and against a real S3 API."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from llm import storage
from llm.storage import CheckpointError

WEIGHTS = b"\x01\x02" * 5000
CONFIG = b'{"dim": 8}'


def _write_ckpt(uri: str, *, commit: bool = True) -> str:
    """A small checkpoint dir with a nested file, committed unless asked otherwise."""
    storage.write_bytes(storage.join(uri, "model.safetensors"), WEIGHTS)
    storage.write_bytes(storage.join(uri, "config.json"), CONFIG)
    storage.write_bytes(storage.join(uri, "trainer_state", "optim.pt"), b"state")
    if commit:
        storage.commit(uri, extra={"step": 1})
    return uri


@pytest.fixture
def run(tmp_path: Path) -> str:
    """Run dir with step-1 and step-2 committed and step-3 written but never committed."""
    run_uri = str(tmp_path / "run")
    for step in (1, 2, 3):
        _write_ckpt(storage.checkpoint_dir(run_uri, step), commit=step < 3)
    return run_uri


def test_join_keeps_scheme() -> None:
    assert storage.join("s3://b/run/", "checkpoints", "/step-1") == "s3://b/run/checkpoints/step-1"
    assert storage.join("file:///tmp/x", "a") == "file:///tmp/x/a"
    assert storage.checkpoint_dir("s3://b/r", 7) == "s3://b/r/checkpoints/step-00000007"


def test_write_read_roundtrip_file_url(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/a/b.bin"
    storage.write_bytes(uri, b"hello")
    storage.write_bytes(uri, b"hello again")  # replace in place
    assert storage.read_bytes(uri) == b"hello again"
    assert storage.exists(uri)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]  # no tmp leftovers


def test_commit_then_verify(tmp_path: Path) -> None:
    ckpt = _write_ckpt(str(tmp_path / "ckpt"))
    manifest = storage.verify(ckpt)
    assert manifest["version"] == 1 and manifest["step"] == 1 and manifest["created"]
    assert sorted(manifest["files"]) == [
        "config.json",
        "model.safetensors",
        "trainer_state/optim.pt",
    ]
    assert manifest["files"]["model.safetensors"]["size"] == len(WEIGHTS)
    assert storage.is_committed(ckpt)
    assert storage.resolve_checkpoint(ckpt) == ckpt  # a checkpoint dir resolves to itself


def test_commit_rejects_reserved_extra_and_empty_dir(tmp_path: Path) -> None:
    ckpt = _write_ckpt(str(tmp_path / "ckpt"), commit=False)
    with pytest.raises(ValueError, match="files"):
        storage.commit(ckpt, extra={"files": {}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty.*no files"):
        storage.commit(str(tmp_path / "empty"))


def test_uncommitted_dir_is_not_a_checkpoint(tmp_path: Path) -> None:
    ckpt = _write_ckpt(str(tmp_path / "run" / "checkpoints" / "step-00000001"), commit=False)
    assert not storage.is_committed(ckpt)
    with pytest.raises(CheckpointError, match=r"no manifest\.json"):
        storage.verify(ckpt)
    assert storage.list_checkpoints(str(tmp_path / "run")) == []
    for uri in (ckpt, str(tmp_path / "run")):
        with pytest.raises(CheckpointError, match="neither a committed checkpoint"):
            storage.resolve_checkpoint(uri)


def test_truncated_file_named(tmp_path: Path) -> None:
    ckpt = _write_ckpt(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(WEIGHTS[:100])
    msg = rf"model\.safetensors: size 100 != manifest {len(WEIGHTS)} \(truncated\?\)"
    with pytest.raises(CheckpointError, match=msg):
        storage.verify(ckpt, check_hashes=False)
    assert not storage.is_committed(ckpt)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        storage.resolve_checkpoint(ckpt)  # never falls back to something else


def test_corrupted_bytes_same_size_caught_by_hash(tmp_path: Path) -> None:
    ckpt = _write_ckpt(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "config.json").write_bytes(CONFIG.replace(b"8", b"9"))
    storage.verify(ckpt, check_hashes=False)  # sizes alone cannot see it
    with pytest.raises(CheckpointError, match=r"config\.json: sha256 .* \(corrupted\)"):
        storage.verify(ckpt)


def test_missing_file_named(tmp_path: Path) -> None:
    ckpt = _write_ckpt(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "trainer_state" / "optim.pt").unlink()
    with pytest.raises(CheckpointError, match=r"trainer_state/optim\.pt: missing"):
        storage.verify(ckpt)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"version": 1}', b'{"version": 1, "files": {"../x": {}}}'],
)
def test_malformed_manifest(tmp_path: Path, content: bytes) -> None:
    ckpt = _write_ckpt(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / storage.MANIFEST).write_bytes(content)
    with pytest.raises(CheckpointError, match=r"manifest\.json"):
        storage.read_manifest(ckpt)
    assert not storage.is_committed(ckpt)


def test_list_latest_resolve_skip_uncommitted(run: str, caplog: pytest.LogCaptureFixture) -> None:
    step = [storage.checkpoint_dir(run, s) for s in (1, 2, 3)]
    with caplog.at_level(logging.WARNING, logger="llm.storage"):
        assert storage.list_checkpoints(run) == step[:2]
    assert any("step-00000003" in r.getMessage() for r in caplog.records)
    assert storage.latest_checkpoint(run) == step[1]
    assert storage.resolve_checkpoint(run) == step[1]
    assert storage.resolve_checkpoint(step[0]) == step[0]


def test_retain_keep_last_one(run: str) -> None:
    step = [storage.checkpoint_dir(run, s) for s in (1, 2, 3)]
    with pytest.raises(ValueError, match="keep_last"):
        storage.retain(run, 0)
    # step-3 is newer than the newest committed one: maybe a save in progress, kept.
    assert storage.retain(run, keep_last=1) == [step[0]]
    assert not storage.exists(step[0])
    assert storage.list_checkpoints(run) == [step[1]]
    assert storage.exists(step[2])
    # Once step-4 commits, the stale step-3 is debris and step-2 is surplus.
    _write_ckpt(storage.checkpoint_dir(run, 4))
    assert storage.retain(run, keep_last=1) == [step[1], step[2]]
    assert storage.list_checkpoints(run) == [storage.checkpoint_dir(run, 4)]
    assert storage.retain(run, keep_last=5) == []


# --- a real S3 API (moto server), through s3fs ----------------------------------------------


def test_s3_commit_resolve_and_reject_truncated(s3_bucket: str) -> None:
    run = storage.join(s3_bucket, "run")
    ckpt = storage.checkpoint_dir(run, 1)
    assert ckpt == f"{s3_bucket}/run/checkpoints/step-00000001"
    _write_ckpt(ckpt, commit=False)
    _write_ckpt(storage.checkpoint_dir(run, 2), commit=False)  # never committed
    assert storage.latest_checkpoint(run) is None
    manifest = storage.commit(ckpt)
    assert json.loads(storage.read_bytes(storage.join(ckpt, "manifest.json"))) == manifest
    assert storage.verify(ckpt)["files"]["model.safetensors"]["size"] == len(WEIGHTS)
    assert storage.resolve_checkpoint(run) == ckpt
    assert storage.resolve_checkpoint(ckpt) == ckpt

    storage.write_bytes(storage.join(ckpt, "model.safetensors"), WEIGHTS[:-1])  # truncated upload
    with pytest.raises(CheckpointError, match=r"step-00000001/model\.safetensors: size"):
        storage.resolve_checkpoint(ckpt)
    assert storage.list_checkpoints(run) == []
    with pytest.raises(CheckpointError, match="neither a committed checkpoint"):
        storage.resolve_checkpoint(run)

    # Retention works without rename: the broken step-1 is older than the newly committed step-2.
    storage.commit(storage.checkpoint_dir(run, 2))
    assert storage.retain(run, keep_last=1) == [ckpt]
    assert not storage.exists(ckpt)
    assert storage.list_checkpoints(run) == [storage.checkpoint_dir(run, 2)]
