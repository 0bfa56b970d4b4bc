"""Offline generation: one request through the engine's slot batching (`BatchGenerator`).

The prompt is prefilled at positions 0..P-1; each later step feeds only the newest token
at its absolute position, so a step costs one token's compute. The model's KV cache is
shared state: one generation at a time per model (the engine's scheduler thread
guarantees that). The cache stays set up afterwards so the next request reuses it; call
`model.clear_cache()` before a plain (training-style) forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator

import torch

from llm.inference.batching import BatchGenerator, Request
from llm.inference.detokenize import IncrementalDecoder
from llm.inference.sampling import SamplingParams
from llm.models.decoder import DecoderModel

__all__ = ["IncrementalDecoder", "generate", "max_new_tokens_for", "stream_generate"]


def max_new_tokens_for(context: int, prompt_len: int, max_new_tokens: int) -> int:
    """How many tokens a prompt can get: `max_new_tokens` capped by the context length.

    Raises ValueError (naming the argument) for an empty prompt, one that leaves no room
    in the context, or a negative `max_new_tokens`.
    """
    if prompt_len == 0:
        raise ValueError("prompt_ids: the prompt is empty")
    if prompt_len >= context:
        raise ValueError(
            f"prompt_ids: the prompt has {prompt_len} tokens but the context length is "
            f"{context}; at most {context - 1} leave room for a new token"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    return min(max_new_tokens, context - prompt_len)


@torch.inference_mode()
def stream_generate(
    model: DecoderModel,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_token_ids: Collection[int] = (),
    seed: int | None = None,
    logprobs: bool = True,
) -> Iterator[tuple[int, float | None]]:
    """Yield `(token_id, logprob)` for each new token, as soon as it is sampled.

    Generation ends after `max_new_tokens` tokens, when the context is full, or after a
    token in `stop_token_ids` (which is yielded, so callers see why it stopped).
    `logprob` is the token's log-probability under the raw model distribution (before
    penalties, temperature and filtering), or None when `logprobs=False`. `seed`
    overrides `sampling.seed`. This is the engine's batching over one slot: the same
    request gives the same tokens here and in a busy engine. The model should be in eval
    mode.
    """
    budget = max_new_tokens_for(model.config.max_seq_len, len(prompt_ids), max_new_tokens)
    if budget == 0:
        return
    if seed is not None:
        sampling = dataclasses.replace(sampling, seed=seed)
    batch = BatchGenerator(model, n_slots=1)
    request = Request(list(prompt_ids), sampling, budget, frozenset(stop_token_ids), logprobs)
    batch.add(request)
    try:
        while True:
            for event in batch.step():
                yield event.token_id, event.logprob
                if event.finish_reason is not None:
                    return
    finally:
        batch.cancel(request)


def generate(
    model: DecoderModel,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_token_ids: Collection[int] = (),
    seed: int | None = None,
) -> list[int]:
    """All new token ids at once (the stop token, if one ended it, is the last one)."""
    return [
        token
        for token, _ in stream_generate(
            model,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_token_ids=stop_token_ids,
            seed=seed,
            logprobs=False,
        )
    ]
