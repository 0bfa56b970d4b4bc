"""The trainer's data: settings -> tokenizer + `TextDataModule` (llm.data) for this rank.

Two ways in:
- `data.dataset_path`: data the data library already prepared (`llm-data prepare` shards
  for `training.task=lm`, chat JSONL for `sft`), used as is.
- `data.source`: a text file, a directory of text files, or `default` (Python's docs) for
  `lm`, or a chat JSONL file for `sft`. With `data.tokenizer=char` a character tokenizer
  is fitted to the text, except when fine-tuning with adapters (`finetune.method`): then
  the tokenizer is the base's (`checkpoint.init_from`). For `lm` the text is tokenized
  into shards in a private temporary directory per process (small corpora only: big ones
  go through `llm-data prepare`), so torchrun workers never race on a shared cache.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
from pathlib import Path

from llm.data.corpus import load_corpus
from llm.data.datamodule import TextDataModule
from llm.data.tokenizers import BaseTokenizer, SimpleCharacterTokenizer, load_tokenizer
from llm.settings import TrainerSettings

log = logging.getLogger(__name__)


def build_data(
    settings: TrainerSettings, rank: int = 0, world_size: int = 1
) -> tuple[BaseTokenizer, TextDataModule]:
    """The tokenizer and this rank's data module for `settings`.

    Raises ValueError / FileNotFoundError (DataError is a ValueError) with a message that
    names the problem; the CLI turns them into exit code 2.
    """
    d, t = settings.data, settings.training
    name = d.tokenizer
    if name in (None, "char") and settings.checkpoint.init_from:
        name = settings.checkpoint.init_from  # fine-tuning keeps the base's vocabulary
    tokenizer = _explicit_tokenizer(name)
    if t.task == "sft":
        path = d.dataset_path or d.source
        if path == "default":
            raise ValueError(
                "training.task=sft needs data.source (or data.dataset_path): a chat JSONL"
            )
        if tokenizer is None:
            tokenizer = _char_tokenizer_for_chats(path)
    elif d.dataset_path is not None:
        path = d.dataset_path  # prepared shards; tokenizer None: the one saved with them
    else:
        docs = load_corpus(d.source)
        if tokenizer is None:
            tokenizer = SimpleCharacterTokenizer.train("".join(docs))
        path = _prepare_docs(docs, tokenizer)
    config = settings.data_config(world_size)
    if config.dataset_path != path:
        config = config.model_copy(update={"dataset_path": path})
    try:
        module = TextDataModule(config, tokenizer, rank, world_size)
    except ValueError as e:
        if "seq_len" not in str(e):
            raise
        # The data library speaks of seq_len; the trainer's user set training.block_size.
        raise ValueError(f"{e} (seq_len is training.block_size={t.block_size})") from None
    return module.tokenizer, module


def _explicit_tokenizer(name: str | None) -> BaseTokenizer | None:
    """None for 'char' (fitted to the data, or the one saved with prepared shards)."""
    if name in (None, "char"):
        return None
    return load_tokenizer(name)  # ours or an HF directory, a checkpoint, or a run directory


def _char_tokenizer_for_chats(path: str) -> SimpleCharacterTokenizer:
    """A character vocabulary covering every conversation as the chat template renders it."""
    from llm.data.sft import to_messages
    from llm.data.sources import SourceSpec, iter_jsonl, resolve

    template = SimpleCharacterTokenizer(["x"])  # only its chat template is used here
    texts: list[str] = []
    for uri in resolve(SourceSpec(path=path, format="jsonl"))[1]:
        for _, _, obj, err in iter_jsonl(uri):
            if err is None:
                try:
                    texts.append(template.apply_chat_template(to_messages(obj), False))
                except ValueError:
                    continue  # load_sft counts and reports malformed lines
    return SimpleCharacterTokenizer.train("".join(texts) or "x")


def _prepare_docs(docs: list[str], tokenizer: BaseTokenizer) -> str:
    """Tokenize in-memory documents into shards in a temporary directory (removed at exit)."""
    from llm.data.prepare import PrepareConfig, prepare
    from llm.data.sources import SourceSpec

    tmp = tempfile.mkdtemp(prefix="llm-train-data-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    jsonl = Path(tmp, "docs.jsonl")
    with jsonl.open("w", encoding="utf-8") as f:  # one record per document keeps EOS borders
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    out = str(Path(tmp, "shards"))
    cfg = PrepareConfig(
        source=SourceSpec(path=str(jsonl), format="jsonl"), out=out, workers=1, fast_bpe=False
    )
    prepare(cfg, tokenizer, progress=False)
    return out
