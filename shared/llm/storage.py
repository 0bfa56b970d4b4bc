"""Object storage over fsspec, with an atomic commit protocol for checkpoint directories.

Local paths, ``file://`` and ``s3://`` URIs all go through fsspec. S3 credentials and the
endpoint come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``), as Kubernetes secrets provide them.

Commit protocol: each writer stages its files locally, hashes them there and uploads them
(``upload``); ``commit`` then writes ``manifest.json`` LAST, listing exactly those files
with the size and sha256 of the bytes that were staged, never whatever else lies in the
directory. Rename is not atomic on S3 (and ``fs.mv`` is broken there), so the manifest,
not a rename, is what makes a directory exist: readers ignore any directory without a
valid manifest and read only the files it lists, a commit never replaces another one, and
deletion removes the manifest first so a half-deleted directory is never seen as committed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import re
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
CHECKPOINTS = "checkpoints"
_CHUNK = 1 << 20  # hash in 1 MiB chunks so multi-GB weight files never sit in memory
_STEP_RE = re.compile(r"^step-(\d+)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or corrupt; the message names the path and why."""


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem for ``uri`` and the path inside it.

    S3 settings are passed explicitly (not only left to botocore) so that fsspec's instance
    cache keys on them: a changed endpoint or key gets a fresh client. Listing caching is
    off because other processes (trainer, retention) change the directories we list.
    """
    protocol, _ = fsspec.core.split_protocol(uri)
    kwargs: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        kwargs["use_listings_cache"] = False
        if endpoint := os.environ.get("AWS_ENDPOINT_URL"):
            kwargs["endpoint_url"] = endpoint
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            kwargs["key"], kwargs["secret"] = key, secret
            if token := os.environ.get("AWS_SESSION_TOKEN"):
                kwargs["token"] = token
        # No region_name: with it, bucket creation on S3-compatible stores fails.
    fs, path = fsspec.core.url_to_fs(uri, **kwargs)
    return fs, path.rstrip("/") or path


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URLs (where a rename is atomic)."""
    protocol, _ = fsspec.core.split_protocol(uri)
    return protocol in (None, "file", "local")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto ``uri`` with ``/``, keeping its scheme (``s3://b/run`` stays a URL)."""
    out = uri.rstrip("/") or uri
    for part in filter(None, (p.strip("/") for p in parts)):
        out = out + part if out.endswith("/") else f"{out}/{part}"
    return out


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers never see a partial file where the store allows it.

    Locally: temp file in the same directory, fsync, ``os.replace`` (atomic on POSIX).
    Remotely: a single PUT, which S3 makes visible all at once (no rename there).
    """
    fs, path = url_to_fs(uri)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    parent, name = os.path.split(path)
    os.makedirs(parent or ".", exist_ok=True)
    tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable too (POSIX only)
        dfd = os.open(parent or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def read_bytes(uri: str) -> bytes:
    """Read a whole (small) object; use for manifests and configs, not weights."""
    fs, path = url_to_fs(uri)
    return fs.cat_file(path)


def exists(uri: str) -> bool:
    """Whether a file or directory (prefix, on S3) exists at ``uri``."""
    fs, path = url_to_fs(uri)
    return fs.exists(path)


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str]:
    """Stream a file through sha256; return (bytes read, hex digest)."""
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def list_files(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int]:
    """Map relative path -> size for every file under ``root`` (recursively)."""
    found = fs.find(root, detail=True)
    prefix = fs._strip_protocol(root).rstrip("/") + "/"
    out: dict[str, int] = {}
    for full, info in found.items():
        full = fs._strip_protocol(full)
        if info.get("type") == "directory" or not full.startswith(prefix):
            continue
        out[full[len(prefix) :]] = int(info["size"])
    return out


def upload(local_dir: str | os.PathLike, dir_uri: str) -> dict[str, dict[str, Any]]:
    """Hash every file under the local staging dir ``local_dir`` and upload it to ``dir_uri``.

    Returns the manifest entries (relative path -> size and sha256) of the staged bytes, so
    that the manifest vouches for what this writer produced, not for what storage holds.
    """
    fs, root = url_to_fs(dir_uri)
    local_fs = LocalFileSystem()
    staged = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    entries: dict[str, dict[str, Any]] = {}
    for path in staged:
        rel = path.relative_to(local_dir).as_posix()
        size, digest = _sha256(local_fs, str(path))
        dest = posixpath.join(root, rel)
        fs.makedirs(posixpath.dirname(dest), exist_ok=True)
        fs.put_file(str(path), dest)
        entries[rel] = {"size": size, "sha256": digest}
    return entries


def prepare(dir_uri: str) -> None:
    """Make ``dir_uri`` a fresh place for one save attempt, before anything is written there.

    A committed directory is refused (a commit never replaces another). Files already there
    are debris of an attempt that died before committing; they are removed so that no stale
    file (say, a dead 2-rank attempt's shards) sits beside this attempt's. Only the holder of
    the run's lease (``llm.training.lease``) may call this: nobody else writes there.
    """
    fs, path = url_to_fs(dir_uri)
    if fs.exists(posixpath.join(path, MANIFEST)):
        raise CheckpointError(f"{dir_uri}: already committed; refusing to write over it")
    if fs.exists(path):
        logger.warning("removing files of an uncommitted save attempt in %s", dir_uri)
        fs.rm(path, recursive=True)


def commit(dir_uri: str, files: dict[str, dict[str, Any]], *, extra: dict | None = None) -> dict:
    """Write ``manifest.json`` listing exactly ``files`` (``upload``'s entries), making it exist.

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
    fs, root = url_to_fs(dir_uri)
    if fs.exists(posixpath.join(root, MANIFEST)):
        raise CheckpointError(f"{dir_uri}: already committed; refusing to write over it")
    present = list_files(fs, root)
    for rel, entry in sorted(files.items()):
        if present.get(rel) != entry["size"]:
            raise CheckpointError(
                f"{join(dir_uri, rel)}: staged {entry['size']} bytes, storage has "
                f"{present.get(rel, 'no file')}; not committing"
            )
    manifest = {
        "version": MANIFEST_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": dict(sorted(files.items())),
        **extra,
    }
    write_bytes(join(dir_uri, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    total = sum(f["size"] for f in files.values())
    logger.info("committed %s (%d files, %d bytes)", dir_uri, len(files), total)
    return manifest


def read_manifest(dir_uri: str) -> dict:
    """Read and shape-check ``manifest.json``; any problem is a CheckpointError."""
    uri = join(dir_uri, MANIFEST)
    try:
        raw = read_bytes(uri)
    except FileNotFoundError:
        raise CheckpointError(f"{dir_uri}: no {MANIFEST} (not committed or incomplete)") from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{uri}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointError(f"{uri}: not a version {MANIFEST_VERSION} manifest object")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{uri}: 'files' must be a non-empty object")
    for rel, entry in files.items():
        parts = rel.split("/")
        if rel.startswith("/") or ".." in parts or "" in parts or rel == MANIFEST:
            raise CheckpointError(f"{uri}: invalid file path {rel!r}")
        ok = isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
        if not ok or not _SHA256_RE.match(str(entry.get("sha256"))):
            raise CheckpointError(f"{uri}: bad entry for {rel!r} (need size and sha256)")
    return manifest


def verify(dir_uri: str, *, check_hashes: bool = True) -> dict:
    """Check every file listed in the manifest is present with its size (and sha256).

    Sizes come from one recursive listing (cheap on S3); hashes re-read every byte, so
    callers that only need "is this complete?" pass ``check_hashes=False``.
    """
    manifest = read_manifest(dir_uri)
    fs, root = url_to_fs(dir_uri)
    present = list_files(fs, root)
    for rel, entry in sorted(manifest["files"].items()):
        where = join(dir_uri, rel)
        if rel not in present:
            raise CheckpointError(f"{where}: missing (listed in manifest)")
        if present[rel] != entry["size"]:
            raise CheckpointError(
                f"{where}: size {present[rel]} != manifest {entry['size']} (truncated?)"
            )
        if check_hashes:
            _, digest = _sha256(fs, posixpath.join(root, rel))
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


def checkpoint_dir(run_uri: str, step: int) -> str:
    """Where step ``step`` of a run is saved; zero-padded so names sort like steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return join(run_uri, CHECKPOINTS, f"step-{step:08d}")


def _scan(run_uri: str) -> list[tuple[int, str, str | None]]:
    """(step, uri, reason it is not committed or None) for each step dir, by step ascending."""
    fs, path = url_to_fs(join(run_uri, CHECKPOINTS))
    if not fs.isdir(path):
        return []
    out = []
    for entry in fs.ls(path, detail=True):
        name = posixpath.basename(fs._strip_protocol(entry["name"]).rstrip("/"))
        m = _STEP_RE.match(name)
        if entry.get("type") != "directory" or not m:
            continue
        uri = join(run_uri, CHECKPOINTS, name)
        try:
            verify(uri, check_hashes=False)
            reason = None
        except CheckpointError as e:
            reason = str(e)
        out.append((int(m.group(1)), uri, reason))
    return sorted(out)


def list_checkpoints(run_uri: str) -> list[str]:
    """Committed checkpoint dirs of a run, oldest step first; others are skipped with a warning."""
    committed = []
    for _, uri, reason in _scan(run_uri):
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
    if exists(join(uri, MANIFEST)):
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
            _delete(stale)
        return uri
    if bad:
        raise CheckpointError(
            f"{run_uri}: no checkpoint verifies: "
            + "; ".join(why for _, why in bad)
            + " (move them away to start over)"
        )
    return None


def _delete(uri: str) -> None:
    """Remove the manifest first, so a half-deleted dir is never seen as committed."""
    fs, path = url_to_fs(uri)
    manifest = posixpath.join(path, MANIFEST)
    if fs.exists(manifest):
        fs.rm_file(manifest)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def retain(run_uri: str, keep_last: int, *, keep: str | None = None) -> list[str]:
    """Delete all but the newest ``keep_last`` committed checkpoints; return deleted uris.

    ``keep`` (the newest checkpoint known to verify byte for byte) is never deleted, so a
    run always has one to resume from even if newer ones turn out bad. Incomplete dirs
    older than the newest committed one are debris of crashed saves and go too; newer ones
    may be a save in progress and are left alone. Best effort: a failed delete is logged
    and the rest go on (an old checkpoint left behind costs space, not correctness).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the newest is never deleted), got {keep_last}")
    scanned = _scan(run_uri)
    committed = [(step, uri) for step, uri, reason in scanned if reason is None]
    if not committed:
        return []
    newest_step = committed[-1][0]
    doomed = {uri for _, uri in committed[:-keep_last]}
    doomed |= {uri for step, uri, reason in scanned if reason is not None and step < newest_step}
    doomed.discard(keep)
    deleted = []
    for step, uri, _ in scanned:
        if uri not in doomed:
            continue
        try:
            _delete(uri)
        except Exception as e:  # any store error: keep the checkpoint, go on
            logger.warning("retain: could not delete %s (step %d): %s", uri, step, e)
            continue
        logger.info("retain: deleted %s (step %d)", uri, step)
        deleted.append(uri)
    return deleted
