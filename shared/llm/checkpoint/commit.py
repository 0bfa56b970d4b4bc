"""The commit protocol: a checkpoint exists once its manifest does, and only then is read.

Each writer stages its files locally, hashes them there and uploads them
(``storage.upload``); ``commit`` then writes ``manifest.json`` LAST, listing exactly those
files with the size and sha256 of the bytes that were staged, never whatever else lies in
the directory. Rename is not atomic on S3 (and ``fs.mv`` is broken there), so the manifest,
not a rename, is what makes a directory exist: readers ignore any directory without a
valid manifest and read only the files it lists, a commit never replaces another one, and
deletion removes the manifest first so a half-deleted directory is never seen as committed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
from typing import Any

from llm import storage
from llm.checkpoint.format import (
    CHECKPOINTS,
    MANIFEST,
    MANIFEST_VERSION,
    CheckpointError,
    read_manifest,
    step_of,
)

logger = logging.getLogger(__name__)


def prepare(dir_uri: str) -> None:
    """Make ``dir_uri`` a fresh place for one save attempt, before anything is written there.

    A committed directory is refused (a commit never replaces another). Files already there
    are debris of an attempt that died before committing; they are removed so that no stale
    file (say, a dead 2-rank attempt's shards) sits beside this attempt's. Only the holder of
    the run's lease (``llm.training.lease``) may call this: nobody else writes there.
    """
    fs, path = storage.url_to_fs(dir_uri)
    if fs.exists(posixpath.join(path, MANIFEST)):
        raise CheckpointError(f"{dir_uri}: already committed; refusing to write over it")
    if fs.exists(path):
        logger.warning("removing files of an uncommitted save attempt in %s", dir_uri)
        fs.rm(path, recursive=True)


def commit(dir_uri: str, files: dict[str, dict[str, Any]], *, extra: dict | None = None) -> dict:
    """Write ``manifest.json`` listing exactly ``files`` (``storage.upload``'s), making it exist.

    Call only after every listed file is fully written. Refuses a directory that is already
    committed, and one where a listed file is missing or has another size than was staged.
    """
    extra = dict(extra or {})
    reserved = {"version", "files", "created"} & extra.keys()
    if reserved:
        raise ValueError(f"commit extra may not override manifest keys {sorted(reserved)}")
    if not files:
        raise CheckpointError(f"{dir_uri}: cannot commit, no files written")
    if MANIFEST in files:
        raise ValueError(f"commit files may not include {MANIFEST}")
    fs, root = storage.url_to_fs(dir_uri)
    if fs.exists(posixpath.join(root, MANIFEST)):
        raise CheckpointError(f"{dir_uri}: already committed; refusing to write over it")
    present = storage.list_files(fs, root)
    for rel, entry in sorted(files.items()):
        if present.get(rel) != entry["size"]:
            raise CheckpointError(
                f"{storage.join(dir_uri, rel)}: staged {entry['size']} bytes, storage has "
                f"{present.get(rel, 'no file')}; not committing"
            )
    manifest = {
        "version": MANIFEST_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": dict(sorted(files.items())),
        **extra,
    }
    storage.write_bytes(
        storage.join(dir_uri, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode()
    )
    total = sum(f["size"] for f in files.values())
    logger.info("committed %s (%d files, %d bytes)", dir_uri, len(files), total)
    return manifest


def verify(dir_uri: str, *, check_hashes: bool = True) -> dict:
    """Check every file listed in the manifest is present with its size (and sha256).

    Sizes come from one recursive listing (cheap on S3); hashes re-read every byte, so
    callers that only need "is this complete?" pass ``check_hashes=False``.
    """
    manifest = read_manifest(dir_uri)
    fs, root = storage.url_to_fs(dir_uri)
    present = storage.list_files(fs, root)
    for rel, entry in sorted(manifest["files"].items()):
        where = storage.join(dir_uri, rel)
        if rel not in present:
            raise CheckpointError(f"{where}: missing (listed in manifest)")
        if present[rel] != entry["size"]:
            raise CheckpointError(
                f"{where}: size {present[rel]} != manifest {entry['size']} (truncated?)"
            )
        if check_hashes:
            _, digest = storage.sha256_file(fs, posixpath.join(root, rel))
            if digest != entry["sha256"]:
                raise CheckpointError(
                    f"{where}: sha256 {digest} != manifest {entry['sha256']} (corrupted)"
                )
    return manifest


def is_committed(dir_uri: str) -> bool:
    """Whether ``dir_uri`` has a valid manifest and every listed file has its size."""
    try:
        verify(dir_uri, check_hashes=False)
    except CheckpointError:
        return False
    return True


def scan(run_uri: str) -> list[tuple[int, str, str | None]]:
    """(step, uri, reason it is not committed or None) for each step dir, by step ascending."""
    fs, path = storage.url_to_fs(storage.join(run_uri, CHECKPOINTS))
    if not fs.isdir(path):
        return []
    out = []
    for entry in fs.ls(path, detail=True):
        name = posixpath.basename(fs._strip_protocol(entry["name"]).rstrip("/"))
        step = step_of(name)
        if entry.get("type") != "directory" or step is None:
            continue
        uri = storage.join(run_uri, CHECKPOINTS, name)
        try:
            verify(uri, check_hashes=False)
            reason = None
        except CheckpointError as e:
            reason = str(e)
        out.append((step, uri, reason))
    return sorted(out)


def list_checkpoints(run_uri: str) -> list[str]:
    """Committed checkpoint dirs of a run, oldest step first; others are skipped with a warning."""
    committed = []
    for _, uri, reason in scan(run_uri):
        if reason is None:
            committed.append(uri)
        else:
            logger.warning("skipping uncommitted checkpoint %s: %s", uri, reason)
    return committed


def latest_checkpoint(run_uri: str) -> str | None:
    """The newest committed checkpoint of a run, or None if it has none."""
    found = list_checkpoints(run_uri)
    return found[-1] if found else None


def resolve_checkpoint(uri: str, *, check_hashes: bool = False) -> str:
    """Turn a checkpoint dir or a run dir into a committed checkpoint dir to load.

    A dir with a manifest is verified (sizes; hashes too if asked, which re-reads every
    byte) and returned; it never silently falls back to another checkpoint. Otherwise
    ``uri`` is taken as a run dir and its newest committed checkpoint is returned.
    """
    if storage.exists(storage.join(uri, MANIFEST)):
        verify(uri, check_hashes=check_hashes)
        return uri
    latest = latest_checkpoint(uri)
    if latest is None:
        raise CheckpointError(
            f"{uri}: neither a committed checkpoint nor a run dir with committed checkpoints "
            "(nor a Hugging Face model directory: config.json with *.safetensors)"
        )
    return latest


def resume_checkpoint(run_uri: str) -> str | None:
    """The newest checkpoint of a run whose every byte matches its manifest, or None.

    Any format (full, sharded, adapter) is checked the same way, hashes and all. A bad
    newer one is warned about and skipped for the previous committed one; once a good one
    is found the bad newer ones are deleted, since training will write those steps again
    and a commit never replaces another. Only the run's lease holder may call this. If
    checkpoints exist but none verifies, that is an error: starting over would silently
    throw the run's progress away.
    """
    bad: list[tuple[str, str]] = []
    for uri in reversed(list_checkpoints(run_uri)):
        try:
            verify(uri, check_hashes=True)
        except CheckpointError as e:
            logger.warning("not resuming from %s, falling back to an older checkpoint: %s", uri, e)
            bad.append((uri, str(e)))
            continue
        for stale, why in bad:
            logger.warning("deleting %s, which failed verification (%s)", stale, why)
            delete(stale)
        return uri
    if bad:
        raise CheckpointError(
            f"{run_uri}: no checkpoint verifies: "
            + "; ".join(why for _, why in bad)
            + " (move them away to start over)"
        )
    return None


def delete(uri: str) -> None:
    """Delete a checkpoint dir, the manifest first, so a half-deleted dir is never seen as committed."""
    fs, path = storage.url_to_fs(uri)
    manifest = posixpath.join(path, MANIFEST)
    if fs.exists(manifest):
        fs.rm_file(manifest)
    if fs.exists(path):
        fs.rm(path, recursive=True)
