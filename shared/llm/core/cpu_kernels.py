"""The decode step's own CPU kernels (fp32), built on first use: attention and linears.

A decode step reads every weight and every cached key and value once for a few rows, and
does little arithmetic with each, so it is bound by memory bandwidth; the general kernels
torch calls stream well below the rate a plain pass reaches (docs/benchmarks.md):

- `decode_attention` (`kernels/decode_attention.cpp`): SDPA's CPU kernel runs a decode
  step as small matrix products of a few query rows each; this makes one pass over a KV
  head's keys and one over its values for all the queries of its group.
- `small_linear` (`kernels/small_linear.cpp`): oneDNN and MKL split few-row products
  over threads poorly (two rows read every weight once per thread); this reads the
  weights once, packed into contiguous groups of outputs, each group meeting every row in
  registers. `pack_linears` packs a model's linear layers once and makes them call it in
  a decode step (`decode_linears()`), under `torch.compile` too: the op is a C++ one,
  so a compiled graph calls it without the GIL.

`enable()` compiles the C++ sources with torch's extension builder (a C++ compiler and
Python's headers are needed, as for `torch.compile` on the CPU; built once, then cached
by torch in `TORCH_EXTENSIONS_DIR`, one build per CPU kind since it targets the machine
it runs on). Without a compiler `enable()` returns False and the model keeps torch's
kernels. `llm.core.attn.kernel.attend` takes the attention kernel for a CPU float32
decode step with a boolean mask once it is enabled; the inference runner enables both.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
import types
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_KERNELS = Path(__file__).with_name("kernels")
_SOURCES = [_KERNELS / n for n in ("decode_attention.cpp", "small_linear.cpp")]
_HEADERS = [_KERNELS / n for n in ("parallel.h", "vector.h")]  # included by the sources
_extension: ModuleType | None = None
_failed = False
_decode_linears = False  # linear layers packed by `pack_linears` call `small_linear`


def enabled() -> bool:
    """Whether `enable()` built the kernels in this process."""
    return _extension is not None


def enable() -> bool:
    """Build (or load the cached build of) the kernels; False, with a warning naming the
    error, where they cannot be built. Idempotent."""
    global _extension, _failed
    if _extension is not None or _failed:
        return _extension is not None
    try:
        from torch.utils.cpp_extension import load_inline

        sources = [source.read_text() for source in _SOURCES]
        headers = [header.read_text() for header in _HEADERS]
        extension = load_inline(
            f"llm_cpu_kernels_{_build_kind(sources + headers)}",
            cpp_sources=sources,
            extra_include_paths=[str(_KERNELS)],
            functions=["decode_attention", "pack_linear_weight", "small_linear_group"],
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
    except Exception as e:  # no compiler, no headers, a failed build: all mean "torch's"
        _failed = True
        log.warning("cpu decode kernels unavailable, using torch's: %s: %s",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")  # fmt: skip
        return False
    torch.library.register_fake("llm::small_linear")(_small_linear_fake)
    _extension = extension
    return True


def _build_kind(sources: list[str]) -> str:
    """A short digest of this CPU's model and flags and of the sources: a build for one
    CPU (`-march=native`) is never loaded on another from a shared cache directory."""
    text = platform.machine() + "".join(sources)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                text += line
            if line.startswith("flags"):
                break
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# -- attention ---------------------------------------------------------------------------


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
    assert _extension is not None, "llm.core.cpu_kernels.enable() first"
    return _extension.decode_attention(q, k, v, mask, scale)


@decode_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# -- linear layers -----------------------------------------------------------------------


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A (N, K) float32 weight as `small_linear` reads it: (N / G, K, G), G outputs a
    group (`linear_group()`); N must be a multiple of G."""
    assert _extension is not None, "llm.core.cpu_kernels.enable() first"
    return _extension.pack_linear_weight(weight)


def linear_group() -> int:
    """Outputs per packed group: 32 with AVX-512, 16 without."""
    assert _extension is not None, "llm.core.cpu_kernels.enable() first"
    return _extension.small_linear_group()


def small_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` from the packed weight (`pack_linear_weight`)."""
    return torch.ops.llm.small_linear(x, packed, bias)


def _small_linear_fake(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0] * packed.shape[2]))


def pack_linears(model: nn.Module) -> int:
    """Pack every float32 CPU `nn.Linear` of `model` whose outputs fill whole groups and
    make it call `small_linear` inside `decode_linears()` without grad (elsewhere it
    stays `F.linear`, on its own weight). The packed copy is read as the weights are now:
    pack again after changing them. Returns how many layers were packed."""
    if not enable():
        return 0
    group, packed = linear_group(), 0
    for module in model.modules():
        weight = module.weight if type(module) is nn.Linear else None
        if weight is None or weight.dtype != torch.float32 or weight.device.type != "cpu":
            continue
        if module.out_features % group:
            continue
        module._llm_packed = pack_linear_weight(weight.detach())  # a plain attribute: no state
        module.forward = types.MethodType(_packed_forward, module)
        packed += 1
    return packed


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # Not differentiable: with grad enabled (training) it stays F.linear.
    if _decode_linears and not torch.is_grad_enabled() and x.dtype == torch.float32 and x.is_cpu:
        return torch.ops.llm.small_linear(x, self._llm_packed, self.bias)
    return F.linear(x, self.weight, self.bias)


@contextlib.contextmanager
def decode_linears() -> Iterator[None]:
    """Within: the layers `pack_linears` packed compute with `small_linear` (enter it
    outside a compiled function: the compiled graph is traced with the flag it sees)."""
    global _decode_linears
    previous, _decode_linears = _decode_linears, True
    try:
        yield
    finally:
        _decode_linears = previous
