"""Text sources for training: a file, a directory of text files, or the default corpus.

The default corpus is the English reference documentation that ships with every CPython
(`pydoc_data.topics`): nothing to download, nothing third-party to ship.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


def default_corpus() -> list[str]:
    """Python's own reference documentation, one document per topic, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def load_corpus(source: str | None) -> list[str]:
    """Documents from `source`: None for the default corpus, a text file, or a directory.

    A directory contributes every `*.txt`, `*.md`, `*.rst` file under it, sorted by path
    so the corpus (and so the run) is deterministic.
    """
    if source is None or source == "default":
        return default_corpus()
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: directory has no text files ({sorted(TEXT_SUFFIXES)})")
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    docs = []
    for f in files:
        try:
            docs.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{path}: corpus is empty")
    log.info("corpus %s: %d documents, %d characters", path, len(docs), sum(map(len, docs)))
    return docs
