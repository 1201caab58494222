"""Fused GroupNorm + SiLU for the autoencoders' ResNet blocks, in NCHW or channels-last memory.

For x (B, C, H, W) in G groups of C/G channels, as `zflux.common.norms.group_norm_silu` defines it:

    mean, var over each (b, group): its C/G channels at all H*W positions
    y = (x - mean) / sqrt(var + eps) * w + b          (w, b per channel)
    out = y * sigmoid(y)

all in fp32, rounded once to x's dtype (PyTorch rounds twice: after the norm, after the SiLU).

Two passes, each reading x once. `_group_stats_kernel`: one program per (b, tile of BLOCK_S
positions) loads a (BLOCK_S, C) tile, every channel of those positions, and writes each group's
mean (summed twice: the second sum, of the deviations from the first mean, corrects its rounding)
and sum of squared deviations over the tile. `_merge_stats_kernel`: one program per (b, group)
merges its tiles' statistics (Chan's parallel formula, exact in fp32 unlike E[x^2] - E[x]^2) into
the group's mean and 1/std, one launch where torch ops took a dozen (launch gaps in an eager
decode). `_group_norm_silu_kernel`: the same tiles again, normalised, scaled, shifted, SiLU'd
(unless `silu` is off: the attention block's plain GroupNorm), stored in x's own memory format.
Whole rows of C channels per position are read, so channels-last memory (C contiguous) reads in
long runs; NCHW reads BLOCK_S-long runs per channel.

Both passes take an optional per-channel `x_bias` added to x as it is loaded: the bias of the
convolution that made x, which the ResNet block runs without it. PyTorch adds a convolution's bias
in a pass of its own over the output (at 1024x1024, 256-512 MiB read and written per convolution);
folded in here, and into `bias_residual_` (h + bias + x, the block's output, one pass where PyTorch
takes two), it costs nothing: those passes were 6.4 of the 34 ms of GPU time a 1024x1024 decode took
(H100 profile, bench/RESULTS.md).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

MERGE_BLOCK = 4096  # tiles' statistics per step of the merge: 4 steps for C = 128 at 1024x1024 (16384 tiles of 64 pixels)


@triton.jit
def _tile(x_ptr, xb_ptr, b, tile, HW, x_sb, x_sc, x_ss, C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_X_BIAS: tl.constexpr):
    """The (BLOCK_S, C) fp32 tile of positions tile*BLOCK_S.. of sample b plus x_bias if any (0 past HW), and its
    (BLOCK_S, 1) row mask."""
    s = tile * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    c = tl.arange(0, C)  # (C,)
    rows = (s < HW)[:, None]  # (BLOCK_S, 1)
    offsets = b.to(tl.int64) * x_sb + s.to(tl.int64)[:, None] * x_ss + c[None, :] * x_sc  # (BLOCK_S, C)
    x = tl.load(x_ptr + offsets, mask=rows, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        x = tl.where(rows, x + tl.load(xb_ptr + c).to(tl.float32)[None, :], 0.0)
    return x, rows


@triton.jit
def _per_channel(v, G: tl.constexpr, C: tl.constexpr):
    """A (G,) per-group vector repeated over each group's C/G channels: (C,)."""
    return tl.reshape(tl.broadcast_to(v[:, None], (G, C // G)), (C,))


@triton.jit
def _group_sum(t, G: tl.constexpr, C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Sum of a (BLOCK_S, C) tile over positions and over each group's channels: (G,)."""
    return tl.sum(tl.sum(tl.reshape(t, (BLOCK_S, G, C // G)), axis=2), axis=0)


@triton.jit
def _group_stats_kernel(x_ptr, xb_ptr, mean_ptr, m2_ptr, HW, x_sb, x_sc, x_ss,
                        C: tl.constexpr, G: tl.constexpr, BLOCK_S: tl.constexpr, HAS_X_BIAS: tl.constexpr):
    tile, b, n_tiles = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    x, rows = _tile(x_ptr, xb_ptr, b, tile, HW, x_sb, x_sc, x_ss, C, BLOCK_S, HAS_X_BIAS)
    count = tl.minimum(HW - tile * BLOCK_S, BLOCK_S) * (C // G)  # elements of each group in this tile
    rough = _group_sum(x, G, C, BLOCK_S) / count  # (G,)
    d = tl.where(rows, x - _per_channel(rough, G, C)[None, :], 0.0)  # (BLOCK_S, C)
    # A second pass over the deviations corrects the rounding of the first sum (large where values sit far from 0).
    shift = _group_sum(d, G, C, BLOCK_S) / count  # (G,)
    mean = rough + shift
    d = tl.where(rows, d - _per_channel(shift, G, C)[None, :], 0.0)
    groups = tl.arange(0, G)
    out = (b * G + groups).to(tl.int64) * n_tiles + tile  # (G,) into (B, G, n_tiles): each group's tiles in one run
    tl.store(mean_ptr + out, mean)
    tl.store(m2_ptr + out, _group_sum(d * d, G, C, BLOCK_S))


@triton.jit
def _tile_counts(t, n_tiles, tile_count, last_count):
    """Elements of a group in tiles t (BLOCK_T,): tile_count, the last tile's last_count, 0 past the tiles."""
    return tl.where(t == n_tiles - 1, last_count, tl.where(t < n_tiles, tile_count, 0.0))


@triton.jit
def _merge_stats_kernel(means_ptr, m2s_ptr, mean_ptr, rstd_ptr, n_tiles, tile_count, last_count, total, eps,
                        BLOCK_T: tl.constexpr):
    """Chan's merge of one (b, group)'s tiles: mean = sum(n_t mean_t) / n, M2 = sum(M2_t + n_t (mean_t - mean)^2)."""
    group = tl.program_id(0)
    row = group.to(tl.int64) * n_tiles
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, n_tiles, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        acc += tl.load(means_ptr + row + t, mask=t < n_tiles, other=0.0) * _tile_counts(t, n_tiles, tile_count, last_count)
    mean = tl.sum(acc, axis=0) / total
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, n_tiles, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        d = tl.load(means_ptr + row + t, mask=t < n_tiles, other=0.0) - mean
        acc += tl.load(m2s_ptr + row + t, mask=t < n_tiles, other=0.0) + _tile_counts(t, n_tiles, tile_count, last_count) * d * d
    tl.store(mean_ptr + group, mean)
    tl.store(rstd_ptr + group, tl.math.rsqrt(tl.sum(acc, axis=0) / total + eps))


@triton.jit
def _group_norm_silu_kernel(x_ptr, xb_ptr, out_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, HW, x_sb, x_sc, x_ss, o_sb, o_sc,
                            o_ss, C: tl.constexpr, G: tl.constexpr, BLOCK_S: tl.constexpr, HAS_X_BIAS: tl.constexpr,
                            SILU: tl.constexpr):
    tile, b = tl.program_id(0), tl.program_id(1)
    x, rows = _tile(x_ptr, xb_ptr, b, tile, HW, x_sb, x_sc, x_ss, C, BLOCK_S, HAS_X_BIAS)
    groups = b.to(tl.int64) * G + tl.arange(0, G)  # (G,) into (B, G)
    mean = _per_channel(tl.load(mean_ptr + groups), G, C)  # (C,)
    rstd = _per_channel(tl.load(rstd_ptr + groups), G, C)  # (C,)
    c = tl.arange(0, C)
    scale = rstd * tl.load(w_ptr + c).to(tl.float32)  # (C,)
    # (x - mean) first: folding the mean into the shift would cancel catastrophically for inputs far from 0.
    y = (x - mean[None, :]) * scale[None, :] + tl.load(bias_ptr + c).to(tl.float32)[None, :]  # (BLOCK_S, C)
    if SILU:
        y = y * tl.sigmoid(y)
    s = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    offsets = b.to(tl.int64) * o_sb + s.to(tl.int64)[:, None] * o_ss + c[None, :] * o_sc
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=rows)


def supports(x: Tensor, groups: int) -> bool:
    """Whether the kernel takes x: 4-D, NCHW or channels-last, the channels and groups powers of two (the tiles' shapes)."""
    if x.ndim != 4:
        return False
    C = x.shape[1]
    pow2 = lambda n: n & (n - 1) == 0  # noqa: E731
    return pow2(C) and pow2(groups) and C % groups == 0 and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))


def _spatial_stride(t: Tensor) -> int:
    """The stride between positions h*W + w of an NCHW or channels-last tensor: 1, or C."""
    return t.stride(3)


@torch.library.custom_op("zflux::group_norm_silu", mutates_args=())
def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, x_bias: Tensor | None = None,
                    silu: bool = True) -> Tensor:
    """SiLU(GroupNorm(x + x_bias)) (without the SiLU if not `silu`) for x (B, C, H, W) (NCHW or channels-last; `supports`),
    weight, bias and x_bias (C,); out in x's memory format."""
    if not supports(x, groups):
        raise ValueError(f"group_norm_silu takes 4-D NCHW or channels-last x with power-of-two channels and groups, got "
                         f"{tuple(x.shape)} in {groups} groups")
    vectors = (weight, bias) if x_bias is None else (weight, bias, x_bias)
    if any(v.shape != (x.shape[1],) for v in vectors):
        raise ValueError(f"weight, bias and x_bias must be ({x.shape[1]},), got {[tuple(v.shape) for v in vectors]}")
    B, C, H, W = x.shape
    HW = H * W
    block_s = max(1, min(triton.next_power_of_2(HW), 8192 // C))
    n_tiles = triton.cdiv(HW, block_s)
    grid = (n_tiles, B)  # tiles on the first axis: the second allows only 65535 programs (2048x2048 makes 65536 tiles)
    means = torch.empty(B, groups, n_tiles, device=x.device, dtype=torch.float32)
    m2s = torch.empty_like(means)
    has_x_bias = x_bias is not None
    x_bias = x_bias.contiguous() if has_x_bias else x  # an unread pointer without one
    _group_stats_kernel[grid](x, x_bias, means, m2s, HW, x.stride(0), x.stride(1), _spatial_stride(x), C=C, G=groups,
                              BLOCK_S=block_s, HAS_X_BIAS=has_x_bias, num_warps=8)
    mean = torch.empty(B, groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    # Every tile holds block_s positions but the last.
    _merge_stats_kernel[(B * groups,)](means, m2s, mean, rstd, n_tiles, float(block_s * (C // groups)),
                                       float((HW - (n_tiles - 1) * block_s) * (C // groups)), float(HW * (C // groups)), eps,
                                       BLOCK_T=min(triton.next_power_of_2(n_tiles), MERGE_BLOCK), num_warps=8)
    out = torch.empty_like(x)  # x's memory format
    _group_norm_silu_kernel[grid](x, x_bias, out, mean, rstd, weight.contiguous(), bias.contiguous(), HW, x.stride(0),
                                  x.stride(1), _spatial_stride(x), out.stride(0), out.stride(1), _spatial_stride(out), C=C,
                                  G=groups, BLOCK_S=block_s, HAS_X_BIAS=has_x_bias, SILU=silu, num_warps=8)
    return out


@group_norm_silu.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, x_bias: Tensor | None = None,
      silu: bool = True) -> Tensor:
    return torch.empty_like(x)


@triton.jit
def _bias_residual_kernel(h_ptr, bias_ptr, x_ptr, n, inner, C, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat indices into the dense memory
    mask = i < n
    c = (i // inner) % C  # each element's channel: inner = 1 in channels-last memory, H*W in NCHW
    h = tl.load(h_ptr + i, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    out = h + tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32) + x
    tl.store(h_ptr + i, out.to(h_ptr.dtype.element_ty), mask=mask)


def supports_residual(h: Tensor, x: Tensor) -> bool:
    """Whether bias_residual_ takes h and x: 4-D, one shape, dtype and strides, dense NCHW or channels-last."""
    dense = h.is_contiguous() or h.is_contiguous(memory_format=torch.channels_last)
    return h.ndim == 4 and h.shape == x.shape and h.dtype == x.dtype and h.stride() == x.stride() and dense


@torch.library.custom_op("zflux::bias_residual", mutates_args=("h",))
def bias_residual_(h: Tensor, bias: Tensor, x: Tensor) -> None:
    """h = h + bias + x for h, x (B, C, H, W) (`supports_residual`) and bias (C,), in fp32, rounded once."""
    if not supports_residual(h, x) or bias.shape != (h.shape[1],):
        raise ValueError(f"bias_residual takes h and x of one shape, dtype and dense layout and a ({h.shape[1]},) bias, got "
                         f"{tuple(h.shape)} / {tuple(x.shape)} strides {h.stride()} / {x.stride()}, bias {tuple(bias.shape)}")
    B, C, H, W = h.shape
    inner = 1 if h.stride(1) == 1 else H * W
    block = 4096
    _bias_residual_kernel[(triton.cdiv(h.numel(), block),)](h, bias.contiguous(), x, h.numel(), inner, C, BLOCK=block,
                                                           num_warps=8)
