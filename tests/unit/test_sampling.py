"""Sampling: greedy, temperature, top-k, top-p and seeded reproducibility."""

from __future__ import annotations

import pytest
import torch

from llm.inference import SamplingParams, filter_logits, make_generator, sample, token_logprobs

VOCAB = 50


def _logits(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _support(logits_row: torch.Tensor, params: SamplingParams, draws: int = 4000) -> set[int]:
    """Tokens drawn at least once from one row's distribution (the row repeated)."""
    ids = sample(logits_row.expand(draws, -1), params, make_generator(0))
    return set(ids.tolist())


def test_greedy_is_argmax() -> None:
    logits = _logits()
    ids = sample(logits, SamplingParams(temperature=0))
    assert ids.shape == (4,)
    assert torch.equal(ids, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_is_greedy(temperature: float) -> None:
    logits = _logits(batch=64, seed=1)
    params = SamplingParams(temperature=temperature, top_k=1)
    for seed in range(5):
        assert torch.equal(sample(logits, params, make_generator(seed)), logits.argmax(-1))


def test_seed_reproducible_and_seeds_differ() -> None:
    logits = _logits(batch=256)
    params = SamplingParams(temperature=1.0)
    first = sample(logits, params, make_generator(123))
    again = sample(logits, params, make_generator(123))
    other = sample(logits, params, make_generator(124))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Unseeded generators take fresh entropy: two of them should not agree on 256 draws.
    assert not torch.equal(
        sample(logits, params, make_generator(None)), sample(logits, params, make_generator(None))
    )


def test_top_k_restricts_support_to_k_most_likely() -> None:
    row = _logits(batch=1, seed=2)
    top5 = set(torch.topk(row[0], 5).indices.tolist())
    # High temperature flattens the distribution so every kept token is actually drawn.
    assert _support(row, SamplingParams(temperature=50.0, top_k=5)) == top5


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert _support(logits, SamplingParams(temperature=1.0, top_p=0.8)) == {0, 1}
    assert _support(logits, SamplingParams(temperature=1.0, top_p=0.81)) == {0, 1, 2}
    assert _support(logits, SamplingParams(temperature=1.0, top_p=0.1)) == {0}
    assert _support(logits, SamplingParams(temperature=1.0, top_p=1.0)) == {0, 1, 2, 3}


def test_filter_logits_renormalises_top_p_mass() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.softmax(filter_logits(logits, SamplingParams(top_p=0.8)), dim=-1)
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_empirical_frequencies_match_softmax() -> None:
    row = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = 40_000
    ids = sample(row.expand(draws, -1), SamplingParams(temperature=1.0), make_generator(7))
    freq = torch.bincount(ids, minlength=4).float() / draws
    torch.testing.assert_close(freq, torch.softmax(row[0], -1), atol=0.01, rtol=0)


def test_temperature_sharpens() -> None:
    row = _logits(batch=1, seed=3)
    draws = 4000
    cold = sample(row.expand(draws, -1), SamplingParams(temperature=0.05), make_generator(1))
    hot = sample(row.expand(draws, -1), SamplingParams(temperature=1.0), make_generator(1))
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
        ({"seed": -3}, "seed"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for sync detection")
def test_sample_does_not_sync_with_host_on_cuda() -> None:
    logits = _logits(batch=8).cuda()
    generator = make_generator(0, "cuda")
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9)
    sample(logits, params, generator)  # warm up lazy CUDA init outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids = sample(logits, params, generator)
        greedy = sample(logits, SamplingParams(temperature=0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids.device.type == "cuda"
    assert torch.equal(greedy.cpu(), logits.argmax(-1).cpu())
