"""`llm-convert`: our checkpoints to and from Hugging Face model directories.

    llm-convert to-hf runs/demo hf/demo [--model-type llama]
    llm-convert from-hf hf/demo runs/imported/checkpoints/step-0

`to-hf` writes what `transformers.AutoModelForCausalLM` and `AutoTokenizer` load offline:
`config.json`, `model.safetensors` (the checkpoint's dtype), the tokenizer with its chat
template, and `generation_config.json` whose `eos_token_id` lists every token that ends a
turn for our engine. `from-hf` writes a committed checkpoint (manifest last) that every
command taking `--checkpoint` loads, local or `s3://`. Safetensors only: no pickle, no
remote code. Errors exit with status 2 and one line naming the file or the problem.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"llm-convert: {message}", err=True)
    return typer.Exit(2)


@app.command("to-hf")
def to_hf_command(
    checkpoint: Annotated[str, typer.Argument(help="a run directory or one checkpoint")],
    out: Annotated[Path, typer.Argument(help="the Hugging Face directory to write")],
    model_type: Annotated[
        str | None, typer.Option(help="the HF family (default: the first that fits)")
    ] = None,
) -> None:
    """Write a checkpoint as a Hugging Face model directory."""
    from transformers import GenerationConfig

    from llm.checkpoint import load_checkpoint
    from llm.data.tokenizers import HFTokenizer
    from llm.interop.hf import to_hf

    try:
        loaded = load_checkpoint(checkpoint)
    except (OSError, ValueError) as e:
        raise _fail(f"{checkpoint}: {e}") from None
    tok = loaded.tokenizer
    if not isinstance(tok, HFTokenizer):
        raise _fail(
            f"{checkpoint}: its tokenizer is a {type(tok).__name__}, which Hugging Face has no "
            "class for; train a BPE tokenizer (llm-tokenizer train) to export a model"
        )
    if out.exists() and any(out.iterdir()):
        raise _fail(f"{out}: exists and is not empty")
    try:
        to_hf(loaded.model, out, model_type)
    except ValueError as e:
        raise _fail(f"--model-type: {e}") from None
    tok.save(out)
    stop = tok.stop_ids
    GenerationConfig(
        bos_token_id=tok.bos_id,
        eos_token_id=stop if len(stop) != 1 else stop[0],
        pad_token_id=tok.pad_id,
    ).save_pretrained(out)
    model_type_written = json.loads((out / "config.json").read_text())["model_type"]
    typer.echo(f"wrote {out} ({model_type_written}, {loaded.model.num_params() / 1e6:.1f}M)")


@app.command("from-hf")
def from_hf_command(
    hf_dir: Annotated[Path, typer.Argument(help="a Hugging Face model directory")],
    out: Annotated[str, typer.Argument(help="the checkpoint directory to write (or s3://)")],
) -> None:
    """Write a Hugging Face model directory as a committed checkpoint."""
    from llm.checkpoint import save_checkpoint
    from llm.data.tokenizers import HFTokenizer
    from llm.interop.hf import from_hf

    if not (hf_dir / "config.json").is_file():
        raise _fail(f"{hf_dir / 'config.json'}: not found (not a Hugging Face model directory)")
    pickled = sorted(p.name for p in hf_dir.glob("*.bin"))
    if pickled and not list(hf_dir.glob("*.safetensors")):
        raise _fail(f"{hf_dir / pickled[0]}: pickle weights are refused; use safetensors")
    try:
        model = from_hf(hf_dir)
        tok = HFTokenizer(hf_dir)
    except (OSError, ValueError, KeyError) as e:
        raise _fail(f"{hf_dir}: {e}") from None
    save_checkpoint(out, model, tok, meta={"converted_from": str(hf_dir)})
    typer.echo(f"wrote {out} ({model.num_params() / 1e6:.1f}M)")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
