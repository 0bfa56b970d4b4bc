"""A decode step's kernels on the CPU, fp32: the engine's own (`llm.core.cpu_kernels`)
against what torch (and vLLM) run, on the shapes of the serving benchmark's decode steps.

Attention: our kernel against SDPA, per layer. Each shape attends over views of 24
separate caches in turn (one per layer, as a model step does), so the keys and values
come from memory, not from the CPU's caches. Prints microseconds per layer, the rate each
streams the cache at, and SDPA's time over ours.

Linear layers: every linear layer of the 82M serving model (hidden 768, 12 layers, FFN
2048, vocabulary 4096; 315 MB of weights, more than the CPU's caches) for a step of 1 to
16 rows: our `small_linear` on packed weights against torch's packed oneDNN linear (what
inductor's freezing compiles a decode step to), MKL's `F.linear`, and vLLM's oneDNN
matmul handle (`onednn_mm`, what vLLM's CPU backend runs) when the script runs from
vLLM's virtualenv (`.bench/vllm`, installed by `serving_vs_vllm.py`; same torch).

Usage: PYTHONPATH=shared .venv/bin/python benchmarks/decode_kernels.py [--threads N]
       PYTHONPATH=shared .bench/vllm/bin/python benchmarks/decode_kernels.py  # + vLLM
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from llm.core import cpu_kernels

LAYERS = 24
SHAPES = [  # (rows, kv heads, queries per kv head, head dim, cached positions)
    (8, 2, 3, 64, 1070),  # 12.6M model, the shared-prefix row
    (16, 2, 3, 64, 192),  # 12.6M model, 16 streams
    (16, 4, 3, 64, 192),  # 82M model, 16 streams
    (16, 4, 3, 64, 1070),
    (3, 4, 3, 64, 192),  # 82M model, one stream (run 3 rows wide)
]


def per_layer_us(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * sorted(times)[repeats // 2] / LAYERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_kernels.enable():
        raise SystemExit("the kernels did not build (a C++ compiler is needed)")
    torch.manual_seed(0)
    print(f"attention: {torch.get_num_threads()} threads, float32, us per layer (GB/s of cache read)")  # fmt: skip
    print(f"{'rows x kv heads x group, positions':>36} {'SDPA':>16} {'ours':>16} {'SDPA/ours':>10}")
    for shape in SHAPES:
        compare(*shape)
    linears()


def compare(rows: int, kv_heads: int, group: int, dim: int, length: int) -> None:
    caches = [
        (torch.randn(rows, kv_heads, 2048, dim), torch.randn(rows, kv_heads, 2048, dim))
        for _ in range(LAYERS)
    ]
    views = [(k[:, :, :length], v[:, :, :length]) for k, v in caches]
    q = torch.randn(rows, kv_heads, group, dim)
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    sdpa = per_layer_us(lambda: [F.scaled_dot_product_attention(q, k, v, attn_mask=mask) for k, v in views])  # fmt: skip
    ours = per_layer_us(lambda: [cpu_kernels.decode_attention(q, k, v, mask[:, 0, 0], dim**-0.5) for k, v in views])  # fmt: skip
    gb = 2 * rows * kv_heads * length * dim * 4 / 1e3  # bytes per us -> GB/s
    shape = f"{rows} x {kv_heads} x {group}, {length}"
    print(
        f"{shape:>36} {sdpa:9.0f} ({gb / sdpa:4.1f}) {ours:9.0f} ({gb / ours:4.1f}) {sdpa / ours:9.2f}x"
    )


def linears() -> None:
    dim, ffn, qkv, vocab, layers = 768, 2048, 768 + 2 * 256, 4096, 12
    shapes = [(qkv, dim), (dim, dim), (ffn, dim), (ffn, dim), (dim, ffn)] * layers + [(vocab, dim)]
    weights = [torch.randn(n, k) * 0.02 for n, k in shapes]
    gb = sum(w.numel() for w in weights) * 4 / 1e9
    ours = [cpu_kernels.pack_linear_weight(w) for w in weights]
    try:  # vLLM's CPU matmul, when this runs from vLLM's virtualenv
        from vllm import _custom_ops as vllm_ops

        handles = [vllm_ops.create_onednn_mm(w.t()) for w in weights]
    except Exception:
        handles = None
    print(f"\nlinear layers of the 82M model ({gb * 1e3:.0f} MB), ms per step (GB/s of weights)")
    print(
        f"{'rows':>5} {'ours':>14} {'oneDNN packed':>14} {'MKL':>14} {'vLLM onednn_mm':>15} {'best other/ours':>16}"
    )
    for rows in (1, 2, 3, 4, 8, 16):
        xs = [torch.randn(rows, w.shape[1]) for w in weights]
        for x, w, p in zip(xs[:5], weights, ours, strict=False):  # the same answers first
            torch.testing.assert_close(cpu_kernels.small_linear(x, p), F.linear(x, w), atol=1e-4, rtol=1e-4)  # fmt: skip
        dnn = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
        calls = {
            "ours": [(cpu_kernels.small_linear, x, p) for x, p in zip(xs, ours, strict=True)],
            "dnn": [(_onednn, x, p) for x, p in zip(xs, dnn, strict=True)],
            "mkl": [(F.linear, x, w) for x, w in zip(xs, weights, strict=True)],
        }
        if handles:
            calls["vllm"] = [(_vllm, x, h) for x, h in zip(xs, handles, strict=True)]
        times = per_step_ms(calls)
        cells = [f"{times[k]:6.2f} ({gb / times[k] * 1e3:4.1f})" if k in times else f"{'-':>14}" for k in ("ours", "dnn", "mkl", "vllm")]  # fmt: skip
        best = min(t for k, t in times.items() if k != "ours")
        print(f"{rows:>5} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14} {cells[3]:>15} {best / times['ours']:15.2f}x")  # fmt: skip


def _onednn(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _vllm(x: torch.Tensor, handle: object) -> torch.Tensor:
    from vllm import _custom_ops as vllm_ops

    return vllm_ops.onednn_mm(handle, x, None)


def per_step_ms(calls: dict[str, list[tuple]], repeats: int = 30) -> dict[str, float]:
    """Median ms of each step, the kinds taking turns (a noisy box drifts)."""
    times: dict[str, list[float]] = {kind: [] for kind in calls}
    for i in range(repeats + 3):
        for kind, step in calls.items():
            start = time.perf_counter()
            for fn, *args in step:
                fn(*args)
            if i >= 3:
                times[kind].append(time.perf_counter() - start)
    return {kind: 1e3 * sorted(t)[repeats // 2] for kind, t in times.items()}


if __name__ == "__main__":
    main()
