"""Fused RMSNorm, and the QK step of attention: RMSNorm over the head dim of q and k, then RoPE.

RMSNorm of a row x (C channels), as `zflux.common.norms.rms_norm` defines it:

    y = x / sqrt(mean(x^2) + eps) * w

all in fp32, rounded once to the input dtype (as F.rms_norm does). One program
normalises BLOCK_M rows of BLOCK_N >= C channels held in registers: one read, one write per element.

`qk_norm_rope` does, for q and k of shape (B, H, S, D), what `zflux.common.rope.qk_norm_rope` does in
four passes: RMSNorm over D, then the rotation of adjacent channel pairs (x0, x1) by the fp32
tables (cos, sin) of shape (B, S, D/2):

    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)

One program handles BLOCK_S tokens of one (batch, head), reading q and k straight out of whatever
view the caller has (usually a slice of the fused qkv projection, (B, S, 3, H, D) in memory) and
writing them (B, H, S, D)-contiguous, the layout attention reads per head.

`qk_norm_rope_into` writes them instead at one stream's tokens of tensors that join two streams (FLUX's text and
image), and, where attention takes v plain, copies the stream's v rows into the joined v; for the fp8 attention kernel
it quantizes q and k as it stores them (v is quantized by `zflux.kernels.quantize.quantize_values`).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from zflux.common.quant import E4M3, E4M3_MAX, TINY

_E4M3_MAX = tl.constexpr(E4M3_MAX)
_TINY = tl.constexpr(TINY)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """Round fp32 values to `dtype` and back: where the PyTorch reference stores an intermediate."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def rms_normalize(x, w, n_cols, eps, dtype: tl.constexpr):
    """x * rsqrt(mean(x^2) + eps) * w per row of a (rows, BLOCK) fp32 tile, rounded to `dtype`.

    Columns >= n_cols must hold 0 in x.
    """
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (rows,)
    return round_to(x * rstd[:, None] * w, dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_rows, n_cols, x_row_stride, eps,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]  # (BLOCK_M, BLOCK_N)
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = rms_normalize(x, w[None, :], n_cols, eps, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], y, mask=mask)


def row_blocks(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for row-wise kernels: whole rows in registers, ~2K+ elements a program."""
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, 2048 // block_n)
    num_warps = min(16, max(4, block_m * block_n // 1024))
    return block_m, block_n, num_warps


def check_same_dtype(*tensors: Tensor | None) -> None:
    """The kernels compute in fp32 and store in one dtype; mixed inputs are a caller's mistake."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) != 1:
        raise ValueError(f"fused norm inputs must share one dtype, got {sorted(map(str, dtypes))}")


@torch.library.custom_op("zflux::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Fused RMSNorm over the last dim of x (..., C) with weight (C,)."""
    check_same_dtype(x, weight)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},)")
    rows = x.reshape(-1, x.shape[-1])  # (R, C): a view unless x is non-contiguous across rows
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (..., C)
    block_m, block_n, num_warps = row_blocks(rows.shape[1])
    grid = (triton.cdiv(rows.shape[0], block_m),)
    _rms_norm_kernel[grid](rows, weight.contiguous(), out, rows.shape[0], rows.shape[1], rows.stride(0), eps,
                           BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return out


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)



@triton.jit
def _norm_rope(x_ptr, w, cos, sin, tokens, mask, s_stride, eps, dtype: tl.constexpr, D: tl.constexpr,
               BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a (BLOCK_S, D) tile of one head, RMSNorm it (rounded to `dtype`), rotate it: fp32 (BLOCK_S, BLOCK_D)."""
    dims = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + tokens[:, None] * s_stride + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    x = rms_normalize(x, w[None, :], D, eps, dtype)  # (BLOCK_S, BLOCK_D)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_S, BLOCK_D // 2, 2)))  # (BLOCK_S, BLOCK_D/2) each
    out = tl.join(x0 * cos - x1 * sin, x1 * cos + x0 * sin)  # (BLOCK_S, BLOCK_D/2, 2)
    return tl.reshape(out, (BLOCK_S, BLOCK_D))


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, kb_ptr, cos_ptr, sin_ptr, q_out, k_out, q_scale_out, k_scale_out,
                         v_out, S, H, S_out, offset, q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, cos_sb, cos_ss,
                         sin_sb, sin_ss, eps, sqrt_d, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                         FP8: tl.constexpr, COPY_V: tl.constexpr):
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    dims = tl.arange(0, BLOCK_D)
    mask = (tokens < S)[:, None] & (dims < D)[None, :]  # (BLOCK_S, BLOCK_D)
    half = tl.arange(0, BLOCK_D // 2)
    half_mask = (tokens < S)[:, None] & (half < D // 2)[None, :]  # (BLOCK_S, BLOCK_D/2)
    cos = tl.load(cos_ptr + b * cos_sb + tokens[:, None] * cos_ss + half[None, :], mask=half_mask, other=0.0)
    sin = tl.load(sin_ptr + b * sin_sb + tokens[:, None] * sin_ss + half[None, :], mask=half_mask, other=0.0)
    qw = tl.load(qw_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)
    kw = tl.load(kw_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)
    dtype: tl.constexpr = q_ptr.dtype.element_ty
    q = _norm_rope(q_ptr + b * q_sb + h * q_sh, qw, cos, sin, tokens, mask, q_ss, eps, dtype, D, BLOCK_S, BLOCK_D)
    k = _norm_rope(k_ptr + b * k_sb + h * k_sh, kw, cos, sin, tokens, mask, k_ss, eps, dtype, D, BLOCK_S, BLOCK_D)
    # (BLOCK_S, BLOCK_D): tokens offset.. of the (B, H, S_out, D)-contiguous outputs, where the streams are joined
    out = (bh.to(tl.int64) * S_out + offset + tokens[:, None]) * D + dims[None, :]
    if COPY_V:  # v's rows into the joined v
        v = tl.load(v_ptr + b * v_sb + h * v_sh + tokens[:, None] * v_ss + dims[None, :], mask=mask, other=0.0)
        tl.store(v_out + out, v, mask=mask)
    if FP8:
        # q: one scale per token. k: one for the whole tensor, from a bound rather than a maximum (which would take a
        # pass of its own): a row normed to RMS 1 has no entry above sqrt(D), RoPE turns channel pairs without
        # lengthening them, so |k| <= sqrt(D) max|w| (w: k's norm weight, or the largest of kb's, where streams with
        # their own weights share one scale). e4m3 is floating point: the bound costs range, not precision.
        q_scale = tl.maximum(tl.max(tl.abs(q), axis=1), _TINY) / _E4M3_MAX  # (BLOCK_S,)
        tl.store(q_scale_out + bh * S_out + offset + tokens, q_scale, mask=tokens < S)
        tl.store(q_out + out, tl.clamp(q / q_scale[:, None], -_E4M3_MAX, _E4M3_MAX).to(q_out.dtype.element_ty), mask=mask)
        bound = tl.max(tl.abs(tl.load(kb_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)), axis=0)
        k_scale = tl.maximum(tl.maximum(tl.max(tl.abs(kw), axis=0), bound) * sqrt_d, _TINY) / _E4M3_MAX
        tl.store(k_out + out, tl.clamp(k / k_scale, -_E4M3_MAX, _E4M3_MAX).to(k_out.dtype.element_ty), mask=mask)
        if bh + tl.program_id(1) == 0:
            tl.store(k_scale_out, k_scale)
    else:
        tl.store(q_out + out, q.to(dtype), mask=mask)
        tl.store(k_out + out, k.to(dtype), mask=mask)


def _rope_table_strides(t: Tensor, B: int, S: int, half: int) -> tuple[Tensor, int, int]:
    """A (B or 1, S, D/2) fp32 table with unit channel stride, and its batch and token strides (batch 0 if broadcast)."""
    if t.dtype != torch.float32 or t.ndim != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (S, half):
        raise ValueError(f"RoPE tables must be fp32 ({B}, {S}, {half}), got {t.dtype} {tuple(t.shape)}")
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] == B else 0), t.stride(1)


def _check_qk(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor) -> None:
    check_same_dtype(q, k, q_weight, k_weight)
    if q.ndim != 4 or k.shape != q.shape or q.shape[-1] % 2:
        raise ValueError(f"q and k must both be (B, H, S, D) with D even, got {tuple(q.shape)} and {tuple(k.shape)}")
    D = q.shape[-1]
    if q_weight.shape != (D,) or k_weight.shape != (D,):
        raise ValueError(f"q/k norm weights must be ({D},), got {tuple(q_weight.shape)}, {tuple(k_weight.shape)}")


def _launch(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float, cos: Tensor, sin: Tensor,
            outs: tuple[Tensor, Tensor, Tensor, Tensor], offset: int = 0, k_bound_weight: Tensor | None = None,
            v: Tensor | None = None, v_out: Tensor | None = None) -> None:
    """Norm and rotate q, k (B, H, S, D) into tokens [offset, offset + S) of outs = (q_out, k_out, q_scale, k_scale):
    (B, H, S_out, D)-contiguous q_out and k_out; with e4m3 outputs, fp32 scales (B, H, S_out) per token for q and (1,)
    for k (bounded by k_bound_weight's entries too). With v (B, H, S, D): its rows copied to the same tokens of v_out
    (B, H, S_out, D)."""
    B, H, S, D = q.shape
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    if v is not None and v.stride(-1) != 1:
        v = v.contiguous()
    cos, cos_sb, cos_ss = _rope_table_strides(cos, B, S, D // 2)
    sin, sin_sb, sin_ss = _rope_table_strides(sin, B, S, D // 2)
    block_d = triton.next_power_of_2(D)
    block_s = max(1, 4096 // block_d)  # two (BLOCK_S, D) tiles of ~4K elements in flight
    # Heads vary fastest across programs: programs running together read whole qkv rows between them.
    grid = (B * H, triton.cdiv(S, block_s))
    k_weight = k_weight.contiguous()
    copy_v = v is not None
    v, v_out = (q, q) if v is None else (v, v_out)
    _qk_norm_rope_kernel[grid](q, k, v, q_weight.contiguous(), k_weight, k_weight if k_bound_weight is None else k_bound_weight,
                               cos, sin, *outs, v_out, S, H, outs[0].shape[2], offset, *q.stride()[:3], *k.stride()[:3],
                               *v.stride()[:3], cos_sb, cos_ss, sin_sb, sin_ss, eps, D**0.5, D=D, BLOCK_S=block_s,
                               BLOCK_D=block_d, FP8=outs[0].dtype == E4M3, COPY_V=copy_v, num_warps=8)


@torch.library.custom_op("zflux::qk_norm_rope", mutates_args=())
def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float, cos: Tensor,
                 sin: Tensor) -> tuple[Tensor, Tensor]:
    """RMSNorm over the head dim of q and k (B, H, S, D), then RoPE by (B, S, D/2) tables; outputs contiguous."""
    _check_qk(q, k, q_weight, k_weight)
    q_out, k_out = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)
    _launch(q, k, q_weight, k_weight, eps, cos, sin, (q_out, k_out, q_out, k_out))
    return q_out, k_out


@qk_norm_rope.register_fake
def _(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)


@torch.library.custom_op("zflux::qk_norm_rope_into", mutates_args=("q_out", "k_out", "q_scale", "k_scale", "v_out"))
def qk_norm_rope_into(q: Tensor, k: Tensor, v: Tensor | None, q_weight: Tensor, k_weight: Tensor, k_bound_weight: Tensor,
                      eps: float, cos: Tensor, sin: Tensor, offset: int, q_out: Tensor, k_out: Tensor,
                      q_scale: Tensor | None, k_scale: Tensor | None, v_out: Tensor | None) -> None:
    """One stream's share of attention's joined inputs: `qk_norm_rope` of q, k (B, H, S, D) written at tokens
    [offset, offset + S) of q_out, k_out (B, H, S_out, D), and v's rows copied there in v_out (B, H, S_out, D).

    e4m3 q_out and k_out: quantized for the fp8 attention kernel as they are stored, q with fp32 scales per token into
    q_scale (B, H, S_out), k with one scale into k_scale (1,): sqrt(D) x the largest |weight| of k_weight and
    k_bound_weight (another stream's, where two streams' keys are joined: both calls then store the same scale), over
    448."""
    _check_qk(q, k, q_weight, k_weight)
    B, H, S, D = q.shape
    if k_bound_weight.shape != k_weight.shape:
        raise ValueError(f"k_bound_weight must be shaped like k_weight {tuple(k_weight.shape)}, got {tuple(k_bound_weight.shape)}")
    S_out = q_out.shape[2]
    if q_out.shape != (B, H, S_out, D) or k_out.shape != q_out.shape or not q_out.is_contiguous() or not k_out.is_contiguous() \
            or offset < 0 or offset + S > S_out:
        raise ValueError(f"q_out and k_out must be contiguous ({B}, {H}, S_out, {D}) holding tokens [{offset}, {offset + S}), "
                         f"got {tuple(q_out.shape)}, {tuple(k_out.shape)}")
    if v is not None and (v.shape != q.shape or v_out is None or v_out.shape != q_out.shape or v_out.dtype != v.dtype
                          or not v_out.is_contiguous()):
        raise ValueError(f"v must be shaped like q, with v_out a contiguous join of its dtype shaped like q_out, got "
                         f"{tuple(v.shape)}, {None if v_out is None else tuple(v_out.shape)}")
    fp8 = q_out.dtype == E4M3
    outs = (q_out, k_out, q_scale, k_scale) if fp8 else (q_out, k_out, q_out, k_out)
    _launch(q, k, q_weight, k_weight, eps, cos, sin, outs, offset, k_bound_weight.contiguous(), v, v_out)
