"""Token sampling: greedy, temperature, top-k and top-p (nucleus) over a batch of logits.

Everything stays on the logits' device: the random draw uses the exponential-race form of
Gumbel-max (gpt-fast) instead of `torch.multinomial`, so sampling never syncs with the host
and a per-request `torch.Generator` makes a seeded request reproducible on its own,
whatever else is running. Top-p follows Holtzman et al. 2019 ("The Curious Case of Neural
Text Degeneration"): keep the smallest set of most likely tokens whose mass reaches `top_p`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep only the k most likely tokens; 0 disables.
    top_p: keep the smallest set of tokens whose probability mass reaches top_p; 1 disables.
    seed: seeds the request's own generator; None draws a fresh non-deterministic seed.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # Field names in the messages so callers can map them to API parameters.
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one request: seeded when asked, else from the OS entropy source."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p; filtered-out tokens get -inf.

    Args:
        logits: (B, V), any float dtype.
    Returns:
        (B, V) float32 logits (a new tensor).
    """
    logits = logits.float() / params.temperature  # (B, V)
    vocab_size = logits.shape[-1]
    if 0 < params.top_k < vocab_size:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Mass strictly before each token: the top token always survives (its mass before
        # is 0), and a token is dropped once the tokens ahead of it already reach top_p.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= params.top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: (B, V) next-token logits.
        params: sampling parameters (shared by the batch).
        generator: RNG for the draw; ignored when greedy.
    Returns:
        (B,) int64 token ids, on the logits' device (no host sync here).
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, params), dim=-1)  # (B, V)
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race). Clamping E keeps
    # a filtered token (p = 0) at 0 even if E underflows to 0, instead of 0/0 = NaN.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of `token_ids` (B,) under the model's raw distribution `logits` (B, V).

    Raw means before temperature/top-k/top-p, as the OpenAI API reports logprobs.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    return logprobs.gather(-1, token_ids[:, None]).squeeze(-1)  # (B,)
