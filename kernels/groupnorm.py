"""Fused GroupNorm + SiLU for the autoencoders' ResNet blocks, in NCHW or channels-last memory.

For x (B, C, H, W) in G groups of C/G channels, as `zflux.common.norms.group_norm_silu` defines it:

    mean, var over each (b, group): its C/G channels at all H*W positions
    y = (x - mean) / sqrt(var + eps) * w + b          (w, b per channel)
    out = y * sigmoid(y)

all in fp32, rounded once to x's dtype (PyTorch rounds twice: after the norm, after the SiLU).

Two passes, each reading x once. `_group_stats_kernel`: one program per (b, tile of BLOCK_S
positions) loads a (BLOCK_S, C) tile, every channel of those positions, and writes each group's
mean (summed twice: the second sum, of the deviations from the first mean, corrects its rounding)
and sum of squared deviations over the tile; the launcher merges the tiles' statistics
(Chan's parallel formula, exact in fp32 unlike E[x^2] - E[x]^2) into each group's mean and 1/std.
`_group_norm_silu_kernel`: the same tiles again, normalised, scaled, shifted, SiLU'd, stored in
x's own memory format. Whole rows of C channels per position are read, so channels-last memory
(C contiguous) reads in long runs; NCHW reads BLOCK_S-long runs per channel.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _tile(x_ptr, b, tile, HW, x_sb, x_sc, x_ss, C: tl.constexpr, BLOCK_S: tl.constexpr):
    """The (BLOCK_S, C) fp32 tile of positions tile*BLOCK_S.. of sample b (0 past HW), and its (BLOCK_S, 1) row mask."""
    s = tile * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    c = tl.arange(0, C)  # (C,)
    rows = (s < HW)[:, None]  # (BLOCK_S, 1)
    offsets = b.to(tl.int64) * x_sb + s.to(tl.int64)[:, None] * x_ss + c[None, :] * x_sc  # (BLOCK_S, C)
    return tl.load(x_ptr + offsets, mask=rows, other=0.0).to(tl.float32), rows


@triton.jit
def _per_channel(v, G: tl.constexpr, C: tl.constexpr):
    """A (G,) per-group vector repeated over each group's C/G channels: (C,)."""
    return tl.reshape(tl.broadcast_to(v[:, None], (G, C // G)), (C,))


@triton.jit
def _group_sum(t, G: tl.constexpr, C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Sum of a (BLOCK_S, C) tile over positions and over each group's channels: (G,)."""
    return tl.sum(tl.sum(tl.reshape(t, (BLOCK_S, G, C // G)), axis=2), axis=0)


@triton.jit
def _group_stats_kernel(x_ptr, mean_ptr, m2_ptr, HW, x_sb, x_sc, x_ss,
                        C: tl.constexpr, G: tl.constexpr, BLOCK_S: tl.constexpr):
    tile, b, n_tiles = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    x, rows = _tile(x_ptr, b, tile, HW, x_sb, x_sc, x_ss, C, BLOCK_S)
    count = tl.minimum(HW - tile * BLOCK_S, BLOCK_S) * (C // G)  # elements of each group in this tile
    rough = _group_sum(x, G, C, BLOCK_S) / count  # (G,)
    d = tl.where(rows, x - _per_channel(rough, G, C)[None, :], 0.0)  # (BLOCK_S, C)
    # A second pass over the deviations corrects the rounding of the first sum (large where values sit far from 0).
    shift = _group_sum(d, G, C, BLOCK_S) / count  # (G,)
    mean = rough + shift
    d = tl.where(rows, d - _per_channel(shift, G, C)[None, :], 0.0)
    groups = tl.arange(0, G)
    out = (b * n_tiles + tile).to(tl.int64) * G + groups  # (G,) into (B, n_tiles, G)
    tl.store(mean_ptr + out, mean)
    tl.store(m2_ptr + out, _group_sum(d * d, G, C, BLOCK_S))


@triton.jit
def _group_norm_silu_kernel(x_ptr, out_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, HW, x_sb, x_sc, x_ss, o_sb, o_sc, o_ss,
                            C: tl.constexpr, G: tl.constexpr, BLOCK_S: tl.constexpr):
    tile, b = tl.program_id(0), tl.program_id(1)
    x, rows = _tile(x_ptr, b, tile, HW, x_sb, x_sc, x_ss, C, BLOCK_S)
    groups = b.to(tl.int64) * G + tl.arange(0, G)  # (G,) into (B, G)
    mean = _per_channel(tl.load(mean_ptr + groups), G, C)  # (C,)
    rstd = _per_channel(tl.load(rstd_ptr + groups), G, C)  # (C,)
    c = tl.arange(0, C)
    scale = rstd * tl.load(w_ptr + c).to(tl.float32)  # (C,)
    # (x - mean) first: folding the mean into the shift would cancel catastrophically for inputs far from 0.
    y = (x - mean[None, :]) * scale[None, :] + tl.load(bias_ptr + c).to(tl.float32)[None, :]  # (BLOCK_S, C)
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
def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    """SiLU(GroupNorm(x)) for x (B, C, H, W) (NCHW or channels-last; `supports`), weight and bias (C,); out in x's memory format."""
    if not supports(x, groups):
        raise ValueError(f"group_norm_silu takes 4-D NCHW or channels-last x with power-of-two channels and groups, got "
                         f"{tuple(x.shape)} in {groups} groups")
    if weight.shape != (x.shape[1],) or bias.shape != (x.shape[1],):
        raise ValueError(f"weight and bias must be ({x.shape[1]},), got {tuple(weight.shape)}, {tuple(bias.shape)}")
    B, C, H, W = x.shape
    HW = H * W
    block_s = max(1, min(triton.next_power_of_2(HW), 8192 // C))
    n_tiles = triton.cdiv(HW, block_s)
    grid = (n_tiles, B)  # tiles on the first axis: the second allows only 65535 programs (2048x2048 makes 65536 tiles)
    means = torch.empty(B, n_tiles, groups, device=x.device, dtype=torch.float32)
    m2s = torch.empty_like(means)
    _group_stats_kernel[grid](x, means, m2s, HW, x.stride(0), x.stride(1), _spatial_stride(x), C=C, G=groups, BLOCK_S=block_s,
                              num_warps=8)
    # Chan's merge of the tiles' (count, mean, M2): every tile holds block_s positions but the last.
    counts = torch.full((n_tiles, 1), float(block_s * (C // groups)), device=x.device)  # (T, 1)
    counts[-1] = (HW - (n_tiles - 1) * block_s) * (C // groups)
    total = HW * (C // groups)
    mean = (means * counts).sum(dim=1) / total  # (B, G)
    m2 = m2s.sum(dim=1) + (counts * (means - mean[:, None]) ** 2).sum(dim=1)  # (B, G)
    rstd = torch.rsqrt(m2 / total + eps)  # (B, G)
    out = torch.empty_like(x)  # x's memory format
    _group_norm_silu_kernel[grid](x, out, mean, rstd, weight.contiguous(), bias.contiguous(), HW, x.stride(0), x.stride(1),
                                  _spatial_stride(x), out.stride(0), out.stride(1), _spatial_stride(out), C=C, G=groups,
                                  BLOCK_S=block_s, num_warps=8)
    return out


@group_norm_silu.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    return torch.empty_like(x)
