"""The manifest-last commit protocol, discovery, resume and retention (`llm.checkpoint`),
locally and against a real S3 API."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest

from llm import storage
from llm.checkpoint import (
    MANIFEST,
    CheckpointError,
    checkpoint_dir,
    is_committed,
    latest_checkpoint,
    list_checkpoints,
    prepare,
    read_manifest,
    resolve_checkpoint,
    resume_checkpoint,
    retain,
    verify,
)
from llm.checkpoint.commit import commit

WEIGHTS = b"\x01\x02" * 5000
CONFIG = b'{"dim": 8}'


def _stage(staging: Path) -> Path:
    """A small checkpoint's files, with a nested one, in a local staging dir."""
    (staging / "trainer_state").mkdir(parents=True, exist_ok=True)
    (staging / "model.safetensors").write_bytes(WEIGHTS)
    (staging / "config.json").write_bytes(CONFIG)
    (staging / "trainer_state" / "optim.pt").write_bytes(b"state")
    return staging


def _write_ckpt(uri: str, *, committed: bool = True) -> str:
    """A small checkpoint dir, staged, uploaded and committed unless asked otherwise."""
    with tempfile.TemporaryDirectory() as tmp:
        files = storage.upload(_stage(Path(tmp)), uri)
    if committed:
        commit(uri, files, extra={"step": 1})
    return uri


@pytest.fixture
def run(tmp_path: Path) -> str:
    """Run dir with step-1 and step-2 committed and step-3 written but never committed."""
    run_uri = str(tmp_path / "run")
    for step in (1, 2, 3):
        _write_ckpt(checkpoint_dir(run_uri, step), committed=step < 3)
    return run_uri


def test_checkpoint_dir_keeps_scheme_and_sorts_by_step() -> None:
    assert checkpoint_dir("s3://b/r", 7) == "s3://b/r/checkpoints/step-00000007"


def test_commit_then_verify(tmp_path: Path) -> None:
    ckpt = _write_ckpt(str(tmp_path / "ckpt"))
    manifest = verify(ckpt)
    assert manifest["version"] == 1 and manifest["step"] == 1 and manifest["created"]
    assert sorted(manifest["files"]) == [
        "config.json",
        "model.safetensors",
        "trainer_state/optim.pt",
    ]
    assert manifest["files"]["model.safetensors"]["size"] == len(WEIGHTS)
    assert is_committed(ckpt)
    assert resolve_checkpoint(ckpt) == ckpt  # a checkpoint dir resolves to itself


def test_commit_rejects_reserved_extra_and_nothing_written(tmp_path: Path) -> None:
    files = storage.upload(_stage(tmp_path / "staging"), str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="files"):
        commit(str(tmp_path / "ckpt"), files, extra={"files": {}})
    with pytest.raises(CheckpointError, match=r"empty.*no files"):
        commit(str(tmp_path / "empty"), {})


def test_manifest_lists_only_what_this_attempt_wrote(tmp_path: Path) -> None:
    """A dead 2-rank attempt left dcp/ shards behind; a 1-rank retry's full checkpoint
    must neither list them nor be mistaken for a sharded one."""
    ckpt = str(tmp_path / "run" / "checkpoints" / "step-00000001")
    stale = Path(ckpt) / "dcp"
    stale.mkdir(parents=True)
    (stale / ".metadata").write_bytes(b"dead attempt")
    (stale / "__1_0.distcp").write_bytes(b"dead attempt")
    files = storage.upload(_stage(tmp_path / "staging"), ckpt)
    manifest = commit(ckpt, files)
    assert sorted(manifest["files"]) == [
        "config.json",
        "model.safetensors",
        "trainer_state/optim.pt",
    ]
    # prepare() is what a trainer runs before writing: it clears a dead attempt's files.
    retry = str(tmp_path / "run" / "checkpoints" / "step-00000002")
    (Path(retry) / "dcp").mkdir(parents=True)
    (Path(retry) / "dcp" / "__1_0.distcp").write_bytes(b"dead attempt")
    prepare(retry)
    assert not Path(retry).exists()


def test_hashes_are_of_the_staged_bytes_not_of_what_storage_holds(tmp_path: Path) -> None:
    """The manifest vouches for what the writer produced: bytes changed between upload and
    commit (same size) are caught by verify instead of being blessed by the commit."""
    ckpt = str(tmp_path / "ckpt")
    files = storage.upload(_stage(tmp_path / "staging"), ckpt)
    (tmp_path / "ckpt" / "config.json").write_bytes(CONFIG.replace(b"8", b"9"))
    commit(ckpt, files)
    with pytest.raises(CheckpointError, match=r"config\.json: sha256 .* \(corrupted\)"):
        verify(ckpt)
    # A listed file that storage lacks, or holds at another size, is not committed at all.
    other = str(tmp_path / "other")
    files = storage.upload(_stage(tmp_path / "staging"), other)
    (tmp_path / "other" / "model.safetensors").write_bytes(WEIGHTS[:10])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: staged \d+ bytes, storage has 10"
    ):
        commit(other, files)
    assert not storage.exists(storage.join(other, MANIFEST))


def test_never_commits_over_a_commit(tmp_path: Path) -> None:
    ckpt = _write_ckpt(str(tmp_path / "ckpt"))
    before = storage.read_bytes(storage.join(ckpt, MANIFEST))
    files = storage.upload(_stage(tmp_path / "staging"), str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match=r"ckpt: already committed; refusing"):
        commit(ckpt, files)
    with pytest.raises(CheckpointError, match=r"ckpt: already committed; refusing"):
        prepare(ckpt)
    assert storage.read_bytes(storage.join(ckpt, MANIFEST)) == before
    verify(ckpt)


def test_uncommitted_dir_is_not_a_checkpoint(tmp_path: Path) -> None:
    ckpt = _write_ckpt(str(tmp_path / "run" / "checkpoints" / "step-00000001"), committed=False)
    assert not is_committed(ckpt)
    with pytest.raises(CheckpointError, match=r"no manifest\.json"):
        verify(ckpt)
    assert list_checkpoints(str(tmp_path / "run")) == []
    for uri in (ckpt, str(tmp_path / "run")):
        with pytest.raises(CheckpointError, match="neither a committed checkpoint"):
            resolve_checkpoint(uri)


def test_truncated_file_named(tmp_path: Path) -> None:
    ckpt = _write_ckpt(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(WEIGHTS[:100])
    msg = rf"model\.safetensors: size 100 != manifest {len(WEIGHTS)} \(truncated\?\)"
    with pytest.raises(CheckpointError, match=msg):
        verify(ckpt, check_hashes=False)
    assert not is_committed(ckpt)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        resolve_checkpoint(ckpt)  # never falls back to something else


def test_corrupted_bytes_same_size_caught_by_hash(tmp_path: Path) -> None:
    ckpt = _write_ckpt(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "config.json").write_bytes(CONFIG.replace(b"8", b"9"))
    verify(ckpt, check_hashes=False)  # sizes alone cannot see it
    with pytest.raises(CheckpointError, match=r"config\.json: sha256 .* \(corrupted\)"):
        verify(ckpt)


def test_missing_file_named(tmp_path: Path) -> None:
    ckpt = _write_ckpt(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "trainer_state" / "optim.pt").unlink()
    with pytest.raises(CheckpointError, match=r"trainer_state/optim\.pt: missing"):
        verify(ckpt)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"version": 1}', b'{"version": 1, "files": {"../x": {}}}'],
)
def test_malformed_manifest(tmp_path: Path, content: bytes) -> None:
    ckpt = _write_ckpt(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / MANIFEST).write_bytes(content)
    with pytest.raises(CheckpointError, match=r"manifest\.json"):
        read_manifest(ckpt)
    assert not is_committed(ckpt)


def test_list_latest_resolve_skip_uncommitted(run: str, caplog: pytest.LogCaptureFixture) -> None:
    step = [checkpoint_dir(run, s) for s in (1, 2, 3)]
    with caplog.at_level(logging.WARNING, logger="llm.checkpoint"):
        assert list_checkpoints(run) == step[:2]
    assert any("step-00000003" in r.getMessage() for r in caplog.records)
    assert latest_checkpoint(run) == step[1]
    assert resolve_checkpoint(run) == step[1]
    assert resolve_checkpoint(step[0]) == step[0]


def test_retain_keep_last_one(run: str) -> None:
    step = [checkpoint_dir(run, s) for s in (1, 2, 3)]
    with pytest.raises(ValueError, match="keep_last"):
        retain(run, 0)
    # step-3 is newer than the newest committed one: maybe a save in progress, kept.
    assert retain(run, keep_last=1) == [step[0]]
    assert not storage.exists(step[0])
    assert list_checkpoints(run) == [step[1]]
    assert storage.exists(step[2])
    # Once step-4 commits, the stale step-3 is debris and step-2 is surplus.
    _write_ckpt(checkpoint_dir(run, 4))
    assert retain(run, keep_last=1) == [step[1], step[2]]
    assert list_checkpoints(run) == [checkpoint_dir(run, 4)]
    assert retain(run, keep_last=5) == []


# --- a real S3 API (moto server), through s3fs ----------------------------------------------


def test_s3_commit_resolve_and_reject_truncated(s3_bucket: str, tmp_path: Path) -> None:
    run = storage.join(s3_bucket, "run")
    ckpt = checkpoint_dir(run, 1)
    assert ckpt == f"{s3_bucket}/run/checkpoints/step-00000001"
    staging = _stage(tmp_path / "staging")
    files = storage.upload(staging, ckpt)
    files_2 = storage.upload(staging, checkpoint_dir(run, 2))  # not committed yet
    assert latest_checkpoint(run) is None
    manifest = commit(ckpt, files)
    assert json.loads(storage.read_bytes(storage.join(ckpt, "manifest.json"))) == manifest
    assert verify(ckpt)["files"]["model.safetensors"]["size"] == len(WEIGHTS)
    assert resolve_checkpoint(run) == ckpt
    assert resolve_checkpoint(ckpt) == ckpt

    storage.write_bytes(storage.join(ckpt, "model.safetensors"), WEIGHTS[:-1])  # truncated upload
    with pytest.raises(CheckpointError, match=r"step-00000001/model\.safetensors: size"):
        resolve_checkpoint(ckpt)
    assert list_checkpoints(run) == []
    with pytest.raises(CheckpointError, match="neither a committed checkpoint"):
        resolve_checkpoint(run)

    # Retention works without rename: the broken step-1 is older than the newly committed step-2.
    commit(checkpoint_dir(run, 2), files_2)
    assert retain(run, keep_last=1) == [ckpt]
    assert not storage.exists(ckpt)
    assert list_checkpoints(run) == [checkpoint_dir(run, 2)]


def test_s3_prepare_clears_a_dead_attempt_and_never_writes_over_a_commit(
    s3_bucket: str, tmp_path: Path
) -> None:
    run = storage.join(s3_bucket, "run")
    ckpt = checkpoint_dir(run, 1)
    storage.write_bytes(storage.join(ckpt, "dcp", "__1_0.distcp"), b"dead 2-rank attempt")
    prepare(ckpt)
    assert not storage.exists(storage.join(ckpt, "dcp", "__1_0.distcp"))
    files = storage.upload(_stage(tmp_path / "staging"), ckpt)
    commit(ckpt, files)
    with pytest.raises(CheckpointError, match=r"step-00000001: already committed"):
        prepare(ckpt)
    with pytest.raises(CheckpointError, match=r"step-00000001: already committed"):
        commit(ckpt, files)
    assert sorted(verify(ckpt)["files"]) == sorted(files)


# --- resume: the newest checkpoint that verifies --------------------------------------------


def test_resume_falls_back_past_a_corrupted_newest(
    run: str, caplog: pytest.LogCaptureFixture
) -> None:
    """step-2's bytes rot in place (same size): resume warns, takes step-1, and deletes the
    bad step-2 so training can commit that step again."""
    step = [checkpoint_dir(run, s) for s in (1, 2)]
    assert resume_checkpoint(run) == step[1]
    (Path(step[1]) / "config.json").write_bytes(CONFIG.replace(b"8", b"9"))
    assert latest_checkpoint(run) == step[1]  # sizes alone cannot see it
    with caplog.at_level(logging.WARNING, logger="llm.checkpoint"):
        assert resume_checkpoint(run) == step[0]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "not resuming from" in warned and "step-00000002/config.json: sha256" in warned
    assert not storage.exists(step[1])
    assert list_checkpoints(run) == [step[0]]


def test_resume_refuses_when_no_checkpoint_verifies(run: str, tmp_path: Path) -> None:
    for s in (1, 2):
        (Path(checkpoint_dir(run, s)) / "config.json").write_bytes(b"{}" * 5)
    with pytest.raises(CheckpointError, match=r"no checkpoint verifies: .*step-00000002"):
        resume_checkpoint(run)
    assert len(list_checkpoints(run)) == 2  # nothing deleted
    assert resume_checkpoint(str(tmp_path / "fresh")) is None


def test_retain_never_deletes_the_newest_verified(run: str) -> None:
    """keep_last=1 would leave only step-2; with step-1 as the newest verified one, it stays."""
    step = [checkpoint_dir(run, s) for s in (1, 2)]
    assert retain(run, keep_last=1, keep=step[0]) == []
    assert list_checkpoints(run) == step


def test_s3_retain_with_failing_deletes_warns_and_returns(
    deny_deletes: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = storage.join(deny_deletes, "run")
    for s in (1, 2, 3):
        _write_ckpt(checkpoint_dir(run, s))
    with caplog.at_level(logging.WARNING, logger="llm.checkpoint"):
        assert retain(run, keep_last=1) == []
    warned = [r.getMessage() for r in caplog.records if "could not delete" in r.getMessage()]
    assert len(warned) == 2 and "step-00000001" in warned[0], warned
    assert len(list_checkpoints(run)) == 3
