"""silu(gate) * up in one pass, written where the caller says: SwiGLU's activation.

PyTorch takes two passes (silu, then the product: five reads and writes of the activation); this
kernel reads gate and up once and writes once. Its destination may be a strided view, so FLUX.2's
single blocks write the activation straight into the second part of linear2's input, beside the
attention output, where a separate concatenation would copy both again. The silu is computed in
fp32 and rounded to the output dtype before the product, where PyTorch stores it, so the two agree
to the last bit but for the exponential's last fp32 ulp.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from zflux.kernels.rmsnorm import check_same_dtype, round_to

BLOCK_M, BLOCK_N = 16, 256


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n_rows, F, gate_rs, up_rs, out_rs, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (rows < n_rows)[:, None] & (cols < F)[None, :]
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + rows[:, None] * gate_rs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + rows[:, None] * up_rs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    silu = round_to(gate / (1.0 + tl.exp(-gate)), dtype)
    tl.store(out_ptr + rows[:, None] * out_rs + cols[None, :], (silu * up).to(dtype), mask=mask)


def as_rows(x: Tensor, name: str) -> Tensor:
    """x (..., F) as a (rows, F) view with unit column stride, without copying (a copy would lose the writes to `out`)."""
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dim, got strides {x.stride()}")
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError as e:
        raise ValueError(f"{name} of shape {tuple(x.shape)} and strides {x.stride()} is not a view of rows") from e


@torch.library.custom_op("zflux::silu_mul", mutates_args=("out",))
def silu_mul_(gate: Tensor, up: Tensor, out: Tensor) -> None:
    """out = silu(gate) * up for gate, up, out of one shape (..., F), each rows of unit column stride (views allowed)."""
    check_same_dtype(gate, up, out)
    if not gate.shape == up.shape == out.shape:
        raise ValueError(f"gate, up and out must share one shape, got {tuple(gate.shape)}, {tuple(up.shape)}, {tuple(out.shape)}")
    g, u, o = as_rows(gate, "gate"), as_rows(up, "up"), as_rows(out, "out")
    n_rows, F = g.shape
    grid = (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(F, BLOCK_N))
    _silu_mul_kernel[grid](g, u, o, n_rows, F, g.stride(0), u.stride(0), o.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                           num_warps=4)
