"""Decode-step attention on the CPU: the engine's kernel (`llm.core.attn.cpu_decode`)
against SDPA, per layer, on the shapes of the serving benchmark's decode steps.

Each shape attends over views of 24 separate caches in turn (one per layer, as a model
step does), so the keys and values come from memory, not from the CPU's caches. Prints
microseconds per layer, the rate each streams the cache at, and SDPA's time over ours.

Usage: PYTHONPATH=shared .venv/bin/python benchmarks/decode_attention.py [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from llm.core.attn import cpu_decode

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
    if not cpu_decode.enable():
        raise SystemExit("the kernel did not build (a C++ compiler is needed)")
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, float32, us per layer (GB/s of cache read)")
    print(f"{'rows x kv heads x group, positions':>36} {'SDPA':>16} {'ours':>16} {'SDPA/ours':>10}")
    for shape in SHAPES:
        compare(*shape)


def compare(rows: int, kv_heads: int, group: int, dim: int, length: int) -> None:
    caches = [
        (torch.randn(rows, kv_heads, 2048, dim), torch.randn(rows, kv_heads, 2048, dim))
        for _ in range(LAYERS)
    ]
    views = [(k[:, :, :length], v[:, :, :length]) for k, v in caches]
    q = torch.randn(rows, kv_heads, group, dim)
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    sdpa = per_layer_us(lambda: [F.scaled_dot_product_attention(q, k, v, attn_mask=mask) for k, v in views])  # fmt: skip
    ours = per_layer_us(lambda: [cpu_decode.decode_attention(q, k, v, mask[:, 0, 0], dim**-0.5) for k, v in views])  # fmt: skip
    gb = 2 * rows * kv_heads * length * dim * 4 / 1e3  # bytes per us -> GB/s
    shape = f"{rows} x {kv_heads} x {group}, {length}"
    print(
        f"{shape:>36} {sdpa:9.0f} ({gb / sdpa:4.1f}) {ours:9.0f} ({gb / ours:4.1f}) {sdpa / ours:9.2f}x"
    )


if __name__ == "__main__":
    main()
