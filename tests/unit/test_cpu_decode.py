"""The CPU decode-attention kernel (`llm.core.attn.cpu_decode`): the same answers as the
reference formula, taken by `attend` for CPU decode steps, traced whole by
torch.compile, and SDPA where it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from llm.core.attn import cpu_decode
from llm.core.attn.kernel import attend
from llm.core.attn.masks import attention_mask

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not cpu_decode.enable():
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
    [(3, 2, 3, 64, 64, 70), (1, 4, 1, 32, 32, 5), (2, 1, 8, 24, 16, 33), (4, 2, 2, 48, 48, 1)],
)  # GQA, MHA (one query per head), MQA with dv != dk (MLA's latent), one key
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
    out = cpu_decode.decode_attention(q, k, v, mask, 0.2)
    torch.testing.assert_close(out, reference(q, k, v, mask, 0.2), **TOL)


def test_a_row_with_every_key_masked_gets_zeros_and_spoils_no_other() -> None:
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    out = cpu_decode.decode_attention(q, k, v, mask, 0.5)
    assert torch.equal(out[1], torch.zeros(2, 3, 8))
    torch.testing.assert_close(out[:1], reference(q[:1], k[:1], v[:1], mask[:1], 0.5), **TOL)


def test_shapes_that_do_not_match_are_refused_naming_them() -> None:
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    with pytest.raises(RuntimeError, match="do not match"):
        cpu_decode.decode_attention(q, k, v, torch.ones(1, 6, dtype=torch.bool), 0.5)


def _calls_kernel(fn) -> bool:
    with torch.profiler.profile() as prof:
        fn()
    return any(e.name == "llm::decode_attention" for e in prof.events())


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


def test_where_it_cannot_build_enable_says_so_and_attention_keeps_sdpa(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch.utils.cpp_extension

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", no_compiler)
    monkeypatch.setattr(cpu_decode, "_extension", None)
    monkeypatch.setattr(cpu_decode, "_failed", False)
    with caplog.at_level(logging.WARNING, logger="llm.core.attn.cpu_decode"):
        assert cpu_decode.enable() is False
    assert "c++: command not found" in caplog.text
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = attention_mask(torch.tensor([[4], [2]]), torch.arange(5))
    assert not _calls_kernel(lambda: attend(q, k, v, mask, 0.3))
    torch.testing.assert_close(
        attend(q, k, v, mask, 0.3), attend(q, k, v, mask, 0.3, eager=True), **TOL
    )
