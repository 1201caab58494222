"""fp8 (e4m3) quantization in plain PyTorch: the math the fp8 kernels and `torch._scaled_mm` are tested against.

A tensor x is stored as e4m3 values q and fp32 scales s with x ~ q * s. The scale of a group of
values (a row: one token of an activation, one output channel of a weight; or the whole tensor) is
its largest magnitude over e4m3's largest finite value, 448, so the group's largest value lands on
448 and nothing saturates:

    s = max(amax(group), TINY) / 448        q = e4m3(clamp(x / s, -448, 448))

e4m3 keeps 3 mantissa bits: every quantized value is within 2^-4 (relative) of x, except values below
s * 2^-9, which flush towards zero. Per-row scales keep one outlier token or channel from crushing the
rest of the tensor, which is why they are the default (`per-row`); `per-tensor` is the simpler scheme
that published fp8 checkpoints use, kept to measure the difference (scripts/bench_fp8_quality.py).
"""

from typing import NamedTuple

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# The smallest amax a scale is made from: an all-zero row then gets a finite scale and quantizes to zeros.
TINY = 1e-12
GRANULARITIES = ("per-row", "per-tensor")


class Fp8Tensor(NamedTuple):
    """e4m3 `data` (..., K) and the fp32 `scale` (..., 1) (per row) or () (per tensor) it is multiplied by."""

    data: Tensor
    scale: Tensor


def check_granularity(name: str) -> str:
    """Return `name` if it is a known scale granularity, else raise naming the choices."""
    if name not in GRANULARITIES:
        raise ValueError(f"unknown fp8 scale granularity {name!r}; choose one of {', '.join(GRANULARITIES)}")
    return name


def quantize(x: Tensor, granularity: str = "per-row") -> Fp8Tensor:
    """x (..., K) as e4m3 with one fp32 scale per row (per token, per output channel) or one for the whole tensor."""
    x = x.float()
    amax = x.abs().amax() if granularity == "per-tensor" else x.abs().amax(dim=-1, keepdim=True)  # () or (..., 1)
    scale = amax.clamp(min=TINY) / E4M3_MAX
    return Fp8Tensor((x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale)


def dequantize(t: Fp8Tensor) -> Tensor:
    """The fp32 values an Fp8Tensor stands for: data * scale."""
    return t.data.float() * t.scale


def reference_linear(x: Fp8Tensor, weight: Fp8Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """x W^T + b with both operands dequantized and multiplied in fp32, rounded to `dtype`: what fp8 GEMMs approximate."""
    out = dequantize(x) @ dequantize(weight).T  # (..., N)
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)
