"""The MLPs' activations in one pass each, written where the caller says: SwiGLU's silu(gate) * up and GELU-tanh.

PyTorch takes two passes for SwiGLU (silu, then the product: five reads and writes of the
activation); its kernel here reads gate and up once and writes once. Both kernels read and write
rows of any stride, so the single blocks of FLUX.1 and FLUX.2 read the MLP input where linear1's
output holds it and write the activation straight into the second part of linear2's input, beside
the attention output, where a concatenation would copy both again (and PyTorch's own GELU, given
such a strided view, falls back to its slow non-vectorized loop). The silu is computed in fp32 and
rounded to the output dtype before the product, where PyTorch stores it, so the two agree to the last
bit but for the exponential's last fp32 ulp; GELU-tanh is computed in fp32 and rounded once, as
PyTorch does, its tanh through the exponential (Triton has no tanh): within an fp32 ulp or two.

`activation_fp8` hands an MLP's activation to an fp8 linear as e4m3 rows with one scale per token
(`zflux.kernels.quantize`): SwiGLU's (Z-Image's w2, FLUX.2's MLPs) or GELU-tanh's (FLUX.1's MLPs), and,
for the single blocks' linear2, the rows [attention output | activation], whose scale is the maximum
over both parts. Whole rows in one program, the activation rounded to the input dtype exactly as
`silu_mul_` / `gelu_tanh_` store it, then quantized, so the result is the unfused kernels' (activation,
concatenation, quantize_rows) to the bit, without the activation's and the concatenation's bf16 round
trips through memory: one read of the inputs and one write of the e4m3 rows.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from zflux.kernels.quantize import fp8_like, store_fp8_rows
from zflux.kernels.rmsnorm import check_same_dtype, round_to, row_blocks

BLOCK_M, BLOCK_N = 16, 256
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # GELU-tanh's inner scale


@triton.jit
def _silu(gate):
    return gate / (1.0 + tl.exp(-gate))


@triton.jit
def _gelu_tanh(x):
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    e = tl.exp(-2.0 * tl.abs(u))  # in (0, 1]: no overflow at any u
    tanh = tl.where(u < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e)
    return 0.5 * x * (1.0 + tanh)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n_rows, F, gate_rs, up_rs, out_rs, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (rows < n_rows)[:, None] & (cols < F)[None, :]
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + rows[:, None] * gate_rs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + rows[:, None] * up_rs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    silu = round_to(_silu(gate), dtype)
    tl.store(out_ptr + rows[:, None] * out_rs + cols[None, :], (silu * up).to(dtype), mask=mask)


@triton.jit
def _activation_fp8_kernel(before_ptr, gate_ptr, up_ptr, out_ptr, scale_ptr, n_rows, F, before_rs, gate_rs, up_rs,
                           D: tl.constexpr, SILU_MUL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,): the whole row, D channels of `before` (if any), then F of the activation
    mask = (rows < n_rows)[:, None] & (cols < D + F)[None, :]
    rows = rows.to(tl.int64)
    dtype: tl.constexpr = gate_ptr.dtype.element_ty
    act_mask = mask & (cols >= D)[None, :]
    gate = tl.load(gate_ptr + rows[:, None] * gate_rs + (cols - D)[None, :], mask=act_mask, other=0.0).to(tl.float32)
    if SILU_MUL:
        up = tl.load(up_ptr + rows[:, None] * up_rs + (cols - D)[None, :], mask=act_mask, other=0.0).to(tl.float32)
        y = round_to(round_to(_silu(gate), dtype) * up, dtype)  # as silu_mul_ stores it
    else:
        y = round_to(_gelu_tanh(gate), dtype)  # as gelu_tanh_ stores it
    if D > 0:
        before_mask = mask & (cols < D)[None, :]
        before = tl.load(before_ptr + rows[:, None] * before_rs + cols[None, :], mask=before_mask, other=0.0).to(tl.float32)
        y = tl.where(before_mask, before, y)
    store_fp8_rows(y, out_ptr, scale_ptr, rows, cols, mask, D + F)


@triton.jit
def _gelu_tanh_kernel(x_ptr, out_ptr, n_rows, F, x_rs, out_rs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (rows < n_rows)[:, None] & (cols < F)[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_rs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * out_rs + cols[None, :], _gelu_tanh(x).to(out_ptr.dtype.element_ty), mask=mask)


def as_rows(x: Tensor, name: str) -> Tensor:
    """x (..., F) as a (rows, F) view with unit column stride, without copying (a copy would lose the writes to `out`)."""
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dim, got strides {x.stride()}")
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError as e:
        raise ValueError(f"{name} of shape {tuple(x.shape)} and strides {x.stride()} is not a view of rows") from e


def grid(n_rows: int, F: int) -> tuple[int, int]:
    return triton.cdiv(n_rows, BLOCK_M), triton.cdiv(F, BLOCK_N)


@torch.library.custom_op("zflux::silu_mul", mutates_args=("out",))
def silu_mul_(gate: Tensor, up: Tensor, out: Tensor) -> None:
    """out = silu(gate) * up for gate, up, out of one shape (..., F), each rows of unit column stride (views allowed)."""
    check_same_dtype(gate, up, out)
    if not gate.shape == up.shape == out.shape:
        raise ValueError(f"gate, up and out must share one shape, got {tuple(gate.shape)}, {tuple(up.shape)}, {tuple(out.shape)}")
    g, u, o = as_rows(gate, "gate"), as_rows(up, "up"), as_rows(out, "out")
    n_rows, F = g.shape
    _silu_mul_kernel[grid(n_rows, F)](g, u, o, n_rows, F, g.stride(0), u.stride(0), o.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                           num_warps=4)


@torch.library.custom_op("zflux::gelu_tanh", mutates_args=("out",))
def gelu_tanh_(x: Tensor, out: Tensor) -> None:
    """out = GELU-tanh(x) for x, out of one shape (..., F), each rows of unit column stride (views allowed)."""
    check_same_dtype(x, out)
    if x.shape != out.shape:
        raise ValueError(f"x and out must share one shape, got {tuple(x.shape)} and {tuple(out.shape)}")
    i, o = as_rows(x, "x"), as_rows(out, "out")
    n_rows, F = i.shape
    _gelu_tanh_kernel[grid(n_rows, F)](i, o, n_rows, F, i.stride(0), o.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4)


def shaped(x: Tensor, width: int) -> Tensor:
    """A stand-in (one element, expanded) of shape (..., width) with x's leading dims and device: what fp8_like reads."""
    return x.new_empty(1).expand(*x.shape[:-1], width)


@torch.library.custom_op("zflux::activation_fp8", mutates_args=())
def activation_fp8(gate: Tensor, up: Tensor | None = None, before: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """silu(gate) * up, or GELU-tanh(gate) without `up`, for gate, up (..., F), after the channels of `before` (..., D)
    if given -> e4m3 (..., D + F) and fp32 scales (..., 1) per row; each input rows of unit column stride (views allowed)."""
    check_same_dtype(gate, up, before)
    lead = gate.shape[:-1]
    if up is not None and up.shape != gate.shape:
        raise ValueError(f"gate and up must share one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if before is not None and before.shape[:-1] != lead:
        raise ValueError(f"before {tuple(before.shape)} and gate {tuple(gate.shape)} must share their leading dims")
    g = as_rows(gate, "gate")
    u = g if up is None else as_rows(up, "up")
    b = g if before is None else as_rows(before, "before")  # read only where D > 0
    n_rows, F = g.shape
    D = 0 if before is None else b.shape[1]
    out, scale = fp8_like(shaped(gate, D + F))
    block_m, block_n, num_warps = row_blocks(D + F)
    _activation_fp8_kernel[(triton.cdiv(n_rows, block_m),)](b, g, u, out, scale, n_rows, F, b.stride(0), g.stride(0), u.stride(0),
                                                           D=D, SILU_MUL=up is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                                                           num_warps=num_warps)
    return out, scale


@activation_fp8.register_fake
def _(gate: Tensor, up: Tensor | None = None, before: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return fp8_like(shaped(gate, gate.shape[-1] + (0 if before is None else before.shape[-1])))
