"""Where training text comes from: text files, JSONL fields, Parquet columns, saved `datasets`.

A source is read as a sequence of *records* (a file, a line, a row), each numbered in a
fixed order. The number is the resume cursor of `llm-data prepare`: skipping the first N
records is cheap (no parsing, no tokenizing), and the same source always yields the same
records. A malformed record is yielded with an `error` (`file:line: reason`) rather than
raised, so the caller decides between `--strict` (stop) and skip-and-count.

Paths go through fsspec (`llm.storage.url_to_fs`): local paths, `file://` and `s3://`
work alike; `.gz`/`.zst` files are decompressed by suffix.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llm import storage

SourceFormat = Literal["auto", "text", "jsonl", "parquet", "hf"]
SampleBy = Literal["document", "line", "paragraph"]

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n+")


class DataError(ValueError):
    """Bad input data or a bad source description; the message says where and why."""


class SourceSpec(BaseModel):
    """What to read. `field` is the JSONL key / Parquet or `datasets` column holding text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="file, directory, glob, or saved `datasets` directory")
    format: SourceFormat = "auto"
    field: str = "text"
    sample_by: SampleBy = Field(
        default="document",
        description="for text files: a file, a line or a blank-line paragraph is one document",
    )
    split: str | None = Field(default=None, description="split of a saved DatasetDict")


@dataclass(frozen=True, slots=True)
class Record:
    index: int  # ordinal of the raw record in the source: the resume cursor
    where: str  # "file", "file:line" or "file:row N", for messages
    text: str | None  # None when the record is malformed
    error: str | None = None


def _bare(name: str) -> str:
    """The name without a compression suffix, so `a.jsonl.gz` counts as `.jsonl`."""
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _suffixes(fmt: str) -> tuple[str, ...]:
    return {"text": TEXT_SUFFIXES, "jsonl": JSONL_SUFFIXES, "parquet": PARQUET_SUFFIXES}.get(
        fmt, TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    )


def _format_of(name: str) -> str:
    bare = _bare(name)
    if bare.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if bare.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def resolve(spec: SourceSpec) -> tuple[str, list[str]]:
    """The concrete format and the sorted list of files (or the dataset dir for `hf`)."""
    fs, path = storage.url_to_fs(spec.path)
    if spec.format == "hf" or (
        spec.format == "auto"
        and fs.isdir(path)
        and any(fs.exists(posixpath.join(path, m)) for m in HF_MARKERS)
    ):
        return "hf", [spec.path]
    proto = "" if "://" not in spec.path else spec.path.split("://", 1)[0] + "://"
    if any(c in spec.path for c in "*?["):
        files = sorted(fs.glob(path))
        files = [f for f in files if fs.isfile(f)]
        if not files:
            raise DataError(f"{spec.path}: glob matches no files")
    elif fs.isdir(path):
        wanted = _suffixes(spec.format)
        files = sorted(f for f in fs.find(path) if _bare(f).endswith(wanted))
        if not files:
            raise DataError(f"{spec.path}: directory has no {spec.format} files {list(wanted)}")
    elif fs.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"{spec.path}: no such file or directory")
    files = [proto + f if proto and not f.startswith(proto) else f for f in files]
    if spec.format != "auto":
        return spec.format, files
    formats = {_format_of(f) for f in files}
    if len(formats) > 1:
        raise DataError(f"{spec.path}: mixed file formats {sorted(formats)}; pass --format")
    return formats.pop(), files


def total_bytes(files: list[str]) -> int | None:
    """Sum of file sizes, for a progress bar; None if the store will not say."""
    try:
        total = 0
        for f in files:
            fs, p = storage.url_to_fs(f)
            total += int(fs.size(p))
        return total
    except (OSError, TypeError, ValueError):
        return None


def _open_text(uri: str):
    fs, path = storage.url_to_fs(uri)
    return fs.open(path, "rt", encoding="utf-8", compression="infer", newline="")


def _read_text(uri: str) -> tuple[str | None, str | None]:
    try:
        with _open_text(uri) as f:
            return f.read(), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text ({e.reason} at byte {e.start})"


def _text_records(spec: SourceSpec, files: list[str], start: int) -> Iterator[Record]:
    index = 0
    for uri in files:
        if spec.sample_by == "document":
            if index >= start:
                text, err = _read_text(uri)
                yield Record(index, uri, text, err)
            index += 1
            continue
        text, err = _read_text(uri)
        if err is not None:  # one record for the whole file, so numbering stays stable
            if index >= start:
                yield Record(index, uri, None, err)
            index += 1
            continue
        if spec.sample_by == "line":
            for lineno, line in enumerate(text.splitlines(), 1):
                if index >= start:
                    yield Record(index, f"{uri}:{lineno}", line)
                index += 1
        else:
            lineno = 1
            pos = 0
            for m in [*_PARAGRAPH_RE.finditer(text), None]:
                end = m.start() if m else len(text)
                if index >= start:
                    yield Record(index, f"{uri}:{lineno}", text[pos:end])
                index += 1
                if m:
                    lineno += text.count("\n", pos, m.end())
                    pos = m.end()


def iter_jsonl(uri: str) -> Iterator[tuple[int, str, object | None, str | None]]:
    """(line number, line, parsed object or None, error or None) for each non-blank line."""
    with _open_text(uri) as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                yield lineno + 1, "", None, f"not UTF-8 text ({e.reason})"
                return
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                yield lineno, line, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, line, None, f"invalid JSON ({e.msg} at column {e.colno})"


def _field_text(obj: object, field: str) -> tuple[str | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if field not in obj:
        keys = ", ".join(sorted(obj)[:8])
        return None, f"no field {field!r} (fields: {keys})"
    value = obj[field]
    if not isinstance(value, str):
        return None, f"field {field!r} is {type(value).__name__}, not a string"
    return value, None


def _jsonl_records(spec: SourceSpec, files: list[str], start: int) -> Iterator[Record]:
    index = 0
    for uri in files:
        for lineno, _line, obj, err in iter_jsonl(uri):
            if index >= start:
                text = None
                if err is None:
                    text, err = _field_text(obj, spec.field)
                yield Record(index, f"{uri}:{lineno}", text, err)
            index += 1


def _parquet_records(spec: SourceSpec, files: list[str], start: int) -> Iterator[Record]:
    import pyarrow.parquet as pq

    index = 0
    for uri in files:
        fs, path = storage.url_to_fs(uri)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            if spec.field not in names:
                raise DataError(f"{uri}: no column {spec.field!r} (columns: {', '.join(names)})")
            n_rows = pf.metadata.num_rows
            if index + n_rows <= start:  # the whole file was done before a resume
                index += n_rows
                continue
            for batch in pf.iter_batches(columns=[spec.field], batch_size=4096):
                values = batch.column(0).to_pylist()
                for value in values:
                    if index >= start:
                        where = f"{uri}:row {index}"
                        if isinstance(value, str):
                            yield Record(index, where, value)
                        else:
                            bad = f"column {spec.field!r} is {type(value).__name__}, not a string"
                            yield Record(index, where, None, bad)
                    index += 1


def _hf_records(spec: SourceSpec, start: int) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(spec.path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{spec.path}: not a saved `datasets` dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = spec.split or ("train" if "train" in ds else None)
        if split not in ds:
            raise DataError(
                f"{spec.path}: no split {split!r} (splits: {', '.join(ds)}); pass --split"
            )
        ds = ds[split]
    if spec.field not in ds.column_names:
        cols = ", ".join(ds.column_names)
        raise DataError(f"{spec.path}: no column {spec.field!r} (columns: {cols})")
    ds = ds.select_columns([spec.field])
    for lo in range(start, len(ds), 4096):
        values = ds[lo : lo + 4096][spec.field]
        for i, value in enumerate(values, lo):
            if isinstance(value, str):
                yield Record(i, f"{spec.path}:row {i}", value)
            else:
                bad = f"column {spec.field!r} is {type(value).__name__}, not a string"
                yield Record(i, f"{spec.path}:row {i}", None, bad)


def iter_records(spec: SourceSpec, start: int = 0) -> Iterator[Record]:
    """The source's records from number `start` on, in a fixed order."""
    fmt, files = resolve(spec)
    if fmt == "hf":
        return _hf_records(spec, start)
    if fmt == "jsonl":
        return _jsonl_records(spec, files, start)
    if fmt == "parquet":
        return _parquet_records(spec, files, start)
    return _text_records(spec, files, start)
