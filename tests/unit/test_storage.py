"""Tests for llm.storage: fsspec paths and atomic whole-object writes."""

from __future__ import annotations

from pathlib import Path

from llm import storage


def test_join_keeps_scheme() -> None:
    assert storage.join("s3://b/run/", "checkpoints", "/step-1") == "s3://b/run/checkpoints/step-1"
    assert storage.join("file:///tmp/x", "a") == "file:///tmp/x/a"


def test_write_read_roundtrip_file_url(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/a/b.bin"
    storage.write_bytes(uri, b"hello")
    storage.write_bytes(uri, b"hello again")  # replace in place
    assert storage.read_bytes(uri) == b"hello again"
    assert storage.exists(uri)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]  # no tmp leftovers
