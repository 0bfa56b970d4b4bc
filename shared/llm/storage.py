"""Object storage over fsspec: local paths, ``file://`` and ``s3://`` URIs alike.

S3 credentials and the endpoint come from the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), as Kubernetes secrets provide them.
Whole-object writes are atomic where the store allows it (``write_bytes``); ``upload``
hashes a local staging dir as it uploads it. What makes a checkpoint directory exist (its
manifest, written last) is ``llm.checkpoint.commit``, built on these.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

_CHUNK = 1 << 20  # hash in 1 MiB chunks so multi-GB weight files never sit in memory


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


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str]:
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
        size, digest = sha256_file(local_fs, str(path))
        dest = posixpath.join(root, rel)
        fs.makedirs(posixpath.dirname(dest), exist_ok=True)
        fs.put_file(str(path), dest)
        entries[rel] = {"size": size, "sha256": digest}
    return entries
