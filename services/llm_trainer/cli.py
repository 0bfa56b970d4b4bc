"""`llm-train`: train a decoder model on a text corpus and write committed checkpoints."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def train(
    out: Annotated[str, typer.Option(help="run directory (local path or s3://...)")] = "runs/default",
    data: Annotated[
        str, typer.Option(help="text file or directory; 'default' = Python's reference docs")
    ] = "default",
    preset: Annotated[str, typer.Option(help="ModelConfig preset")] = "small",
    tokenizer: Annotated[
        str, typer.Option(help="'char' (built from the corpus) or a local HF tokenizer directory")
    ] = "char",
    dim: Annotated[int | None, typer.Option(help="override the preset's dim")] = None,
    n_layers: Annotated[int | None, typer.Option()] = None,
    n_heads: Annotated[int | None, typer.Option()] = None,
    n_kv_heads: Annotated[int | None, typer.Option()] = None,
    max_steps: Annotated[int, typer.Option()] = 1000,
    batch_size: Annotated[int, typer.Option()] = 16,
    block_size: Annotated[int, typer.Option()] = 128,
    lr: Annotated[float, typer.Option()] = 1e-3,
    warmup_steps: Annotated[int, typer.Option()] = 50,
    eval_interval: Annotated[int, typer.Option()] = 200,
    eval_batches: Annotated[int, typer.Option()] = 20,
    checkpoint_interval: Annotated[int, typer.Option()] = 500,
    keep_last: Annotated[int, typer.Option()] = 2,
    seed: Annotated[int, typer.Option()] = 1337,
    device: Annotated[str, typer.Option()] = "cpu",
    log_interval: Annotated[int, typer.Option()] = 50,
) -> None:
    """Train on a corpus; resume from the run directory's newest committed checkpoint."""
    import torch
    from pydantic import ValidationError

    from llm.config import ModelConfig
    from llm.data.corpus import load_corpus
    from llm.data.dataset import TokenWindows, tokenize_documents
    from llm.data.tokenizers import HFTokenizer, SimpleCharacterTokenizer
    from llm.training.trainer import TrainConfig
    from llm.training.trainer import train as run_training

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(torch.get_num_threads())
    try:
        docs = load_corpus(data)
        tok = (
            SimpleCharacterTokenizer.train("".join(docs))
            if tokenizer == "char"
            else HFTokenizer(Path(tokenizer))
        )
        overrides = {
            k: v
            for k, v in dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads).items()
            if v is not None
        }
        model_cfg = ModelConfig.from_preset(
            preset, vocab_size=tok.vocab_size, max_seq_len=max(block_size, 256), **overrides
        )
        cfg = TrainConfig(
            run_dir=out, max_steps=max_steps, batch_size=batch_size, block_size=block_size, lr=lr,
            warmup_steps=warmup_steps, eval_interval=eval_interval, eval_batches=eval_batches,
            checkpoint_interval=checkpoint_interval, keep_last=keep_last, seed=seed,
            device=device, log_interval=log_interval,
        )  # fmt: skip
        tokens = tokenize_documents(docs, tok)
        TokenWindows(tokens, block_size, cfg.val_fraction)  # fail now if the corpus is too small
    except (ValueError, FileNotFoundError, ValidationError) as e:
        typer.echo(f"llm-train: error: {e}", err=True)
        raise typer.Exit(2) from None

    logging.getLogger("llm_trainer").info(
        "model %s: %.2fM parameters, %d tokens", preset, _n_params(model_cfg) / 1e6, len(tokens)
    )
    result = run_training(model_cfg, cfg, tok, tokens)
    summary = {"event": "train_done", "run_dir": out, "step": result.step,
               "train_loss": result.train_loss, "val_loss": result.val_loss}  # fmt: skip
    print(json.dumps(summary), flush=True)


def _n_params(cfg) -> int:  # noqa: ANN001
    import torch

    from llm.models.decoder import DecoderModel

    with torch.device("meta"):
        return DecoderModel(cfg).num_params()


def main() -> None:
    app(prog_name="llm-train")


if __name__ == "__main__":
    sys.exit(main())
