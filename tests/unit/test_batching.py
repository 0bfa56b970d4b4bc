"""Continuous batching over KV-cache slots: every request's tokens equal the same request
run alone, whatever arrives, leaves or is cancelled around it."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from tests.support import shrink
from torch.utils._python_dispatch import TorchDispatchMode

from llm.config import ModelConfig
from llm.core.kv_cache import KVCache
from llm.inference import BatchGenerator, Request, SamplingParams, generate
from llm.inference.batching import FewRowLinears
from llm.models.decoder import DecoderModel

PRESETS = ["tiny", "tiny-moe", "deepseek-v2-lite", "bloom", "mistral"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(preset: str) -> DecoderModel:
    torch.manual_seed(0)
    # Larger init than the default so the random model's logits are far from uniform.
    overrides = {} if preset.startswith("tiny") else shrink(preset)
    config = ModelConfig.from_preset(preset, **{**overrides, "max_seq_len": 96, "init_std": 0.2})
    return DecoderModel(config).eval()


def _requests(vocab: int, n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        params = (
            SamplingParams(temperature=0)
            if i % 3 == 0
            else SamplingParams(temperature=rng.choice([0.7, 1.0]), top_k=rng.choice([0, 5]),
                                top_p=rng.choice([1.0, 0.9]), seed=1000 + i)
        )  # fmt: skip
        stop = frozenset({rng.randrange(vocab)}) if i % 4 == 1 else frozenset()
        out.append(
            Request(prompt, params, rng.randint(1, 20), stop, logprobs=True, top_logprobs=i % 3)
        )
    return out


def _clone(r: Request) -> Request:
    return Request(r.prompt_ids, r.sampling, r.max_new_tokens, r.stop_token_ids, r.logprobs,
                   r.top_logprobs)  # fmt: skip


def _assert_same(got: list[tuple], want: list[tuple]) -> None:
    """Same tokens, finish and alternatives; logprobs equal up to float rounding (a decode
    step's batch width changes the GEMM's blocking, not the argmax)."""
    assert [(t, [i for i, _ in top], f) for t, _, top, f in got] == [
        (t, [i for i, _ in top], f) for t, _, top, f in want
    ]
    for (_, lp, top, _), (_, lp_want, top_want, _) in zip(got, want, strict=True):
        assert lp == pytest.approx(lp_want, abs=1e-5)
        assert [v for _, v in top] == pytest.approx([v for _, v in top_want], abs=1e-5)


def _run_alone(model: DecoderModel, request: Request, **kw: object) -> list[tuple]:
    batch = BatchGenerator(model, n_slots=4, **kw)
    batch.add(request)
    out = []
    while batch.active:
        out += [(e.token_id, e.logprob, e.top, e.finish_reason) for e in batch.step()]
    return out


def _run_together(model: DecoderModel, requests: list[Request], seed: int, **kw: object) -> dict:
    """Requests arrive at random steps into 4 slots; returns each one's events."""
    rng = random.Random(seed)
    batch = BatchGenerator(model, n_slots=4, **kw)
    waiting, out = list(requests), {id(r): [] for r in requests}
    while waiting or batch.active:
        while waiting and batch.free_slots and rng.random() < 0.5:
            batch.add(waiting.pop(0))
        for e in batch.step():
            out[id(e.request)].append((e.token_id, e.logprob, e.top, e.finish_reason))
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_batched_equals_alone(preset: str) -> None:
    model = _model(preset)
    requests = _requests(model.config.vocab_size, 10, seed=1)
    together = _run_together(model, requests, seed=2, prefill_chunk=7)
    for r in requests:
        alone = _run_alone(model, _clone(r), prefill_chunk=7)
        _assert_same(together[id(r)], alone)
        assert alone[-1][3] in ("stop", "length") and all(e[3] is None for e in alone[:-1])
        assert len(alone) <= r.max_new_tokens


@pytest.mark.parametrize("preset", PRESETS)
def test_prefix_caching_gives_the_tokens_of_a_cold_run(preset: str) -> None:
    """Prompts sharing prefixes, arriving at random steps: the ones that reuse cached
    blocks (in place, or copied from a running request) generate what they generate
    alone with nothing cached."""
    model = _model(preset)
    rng = random.Random(5)
    vocab = model.config.vocab_size
    shared = [[rng.randrange(vocab) for _ in range(22)] for _ in range(2)]
    requests = []
    for i in range(10):
        prompt = shared[i % 2][: rng.randint(9, 22)] + [rng.randrange(vocab) for _ in range(i % 4)]
        params = SamplingParams(temperature=0) if i % 2 else SamplingParams(0.8, seed=i)
        requests.append(Request(prompt, params, rng.randint(3, 12), logprobs=True))
    together = _run_together(model, requests, seed=6, prefill_chunk=7, block_size=4)
    assert sum(r.cached for r in requests) >= 40  # the cache did serve prefixes
    for r in requests:
        alone = _run_alone(model, _clone(r), prefill_chunk=7, prefix_caching=False)
        _assert_same(together[id(r)], alone)


@pytest.mark.parametrize("preset", ["tiny", "deepseek-v2-lite"])
def test_a_burst_of_prompts_sharing_a_prefix_computes_it_once(preset: str) -> None:
    """Prompts that share a long prefix, all admitted at once: the later ones wait for the
    first to compute it and copy it (while a request in a higher slot decodes over their
    idle rows), and each generates what it generates alone with nothing cached."""
    model = _model(preset)
    rng = random.Random(7)
    vocab = model.config.vocab_size
    shared = [rng.randrange(vocab) for _ in range(40)]
    requests = [
        Request(shared + [rng.randrange(vocab) for _ in range(3)], SamplingParams(0), 6,
                logprobs=True)
        for _ in range(3)
    ]  # fmt: skip
    early = Request([rng.randrange(vocab) for _ in range(5)], SamplingParams(0), 30)
    batch = BatchGenerator(model, n_slots=4, prefill_chunk=16, block_size=4)
    for r in requests:
        batch.add(r)
    batch.add(early)  # slot 3: its decode steps span the waiting slots' rows
    out = {id(r): [] for r in requests}
    while batch.active:
        for e in batch.step():
            if id(e.request) in out:
                out[id(e.request)].append((e.token_id, e.logprob, e.top, e.finish_reason))
    assert [r.cached for r in requests] == [0, 40, 40]
    for r in requests:
        alone = _run_alone(model, _clone(r), prefill_chunk=16, prefix_caching=False)
        _assert_same(out[id(r)], alone)


def test_greedy_alone_equals_generate_and_logprobs_are_consistent() -> None:
    model = _model("tiny")
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    want = generate(model, prompt, max_new_tokens=12, sampling=SamplingParams(temperature=0))
    events = _run_alone(model, Request(prompt, SamplingParams(0), 12, top_logprobs=3))
    assert [e[0] for e in events] == want
    for token, logprob, top, _ in events:
        assert len(top) == 3 and top[0][0] == token  # greedy picks the most likely token
        assert logprob == pytest.approx(top[0][1])
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_chunked_prefill_matches_one_pass() -> None:
    model = _model("tiny")
    prompt = list(range(40))
    greedy = SamplingParams(temperature=0)
    one = _run_alone(model, Request(prompt, greedy, 10, logprobs=True), prefill_chunk=512)
    chunked = _run_alone(model, Request(prompt, greedy, 10, logprobs=True), prefill_chunk=6)
    assert [e[0] for e in one] == [e[0] for e in chunked]
    assert [e[1] for e in one] == pytest.approx([e[1] for e in chunked], abs=1e-4)


def test_cancel_frees_the_slot_and_others_are_unaffected() -> None:
    model = _model("tiny")
    keep, drop = _requests(model.config.vocab_size, 2, seed=3)
    keep.max_new_tokens, keep.stop_token_ids = 15, frozenset()
    batch = BatchGenerator(model, n_slots=2)
    batch.add(keep), batch.add(drop)
    events = batch.step() + batch.step()
    batch.cancel(drop)
    assert batch.active == 1 and batch.free_slots == 1
    cancelled_at = len(events)
    while batch.active:
        events += batch.step()
    assert not [e for e in events[cancelled_at:] if e.request is drop]
    kept = [(e.token_id, e.logprob, e.top, e.finish_reason) for e in events if e.request is keep]
    _assert_same(kept, _run_alone(model, _clone(keep)))


def test_a_prompt_that_fills_the_context_is_refused() -> None:
    model = _model("tiny")
    batch = BatchGenerator(model, n_slots=1)
    with pytest.raises(ValueError, match="prompt_ids"):
        batch.add(Request(list(range(96)), SamplingParams(0), 1))
    batch.add(Request(list(range(90)), SamplingParams(0), 50))  # capped to the 6 that fit
    events = []
    while batch.active:
        events += batch.step()
    assert len(events) == 6 and events[-1].finish_reason == "length"


@pytest.mark.parametrize("chunk", [4, 512])
def test_prompt_logprobs_equal_a_full_forward(chunk: int) -> None:
    model = _model("tiny")
    prompt = [7, 3, 9, 1, 22, 5, 5, 8, 13, 2, 40]
    with torch.no_grad():
        model.clear_cache()
        want = torch.log_softmax(model(torch.tensor([prompt]))[0, :-1], dim=-1)  # (P-1, V)
    batch = BatchGenerator(model, n_slots=2, prefill_chunk=chunk)
    scored = Request(prompt, SamplingParams(0), 0, prompt_logprobs=2)
    generating = Request(prompt, SamplingParams(0), 3, prompt_logprobs=0)
    batch.add(scored), batch.add(generating)
    events = []
    while batch.active:
        events += batch.step()
    (only,) = [e for e in events if e.request is scored]
    assert (only.token_id, only.finish_reason) == (-1, "length")
    first, *rest = [e for e in events if e.request is generating]
    assert len(rest) == 2 and all(e.prompt_logprobs is None for e in rest)
    for scores, k in ((only.prompt_logprobs, 2), (first.prompt_logprobs, 0)):
        assert [t for t, _, _ in scores] == prompt[1:]
        got = torch.tensor([lp for _, lp, _ in scores])
        torch.testing.assert_close(got, want.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0])
        for i, (_, _, top) in enumerate(scores):
            assert [t for t, _ in top] == want[i].topk(k).indices.tolist()


@pytest.mark.parametrize("preset", PRESETS)
def test_attending_over_a_cache_prefix_equals_the_whole_cache(preset: str) -> None:
    model = _model(preset)
    model.setup_cache(2, 96)
    prompt = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        model(prompt, torch.arange(10).expand(2, -1))
        step = torch.randint(0, model.config.vocab_size, (2, 1))
        pos = torch.tensor([[10], [7]])  # rows at different positions
        whole = model(step, pos)
        prefix = model(step, pos, kv_len=16)
    torch.testing.assert_close(prefix, whole, atol=1e-5, rtol=1e-5)
    model.clear_cache()


@pytest.mark.parametrize("rows", [1, 6, 128, 129])
@pytest.mark.parametrize("bias", [False, True])
def test_few_row_linears_equal_f_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(rows, 1, 48)  # (B, T, in), as a decode step's activations
    layer = torch.nn.Linear(48, 40, bias=bias)
    products: list[torch.Tensor] = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.mm.default:
                products.append(args[0])
            return func(*args, **(kwargs or {}))

    with Products(), FewRowLinears():
        got = layer(x)
    products = [p for p in products if p.shape == layer.weight.shape]
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias))
    # 2 to 128 rows ran as W @ x^T: an aten.mm whose first operand is the weight
    assert bool(products) == (2 <= rows <= 128)
    # and the result is row-major, as F.linear's: a transposed view made every op after
    # it slower (SDPA's CPU flash kernel refused such queries and fell back to its math path)
    assert got.is_contiguous()


def test_compiled_decode_writes_the_cache_in_place() -> None:
    """A compiled decode step writes its new entries into the cache in place and attends
    over a view of it: its code never loops over the cache (a `scatter_` into `cache[:B]`
    compiled into a copy of all B rows, at every layer of every step)."""
    from torch._inductor.utils import run_and_get_code

    cache = KVCache(batch_size=4, n_kv_heads=2, max_seq_len=1000, head_dim=8)
    k, v = torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8)
    pos = torch.tensor([[5], [0], [999]])
    step = torch.compile(lambda p, k, v: [t.sum(-1) for t in cache.update(p, k, v, kv_len=16)])
    with torch.no_grad():
        (keys, _), codes = run_and_get_code(step, pos, k, v)
    torch.testing.assert_close(cache.k_cache[torch.arange(3), :, pos[:, 0]], k[:, :, 0])
    torch.testing.assert_close(cache.v_cache[torch.arange(3), :, pos[:, 0]], v[:, :, 0])
    torch.testing.assert_close(keys, cache.k_cache[:3, :, :16].sum(-1))
    rows = 3 * 2 * 1000 * 8  # the elements of the cache's first 3 rows
    assert all(f"{rows}L" not in code and f"{4 * rows // 3}L" not in code for code in codes)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "deepseek-v2-lite", "bloom"])
def test_compiled_steps_equal_eager_and_compile_only_at_warmup(preset: str) -> None:
    """Compiled decode and prefill calls (dynamic shapes; frozen weights on the CPU) give
    the eager tokens, and traffic of every width, chunk length and cache length after
    `warmup` compiles nothing more (a compile mid-traffic stalls every stream for seconds)."""
    from torch._dynamo.utils import counters

    model = _model(preset)
    requests = _requests(model.config.vocab_size, 8, seed=3)
    requests[0].prompt_ids = requests[0].prompt_ids[:1]  # a one-token prompt
    requests[1].prompt_ids = list(range(80))  # attends over the whole cache (96)
    requests[1].max_new_tokens = 16
    torch._dynamo.reset()
    batch = BatchGenerator(model, n_slots=4, prefill_chunk=7, compile=True)
    batch.warmup()
    graphs = counters["stats"]["unique_graphs"]
    rng, waiting = random.Random(4), list(requests)
    compiled = {id(r): [] for r in requests}
    while waiting or batch.active:
        while waiting and batch.free_slots and rng.random() < 0.5:
            batch.add(waiting.pop(0))
        for e in batch.step():
            compiled[id(e.request)].append((e.token_id, e.logprob, e.top, e.finish_reason))
    assert counters["stats"]["unique_graphs"] == graphs
    eager = _run_together(model, [_clone(r) for r in requests], seed=4, prefill_chunk=7)
    for got, want in zip(compiled.values(), eager.values(), strict=True):
        _assert_same(got, want)
    torch._dynamo.reset()


@pytest.mark.slow
def test_a_model_that_cannot_compile_runs_eager(caplog: pytest.LogCaptureFixture) -> None:
    """No working C++ compiler (a slim image): warmup warns and the runner serves eager."""
    model = _model("tiny")
    requests = _requests(model.config.vocab_size, 3, seed=5)
    torch._dynamo.reset()
    batch = BatchGenerator(model, n_slots=4, prefill_chunk=7, compile=True)
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        batch.warmup()
    torch._dynamo.reset()
    assert not batch.runner.compiled
    assert "compile failed, running eager" in caplog.text
    got = {id(r): [] for r in requests}
    waiting = list(requests)
    while waiting or batch.active:
        while waiting and batch.free_slots:
            batch.add(waiting.pop(0))
        for e in batch.step():
            got[id(e.request)].append((e.token_id, e.logprob, e.top, e.finish_reason))
    for r in requests:
        _assert_same(got[id(r)], _run_alone(model, _clone(r), prefill_chunk=7))


def test_prefill_rows_are_cut_to_waste_little_padding() -> None:
    from llm.inference.runner import piece_length

    assert piece_length([512, 32, 32]) == 64  # 10 rows, 11% padding, not 3 rows of 512
    assert piece_length([512], least_rows=2) == 256  # two halves, not a padding row
    assert piece_length([511], least_rows=2) == 256
    assert piece_length([128] * 8) == 128
    assert piece_length([100, 90, 80]) == 100  # 11% padding: within the 12.5% budget
    assert piece_length([300, 40]) == 75  # 4 rows + 1 row: 10%
    assert piece_length([1, 1], least_rows=2) == 2  # a compiled call has 2 tokens a row


def test_narrow_decode_steps_run_at_the_fastest_wider_width(monkeypatch) -> None:
    """On the CPU, warmup times decode steps of 1.. rows, and a step narrower than a
    faster one runs at that width (extra rows are idle slots): the tokens stay those of
    the request alone, and the slots' positions are what they were before the timing."""
    import llm.inference.runner as runner_module

    model = _model("tiny")
    batch = BatchGenerator(model, n_slots=8, prefill_chunk=7)
    runner = batch.runner
    runner.pos[:] = torch.arange(9)[:, None]  # positions idle rows would write at
    clock = [0.0]
    cost = {1: 3.0, 2: 2.0, 3: 1.0, 4: 1.02, 5: 1.5, 6: 1.6}  # seconds per width: 3 wins
    monkeypatch.setattr(runner_module.time, "perf_counter", lambda: clock[0])
    decode, widths = runner._decode, []

    def timed(tokens: torch.Tensor, *args: object) -> torch.Tensor:
        clock[0] += cost.get(tokens.shape[0], 0.0) / 1000
        widths.append(tokens.shape[0])
        return decode(tokens, *args)

    runner._decode = timed
    batch.warmup()
    monkeypatch.undo()
    assert runner.decode_width == {1: 3, 2: 3, 3: 3, 4: 4, 5: 5, 6: 6}  # 4 is within 5% of 3
    assert runner.pos[:, 0].tolist() == list(range(9))

    request = Request([3, 1, 4, 1, 5], SamplingParams(temperature=0), 8, logprobs=True)
    widths.clear()
    got = []
    batch.add(request)
    while batch.active:
        got += [(e.token_id, e.logprob, e.top, e.finish_reason) for e in batch.step()]
    assert widths and set(widths) == {3}
    want = _run_alone(model, Request([3, 1, 4, 1, 5], SamplingParams(temperature=0), 8,
                                     logprobs=True))  # fmt: skip
    _assert_same(got, want)
