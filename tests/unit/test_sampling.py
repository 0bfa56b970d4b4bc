"""Batched sampling: greedy, temperature, top-k, top-p, min-p, penalties, logit bias, per-row
parameters and seeds that do not depend on the rest of the batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llm.inference import Sampler, SamplingParams, token_logprobs
from llm.inference.sampling import apply_penalties, exponential_noise, filter_logits

VOCAB = 50


def _logits(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _sample(
    logits: torch.Tensor, params: SamplingParams | list[SamplingParams], seed0: int = 0
) -> torch.Tensor:
    """Each row in its own slot; row i seeded seed0 + i unless its params carry a seed."""
    B = logits.shape[0]
    per_row = params if isinstance(params, list) else [params] * B
    sampler = Sampler(B, logits.shape[1])
    for i, p in enumerate(per_row):
        sampler.assign(i, p if p.seed is not None else dataclasses.replace(p, seed=seed0 + i), [])
    return sampler(logits, torch.arange(B), range(B))


def _support(logits_row: torch.Tensor, params: SamplingParams, draws: int = 4000) -> set[int]:
    """Tokens drawn at least once from one row's distribution (the row repeated)."""
    return set(_sample(logits_row.expand(draws, -1), params).tolist())


def test_greedy_is_argmax() -> None:
    logits = _logits()
    ids = _sample(logits, SamplingParams(temperature=0))
    assert ids.shape == (4,)
    assert torch.equal(ids, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_is_greedy(temperature: float) -> None:
    logits = _logits(batch=64, seed=1)
    params = SamplingParams(temperature=temperature, top_k=1)
    for seed in range(5):
        assert torch.equal(_sample(logits, params, seed0=100 * seed), logits.argmax(-1))


def test_seed_reproducible_and_seeds_differ() -> None:
    logits = _logits(batch=256)
    params = SamplingParams(temperature=1.0)
    first, again = _sample(logits, params, 123), _sample(logits, params, 123)
    assert torch.equal(first, again)
    assert not torch.equal(first, _sample(logits, params, 124))
    # Unseeded requests get fresh random seeds: two batches should not agree on 256 draws.
    a, b = Sampler(256, VOCAB), Sampler(256, VOCAB)
    for i in range(256):
        a.assign(i, params, []), b.assign(i, params, [])
    rows = torch.arange(256)
    assert not torch.equal(a(logits, rows, range(256)), b(logits, rows, range(256)))


def test_a_seeded_row_draws_the_same_wherever_it_sits_in_the_batch() -> None:
    row = _logits(batch=1, seed=5)
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    alone = _sample(row, mine)
    others = [SamplingParams(temperature=t, top_k=k) for t, k in ((0.0, 0), (2.0, 3), (0.7, 0))]
    for position in range(4):
        params = [*others[:position], mine, *others[position:]]
        batch = torch.cat([_logits(position, seed=9), row, _logits(3 - position, seed=8)])
        assert _sample(batch, params)[position] == alone[0]


def test_mixed_parameters_in_one_batch_equal_each_row_alone() -> None:
    logits = _logits(batch=6, seed=4)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=3, seed=1),
        SamplingParams(temperature=0.5, top_p=0.5, seed=2),
        SamplingParams(temperature=1.2, min_p=0.2, seed=3),
        SamplingParams(temperature=1.0, seed=4),
        SamplingParams(temperature=0.0, top_k=5),
    ]
    together = _sample(logits, params)
    for i, p in enumerate(params):
        assert together[i] == _sample(logits[i : i + 1], p)[0]


def test_top_k_restricts_support_to_k_most_likely() -> None:
    row = _logits(batch=1, seed=2)
    top5 = set(torch.topk(row[0], 5).indices.tolist())
    # High temperature flattens the distribution so every kept token is actually drawn.
    assert _support(row, SamplingParams(temperature=50.0, top_k=5)) == top5


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert _support(logits, SamplingParams(temperature=1.0, top_p=0.8)) == {0, 1}
    assert _support(logits, SamplingParams(temperature=1.0, top_p=0.81)) == {0, 1, 2}
    assert _support(logits, SamplingParams(temperature=1.0, top_p=0.1)) == {0}
    assert _support(logits, SamplingParams(temperature=1.0, top_p=1.0)) == {0, 1, 2, 3}


def test_min_p_drops_tokens_below_a_fraction_of_the_top_one() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert _support(logits, SamplingParams(temperature=1.0, min_p=0.5)) == {0, 1}  # >= 0.25
    assert _support(logits, SamplingParams(temperature=1.0, min_p=0.2)) == {0, 1, 2}  # >= 0.1


def test_filter_logits_renormalises_top_p_mass_per_row() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(2, -1)
    kept = torch.softmax(
        filter_logits(logits, torch.tensor([0, 1]), torch.tensor([0.8, 1.0]), torch.zeros(2)),
        dim=-1,
    )
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0, 0], [1.0, 0, 0, 0]]))


def test_penalties_follow_their_definitions() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[0, 0, 3, 1]], dtype=torch.int32)
    seen = torch.tensor([[True, True, True, False]])  # token 0 and 1 only in the prompt
    out = apply_penalties(
        logits, counts, seen, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25])
    )
    # repetition: 2 / 2, -2 * 2, 1 / 2; presence once per output token; frequency per count.
    want = torch.tensor([[1.0, -4.0, 0.5 - 0.5 - 0.75, 0.5 - 0.5 - 0.25]])
    torch.testing.assert_close(out, want)


def test_frequency_penalty_steers_greedy_decoding_away_from_repeats() -> None:
    sampler = Sampler(2, 3)
    sampler.assign(0, SamplingParams(temperature=0), [])
    sampler.assign(1, SamplingParams(temperature=0, frequency_penalty=2.0), [])
    logits, rows = torch.tensor([[3.0, 2.0, 0.0]]).expand(2, -1), torch.arange(2)
    picks = []
    for _ in range(3):
        token = sampler(logits, rows, [0, 1])
        sampler.record(token, rows, [0, 1])
        picks.append(token.tolist())
    assert [p[0] for p in picks] == [0, 0, 0]
    assert [p[1] for p in picks] == [0, 1, 0]  # [3, 2, 0] -> [1, 2, 0] -> [1, 0, 0]


def test_empirical_frequencies_match_softmax() -> None:
    row = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = 40_000
    ids = _sample(row.expand(draws, -1), SamplingParams(temperature=1.0), seed0=7)
    freq = torch.bincount(ids, minlength=4).float() / draws
    torch.testing.assert_close(freq, torch.softmax(row[0], -1), atol=0.01, rtol=0)


def test_noise_is_exponential_and_varies_by_step_and_seed() -> None:
    noise = exponential_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 20_000)
    assert (noise > 0).all()
    torch.testing.assert_close(noise.mean(1), torch.ones(3), atol=0.03, rtol=0)
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(noise[0], exponential_noise(torch.tensor([1]), torch.tensor([0]), 20_000)[0])


def test_temperature_sharpens() -> None:
    row = _logits(batch=1, seed=3)
    draws = 4000
    cold = _sample(row.expand(draws, -1), SamplingParams(temperature=0.05), seed0=1)
    hot = _sample(row.expand(draws, -1), SamplingParams(temperature=1.0), seed0=1)
    argmax = int(row.argmax())
    assert (cold == argmax).float().mean() > 0.99
    assert (hot == argmax).float().mean() < (cold == argmax).float().mean()


def test_token_logprobs_are_raw_log_softmax() -> None:
    logits = _logits()
    ids = torch.tensor([0, 1, 2, 3])
    expected = torch.log_softmax(logits, -1)[torch.arange(4), ids]
    torch.testing.assert_close(token_logprobs(logits, ids), expected)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"seed": -3}, "seed"),
        ({"logit_bias": {3: 100.5}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logit_bias": {3: float("nan")}}, "logit_bias"),
        ({"logit_bias": {3: "5"}}, "logit_bias"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.5])
def test_logit_bias_minus_100_bans_and_plus_100_forces(temperature: float) -> None:
    logits = _logits(batch=512, seed=3)
    top = logits.argmax(-1)
    # Banned: each row's own most likely token (a row-local bias, one slot per row).
    banned = [SamplingParams(temperature, logit_bias={int(t): -100}) for t in top]
    assert not (_sample(logits, banned) == top).any()
    # Forced: the token every row finds least likely, however unlikely.
    least = int(logits.sum(0).argmin())
    forced = _sample(logits, SamplingParams(temperature, logit_bias={least: 100}))
    assert forced.tolist() == [least] * 512
    if temperature:  # unbiased, the same rows draw it (almost) never
        assert (_sample(logits, SamplingParams(temperature)) == least).float().mean() < 0.05


def test_logit_bias_is_per_row_and_cleared_with_the_slot() -> None:
    logits = _logits(batch=2, seed=4)
    greedy = logits.argmax(-1)
    sampler = Sampler(2, VOCAB)
    sampler.assign(0, SamplingParams(0, logit_bias={"7": 100}), [])  # a JSON key: a string
    sampler.assign(1, SamplingParams(0), [])
    assert sampler(logits, torch.arange(2), [0, 1]).tolist() == [7, int(greedy[1])]
    sampler.release(0)
    sampler.assign(0, SamplingParams(0), [])  # the slot's next request has no bias
    assert torch.equal(sampler(logits, torch.arange(2), [0, 1]), greedy)
    b = SamplingParams(1.0, logit_bias={5: 1.0}, seed=0)
    assert b.logit_bias == {5: 1.0} and b.biased
    with pytest.raises(ValueError, match=r"^logit_bias: token 50 is outside the vocabulary"):
        sampler.assign(1, SamplingParams(0, logit_bias={VOCAB: 1}), [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for sync detection")
def test_sampling_does_not_sync_with_host_on_cuda() -> None:
    logits = _logits(batch=8).cuda()
    sampler = Sampler(8, VOCAB, "cuda")
    for i in range(8):
        bias = {i: 5.0} if i % 2 else {}  # biased and unbiased rows in one step
        sampler.assign(i, SamplingParams(0.7, top_k=20, top_p=0.9, seed=i, logit_bias=bias), [1])
    rows = torch.arange(8, device="cuda")
    sampler(logits, rows, range(8))  # warm up lazy CUDA init outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids = sampler(logits, rows, range(8))
        sampler.record(ids, rows, range(8))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids.device.type == "cuda"
