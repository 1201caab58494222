"""Per-token fp8 quantization: rows of x (R, K) -> e4m3 rows and one fp32 scale per row.

As `zflux.common.quant.quantize` defines it (per-row):

    s = max(amax(x_row), TINY) / 448        q = e4m3(clamp(x_row / s, -448, 448))

one read of x and one write of q and s, where PyTorch takes five passes. `store_fp8_rows` is the
tail the fused norm kernels (`zflux.kernels.modulate`) end with to hand their rows to an fp8 linear.
`quantize_heads` does the same for attention's (B, H, S, D) inputs, with a scale per token, per head or per channel
of each head (v's, for the fp8 flash kernel, which applies those after the PV product), optionally transposed.
`quantize_values` quantizes v per channel, its maxima from one pass over each stream (`channel_amax`), straight into
the join of two streams' values.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from zflux.common.quant import E4M3, E4M3_MAX, TINY
from zflux.kernels.rmsnorm import row_blocks

_MAX = tl.constexpr(E4M3_MAX)
_TINY = tl.constexpr(TINY)


@triton.jit
def store_fp8_rows(y, out_ptr, scale_ptr, rows, cols, mask, n_cols):
    """Quantize the fp32 tile y (BLOCK_M, BLOCK_N) per row to e4m3 at out_ptr (R, n_cols), its row scales at scale_ptr."""
    amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1)  # (BLOCK_M,)
    scale = tl.maximum(amax, _TINY) / _MAX
    q = tl.clamp(y / scale[:, None], -_MAX, _MAX)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], q.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=tl.max(mask.to(tl.int32), axis=1) > 0)


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, n_rows, n_cols, x_row_stride,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]  # (BLOCK_M, BLOCK_N)
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    store_fp8_rows(x, out_ptr, scale_ptr, rows, cols, mask, n_cols)


@torch.library.custom_op("zflux::quantize_fp8_rows", mutates_args=())
def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., K) -> e4m3 (..., K) and fp32 scales (..., 1), one per row."""
    rows = x.reshape(-1, x.shape[-1])  # (R, K)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=E4M3, device=x.device)  # (..., K)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)  # (..., 1)
    block_m, block_n, num_warps = row_blocks(rows.shape[1])
    _quantize_rows_kernel[(triton.cdiv(rows.shape[0], block_m),)](rows, out, scale, rows.shape[0], rows.shape[1],
                                                                 rows.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                                                                 num_warps=num_warps)
    return out, scale


@triton.jit
def _quantize_heads_kernel(x_ptr, out_ptr, scale_ptr, S, H, x_sb, x_sh, x_ss, out_sh, out_ss, out_sd, scale_sh, scale_sd,
                           D: tl.constexpr, BLOCK_S: tl.constexpr, PER_TOKEN: tl.constexpr):
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    dims = tl.arange(0, D)
    mask = (tokens < S)[:, None]  # (BLOCK_S, 1)
    x = tl.load(x_ptr + b * x_sb + h * x_sh + tokens[:, None] * x_ss + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    if PER_TOKEN:
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), _TINY) / _MAX  # (BLOCK_S,)
        tl.store(scale_ptr + bh * S + tokens, scale, mask=tokens < S)
        scale = scale[:, None]
    else:  # given: one per head (B, H) or per channel (B, H, D)
        scale = tl.load(scale_ptr + bh * scale_sh + dims * scale_sd)[None, :]  # (1, D)
    q = tl.clamp(x / scale, -_MAX, _MAX).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + bh * out_sh + tokens[:, None] * out_ss + dims[None, :] * out_sd, q, mask=mask)


AMAX_TOKENS = 64  # tokens per program of _channel_amax_kernel


@triton.jit
def _channel_amax_kernel(x_ptr, amax_ptr, S, H, x_sb, x_sh, x_ss, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Fold each channel's largest |x| over BLOCK_S tokens of one (batch, head) into amax (B, H, D), atomically."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    dims = tl.arange(0, D)
    x = tl.load(x_ptr + b * x_sb + h * x_sh + tokens[:, None] * x_ss + dims[None, :], mask=(tokens < S)[:, None], other=0.0)
    tl.atomic_max(amax_ptr + bh * D + dims, tl.max(tl.abs(x.to(tl.float32)), axis=0))


def channel_amax(xs: list[Tensor]) -> Tensor:
    """The largest |x| per channel of each head over the tokens of every x (B, H, S_i, D) (unit channel stride): (B, H,
    D) fp32. One pass over each, folding maxima of 64-token tiles atomically (exact in any order): on the H100 24 us
    against torch's strided reduction's 29 over Z-Image's v (a view of its qkv projection), both streams of a joint
    attention into one buffer."""
    B, H, _, D = xs[0].shape
    amax = torch.zeros((B, H, D), dtype=torch.float32, device=xs[0].device)
    for x in xs:
        if x.stride(-1) != 1:
            x = x.contiguous()
        S = x.shape[2]
        _channel_amax_kernel[(B * H, triton.cdiv(S, AMAX_TOKENS))](x, amax, S, H, *x.stride()[:3], D=D, BLOCK_S=AMAX_TOKENS,
                                                                  num_warps=4)
    return amax


def quantize_heads(x: Tensor, per: str, transpose: bool = False) -> tuple[Tensor, Tensor]:
    """x (B, H, S, D) (any strides, unit channel stride) -> e4m3 (B, H, S, D), or (B, H, D, S') transposed (S' = S
    rounded up to 16, so that each row is 16-byte aligned for TMA), and fp32 scales: per "token" (B, H, S), one for each
    token and head; per "head" (B, H); per "channel" (B, H, D), each over the head's tokens."""
    B, H, S, D = x.shape
    out = torch.empty((B, H, D, padded(S)) if transpose else (B, H, S, D), dtype=E4M3, device=x.device)
    if per == "token":
        scale = torch.empty((B, H, S), dtype=torch.float32, device=x.device)
    else:  # the maxima first: over the head's tokens (and channels), then the quantizing pass
        amax = channel_amax([x])  # (B, H, D)
        scale = (amax.amax(dim=-1) if per == "head" else amax).clamp_(min=TINY) / E4M3_MAX
    _quantize_heads(x, out, scale, per, transpose)
    return out, scale


def quantize_values(vs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Streams' values (B, H, S_i, D) joined along the tokens and quantized per channel of each head: what
    quantize_heads(torch.cat(vs, dim=2), per="channel", transpose=True) returns, to the bit, from one max-reduction and
    one quantizing pass over each stream's view, with no concatenation. (Taking the maxima inside the QK-norm + RoPE
    kernel, which reads the same rows, was slower on the H100: as atomic maxima, 3.65 against 1.65 + 1.02 ms per Z-Image
    fp8 NFE; as maxima per tile of tokens reduced after, 3.16 + 0.39.)"""
    B, H, _, D = vs[0].shape
    out = torch.empty((B, H, D, padded(sum(v.shape[2] for v in vs))), dtype=E4M3, device=vs[0].device)
    scale = channel_amax(vs).clamp_(min=TINY) / E4M3_MAX  # (B, H, D)
    offset = 0
    for v in vs:
        _quantize_heads(v, out[..., offset:], scale, "channel", transpose=True)
        offset += v.shape[2]
    return out, scale


def padded(S: int) -> int:
    """A transposed head's row length: S tokens rounded up to 16."""
    return triton.cdiv(S, 16) * 16


def _quantize_heads(x: Tensor, out: Tensor, scale: Tensor, per: str, transpose: bool) -> None:
    """x (B, H, S, D) quantized into out (B, H, S, D) or, transposed, (B, H, D, >= S), a view; per "token": its scales
    stored into `scale` (B, H, S), else divided by the given ones."""
    B, H, S, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out_ss, out_sd = (out.stride(3), out.stride(2)) if transpose else (out.stride(2), out.stride(3))
    block_s = max(1, 4096 // D)
    _quantize_heads_kernel[(B * H, triton.cdiv(S, block_s))](x, out, scale, S, H, *x.stride()[:3], out.stride(1), out_ss,
                                                             out_sd, *((D, 1) if per == "channel" else (1, 0)), D=D, BLOCK_S=block_s,
                                                             PER_TOKEN=per == "token", num_warps=4)


def fp8_like(x: Tensor) -> tuple[Tensor, Tensor]:
    """Empty e4m3 rows shaped like x (..., K) and their fp32 scales (..., 1): the fake (meta) outputs of the fp8 ops."""
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@quantize_rows.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return fp8_like(x)
