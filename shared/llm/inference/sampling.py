"""Token sampling over a batch of requests that each bring their own parameters.

Every request's parameters live in per-slot tensors (`Sampler`), so one call samples a
whole decode step of requests with different temperatures, filters and penalties, on the
logits' device, without a host sync per request:

- logit bias (OpenAI's `logit_bias`): a per-token value added to the raw logits, so -100
  all but bans a token and +100 all but forces it;
- then penalties: repetition (CTRL, Keskar et al. 2019: positive logits of
  seen tokens divided by it, negative ones multiplied; prompt and output count as seen),
  presence and frequency (OpenAI's: minus presence * [count > 0] minus frequency * count,
  over the output);
- then temperature, top-k, top-p (Holtzman et al. 2019: the smallest set of most likely
  tokens whose mass reaches top_p) and min-p (Nguyen et al. 2024: tokens below min_p times
  the top token's probability), each per row;
- the draw is Gumbel-max in its exponential-race form, argmax(p / E) with E ~ Exp(1), and
  E comes from a counter-based hash of (seed, step, token id) instead of a generator's
  state. A seeded request therefore draws the same numbers whatever else is in the batch,
  and an unseeded one gets a random seed when it is admitted.

A slot may also hold a grammar (`llm.inference.grammar.Matcher`): its rows' tokens that
the grammar does not allow next get -inf before anything else, so greedy and drawn tokens
alike keep the output valid; rows without one are untouched.

Temperature 0 is greedy: argmax of the biased, penalised logits. Logprobs are reported from
the raw model distribution (before bias, penalties, temperature and filters), as the OpenAI
API does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from llm.inference.grammar import Matcher, allowed, bitmask_words

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep only the k most likely tokens; 0 disables.
    top_p: keep the smallest set of tokens whose probability mass reaches top_p; 1 disables.
    min_p: drop tokens less likely than min_p times the most likely one; 0 disables.
    repetition_penalty: > 1 discourages any token already in the prompt or output; 1 disables.
    presence_penalty, frequency_penalty: subtracted once per seen output token / per
        occurrence (OpenAI's definition, in [-2, 2] there); 0 disables.
    seed: makes the draws reproducible; None draws a fresh seed per request.
    logit_bias: token id -> value in [-100, 100] added to that token's logit before
        everything else (OpenAI's definition; ids may come as decimal strings, as JSON
        keys do).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Field names in the messages so callers can map them to API parameters.
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty: must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}: must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: must be in [0, 2**63), got {self.seed}")
        object.__setattr__(self, "logit_bias", _bias_table(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0

    @property
    def biased(self) -> bool:
        return any(self.logit_bias.values())

    @property
    def penalties(self) -> bool:
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )


def _bias_table(bias: Mapping[int | str, float]) -> dict[int, float]:
    """`logit_bias` as {token id: value}, each checked; a message names the entry."""
    table = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias: {key!r} is not a token id") from None
        if token < 0:
            raise ValueError(f"logit_bias: {key!r} is not a token id (ids are >= 0)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"logit_bias: the bias of {key!r} must be a number, got {value!r}")
        if not (math.isfinite(value) and -100 <= value <= 100):
            raise ValueError(f"logit_bias: the bias of {key!r} must be in [-100, 100], got {value}")
        table[token] = float(value)
    return table


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def exponential_noise(seed: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) draws that depend only on (seed, step, token id).

    Args:
        seed, step: (B,) int64.
    Returns:
        (B, V) float32, each entry > 0.
    """
    key = _fmix32((seed & _MASK32) ^ _fmix32(((seed >> 32) & _MASK32) ^ (step & _MASK32)))
    ids = torch.arange(vocab_size, device=seed.device)  # (V,)
    x = _fmix32((ids[None] * 0x9E3779B1 + key[:, None]) & _MASK32)  # (B, V)
    u = ((x >> 8).float() + 0.5) * 2.0**-24  # (B, V) uniform in (0, 1)
    return -torch.log(u)


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    seen: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """
    Args:
        logits: (B, V) float32.
        counts: (B, V) occurrences of each token in the output so far.
        seen: (B, V) bool, token in the prompt or the output.
        repetition, presence, frequency: (B,) per-row penalties (1, 0, 0 disable).
    Returns:
        (B, V) penalised logits (a new tensor).
    """
    r = repetition[:, None]
    penalised = torch.where(logits > 0, logits / r, logits * r)
    logits = torch.where(seen, penalised, logits)
    counts = counts.to(logits.dtype)
    return logits - presence[:, None] * (counts > 0) - frequency[:, None] * counts


def filter_logits(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Per-row top-k, top-p and min-p; filtered-out tokens get -inf.

    Args:
        logits: (B, V) float32, temperature already applied.
        top_k: (B,) int64, 0 disables; top_p: (B,) 1 disables; min_p: (B,) 0 disables.
    Returns:
        (B, V) (a new tensor).
    """
    V = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(V, device=logits.device)[None]  # (1, V)
    k = torch.where(top_k > 0, top_k, V)[:, None]  # (B, 1)
    probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
    # Mass strictly before each token: the top token always survives, and a token is
    # dropped once the tokens ahead of it already reach top_p.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = (ranks >= k) | (mass_before >= top_p[:, None]) | (probs < min_p[:, None] * probs[:, :1])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    noise: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row: greedy where temperature is 0, else a filtered draw.

    Args:
        logits: (B, V) (penalised) logits.
        temperature: (B,).
        noise: (B, V) Exp(1) draws (`exponential_noise`).
        top_k, top_p, min_p: (B,) filters, or None when no row filters.
    Returns:
        (B,) int64 token ids (no host sync).
    """
    logits = logits.float()
    greedy = temperature == 0  # (B,)
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]  # (B, V)
    if top_k is not None:
        scaled = filter_logits(scaled, top_k, top_p, min_p)
    # argmax(p / E) = argmax(log p - log E): the softmax's normaliser does not matter.
    drawn = (scaled - noise.log()).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of `token_ids` (B,) under the model's raw distribution `logits` (B, V)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    return logprobs.gather(-1, token_ids[:, None]).squeeze(-1)  # (B,)


class Sampler:
    """Per-slot sampling parameters and token statistics, for a pool of `n_slots` requests.

    `assign` loads a request's parameters into a slot, `__call__` samples rows of slots,
    `record` counts what was sampled (penalties, the step the noise depends on), `release`
    clears a slot. Parameter changes happen only at admission, so a step issues no copy
    from the host.
    """

    def __init__(self, n_slots: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        kw = dict(device=device)
        self.vocab_size = vocab_size
        self.temperature = torch.zeros(n_slots, **kw)
        self.top_k = torch.zeros(n_slots, dtype=torch.long, **kw)
        self.top_p = torch.ones(n_slots, **kw)
        self.min_p = torch.zeros(n_slots, **kw)
        self.repetition = torch.ones(n_slots, **kw)
        self.presence = torch.zeros(n_slots, **kw)
        self.frequency = torch.zeros(n_slots, **kw)
        self.seed = torch.zeros(n_slots, dtype=torch.long, **kw)
        self.step = torch.zeros(n_slots, dtype=torch.long, **kw)
        self.counts = torch.zeros(n_slots, vocab_size, dtype=torch.int32, **kw)
        self.seen = torch.zeros(n_slots, vocab_size, dtype=torch.bool, **kw)
        self.bias = torch.zeros(n_slots, vocab_size, **kw)  # logit_bias, dense per slot
        # Host-side: which slots draw at random, filter, penalise or bias (passes that no
        # row of a step needs are skipped).
        self._drawing: set[int] = set()
        self._filtering: set[int] = set()
        self._penalising: set[int] = set()
        self._biasing: set[int] = set()
        self._grammars: dict[int, Matcher] = {}  # slot -> its grammar, if constrained

    def assign(self, slot: int, params: SamplingParams, prompt_ids: Sequence[int]) -> int:
        """Load a request into `slot`; returns the seed it samples with."""
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        for name, value in (
            ("temperature", params.temperature),
            ("top_k", params.top_k),
            ("top_p", params.top_p),
            ("min_p", params.min_p),
            ("repetition", params.repetition_penalty),
            ("presence", params.presence_penalty),
            ("frequency", params.frequency_penalty),
            ("seed", seed),
            ("step", 0),
        ):
            getattr(self, name)[slot] = value
        self.counts[slot] = 0
        self.seen[slot] = False
        if params.repetition_penalty != 1:
            ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=self.seen.device)
            self.seen[slot, ids] = True
        self._clear_bias(slot)
        if params.biased:
            bias = params.logit_bias
            if max(bias) >= self.vocab_size:
                raise ValueError(f"logit_bias: token {max(bias)} is outside the vocabulary")
            ids = torch.tensor(list(bias), dtype=torch.long, device=self.bias.device)
            self.bias[slot, ids] = torch.tensor(list(bias.values()), device=self.bias.device)
            self._biasing.add(slot)
        (self._drawing.discard if params.greedy else self._drawing.add)(slot)
        (self._filtering.add if params.filters else self._filtering.discard)(slot)
        (self._penalising.add if params.penalties else self._penalising.discard)(slot)
        return seed

    def constrain(self, slot: int, grammar: Matcher | None) -> None:
        """Mask `slot`'s tokens by `grammar` from its next token on (None: free text)."""
        if grammar is None:
            self._grammars.pop(slot, None)
        else:
            self._grammars[slot] = grammar

    def accept(self, tokens: Sequence[int], slots: Sequence[int]) -> None:
        """Advance the grammars of `slots` past their sampled `tokens` (host ints)."""
        for slot, token in zip(slots, tokens, strict=True):
            grammar = self._grammars.get(slot)
            if grammar is not None:
                grammar.accept(token)

    def release(self, slot: int) -> None:
        self._grammars.pop(slot, None)
        self._drawing.discard(slot)
        self._filtering.discard(slot)
        self._penalising.discard(slot)
        self._clear_bias(slot)

    def _clear_bias(self, slot: int) -> None:
        # A step adds every row's bias when any row has one: a slot's row must be zero
        # whenever it is not biasing.
        if slot in self._biasing:
            self.bias[slot] = 0
            self._biasing.discard(slot)

    def __call__(
        self, logits: torch.Tensor, rows: torch.Tensor, slots: Sequence[int]
    ) -> torch.Tensor:
        """Sample one token for each of `logits`' rows (B, V), row b belonging to slot
        `rows[b]` ((B,) on the device; `slots` is the same on the host). Returns (B,)."""
        logits = logits.float()
        if self._grammars.keys() & set(slots):
            logits = self._constrained(logits, slots)  # a new tensor
        if self._biasing.intersection(slots):
            logits = logits + self.bias[rows]  # a new tensor: the caller's logits stay raw
        if self._penalising.intersection(slots):
            logits = apply_penalties(
                logits, self.counts[rows], self.seen[rows], self.repetition[rows],
                self.presence[rows], self.frequency[rows],
            )  # fmt: skip
        if not self._drawing.intersection(slots):
            return logits.argmax(dim=-1)  # every row greedy
        filters = (
            (self.top_k[rows], self.top_p[rows], self.min_p[rows])
            if self._filtering.intersection(slots)
            else (None, None, None)
        )
        noise = exponential_noise(self.seed[rows], self.step[rows], logits.shape[-1])
        return sample(logits, self.temperature[rows], noise, *filters)

    def _constrained(self, logits: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """`logits` (B, V) with the tokens each row's grammar forbids at -inf; the masks
        are computed on the host and sent as one (B, V/32) bitmask."""
        V = logits.shape[-1]
        bitmask = torch.full((len(slots), bitmask_words(V)), -1, dtype=torch.int32)
        for row, slot in enumerate(slots):
            grammar = self._grammars.get(slot)
            if grammar is not None:
                grammar.fill(bitmask, row)
        mask = allowed(bitmask.to(logits.device, non_blocking=True), V)  # (B, V)
        return logits.masked_fill(~mask, float("-inf"))

    def record(self, tokens: torch.Tensor, rows: torch.Tensor, slots: Sequence[int]) -> None:
        """Count the sampled `tokens` (B,) of slots `rows` (B,) (`slots` on the host): the
        draw's step and the penalties' counts, where a row of the step uses them."""
        if self._drawing.intersection(slots):
            self.step.index_add_(0, rows, torch.ones_like(rows))
        if self._penalising.intersection(slots):
            ones = torch.ones_like(tokens, dtype=torch.int32)
            self.counts.index_put_((rows, tokens), ones, accumulate=True)
            self.seen.index_put_((rows, tokens), ones.bool())
