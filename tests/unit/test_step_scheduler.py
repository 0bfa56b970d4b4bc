"""The step scheduler's policy and the prefix cache, without a model: which chunks, which
decodes and which cached prefixes a step plans."""

from __future__ import annotations

import pytest

from llm.inference import Request, SamplingParams
from llm.inference.prefix_cache import PrefixCache
from llm.inference.scheduler import CacheCopy, PrefillChunk, SchedulerOutput, StepScheduler

GREEDY = SamplingParams(temperature=0)


def _request(prompt: list[int], max_new: int = 4, **kw: object) -> Request:
    return Request(list(prompt), GREEDY, max_new, **kw)


def _run_step(s: StepScheduler, token: int = 7) -> list[tuple[Request, str | None]]:
    """Plan a step and play the runner: every finished prompt and every decode samples
    `token`."""
    plan = s.schedule()
    for chunk in plan.prefills:
        s.prefilled(chunk)
    done = [c.request for c in plan.prefills if c.last and c.request.max_new_tokens]
    return [(r, s.sampled(r, token)) for r in [*done, *plan.decodes]]


def _chunks(plan_prefills: list[PrefillChunk]) -> list[tuple[int, int, int]]:
    return [(c.request.slot, c.start, c.length) for c in plan_prefills]


def test_several_prompts_share_a_step_under_the_token_budget() -> None:
    s = StepScheduler(n_slots=4, max_seq_len=64, prefill_chunk=25, prefix_caching=False)
    a, b, c = (_request(range(i * 10, i * 10 + 10)) for i in range(3))
    for r in (a, b, c):
        s.add(r)
    plan = s.schedule()
    assert _chunks(plan.prefills) == [(0, 0, 10), (1, 0, 10), (2, 0, 5)] and not plan.decodes
    for chunk in plan.prefills:
        s.prefilled(chunk)
    assert not plan.prefills[2].last and plan.prefills[0].last
    s.sampled(a, 1), s.sampled(b, 1)
    plan = s.schedule()
    # The rest of c's prompt, and a and b decode (in slot order).
    assert _chunks(plan.prefills) == [(2, 5, 5)] and plan.decodes == [a, b]


def test_requests_finish_on_a_stop_token_or_their_length_and_free_their_slot() -> None:
    s = StepScheduler(n_slots=2, max_seq_len=64, prefix_caching=False)
    stops = _request([1, 2, 3], max_new=10, stop_token_ids=frozenset({9}))
    short = _request([4, 5], max_new=2)
    s.add(stops), s.add(short)
    assert s.free_slots == 0
    assert [reason for _, reason in _run_step(s, token=1)] == [None, None]
    assert _run_step(s, token=9) == [(stops, "stop"), (short, "length")]
    assert s.free_slots == 2 and stops.slot == short.slot == -1
    assert not s.schedule()


def test_a_stop_token_ends_a_request_only_after_min_tokens() -> None:
    s = StepScheduler(n_slots=1, max_seq_len=64, prefix_caching=False)
    r = _request([1, 2, 3], max_new=10, stop_token_ids=frozenset({9}), min_tokens=2)
    s.add(r)
    assert [reason for _, reason in _run_step(s, token=9)] == [None]  # 1st token
    assert [reason for _, reason in _run_step(s, token=9)] == [None]  # 2nd
    assert _run_step(s, token=9) == [(r, "stop")]


def test_a_prompt_only_scored_ends_after_its_prefill() -> None:
    s = StepScheduler(n_slots=1, max_seq_len=64)
    scored = _request(range(20), max_new=0, prompt_logprobs=0)
    s.add(scored)
    assert _run_step(s) == [] and s.free_slots == 1


def test_a_prompt_too_long_for_the_context_is_refused_and_max_new_tokens_capped() -> None:
    s = StepScheduler(n_slots=1, max_seq_len=32)
    with pytest.raises(ValueError, match="prompt_ids"):
        s.add(_request(range(32)))
    r = _request(range(30), max_new=50)
    s.add(r)
    assert r.max_new_tokens == 2


def test_cancel_frees_a_prefilling_or_decoding_slot() -> None:
    s = StepScheduler(n_slots=2, max_seq_len=64, prefill_chunk=4, prefix_caching=False)
    a, b = _request(range(10)), _request(range(3))
    s.add(a), s.add(b)
    _run_step(s)  # a: 4 of 10 prompt tokens; b waits for budget
    s.cancel(a)
    plan = s.schedule()
    assert [c.request for c in plan.prefills] == [b] and s.free_slots == 1


# -- prefix caching -------------------------------------------------------------------------

PROMPT = list(range(100, 140))  # 40 tokens: two full blocks of 16, and 8 more


def test_a_finished_requests_slot_is_reused_in_place_by_a_prompt_sharing_its_blocks() -> None:
    s = StepScheduler(n_slots=4, max_seq_len=128, block_size=16)
    first = _request(PROMPT, max_new=1)
    s.add(first)
    slot = first.slot
    _run_step(s)
    assert s.free_slots == 4
    second = _request([*PROMPT[:32], 1, 2, 3])
    s.add(second)
    # Both full blocks, in place: no copy, and the prefill starts at position 32.
    assert (second.slot, second.cached, second.prefilled) == (slot, 32, 32)
    plan = s.schedule()
    assert not plan.copies and _chunks(plan.prefills) == [(slot, 32, 3)]


def test_a_running_requests_prefix_is_copied_into_a_new_slot() -> None:
    s = StepScheduler(n_slots=4, max_seq_len=128, block_size=16)
    running = _request(PROMPT, max_new=50)
    s.add(running)
    _run_step(s)
    newcomer = _request(PROMPT[:20])
    s.add(newcomer)
    assert newcomer.slot != running.slot and newcomer.cached == 16
    plan = s.schedule()
    assert plan.copies == [CacheCopy(running.slot, newcomer.slot, 16)]
    assert _chunks(plan.prefills) == [(newcomer.slot, 16, 4)]
    assert s.schedule().copies == []  # copied once


def test_the_last_prompt_token_is_always_computed() -> None:
    s = StepScheduler(n_slots=2, max_seq_len=128, block_size=16)
    a = _request(PROMPT[:32], max_new=1)
    s.add(a)
    _run_step(s)
    b = _request(PROMPT[:32])  # the very same prompt: 2 blocks cached, 1 reusable
    s.add(b)
    assert b.cached == 16 and _chunks(s.schedule().prefills) == [(b.slot, 16, 16)]


def test_generated_tokens_are_cached_too() -> None:
    """A multi-turn chat's next prompt holds the previous answer."""
    s = StepScheduler(n_slots=2, max_seq_len=128, block_size=16)
    turn = _request(PROMPT[:30], max_new=10)
    s.add(turn)
    while turn.slot >= 0:
        _run_step(s, token=5)
    history = PROMPT[:30] + [5] * 10  # 39 tokens computed, the last answer token is not
    follow_up = _request([*history, 1, 2, 3])
    s.add(follow_up)
    assert follow_up.cached == 32


def test_scored_prompts_reuse_nothing_but_their_blocks_are_cached() -> None:
    s = StepScheduler(n_slots=2, max_seq_len=128, block_size=16)
    warm = _request(PROMPT, max_new=1)
    s.add(warm)
    _run_step(s)
    scored = _request(PROMPT, max_new=0, prompt_logprobs=1)
    s.add(scored)
    assert scored.cached == 0
    _run_step(s)
    later = _request(PROMPT)
    s.add(later)
    assert later.cached == 32


def test_eviction_takes_the_least_recently_used_free_slot_below_the_batch_width() -> None:
    s = StepScheduler(n_slots=5, max_seq_len=128, block_size=16)
    prompts = [[k] * 20 for k in (1, 2, 3)]
    firsts = [_request(p, max_new=1) for p in prompts]
    long = _request([4] * 20, max_new=100)
    for r in (*firsts, long):
        s.add(r)
    assert [r.slot for r in (*firsts, long)] == [0, 1, 2, 3]  # lowest free first
    _run_step(s)  # the three short ones end; each slot keeps one block of its prompt
    for p in (prompts[0], prompts[2]):  # use slots 0 and 2 again, in place
        r = _request(p, max_new=1)
        s.add(r)
        assert r.cached == 16 and r.slot == prompts.index(p)
        _run_step(s)
    fresh = _request([9] * 20, max_new=1)
    s.add(fresh)
    # Slot 1 was used least recently among the free slots below the busy width (4): slot
    # 4, never used, would widen every decode step.
    assert fresh.slot == 1 and fresh.cached == 0
    _run_step(s)
    again = _request(prompts[1])
    s.add(again)
    assert again.cached == 0  # its block was evicted (and now slot 0's, the next LRU)...
    kept = _request(prompts[2])
    s.add(kept)
    assert kept.cached == 16  # ...slot 2's is still there


def test_eviction_spares_the_only_copy_of_a_prefix() -> None:
    s = StepScheduler(n_slots=4, max_seq_len=128, block_size=16)
    shared, other = [5] * 20, [6] * 20
    reqs = [
        _request(p, max_new=n) for p, n in ((shared, 1), (other, 1), (other, 50), ([7] * 20, 50))
    ]
    for r in reqs:
        s.add(r)
    assert [r.slot for r in reqs] == [0, 1, 2, 3]
    _run_step(s)  # slots 0 and 1 are free again; slot 2 waited for `other`'s block...
    _run_step(s)  # ...and holds it too now, copied
    fresh = _request([9] * 20, max_new=1)
    s.add(fresh)
    assert fresh.slot == 1  # not slot 0, the least recently used: its block is the only copy
    again = _request(shared)
    s.add(again)
    assert again.cached == 16 and again.slot == 0


def test_with_every_slot_free_eviction_still_spares_the_only_copy_of_a_prefix() -> None:
    # A burst of requests that all ended in one step: no slot is busy, and each free slot
    # loses something. The lowest (slot 0) holds the only copy of a 4-block prefix; slots
    # 1 and 2 share theirs and lose one block of their own each.
    s = StepScheduler(n_slots=3, max_seq_len=256, block_size=16)
    a, b = [5] * 64, [6] * 64
    reqs = [_request(a + [1] * 20, max_new=1), _request(b + [2] * 20, max_new=1)]
    reqs.append(_request(b + [3] * 20, max_new=1))
    for r in reqs:
        s.add(r)
    while s.active:
        _run_step(s)
    fresh = _request([9] * 20, max_new=1)
    s.add(fresh)
    assert fresh.slot == 1  # one block lost and no wider than slot 0 by more than one
    again = _request(a + [7] * 20)
    s.add(again)
    assert again.cached == 64 and again.slot == 0


def test_disabled_prefix_caching_reuses_nothing() -> None:
    s = StepScheduler(n_slots=2, max_seq_len=128, block_size=16, prefix_caching=False)
    for _ in range(2):
        r = _request(PROMPT, max_new=1)
        s.add(r)
        assert r.cached == 0
        _run_step(s)


def test_the_trie_forgets_blocks_no_slot_holds() -> None:
    cache = PrefixCache(n_slots=1, block_size=2)
    placement = cache.admit([1, 2, 3, 4, 5], free=[0], busy_width=0)
    cache.assign(placement, [1, 2, 3, 4, 5])
    cache.extend(0, [1, 2, 3, 4, 5], 5)
    assert cache.admit([1, 2, 3, 4, 9], free=[0], busy_width=0).cached == 4
    other = cache.admit([7, 7, 7], free=[0], busy_width=0)
    cache.assign(other, [7, 7, 7])  # slot 0 is overwritten from position 0
    assert cache.admit([1, 2, 3, 4, 9], free=[0], busy_width=0).cached == 0
    assert not cache._root(0).children  # nothing is left of the old blocks


def test_a_prompt_admitted_beside_one_computing_its_prefix_waits_and_copies_it() -> None:
    """A burst of prompts sharing a long prefix computes it once: a later prompt waits
    while an older one computes the shared blocks, then gets them as a copy and computes
    only its suffix. A short shared part (under half of what is left) is not waited for."""
    s = StepScheduler(n_slots=4, max_seq_len=256, prefill_chunk=64, block_size=16)
    doc = list(range(100, 196))  # 96 tokens: 6 blocks
    first, second = _request([*doc, 1, 2, 3]), _request([*doc, 4, 5])
    other = _request(doc[:16] + list(range(300, 360)))  # shares 1 block of 75 tokens
    for r in (first, second, other):
        s.add(r)
    plan = s.schedule()  # the budget goes to `first`, then `other`; `second` waits
    assert _chunks(plan.prefills) == [(first.slot, 0, 64)]
    _run_step_of(s, plan)
    # first's 35 left; `other` copies its one computed block and goes on; `second` still
    # waits (blocks 5 and 6 are not computed yet).
    plan = s.schedule()
    assert plan.copies == [CacheCopy(first.slot, other.slot, 16)]
    assert _chunks(plan.prefills) == [(first.slot, 64, 35), (other.slot, 16, 29)]
    _run_step_of(s, plan)
    plan = s.schedule()
    assert plan.copies == [CacheCopy(first.slot, second.slot, 96)]
    assert second.cached == second.prefilled == 96
    assert _chunks(plan.prefills) == [(second.slot, 96, 2), (other.slot, 45, 31)]


def _run_step_of(s: StepScheduler, plan: SchedulerOutput) -> None:
    for chunk in plan.prefills:
        s.prefilled(chunk)
    for chunk in plan.prefills:
        if chunk.last:
            s.sampled(chunk.request, 7)
    for r in plan.decodes:
        s.sampled(r, 7)
