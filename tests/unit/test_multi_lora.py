"""Several LoRA adapters in one batch: each row gets the greedy tokens of the model with its
adapter merged, run alone; ranks differ; prefixes are cached per adapter; an unload drains
the requests running with the adapter; loading after compiling compiles nothing again."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from llm.config import ModelConfig
from llm.core.lora import apply_lora, unload_lora
from llm.core.multi_lora import MultiLoRALinear
from llm.inference import BatchGenerator, Request, SamplingParams, generate
from llm.inference.adapters import AdapterSet
from llm.interop.peft import load_with_adapter, save_adapter
from llm.models.decoder import DecoderModel

# Two adapters of different ranks and targets (q/v of the fused qkv_proj: a part-only update).
ADAPTERS = {"a": (["q_proj", "v_proj", "down_proj"], 2, 4.0), "b": (["all-linear"], 4, 8.0)}


def _base() -> DecoderModel:
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", max_seq_len=96, init_std=0.2)
    return DecoderModel(config).eval()


def _save_adapters(base: DecoderModel, root: Path) -> dict[str, Path]:
    out = {}
    for i, (name, (targets, r, alpha)) in enumerate(ADAPTERS.items()):
        model = copy.deepcopy(base)
        apply_lora(model, targets, r=r, alpha=alpha)
        torch.manual_seed(10 + i)
        for pname, p in model.named_parameters():
            if ".lora_B." in pname:
                torch.nn.init.normal_(p, std=0.3)  # a trained-looking adapter, not a no-op
        save_adapter(model, root / name)
        out[name] = root / name
    return out


def _merged(base: DecoderModel, adapter: Path | None) -> DecoderModel:
    model = copy.deepcopy(base)
    if adapter is not None:
        unload_lora(load_with_adapter(model, adapter))
    return model.eval()


def _greedy(prompt: list[int], adapter: int, n: int = 12) -> Request:
    return Request(prompt, SamplingParams(temperature=0), n, adapter=adapter)


def _run(batch: BatchGenerator, requests: list[Request]) -> list[list[int]]:
    for r in requests:
        batch.add(r)
    while batch.active:
        batch.step()
    return [r.output_ids for r in requests]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[DecoderModel, dict[str, Path]]:
    base = _base()
    return base, _save_adapters(base, tmp_path_factory.mktemp("adapters"))


def test_a_batch_mixing_adapters_gives_each_row_its_merged_models_tokens(
    served: tuple[DecoderModel, dict[str, Path]],
) -> None:
    base, dirs = served
    model = copy.deepcopy(base)
    adapters = AdapterSet(model, max_loras=3, max_rank=4)
    index = {name: adapters.load(name, path) for name, path in dirs.items()}
    assert {m.lora_A.shape[1] for m in adapters.layers.values()} == {4, 12}  # qkv: 3 parts
    prompts = [[5, 9, 2, 7, 1, 3, 8] * 3, [11, 4, 6], [2] * 40]
    kinds = [None, "a", "b"]
    # The same prompts under every adapter and the base, in one batch: rows of all three
    # kinds share each step (and the 40-token prompt's blocks are cached per adapter).
    requests = [_greedy(p, index[k] if k else 0) for p in prompts for k in kinds]
    batch = BatchGenerator(model, n_slots=9, prefill_chunk=64, block_size=8, adapters=adapters)
    got = _run(batch, requests)
    for (p, k), tokens in zip([(p, k) for p in prompts for k in kinds], got, strict=True):
        want = generate(_merged(base, dirs[k] if k else None), p, max_new_tokens=12,
                        sampling=SamplingParams(0), stop_token_ids=())  # fmt: skip
        assert tokens == want, (k, p)
    assert got[0] != got[1] != got[2]  # the adapters change the output
    # Again, the prompts now cached: each adapter reuses its own prefix only.
    again = [_greedy(p, index[k] if k else 0) for p in prompts for k in kinds]
    assert _run(batch, again) == got
    assert all(r.cached > 0 for r in again if len(r.prompt_ids) == 40)


def test_an_unloaded_index_taken_by_another_adapter_reuses_nothing_cached(
    served: tuple[DecoderModel, dict[str, Path]],
) -> None:
    base, dirs = served
    model = copy.deepcopy(base)
    adapters = AdapterSet(model, max_loras=1, max_rank=4)
    prompt = list(range(3, 40))
    batch = BatchGenerator(model, n_slots=2, block_size=8, adapters=adapters)
    a = adapters.load("a", dirs["a"])
    with pytest.raises(ValueError, match="1 adapters are loaded already"):
        adapters.load("b", dirs["b"])
    _run(batch, [_greedy(prompt, a)])
    batch.unload_adapter("a")
    b = adapters.load("b", dirs["b"])
    assert b == a  # the freed index
    request = _greedy(prompt, b)
    got = _run(batch, [request])
    assert request.cached == 0
    want = generate(_merged(base, dirs["b"]), prompt, max_new_tokens=12,
                    sampling=SamplingParams(0), stop_token_ids=())  # fmt: skip
    assert got == [want]
    assert adapters.names == ["b"] and adapters.paths == {"b": str(dirs["b"])}


def test_an_adapter_unloaded_while_a_request_runs_with_it_drains(
    served: tuple[DecoderModel, dict[str, Path]],
) -> None:
    """Unloading drains: the name goes at once, the running request keeps its adapter to
    its last token, and the index (weights, cached prefixes) is freed after it ends."""
    base, dirs = served
    model = copy.deepcopy(base)
    adapters = AdapterSet(model, max_loras=1, max_rank=4)
    batch = BatchGenerator(model, n_slots=2, block_size=8, adapters=adapters)
    prompt = list(range(3, 40))
    a = adapters.load("a", dirs["a"])
    request = _greedy(prompt, a, n=20)
    batch.add(request)
    for _ in range(3):
        batch.step()
    assert batch.unload_adapter("a") == 1  # still running with it
    with pytest.raises(KeyError):
        adapters.index("a")
    with pytest.raises(ValueError, match="1 adapters are loaded already"):
        adapters.load("b", dirs["b"])  # its index is still taken
    base_request = _greedy(prompt, 0, n=20)  # a request added meanwhile: the base's rows
    batch.add(base_request)
    while batch.active:
        batch.step()
    want = generate(_merged(base, dirs["a"]), prompt, max_new_tokens=20,
                    sampling=SamplingParams(0), stop_token_ids=())  # fmt: skip
    assert request.output_ids == want  # the adapter to the last token
    assert base_request.output_ids == generate(_merged(base, None), prompt, max_new_tokens=20,
                                               sampling=SamplingParams(0), stop_token_ids=())  # fmt: skip
    assert adapters.retired == set() and adapters.free_indices == [a]
    b = adapters.load("b", dirs["b"])  # into the freed index, nothing of "a" left in it
    again = _greedy(prompt, b)
    assert _run(batch, [again]) == [generate(_merged(base, dirs["b"]), prompt, max_new_tokens=12,
                                             sampling=SamplingParams(0), stop_token_ids=())]  # fmt: skip
    assert again.cached == 0
    assert batch.unload_adapter("b") == 0 and adapters.free_indices == [b]  # freed at once


def test_an_adapter_above_the_served_rank_is_refused(
    served: tuple[DecoderModel, dict[str, Path]],
) -> None:
    base, dirs = served
    adapters = AdapterSet(copy.deepcopy(base), max_loras=2, max_rank=2)
    with pytest.raises(ValueError, match="rank above the served maximum 2"):
        adapters.load("b", dirs["b"])
    assert adapters.names == []
    assert all(isinstance(m, MultiLoRALinear) for m in adapters.layers.values())
    assert not any("lm_head" in n for n in adapters.layers)


@pytest.mark.slow
def test_compiled_rows_of_other_adapters_compile_nothing_again(
    served: tuple[DecoderModel, dict[str, Path]],
) -> None:
    """The index tensor is an input of the compiled graphs, and a load after compiling is an
    in-place copy the graphs see: no recompiles, the merged models' tokens."""
    base, dirs = served
    model = copy.deepcopy(base)
    adapters = AdapterSet(model, max_loras=2, max_rank=4)
    torch._dynamo.reset()
    batch = BatchGenerator(model, n_slots=4, prefill_chunk=16, adapters=adapters, compile=True)
    batch.warmup()
    assert batch.runner.compiled
    graphs = counters["stats"]["unique_graphs"]
    index = {name: adapters.load(name, path) for name, path in dirs.items()}
    prompts = [[5, 9, 2, 7, 1], [11, 4, 6, 3, 3, 8, 1]]
    kinds = [None, "a", "b"]
    requests = [_greedy(p, index[k] if k else 0, n=8) for k in kinds for p in prompts[:1]]
    requests.append(_greedy(prompts[1], index["b"], n=8))
    got = _run(batch, requests)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
    for r, tokens in zip(requests, got, strict=True):
        name = {v: k for k, v in index.items()}.get(r.adapter)
        want = generate(_merged(base, dirs[name] if name else None), r.prompt_ids,
                        max_new_tokens=8, sampling=SamplingParams(0), stop_token_ids=())  # fmt: skip
        assert tokens == want
