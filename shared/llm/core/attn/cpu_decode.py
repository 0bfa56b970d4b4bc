"""A decode-step attention kernel for the CPU (fp32), built on first use.

A decode step's attention reads every cached key and value of every row once and does
little arithmetic with them, so it is bound by memory bandwidth. SDPA's CPU kernel runs
it as small matrix products of a few query rows each and streams the cache well below
the rate a plain pass over it reaches; `decode_attention.cpp` makes one pass over a KV
head's keys and one over its values for all the queries of its group
(`benchmarks/decode_attention.py` compares the two; docs/benchmarks.md has the numbers).

`enable()` compiles the C++ source with torch's extension builder (a C++ compiler and
Python's headers are needed, as for `torch.compile` on the CPU; built once, then
cached by torch in `TORCH_EXTENSIONS_DIR`, one build per CPU kind since it targets the
machine it runs on). Without a compiler `enable()` returns False and attention keeps
SDPA. `llm.core.attn.kernel.attend` takes the kernel for a CPU float32 decode step with a
boolean mask once it is enabled; the op is registered as `llm::decode_attention`, so
`torch.compile` calls it as one opaque kernel.
"""

from __future__ import annotations

import hashlib
import logging
import platform
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("decode_attention.cpp")
_extension: ModuleType | None = None
_failed = False


def enabled() -> bool:
    """Whether `enable()` built the kernel in this process."""
    return _extension is not None


def enable() -> bool:
    """Build (or load the cached build of) the kernel; False, with a warning naming the
    error, where it cannot be built. Idempotent."""
    global _extension, _failed
    if _extension is not None or _failed:
        return _extension is not None
    try:
        from torch.utils.cpp_extension import load_inline

        _extension = load_inline(
            f"llm_decode_attention_{_cpu_kind()}",
            cpp_sources=_SOURCE.read_text(),
            functions=["decode_attention"],
            # -ffast-math lets the compiler vectorize exp and the reductions; it is not
            # passed to the linker, so the process's floating-point mode stays as it is.
            extra_cflags=[
                "-O3",
                "-march=native",
                "-fopenmp",
                "-ffast-math",
                "-fno-finite-math-only",
            ],
        )
    except Exception as e:  # no compiler, no headers, a failed build: all mean "use SDPA"
        _failed = True
        log.warning("cpu decode attention kernel unavailable, using SDPA: %s: %s",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")  # fmt: skip
        return False
    return True


def _cpu_kind() -> str:
    """A short digest of this CPU's model and flags: a build for one CPU (`-march=native`)
    is never loaded on another from a shared cache directory."""
    text = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                text += line
            if line.startswith("flags"):
                break
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@torch.library.custom_op("llm::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """
    Args:
        q: (B, Hkv, G, dk) float32: the G queries of each KV head's group, one token each.
        k: (B, Hkv, L, dk) float32, unit stride in dk (a view of the cache is fine).
        v: (B, Hkv, L, dv) float32, unit stride in dv.
        mask: (B, L) bool, True = attend.
        scale: softmax scale.
    Returns:
        (B, Hkv, G, dv); a row with every key masked gets zeros.
    """
    assert _extension is not None, "llm.core.attn.cpu_decode.enable() first"
    return _extension.decode_attention(q, k, v, mask, scale)


@decode_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
