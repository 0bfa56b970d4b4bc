"""NF4 weights for QLoRA (Dettmers et al. 2023, arXiv:2305.14314): 4-bit NormalFloat blocks
with double-quantized scales, in bitsandbytes' exact format.

A weight is flattened and cut into blocks of 64 values. Each block is scaled by its absmax
into [-1, 1] and every value replaced by the index of the nearest of the 16 NF4 levels
(quantiles of N(0, 1)); two indices pack into one byte, the first in the high nibble.
Double quantization stores the per-block absmax (fp32, 0.5 bit per weight) as 8 bits:
their mean (`offset`) is subtracted and the rest quantized blockwise (256 scales a block)
with bitsandbytes' signed dynamic 8-bit map, leaving ~4.127 bits per weight in all.

Two kernels compute this format: `bitsandbytes` where it runs (`backend="auto"` prefers
it), and the torch implementation here, which mirrors bitsandbytes' reference one op for
op (same codebooks, the same midpoint bucketing, the same reciprocal scaling), so both
produce the same bytes and the same dequantized weights (a test checks it whenever
bitsandbytes imports).

`NF4Linear` is a frozen linear layer holding such a weight; `quantize_base` swaps every
`nn.Linear` of a model for one, from outside; LoRA then wraps them
(`llm.core.lora.apply_lora`). Its matmul dequantizes the weight on the fly, in forward and
again in backward (as bitsandbytes' `MatMul4Bit`), so no full-precision copy outlives a
layer's call.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

Backend = Literal["auto", "bitsandbytes", "torch"]
BLOCK_SIZE = 64  # values per NF4 block (QLoRA's setting and bitsandbytes' default)
STATS_BLOCK_SIZE = 256  # absmax values per block of the double quantization

# bitsandbytes' NF4 levels (`create_normal_map(offset=0.9677083)`), sorted, in fp32.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(True, 7, 8)`), (256,).

    Dettmers 2015 (arXiv:1511.04561): a sign, a run of zero bits giving a decimal exponent,
    then a linear fraction, so small magnitudes keep relative precision.
    """
    data: list[float] = []
    max_exp, non_sign_bits = 7, 7
    for i in range(max_exp):
        items = int(2 ** (i + non_sign_bits - max_exp) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


class NF4Weight(NamedTuple):
    """A weight in bitsandbytes' NF4 layout (double-quantized statistics)."""

    packed: torch.Tensor  # (ceil(n / 2), 1) uint8: two 4-bit codes per byte, high nibble first
    absmax: torch.Tensor  # (n_blocks,) uint8: block scales, 8-bit dynamic codes
    offset: torch.Tensor  # () fp32: mean of the block scales, subtracted before coding them
    absmax2: torch.Tensor  # (ceil(n_blocks / 256),) fp32: scales of the block scales
    shape: torch.Size  # the original weight's shape
    dtype: torch.dtype  # the original weight's dtype (the default dequantized dtype)
    block_size: int = BLOCK_SIZE


# -- the torch kernels ------------------------------------------------------------------------


def _blockwise_absmax(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1] (bitsandbytes' reference ops:
    multiply by the reciprocal, a short last block scaled by division)."""
    n = flat.numel()
    full = n - n % block_size
    blocks = flat[:full].view(-1, block_size)  # (n_blocks, bs)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).view(-1)
    if n > full:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    return absmax, scaled


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted `code` (ties to the lower one), as uint8."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """values (n,) fp32 times their block's absmax."""
    n = values.numel()
    full = n - n % block_size
    out = (values[:full].view(-1, block_size) * absmax[: full // block_size, None]).view(-1)
    if n > full:
        out = torch.cat([out, values[full:] * absmax[-1]])
    return out


def _quantize_torch(w: torch.Tensor, block_size: int) -> NF4Weight:
    flat = w.detach().reshape(-1).float()
    absmax, scaled = _blockwise_absmax(flat, block_size)
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))
    q = _nearest(scaled, NF4_CODE.to(w.device))
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)  # (ceil(n/2), 1)
    offset = absmax.mean()
    absmax2, scaled2 = _blockwise_absmax(absmax - offset, STATS_BLOCK_SIZE)
    qabsmax = _nearest(scaled2, dynamic_map().to(w.device))
    return NF4Weight(packed, qabsmax, offset, absmax2, w.shape, w.dtype, block_size)


def _dequantize_torch(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    absmax = _scale_blocks(dynamic_map().to(q.absmax.device)[q.absmax.long()], q.absmax2, 256)
    absmax = absmax + q.offset
    n = math.prod(q.shape)
    flat = q.packed.view(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).view(-1)[:n]  # (n,) high nibble first
    values = NF4_CODE.to(flat.device)[codes.long()]
    return _scale_blocks(values, absmax, q.block_size).view(q.shape).to(dtype)


# -- bitsandbytes -----------------------------------------------------------------------------


@functools.cache
def bitsandbytes_available(device_type: str = "cpu") -> bool:
    """Whether bitsandbytes imports and runs NF4 on this device type (checked once)."""
    try:
        import bitsandbytes.functional as bnbf

        w = torch.randn(4, BLOCK_SIZE, device=device_type)
        packed, state = bnbf.quantize_4bit(w, blocksize=BLOCK_SIZE, quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as e:  # ImportError, a missing native library, an unsupported device
        log.info("bitsandbytes NF4 unavailable on %s (%s); using the torch kernels", device_type, e)
        return False
    return True


def _use_bitsandbytes(backend: Backend, device_type: str) -> bool:
    if backend == "torch":
        return False
    if backend == "bitsandbytes":
        if not bitsandbytes_available(device_type):
            raise RuntimeError(
                f"backend='bitsandbytes': bitsandbytes cannot run NF4 on {device_type}"
            )
        return True
    return bitsandbytes_available(device_type)


def _quantize_bnb(w: torch.Tensor, block_size: int) -> NF4Weight:
    import bitsandbytes.functional as bnbf

    packed, s = bnbf.quantize_4bit(
        w.detach(), blocksize=block_size, compress_statistics=True, quant_type="nf4"
    )
    return NF4Weight(packed, s.absmax, s.offset, s.state2.absmax, w.shape, w.dtype, block_size)


def _dequantize_bnb(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnbf
    from bitsandbytes.functional import QuantState

    device = q.packed.device
    stats = QuantState(
        absmax=q.absmax2, code=dynamic_map().to(device), blocksize=STATS_BLOCK_SIZE,
        dtype=torch.float32,
    )  # fmt: skip
    state = QuantState(
        absmax=q.absmax, shape=q.shape, dtype=dtype, blocksize=q.block_size,
        code=NF4_CODE.to(device), quant_type="nf4", offset=q.offset, state2=stats,
    )  # fmt: skip
    return bnbf.dequantize_4bit(q.packed, state)


# -- public API -------------------------------------------------------------------------------


def quantize_nf4(
    w: torch.Tensor, block_size: int = BLOCK_SIZE, backend: Backend = "auto"
) -> NF4Weight:
    """Quantize `w` (any shape, fp32/bf16/fp16) to double-quantized NF4."""
    if not w.is_floating_point():
        raise ValueError(f"quantize_nf4 needs a floating-point tensor, got {w.dtype}")
    if _use_bitsandbytes(backend, w.device.type):
        return _quantize_bnb(w, block_size)
    return _quantize_torch(w, block_size)


def dequantize_nf4(
    q: NF4Weight, dtype: torch.dtype | None = None, backend: Backend = "auto"
) -> torch.Tensor:
    """The weight `q` stands for, in `dtype` (default: the original dtype)."""
    dtype = dtype or q.dtype
    if _use_bitsandbytes(backend, q.packed.device.type):
        return _dequantize_bnb(q, dtype)
    return _dequantize_torch(q, dtype)


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T with W dequantized in forward and again in backward (nothing saved but the
    4-bit weight), gradients for x only: the base weight is frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen `nn.Linear` whose weight is stored as NF4 (bias kept as it was, frozen).

    `weight` dequantizes on access (code reading `.weight` directly, such as MLA's absorbed
    decode, sees the quantized weight). Moving the module moves its buffers but never
    changes the dtype of the fp32 statistics: `.to(torch.bfloat16)` only changes the bias.
    """

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None, backend: Backend = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.block_size, self.weight_dtype, self.backend = q.block_size, q.dtype, backend
        self.register_buffer("weight_packed", q.packed)
        self.register_buffer("weight_absmax", q.absmax)
        self.register_buffer("weight_offset", q.offset)
        self.register_buffer("weight_absmax2", q.absmax2)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, block_size: int = BLOCK_SIZE, backend: Backend = "auto"
    ) -> NF4Linear:
        return cls(quantize_nf4(linear.weight, block_size, backend), linear.bias, backend)

    def nf4(self) -> NF4Weight:
        return NF4Weight(
            self.weight_packed, self.weight_absmax, self.weight_offset, self.weight_absmax2,
            torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.block_size,
        )  # fmt: skip

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight, (out_features, in_features), in `dtype` (default: the original)."""
        return dequantize_nf4(self.nf4(), dtype, self.backend)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def _apply(self, fn, recurse=True):  # nn.Module's signature, untyped
        # Keep the fp32 statistics fp32 under `.to(dtype)`; only follow device moves.
        stats = {k: self._buffers[k] for k in ("weight_offset", "weight_absmax2")}
        super()._apply(fn, recurse)
        for k, t in stats.items():
            self._buffers[k] = t.to(self.weight_packed.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nf4 block_size={self.block_size}"
        )


def quantize_base(
    model: nn.Module,
    skip: Sequence[str] = ("lm_head",),
    block_size: int = BLOCK_SIZE,
    backend: Backend = "auto",
    device: torch.device | str | None = None,
) -> list[str]:
    """Replace every `nn.Linear` of `model` with an `NF4Linear`, freezing it, and return the
    replaced names. Modules whose name is in `skip` or ends with `.<skip entry>` stay as
    they are (the output layer, as QLoRA and transformers' bitsandbytes loading keep it).

    With `device`, each layer moves there just before it is quantized, so a model loaded on
    the CPU reaches the accelerator as NF4 without ever being there in full precision
    (move the rest with `model.to(device)` after). Apply before `apply_lora`.
    """
    names = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and not any(name == s or name.endswith("." + s) for s in skip)
    ]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, leaf)
        if device is not None:
            linear.to(device)
        # One layer at a time: its full-precision weight is freed before the next is read.
        setattr(parent, leaf, NF4Linear.from_linear(linear, block_size, backend))
        del linear
    return names
