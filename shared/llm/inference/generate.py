"""Autoregressive generation over the model's preallocated KV cache (gpt-fast style).

The prompt is prefilled in one forward pass at positions 0..P-1; each later step feeds
only the newest token at its absolute position, so a step costs one token's compute.
The model's KV cache is shared state: one generation at a time per model (the engine's
scheduler thread guarantees that). The cache stays set up afterwards so the next request
reuses it; call `model.clear_cache()` before a plain (training-style) forward.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch

from llm.inference.detokenize import IncrementalDecoder
from llm.inference.sampling import SamplingParams, make_generator, sample, token_logprobs
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


def _ensure_cache(model: DecoderModel) -> None:
    """Allocate a batch-1 cache over the whole context unless one is already there.

    A full-length cache is reused across requests: stale entries past a request's
    position are masked out by the model (keys at positions > input_pos are ignored).
    """
    if model.cache_batch_size != 1 or model.cache_max_seq_len != model.config.max_seq_len:
        model.setup_cache(1, model.config.max_seq_len)


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
    temperature and filtering), or None when `logprobs=False`. `seed` overrides
    `sampling.seed`. The model should be in eval mode.
    """
    budget = max_new_tokens_for(model.config.max_seq_len, len(prompt_ids), max_new_tokens)
    if budget == 0:
        return
    device = model.embed_tokens.weight.device
    _ensure_cache(model)
    generator = make_generator(seed if seed is not None else sampling.seed, device)
    stop = frozenset(stop_token_ids)

    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, P)
    logits = model(tokens, torch.arange(len(prompt_ids), device=device)[None])[:, -1]  # (1, V)
    pos = torch.tensor([[len(prompt_ids)]], device=device)  # (1, 1) next position
    for step in range(budget):
        next_id = sample(logits, sampling, generator)  # (1,)
        if logprobs:
            # One host read per token for both values.
            pair = torch.stack([next_id.double(), token_logprobs(logits, next_id).double()])
            token_f, logprob = pair[:, 0].tolist()
            token: int = int(token_f)
        else:
            token, logprob = int(next_id.item()), None
        yield token, logprob
        if token in stop or step == budget - 1:
            return
        logits = model(next_id[:, None], pos)[:, -1]  # (1, V)
        pos += 1


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
