"""Fused normalisation + adaLN modulation: one kernel per form the two model families use.

On rows x (B, S, C) with per-sample vectors shift, scale, gate of shape (B, 1, C):

    layer_norm_modulate   (1 + scale) * LayerNorm(x) + shift          FLUX (shift optional: Z-Image's final layer)
    rms_norm_scale        RMSNorm(x) * w * (1 + scale)                Z-Image's modulated pre-norm
    gated_rms_residual    x + gate * RMSNorm(y) * w                   Z-Image's sandwich-norm residual
    gated_residual        x + gate * y                                FLUX's gated residual (torch.addcmul)

and a gated residual with the norm the next branch reads of its result, two outputs (out, normed):

    gated_rms_residual_norm_scale        out = x + gate * RMSNorm(y) * w2,  RMSNorm(out) * w1 * (1 + scale)
    gated_residual_layer_norm_modulate   out = x + gate * y,                (1 + scale) * LayerNorm(out) + shift

(Z-Image's attention residual then its MLP's pre-norm; FLUX's double-block attention residual then its MLP's adaLN),
which save a read of out against the two ops. Each is one read of every input and one write of each output, where
PyTorch takes three to five passes. The norms (and the fused forms' second output) also come as `*_fp8`: the output,
rounded to the input dtype, quantized per token to e4m3 with one fp32 scale per row (`zflux.kernels.quantize`), the
input an fp8 linear takes (`zflux.common.fp8`). Statistics are in fp32, and every intermediate the reference in
`zflux.common.norms` stores in the input dtype is rounded to it here too, so outputs agree to the last bit except where
fp32 summation order differs; the fused forms run the same device functions as the single ones, so they equal those
to the bit.
One program handles BLOCK_M rows of BLOCK_N >= C channels, as in `zflux.kernels.rmsnorm`.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from zflux.common.quant import E4M3
from zflux.kernels.quantize import fp8_like, store_fp8_rows
from zflux.kernels.rmsnorm import check_same_dtype, rms_normalize, round_to, row_blocks


@triton.jit
def _row_tile(n_rows, S, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sample index, token index and column index of this program's (BLOCK_M, BLOCK_N) tile, and its mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) over B*S
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < C)[None, :]  # (BLOCK_M, BLOCK_N)
    rows = rows.to(tl.int64)
    return rows // S, rows % S, cols, mask


@triton.jit
def _load(ptr, b, s, cols, mask, b_stride, s_stride):
    """fp32 tile of a (B, S, C) tensor with unit channel stride; s_stride 0 reads a per-sample (B, 1, C) vector."""
    return tl.load(ptr + b[:, None] * b_stride + s[:, None] * s_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(y, out_ptr, out_scale_ptr, rows, cols, mask, C, dtype: tl.constexpr, FP8_OUT: tl.constexpr):
    """Store the rows y (BLOCK_M, BLOCK_N) as `dtype`, or, for an fp8 linear next, rounded to `dtype` and quantized per row."""
    if FP8_OUT:
        store_fp8_rows(round_to(y, dtype), out_ptr, out_scale_ptr, rows, cols, mask, C)
    else:
        tl.store(out_ptr + rows[:, None] * C + cols[None, :], y.to(dtype), mask=mask)


@triton.jit
def _layer_norm_scaled(x, scale, mask, C, eps, dtype: tl.constexpr):
    """(1 + scale) * LayerNorm(x) of fp32 tiles, rounded to `dtype` (where the reference adds the shift)."""
    mean = tl.sum(x, axis=1) / C  # (BLOCK_M,)
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=1) / C + eps)
    y = round_to(centred * rstd[:, None], dtype)
    return round_to(y * round_to(1.0 + scale, dtype), dtype)


@triton.jit
def _rms_norm_scaled(x, w, scale, C, eps, dtype: tl.constexpr):
    """RMSNorm(x) * w * (1 + scale) of fp32 tiles, w (1, BLOCK_N); unrounded (the store rounds it)."""
    return rms_normalize(x, w, C, eps, dtype) * round_to(1.0 + scale, dtype)


@triton.jit
def _gated(x, y, gate, dtype: tl.constexpr):
    """x + gate * y of fp32 tiles rounded once to `dtype`, as torch.addcmul (the product of two bf16 values is exact)."""
    return round_to(x + gate * y, dtype)


@triton.jit
def _gated_rms(x, y, w, gate, C, eps, dtype: tl.constexpr):
    """x + gate * RMSNorm(y) * w of fp32 tiles, w (1, BLOCK_N), rounded to `dtype` after each of the reference's ops."""
    return round_to(x + round_to(gate * rms_normalize(y, w, C, eps, dtype), dtype), dtype)


@triton.jit
def _layer_norm_modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, out_scale_ptr, n_rows, S, C, x_sb, x_ss, shift_sb,
                                scale_sb, eps, HAS_SHIFT: tl.constexpr, FP8_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr):
    b, s, cols, mask = _row_tile(n_rows, S, C, BLOCK_M, BLOCK_N)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    x = _load(x_ptr, b, s, cols, mask, x_sb, x_ss)
    y = _layer_norm_scaled(x, _load(scale_ptr, b, s, cols, mask, scale_sb, 0), mask, C, eps, dtype)
    if HAS_SHIFT:
        y = y + _load(shift_ptr, b, s, cols, mask, shift_sb, 0)
    _store(y, out_ptr, out_scale_ptr, b * S + s, cols, mask, C, dtype, FP8_OUT)


@triton.jit
def _rms_norm_scale_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, out_scale_ptr, n_rows, S, C, x_sb, x_ss, scale_sb, eps,
                           FP8_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, s, cols, mask = _row_tile(n_rows, S, C, BLOCK_M, BLOCK_N)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    x = _load(x_ptr, b, s, cols, mask, x_sb, x_ss)
    y = _rms_norm_scaled(x, w[None, :], _load(scale_ptr, b, s, cols, mask, scale_sb, 0), C, eps, dtype)
    _store(y, out_ptr, out_scale_ptr, b * S + s, cols, mask, C, dtype, FP8_OUT)


@triton.jit
def _gated_rms_residual_kernel(x_ptr, y_ptr, w_ptr, gate_ptr, out_ptr, n_rows, S, C, x_sb, x_ss, y_sb, y_ss, gate_sb, eps,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, s, cols, mask = _row_tile(n_rows, S, C, BLOCK_M, BLOCK_N)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    out = _gated_rms(_load(x_ptr, b, s, cols, mask, x_sb, x_ss), _load(y_ptr, b, s, cols, mask, y_sb, y_ss), w[None, :],
                     _load(gate_ptr, b, s, cols, mask, gate_sb, 0), C, eps, dtype)
    _store(out, out_ptr, out_ptr, b * S + s, cols, mask, C, dtype, False)


@triton.jit
def _gated_residual_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, n_rows, S, C, x_sb, x_ss, y_sb, y_ss, gate_sb,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, s, cols, mask = _row_tile(n_rows, S, C, BLOCK_M, BLOCK_N)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    out = _gated(_load(x_ptr, b, s, cols, mask, x_sb, x_ss), _load(y_ptr, b, s, cols, mask, y_sb, y_ss),
                 _load(gate_ptr, b, s, cols, mask, gate_sb, 0), dtype)
    _store(out, out_ptr, out_ptr, b * S + s, cols, mask, C, dtype, False)


@triton.jit
def _gated_rms_residual_norm_scale_kernel(x_ptr, y_ptr, w_ptr, gate_ptr, norm_w_ptr, scale_ptr, out_ptr, normed_ptr,
                                          normed_scale_ptr, n_rows, S, C, x_sb, x_ss, y_sb, y_ss, gate_sb, scale_sb, eps,
                                          FP8_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, s, cols, mask = _row_tile(n_rows, S, C, BLOCK_M, BLOCK_N)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    norm_w = tl.load(norm_w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    out = _gated_rms(_load(x_ptr, b, s, cols, mask, x_sb, x_ss), _load(y_ptr, b, s, cols, mask, y_sb, y_ss), w[None, :],
                     _load(gate_ptr, b, s, cols, mask, gate_sb, 0), C, eps, dtype)
    _store(out, out_ptr, out_ptr, b * S + s, cols, mask, C, dtype, False)
    normed = _rms_norm_scaled(out, norm_w[None, :], _load(scale_ptr, b, s, cols, mask, scale_sb, 0), C, eps, dtype)
    _store(normed, normed_ptr, normed_scale_ptr, b * S + s, cols, mask, C, dtype, FP8_OUT)


@triton.jit
def _gated_residual_layer_norm_modulate_kernel(x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, out_ptr, normed_ptr,
                                               normed_scale_ptr, n_rows, S, C, x_sb, x_ss, y_sb, y_ss, gate_sb, shift_sb,
                                               scale_sb, eps, FP8_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
                                               BLOCK_N: tl.constexpr):
    b, s, cols, mask = _row_tile(n_rows, S, C, BLOCK_M, BLOCK_N)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    out = _gated(_load(x_ptr, b, s, cols, mask, x_sb, x_ss), _load(y_ptr, b, s, cols, mask, y_sb, y_ss),
                 _load(gate_ptr, b, s, cols, mask, gate_sb, 0), dtype)
    _store(out, out_ptr, out_ptr, b * S + s, cols, mask, C, dtype, False)
    normed = _layer_norm_scaled(out, _load(scale_ptr, b, s, cols, mask, scale_sb, 0), mask, C, eps, dtype)
    normed = normed + _load(shift_ptr, b, s, cols, mask, shift_sb, 0)
    _store(normed, normed_ptr, normed_scale_ptr, b * S + s, cols, mask, C, dtype, FP8_OUT)


def _rows(x: Tensor, name: str = "x") -> Tensor:
    """x as (B, S, C) with unit channel stride (any batch and token strides are fine)."""
    if x.ndim != 3:
        raise ValueError(f"{name} must be (B, S, C), got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _per_sample(v: Tensor, x: Tensor, name: str) -> tuple[Tensor, int]:
    """A (B or 1, 1, C) modulation vector with unit channel stride, and its batch stride (0 if broadcast)."""
    B, _, C = x.shape
    if v.ndim != 3 or v.shape[0] not in (1, B) or v.shape[1:] != (1, C):
        raise ValueError(f"{name} must be ({B}, 1, {C}), got shape {tuple(v.shape)}")
    v = v if v.stride(-1) == 1 else v.contiguous()
    return v, (v.stride(0) if v.shape[0] == B else 0)


def _weight(w: Tensor, x: Tensor) -> Tensor:
    """The (C,) norm weight for x (B, S, C), contiguous."""
    if w.shape != x.shape[-1:]:
        raise ValueError(f"weight has shape {tuple(w.shape)}, expected ({x.shape[-1]},)")
    return w.contiguous()


def _launch_config(x: Tensor) -> tuple[tuple[int], dict]:
    """Grid and block sizes for a row kernel over x (B, S, C)."""
    B, S, C = x.shape
    block_m, block_n, num_warps = row_blocks(C)
    return (triton.cdiv(B * S, block_m),), dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)


def _outputs(x: Tensor, fp8: bool) -> tuple[Tensor, Tensor]:
    """The (B, S, C) output of a norm kernel, in x's dtype or e4m3, and its per-token scales (B, S, 1) (a dummy unless fp8)."""
    B, S, C = x.shape
    out = torch.empty((B, S, C), dtype=E4M3 if fp8 else x.dtype, device=x.device)
    return out, torch.empty((B, S, 1) if fp8 else (1,), dtype=torch.float32, device=x.device)


def _layer_norm_modulate(x: Tensor, shift: Tensor | None, scale: Tensor, eps: float, fp8: bool) -> tuple[Tensor, Tensor]:
    check_same_dtype(x, shift, scale)
    x = _rows(x)
    has_shift = shift is not None
    scale, scale_sb = _per_sample(scale, x, "scale")
    shift, shift_sb = _per_sample(shift, x, "shift") if has_shift else (scale, 0)  # a dummy pointer when absent
    B, S, C = x.shape
    out, out_scale = _outputs(x, fp8)
    grid, meta = _launch_config(x)
    _layer_norm_modulate_kernel[grid](x, shift, scale, out, out_scale, B * S, S, C, x.stride(0), x.stride(1), shift_sb,
                                      scale_sb, eps, HAS_SHIFT=has_shift, FP8_OUT=fp8, **meta)
    return out, out_scale


def _rms_norm_scale(x: Tensor, weight: Tensor, scale: Tensor, eps: float, fp8: bool) -> tuple[Tensor, Tensor]:
    check_same_dtype(x, weight, scale)
    x = _rows(x)
    scale, scale_sb = _per_sample(scale, x, "scale")
    B, S, C = x.shape
    out, out_scale = _outputs(x, fp8)
    grid, meta = _launch_config(x)
    _rms_norm_scale_kernel[grid](x, _weight(weight, x), scale, out, out_scale, B * S, S, C, x.stride(0), x.stride(1),
                                 scale_sb, eps, FP8_OUT=fp8, **meta)
    return out, out_scale


@torch.library.custom_op("zflux::layer_norm_modulate", mutates_args=())
def layer_norm_modulate(x: Tensor, shift: Tensor | None, scale: Tensor, eps: float) -> Tensor:
    """(1 + scale) * LayerNorm(x) + shift on x (B, S, C), shift (or None) and scale (B, 1, C)."""
    return _layer_norm_modulate(x, shift, scale, eps, fp8=False)[0]


@torch.library.custom_op("zflux::layer_norm_modulate_fp8", mutates_args=())
def layer_norm_modulate_fp8(x: Tensor, shift: Tensor | None, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """layer_norm_modulate rounded to x's dtype, then quantized per token: e4m3 (B, S, C) and fp32 scales (B, S, 1)."""
    return _layer_norm_modulate(x, shift, scale, eps, fp8=True)


@torch.library.custom_op("zflux::rms_norm_scale", mutates_args=())
def rms_norm_scale(x: Tensor, weight: Tensor, scale: Tensor, eps: float) -> Tensor:
    """RMSNorm(x) * weight * (1 + scale) on x (B, S, C), weight (C,), scale (B, 1, C)."""
    return _rms_norm_scale(x, weight, scale, eps, fp8=False)[0]


@torch.library.custom_op("zflux::rms_norm_scale_fp8", mutates_args=())
def rms_norm_scale_fp8(x: Tensor, weight: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """rms_norm_scale rounded to x's dtype, then quantized per token: e4m3 (B, S, C) and fp32 scales (B, S, 1)."""
    return _rms_norm_scale(x, weight, scale, eps, fp8=True)


def _residual_rows(x: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor, Tensor, int, Tensor]:
    """x and y (B, S, C) with unit channel stride, the gate and its batch stride, and the empty (B, S, C) residual."""
    x, y = _rows(x), _rows(y, "y")
    if y.shape != x.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    gate, gate_sb = _per_sample(gate, x, "gate")
    return x, y, gate, gate_sb, torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _gated_rms_residual_norm_scale(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, norm_weight: Tensor, scale: Tensor,
                                   eps: float, fp8: bool) -> tuple[Tensor, Tensor, Tensor]:
    check_same_dtype(x, y, weight, gate, norm_weight, scale)
    x, y, gate, gate_sb, out = _residual_rows(x, y, gate)
    scale, scale_sb = _per_sample(scale, x, "scale")
    B, S, C = x.shape
    normed, normed_scale = _outputs(x, fp8)
    grid, meta = _launch_config(x)
    _gated_rms_residual_norm_scale_kernel[grid](x, y, _weight(weight, x), gate, _weight(norm_weight, x), scale, out, normed,
                                                normed_scale, B * S, S, C, x.stride(0), x.stride(1), y.stride(0),
                                                y.stride(1), gate_sb, scale_sb, eps, FP8_OUT=fp8, **meta)
    return out, normed, normed_scale


def _gated_residual_layer_norm_modulate(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float,
                                        fp8: bool) -> tuple[Tensor, Tensor, Tensor]:
    check_same_dtype(x, y, gate, shift, scale)
    x, y, gate, gate_sb, out = _residual_rows(x, y, gate)
    shift, shift_sb = _per_sample(shift, x, "shift")
    scale, scale_sb = _per_sample(scale, x, "scale")
    B, S, C = x.shape
    normed, normed_scale = _outputs(x, fp8)
    grid, meta = _launch_config(x)
    _gated_residual_layer_norm_modulate_kernel[grid](x, y, gate, shift, scale, out, normed, normed_scale, B * S, S, C,
                                                     x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate_sb,
                                                     shift_sb, scale_sb, eps, FP8_OUT=fp8, **meta)
    return out, normed, normed_scale


@torch.library.custom_op("zflux::gated_rms_residual", mutates_args=())
def gated_rms_residual(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, eps: float) -> Tensor:
    """x + gate * RMSNorm(y) * weight on x, y (B, S, C), weight (C,), gate (B, 1, C)."""
    check_same_dtype(x, y, weight, gate)
    x, y, gate, gate_sb, out = _residual_rows(x, y, gate)
    B, S, C = x.shape
    grid, meta = _launch_config(x)
    _gated_rms_residual_kernel[grid](x, y, _weight(weight, x), gate, out, B * S, S, C, x.stride(0), x.stride(1),
                                     y.stride(0), y.stride(1), gate_sb, eps, **meta)
    return out


@torch.library.custom_op("zflux::gated_residual", mutates_args=())
def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """x + gate * y on x, y (B, S, C), gate (B, 1, C), rounded once as torch.addcmul(x, gate, y)."""
    check_same_dtype(x, y, gate)
    x, y, gate, gate_sb, out = _residual_rows(x, y, gate)
    B, S, C = x.shape
    grid, meta = _launch_config(x)
    _gated_residual_kernel[grid](x, y, gate, out, B * S, S, C, x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate_sb,
                                 **meta)
    return out


@torch.library.custom_op("zflux::gated_rms_residual_norm_scale", mutates_args=())
def gated_rms_residual_norm_scale(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, norm_weight: Tensor, scale: Tensor,
                                  eps: float) -> tuple[Tensor, Tensor]:
    """gated_rms_residual(x, y, weight, gate), and rms_norm_scale of it with norm_weight (C,) and scale (B, 1, C)."""
    return _gated_rms_residual_norm_scale(x, y, weight, gate, norm_weight, scale, eps, fp8=False)[:2]


@torch.library.custom_op("zflux::gated_rms_residual_norm_scale_fp8", mutates_args=())
def gated_rms_residual_norm_scale_fp8(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, norm_weight: Tensor,
                                      scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """gated_rms_residual_norm_scale with the norm quantized as rms_norm_scale_fp8's: the residual, e4m3 and scales."""
    return _gated_rms_residual_norm_scale(x, y, weight, gate, norm_weight, scale, eps, fp8=True)


@torch.library.custom_op("zflux::gated_residual_layer_norm_modulate", mutates_args=())
def gated_residual_layer_norm_modulate(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                                       eps: float) -> tuple[Tensor, Tensor]:
    """gated_residual(x, y, gate), and layer_norm_modulate of it with shift and scale (B, 1, C)."""
    return _gated_residual_layer_norm_modulate(x, y, gate, shift, scale, eps, fp8=False)[:2]


@torch.library.custom_op("zflux::gated_residual_layer_norm_modulate_fp8", mutates_args=())
def gated_residual_layer_norm_modulate_fp8(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                                           eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """gated_residual_layer_norm_modulate with the norm quantized as layer_norm_modulate_fp8's: the residual, e4m3 and scales."""
    return _gated_residual_layer_norm_modulate(x, y, gate, shift, scale, eps, fp8=True)


@layer_norm_modulate.register_fake
def _(x: Tensor, shift: Tensor | None, scale: Tensor, eps: float) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@rms_norm_scale.register_fake
def _(x: Tensor, weight: Tensor, scale: Tensor, eps: float) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@layer_norm_modulate_fp8.register_fake
def _(x: Tensor, shift: Tensor | None, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return fp8_like(x)


@rms_norm_scale_fp8.register_fake
def _(x: Tensor, weight: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return fp8_like(x)


@gated_rms_residual.register_fake
def _(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, eps: float) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@gated_residual.register_fake
def _(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@gated_rms_residual_norm_scale.register_fake
def _(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, norm_weight: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(2))


@gated_rms_residual_norm_scale_fp8.register_fake
def _(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, norm_weight: Tensor, scale: Tensor,
      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), *fp8_like(x)


@gated_residual_layer_norm_modulate.register_fake
def _(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(2))


@gated_residual_layer_norm_modulate_fp8.register_fake
def _(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), *fp8_like(x)
