"""`llm-generate`: offline generation from a checkpoint, without a server.

    llm-generate --checkpoint runs/demo "To be, or not to be"          # streams to stdout
    llm-generate --checkpoint runs/demo --chat "Who are you?" --temperature 0.7 --seed 1
    llm-generate --checkpoint runs/demo --input prompts.jsonl --slots 16 > out.jsonl

With `--input`, each line is a JSON string or an object with a "prompt" (or "messages",
a chat) and optional per-line sampling fields; all lines run through the engine's
continuous batching (`--slots` at a time) and each result is one JSON line, in input
order: {"index", "text", "finish_reason", "prompt_tokens", "completion_tokens"}.
A bad line exits with status 2 naming the file and line; nothing is generated then.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from llm.checkpoint import CheckpointError, load_checkpoint
from llm.data.tokenizers import BaseTokenizer
from llm.inference import BatchGenerator, IncrementalDecoder, Request, SamplingParams
from llm_engine.settings import DTYPES

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclasses.dataclass
class _Job:
    index: int
    request: Request
    decoder: IncrementalDecoder
    text: str = ""
    finish_reason: str | None = None


def _prompt_ids(
    tokenizer: BaseTokenizer, prompt: str | None, messages: Any, chat: bool
) -> list[int]:
    if messages is not None or chat:
        messages = messages if messages is not None else [{"role": "user", "content": prompt}]
        return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return tokenizer.encode(prompt or "")


def _read_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON: {e.msg}") from None
        row = {"prompt": row} if isinstance(row, str) else row
        if not isinstance(row, dict) or not ({"prompt", "messages"} & row.keys()):
            raise ValueError(
                f'{path}:{n}: expected a string or an object with "prompt" or "messages"'
            )
        row["_line"] = f"{path}:{n}"
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def run_batch(
    batch: BatchGenerator, tokenizer: BaseTokenizer, jobs: list[_Job], stream: bool = False
) -> None:
    """Generate every job through `batch`, `batch.n_slots` at a time, in place."""
    waiting, running = list(jobs), {}
    while waiting or running:
        while waiting and batch.free_slots:
            job = waiting.pop(0)
            batch.add(job.request)
            running[id(job.request)] = job
        for event in batch.step():
            job = running[id(event.request)]
            delta, job.finish_reason = batch.detokenize(event, job.decoder)
            if delta:
                job.text += delta
                if stream:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            if job.finish_reason is not None:
                rest = job.decoder.flush()
                job.text += rest
                if stream:
                    sys.stdout.write(rest + "\n")
                del running[id(event.request)]


@app.command()
def main_command(
    prompt: Annotated[str | None, typer.Argument(help="the prompt (omit with --input)")] = None,
    checkpoint: Annotated[str, typer.Option(help="run dir or checkpoint dir (or s3:// URI)")] = "",
    input: Annotated[Path | None, typer.Option(help="JSONL prompts, one per line")] = None,
    chat: Annotated[
        bool, typer.Option(help="wrap the prompt as a user message (chat template)")
    ] = False,
    max_tokens: Annotated[
        int, typer.Option(help="new tokens at most (0: up to the context)")
    ] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 0.8,
    top_k: Annotated[int, typer.Option(help="0: off")] = 0,
    top_p: Annotated[float, typer.Option(help="1: off")] = 1.0,
    min_p: Annotated[float, typer.Option(help="0: off")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="1: off")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="reproducible sampling")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    slots: Annotated[int, typer.Option(help="requests generated at once (--input)")] = 8,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    threads: Annotated[int, typer.Option(help="torch intra-op threads (0: default)")] = 0,
) -> None:
    """Generate text from a checkpoint (one prompt streamed, or a JSONL file batched)."""
    if threads:
        torch.set_num_threads(threads)
    if (prompt is None) == (input is None):
        raise _fail("give a prompt or --input FILE, not both")
    if not checkpoint:
        raise _fail("--checkpoint is required")
    if dtype != "auto" and dtype not in DTYPES:
        raise _fail(f"--dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    try:
        defaults = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed=seed)
        rows = _read_lines(input) if input is not None else [{"prompt": prompt, "_line": "prompt"}]
        loaded = load_checkpoint(checkpoint, device=device, dtype=DTYPES.get(dtype))
    except (ValueError, OSError, CheckpointError) as e:
        raise _fail(str(e)) from None
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    context = model.config.max_seq_len
    jobs = []
    for i, row in enumerate(rows):
        where = row["_line"]
        try:
            overrides = {k: v for k, v in row.items() if k in _SAMPLING_FIELDS}
            sampling = dataclasses.replace(defaults, **overrides)
            ids = _prompt_ids(tokenizer, row.get("prompt"), row.get("messages"), chat)
        except (TypeError, ValueError) as e:
            raise _fail(f"{where}: {e}") from None
        if not ids or len(ids) >= context:
            raise _fail(
                f"{where}: the prompt has {len(ids)} tokens; the context holds {context - 1}"
            )
        n = int(row.get("max_tokens", max_tokens)) or context
        request = Request(ids, sampling, min(n, context - len(ids)), frozenset(tokenizer.stop_ids))
        decoder = IncrementalDecoder(tokenizer, stop=tuple(stop or ()), context_ids=ids[-4:])
        jobs.append(_Job(i, request, decoder))
    batch = BatchGenerator(model, n_slots=min(slots, len(jobs)))
    run_batch(batch, tokenizer, jobs, stream=input is None)
    if input is not None:
        for job in jobs:
            print(json.dumps({
                "index": job.index, "text": job.text, "finish_reason": job.finish_reason,
                "prompt_tokens": len(job.request.prompt_ids),
                "completion_tokens": job.request.generated,
            }))  # fmt: skip


def _fail(message: str) -> typer.Exit:
    typer.echo(f"llm-generate: error: {message}", err=True)
    return typer.Exit(2)


def main() -> None:
    app()
