"""The CPU decode-step kernels (`llm.core.cpu_kernels`): attention and linear layers give
the reference's answers, are taken for CPU decode steps only, are traced whole by
torch.compile, and torch's kernels stay where they cannot be built."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from llm.config import ModelConfig
from llm.core import cpu_kernels
from llm.core.attn.kernel import attend
from llm.core.attn.masks import attention_mask
from llm.inference.runner import ModelRunner
from llm.models.decoder import DecoderModel

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not cpu_kernels.enable():
        pytest.fail("the kernel did not build (see the warning above)")


def reference(q, k, v, mask, scale):  # q (B, Hkv, G, dk), mask (B, L)
    groups = q.shape[2]
    q = q.reshape(q.shape[0], -1, 1, q.shape[-1])  # (B, H, 1, dk), head = kv * G + g
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    return attend(q, k, v, mask[:, None, None], scale, eager=True).reshape(
        q.shape[0], -1, groups, v.shape[-1]
    )


@pytest.mark.parametrize(
    "batch, kv_heads, groups, dk, dv, length",
    [
        (3, 2, 3, 64, 64, 70),
        (1, 4, 1, 32, 32, 5),
        (2, 1, 8, 24, 16, 33),
        (4, 2, 2, 48, 48, 1),
        (2, 2, 8, 128, 128, 40),
        (1, 2, 7, 64, 64, 33),
    ],
)  # GQA, MHA (one query per head), MQA with dv != dk (MLA's latent), one key; head dims
# 64 and 128 take the register-blocked path, with groups larger than one block of queries
def test_the_kernel_gives_the_reference_over_a_cache_view(
    batch: int, kv_heads: int, groups: int, dk: int, dv: int, length: int
) -> None:
    torch.manual_seed(0)
    cache_k = torch.randn(batch + 1, kv_heads, length + 9, dk)  # rows and positions to spare
    cache_v = torch.randn(batch + 1, kv_heads, length + 9, dv)
    k, v = cache_k[:batch, :, :length], cache_v[:batch, :, :length]  # strided, as a step's
    q = torch.randn(batch, kv_heads, groups, dk)
    mask = torch.rand(batch, length) > 0.3
    mask[:, 0] = True  # every row sees a key
    out = cpu_kernels.decode_attention(q, k, v, mask, 0.2)
    torch.testing.assert_close(out, reference(q, k, v, mask, 0.2), **TOL)


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """torch's thread count for one test, restored after it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


@pytest.mark.parametrize("threads", [1, 2, 3, 5], indirect=True)
def test_every_head_is_computed_once_however_many_threads_share_them(threads: int) -> None:
    # 7 rows x 3 KV heads: 21 items in uneven shares, the ones left taken from the backs
    # of the others' shares (kernels/parallel.h)
    torch.manual_seed(threads)
    q, k, v = torch.randn(7, 3, 2, 64), torch.randn(7, 3, 20, 64), torch.randn(7, 3, 20, 64)
    mask = torch.rand(7, 20) > 0.2
    mask[:, 0] = True
    out = cpu_kernels.decode_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(out, reference(q, k, v, mask, 0.3), **TOL)


def test_a_row_with_every_key_masked_gets_zeros_and_spoils_no_other() -> None:
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    out = cpu_kernels.decode_attention(q, k, v, mask, 0.5)
    assert torch.equal(out[1], torch.zeros(2, 3, 8))
    torch.testing.assert_close(out[:1], reference(q[:1], k[:1], v[:1], mask[:1], 0.5), **TOL)


def test_shapes_that_do_not_match_are_refused_naming_them() -> None:
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    with pytest.raises(RuntimeError, match="do not match"):
        cpu_kernels.decode_attention(q, k, v, torch.ones(1, 6, dtype=torch.bool), 0.5)


def _calls_kernel(fn, name: str = "llm::decode_attention") -> bool:
    with torch.profiler.profile() as prof:
        fn()
    return any(e.name == name for e in prof.events())


def test_attend_takes_the_kernel_for_a_cpu_decode_step_and_sdpa_otherwise() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 1, 16), torch.randn(3, 2, 12, 16), torch.randn(3, 2, 12, 16)
    q_pos = torch.tensor([[11], [4], [7]])
    mask = attention_mask(q_pos, torch.arange(12))  # (B, 1, 1, L) bool
    assert _calls_kernel(lambda: attend(q, k, v, mask, 0.3))
    torch.testing.assert_close(
        attend(q, k, v, mask, 0.3), attend(q, k, v, mask, 0.3, eager=True), **TOL
    )
    alibi = attention_mask(q_pos, torch.arange(12), alibi_slopes=torch.rand(6))  # per head
    assert not _calls_kernel(lambda: attend(q, k, v, alibi, 0.3))
    assert not _calls_kernel(lambda: attend(q.double(), k.double(), v.double(), mask, 0.3))
    shared = mask[:1]  # one mask broadcast over the rows
    assert not _calls_kernel(lambda: attend(q, k, v, shared, 0.3))
    prefill = attention_mask(torch.arange(10, 12)[None].repeat(3, 1), torch.arange(12))
    q2 = torch.randn(3, 6, 2, 16)
    assert not _calls_kernel(lambda: attend(q2, k, v, prefill, 0.3))


def test_a_compiled_decode_step_calls_the_kernel_in_one_graph() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 4, 1, 8), torch.randn(4, 2, 10, 8), torch.randn(4, 2, 10, 8)
    mask = attention_mask(torch.tensor([[9], [3], [0], [5]]), torch.arange(10))
    compiled = torch.compile(lambda *a: attend(*a, 0.35) * 2, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(q, k, v, mask), 2 * attend(q, k, v, mask, 0.35, eager=True), **TOL)  # fmt: skip


def test_building_it_leaves_the_floating_point_mode_alone() -> None:
    # -ffast-math at link time would flush subnormals to zero for the whole process.
    assert (torch.tensor([1e-40]) * 2).item() > 0


def test_where_it_cannot_build_enable_says_so_and_torch_kernels_stay(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch.utils.cpp_extension

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", no_compiler)
    monkeypatch.setattr(cpu_kernels, "_extension", None)
    monkeypatch.setattr(cpu_kernels, "_failed", False)
    with caplog.at_level(logging.WARNING, logger="llm.core.cpu_kernels"):
        assert cpu_kernels.enable() is False
    assert "c++: command not found" in caplog.text
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = attention_mask(torch.tensor([[4], [2]]), torch.arange(5))
    assert not _calls_kernel(lambda: attend(q, k, v, mask, 0.3))
    torch.testing.assert_close(
        attend(q, k, v, mask, 0.3), attend(q, k, v, mask, 0.3, eager=True), **TOL
    )
    assert cpu_kernels.pack_linears(torch.nn.Linear(8, 64)) == 0


# -- linear layers ---------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_small_linear_gives_f_linear_for_any_number_of_rows(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    group = cpu_kernels.linear_group()
    weight, b = torch.randn(3 * group, 37), torch.randn(3 * group) if bias else None
    x = torch.randn(rows, 2, 40)[..., :37]  # (rows, 2, K), not contiguous
    packed = cpu_kernels.pack_linear_weight(weight)
    out = cpu_kernels.small_linear(x, packed, b)
    assert out.shape == (rows, 2, 3 * group)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, b), **TOL)


@pytest.mark.parametrize("threads", [1, 2, 3, 5], indirect=True)
def test_every_group_of_outputs_is_computed_once_however_many_threads_share_them(
    threads: int,
) -> None:
    torch.manual_seed(threads)
    group = cpu_kernels.linear_group()
    weight, bias, x = torch.randn(11 * group, 24), torch.randn(11 * group), torch.randn(6, 24)
    out = cpu_kernels.small_linear(x, cpu_kernels.pack_linear_weight(weight), bias)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), **TOL)


def test_a_weight_that_does_not_fill_whole_groups_or_a_wrong_input_is_refused() -> None:
    group = cpu_kernels.linear_group()
    with pytest.raises(RuntimeError, match=f"multiple of {group}"):
        cpu_kernels.pack_linear_weight(torch.randn(group + 1, 8))
    packed = cpu_kernels.pack_linear_weight(torch.randn(group, 8))
    with pytest.raises(RuntimeError, match="does not match the weight's 8 inputs"):
        cpu_kernels.small_linear(torch.randn(2, 9), packed)


def test_packed_layers_use_the_kernel_only_in_a_decode_step_and_keep_their_state() -> None:
    group = cpu_kernels.linear_group()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 2 * group),
        torch.nn.Linear(2 * group, group + 1),  # not whole
        torch.nn.Linear(group + 1, group, bias=False).double(),  # not float32
    )
    keys = set(model.state_dict())
    assert cpu_kernels.pack_linears(model) == 1
    assert set(model.state_dict()) == keys and not list(model.buffers())
    x = torch.randn(3, 16)
    expected = model[0](x)
    assert not _calls_kernel(lambda: model[0](x), "llm::small_linear")
    with cpu_kernels.decode_linears():
        assert not _calls_kernel(lambda: model[0](x), "llm::small_linear")  # with grad
    with cpu_kernels.decode_linears(), torch.no_grad():
        assert _calls_kernel(lambda: model[0](x), "llm::small_linear")
        torch.testing.assert_close(model[0](x), expected, **TOL)
        compiled = torch.compile(lambda t: model[0](t).relu(), fullgraph=True, dynamic=True)
        torch.testing.assert_close(compiled(x), expected.relu(), **TOL)


def test_the_runner_packs_a_float32_model_and_its_decode_steps_match_eager_ones() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", max_seq_len=32, init_std=0.2)
    model = DecoderModel(cfg).eval()
    reference = DecoderModel(cfg).eval()
    reference.load_state_dict(model.state_dict())
    runner = ModelRunner(model, n_slots=3, max_seq_len=32)
    assert runner.packed == len([m for m in model.modules() if type(m) is torch.nn.Linear])
    reference.setup_cache(4, 32)
    tokens, pos = torch.tensor([[5], [7], [9]]), torch.tensor([[0], [0], [0]])
    with torch.inference_mode():
        got = runner._decode(tokens, pos, 1, runner.adapter_of[:3])
        want = reference(tokens, pos, kv_len=1)[:, -1]
    torch.testing.assert_close(got, want, **TOL)
