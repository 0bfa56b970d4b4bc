"""`llm-data prepare|inspect` and `llm-tokenizer train`.

    llm-tokenizer train data/*.txt --out tok --vocab-size 8192
    llm-data prepare data/ --tokenizer tok --out s3://bucket/tokens --workers 8
    llm-data inspect s3://bucket/tokens

Errors in the input (a missing path or column, an empty corpus, a malformed line with
`--strict`, text the tokenizer cannot encode) exit with status 2 and one line naming
the problem. An interrupted `prepare` exits 130; the same command resumes it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

data_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
tokenizer_app = typer.Typer(
    add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True
)
data_app.add_typer(
    tokenizer_app, name="tokenizer", help="Train tokenizers (same as llm-tokenizer)."
)

Format = Annotated[
    str, typer.Option("--format", help="auto, text, jsonl, parquet or hf (load_from_disk)")
]
Field = Annotated[str, typer.Option(help="JSONL key / Parquet or datasets column with the text")]
SampleBy = Annotated[str, typer.Option(help="text files: one document per file, line or paragraph")]
Split = Annotated[str | None, typer.Option(help="split of a saved DatasetDict (default: train)")]
Strict = Annotated[
    bool, typer.Option(help="stop at the first malformed record instead of skipping it")
]
Quiet = Annotated[bool, typer.Option(help="no progress bar")]


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(prog: str, e: BaseException) -> typer.Exit:
    typer.echo(f"{prog}: error: {e}", err=True)
    return typer.Exit(2)


def _input_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    return (ValueError, FileNotFoundError, ValidationError, OSError)


def _texts(spec, strict: bool, progress: bool) -> Iterator[str]:
    """Text of every good record, with a progress bar over the bytes read."""
    from tqdm.auto import tqdm

    from llm.data.sources import DataError, iter_records, resolve, total_bytes

    fmt, files = resolve(spec)
    log = logging.getLogger("llm_data")
    total = total_bytes(files) if fmt != "hf" else None
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
        for rec in iter_records(spec):
            if rec.error is not None:
                if strict:
                    raise DataError(f"{rec.where}: {rec.error}")
                log.warning("%s: %s (skipped)", rec.where, rec.error)
                continue
            bar.update(len(rec.text.encode("utf-8", "surrogatepass")))
            yield rec.text


@data_app.command()
def prepare(
    source: Annotated[
        str, typer.Argument(help="text file, directory, glob, JSONL, Parquet or saved dataset")
    ],
    out: Annotated[str, typer.Option(help="output directory (local path or s3://...)")],
    tokenizer: Annotated[
        str,
        typer.Option(help="tokenizer directory or checkpoint; 'char' builds one from the source"),
    ],
    format: Format = "auto",
    field: Field = "text",
    sample_by: SampleBy = "document",
    split: Split = None,
    shard_tokens: Annotated[int, typer.Option(help="tokens per shard (about)")] = 1 << 25,
    workers: Annotated[
        int | None, typer.Option(help="encoding processes (default: all cores)")
    ] = None,
    strict: Strict = False,
    overwrite: Annotated[
        bool, typer.Option(help="replace an existing, different preparation")
    ] = False,
    fast_bpe: Annotated[
        bool, typer.Option(help="cached byte-level BPE encoder where it applies (same ids)")
    ] = True,
    quiet: Quiet = False,
) -> None:
    """Tokenize a text source into memory-mapped token shards (resumes if interrupted)."""
    _setup_logging(quiet)
    from llm.data.prepare import PrepareConfig
    from llm.data.prepare import prepare as run_prepare
    from llm.data.sources import SourceSpec
    from llm.data.tokenizers import SimpleCharacterTokenizer, load_tokenizer

    try:
        spec = SourceSpec(path=source, format=format, field=field, sample_by=sample_by, split=split)
        cfg = PrepareConfig(
            source=spec,
            out=out,
            shard_tokens=shard_tokens,
            strict=strict,
            overwrite=overwrite,
            fast_bpe=fast_bpe,
            **({"workers": workers} if workers else {}),
        )
        if tokenizer == "char":
            chars: set[str] = set()
            for text in _texts(spec, strict, False):  # a first pass, for the vocabulary
                chars.update(text)
            tok = SimpleCharacterTokenizer(sorted(chars))
        else:
            tok = load_tokenizer(tokenizer)
        result = run_prepare(cfg, tok, progress=not quiet)
    except KeyboardInterrupt:
        typer.echo("llm-data: interrupted; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    except _input_errors() as e:
        raise _fail("llm-data", e) from None
    ix = result.index
    summary = {
        "event": "prepare_done",
        "out": out,
        "tokens": ix.n_tokens,
        "documents": ix.n_docs,
        "shards": len(ix.shards),
        "dtype": ix.dtype,
        "tokenizer": ix.tokenizer.fingerprint,
        "resumed_shards": result.resumed_shards,
        "seconds": round(result.seconds, 3),
        "mb_per_s": round(result.bytes_in / 1e6 / max(result.seconds, 1e-9), 3),
        **ix.stats,
    }
    print(json.dumps(summary), flush=True)


@data_app.command()
def inspect(uri: Annotated[str, typer.Argument(help="a prepared directory")]) -> None:
    """Print a prepared directory's index summary as JSON."""
    from llm.data.shards import read_index

    try:
        ix = read_index(uri)
    except _input_errors() as e:
        raise _fail("llm-data", e) from None
    shards = [{"name": s.name, "tokens": s.n_tokens, "documents": s.n_docs} for s in ix.shards]
    print(json.dumps({**ix.model_dump(exclude={"shards"}), "shards": shards}, indent=2))


@tokenizer_app.callback()
def _tokenizer_group() -> None:
    """Train tokenizers."""


@tokenizer_app.command()
def train(
    source: Annotated[
        str, typer.Argument(help="text file, directory, glob, JSONL, Parquet or saved dataset")
    ],
    out: Annotated[str, typer.Option(help="directory to save the tokenizer in")],
    vocab_size: Annotated[
        int, typer.Option(help="vocabulary size, special tokens included")
    ] = 8192,
    min_frequency: Annotated[int, typer.Option(help="least count of a pair to be merged")] = 2,
    format: Format = "auto",
    field: Field = "text",
    sample_by: SampleBy = "document",
    split: Split = None,
    strict: Strict = False,
    quiet: Quiet = False,
) -> None:
    """Train a byte-level BPE that `AutoTokenizer.from_pretrained(out)` loads (ChatML template)."""
    _setup_logging(quiet)
    from llm.data.bpe import train_bpe
    from llm.data.sources import SourceSpec

    try:
        spec = SourceSpec(path=source, format=format, field=field, sample_by=sample_by, split=split)
        tok = train_bpe(
            _texts(spec, strict, not quiet), out, vocab_size, min_frequency, show_progress=not quiet
        )
    except _input_errors() as e:
        raise _fail("llm-tokenizer", e) from None
    summary = {
        "event": "tokenizer_done",
        "out": out,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "fingerprint": tok.fingerprint(),
    }
    print(json.dumps(summary), flush=True)


def data_main() -> None:
    data_app(prog_name="llm-data")


def tokenizer_main() -> None:
    tokenizer_app(prog_name="llm-tokenizer")


if __name__ == "__main__":
    sys.exit(data_main())
