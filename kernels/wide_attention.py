"""Flash-attention forward for wide heads (head dim 128-512): the autoencoders' single-head mid-block attention.

The autoencoder's mid block attends over every latent pixel with one head of C = 512 channels
(16384 tokens at 1024x1024). SDPA's flash and cuDNN kernels stop at head dim 256, so it runs the
memory-efficient kernel there (4.6 ms on the H100 where the FLOPs take about 1 ms). The narrow
kernel's plan (kernels/attention.py: one program holds its queries' whole fp32 output) does not fit
either: 512 value channels of fp32 for 64 queries are 128 KiB of registers.

So the value channels are split: a program owns BLOCK_M queries and one slice of DV value channels,
computes the full-width scores q k^T itself (recomputed by each of the C / DV slices' programs) and
folds them into its slice with the online softmax in base 2, as kernels/attention.py does:

    s = q k_j^T * log2(e) / sqrt(C)
    m' = max(m, rowmax(s));  p = exp2(s - m');  a = exp2(m - m')
    l = a l + rowsum(p);     acc = a acc + p v_j[:, slice]
    out[:, slice] = acc / l

Per query block that is C / DV score products of C-deep dots against one C-deep value product in
all: DV = 256 does 1.5x the FLOPs of unsplit attention, DV = 128 2.5x, but needs half the registers
(the autotuner picks). The query tile (BLOCK_M, C) stays in shared memory for the whole key loop
(64 KiB at BLOCK_M = 64 in bf16), each stage of the pipeline adds a (BLOCK_N, C) key tile and a
(BLOCK_N, DV) value tile; the configs below stay within Hopper's 227 KiB per program (one that
does not fit fails to compile and the autotuner skips it). Tiles are read through tensor
descriptors padded to the next power of two of C with zeros (C = 384 reads 512 wide; zeros add
nothing to q.k), so any C that is a multiple of 128 up to 512 runs. No key padding: every sequence
is full.
"""

import os

import torch
import triton
import triton.language as tl
from einops import rearrange
from torch import Tensor

from zflux.kernels.attention import LOG2_E, _workspace

HEAD_DIMS = (128, 256, 384, 512)

# BLOCK_M queries x DV value channels per program, BLOCK_N keys per step; shared memory
# (bf16, q + stages x (k + v)) noted per config.
CONFIGS = [  # the two fastest of six timed on the H100 at (1, 1, 16384, 512) (bench/RESULTS.md, 2026-11-24): 1.99, 2.62 ms
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "DV": 256}, num_warps=4, num_stages=3),  # 64 + 3 x 48 = 208 KiB
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 16, "DV": 256}, num_warps=8, num_stages=3),  # 128 + 3 x 24 = 200 KiB
]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """One small config where timing the rest is pointless: the interpreter (CPU tests), fp32 (tests only, twice the bytes)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "DV": 128})]
    if named_args["q_ptr"].dtype == torch.float32:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "DV": 128}, num_warps=4, num_stages=1)]
    return configs


@triton.jit
def _fold(acc, l_i, m_i, q, k_desc, v_desc, start, dv_start, S, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
          DOT_PRECISION: tl.constexpr):
    """Fold key block [start, start + BLOCK_N) into the running (acc, l, m) of one (query block, value slice)."""
    k = k_desc.load([start, 0])  # (BLOCK_N, D_PAD)
    s = tl.dot(q, k.T, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    if MASKED:  # the keys past S read as zeros: a score of 0, not -inf, unless masked
        s = tl.where((start + tl.arange(0, BLOCK_N))[None, :] < S, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)  # (BLOCK_M,)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    v = v_desc.load([start, dv_start])  # (BLOCK_N, DV)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i * alpha + tl.sum(p, axis=1), m_new


@triton.autotune(CONFIGS, key=["D_PAD", "DOT_PRECISION"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _wide_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, S, H, D, qk_scale, q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh,
                           v_ss, o_sb, o_sh, o_ss, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, DV: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    dv_start = tl.program_id(1) * DV  # this program's value channels: dv_start..dv_start + DV
    bh = tl.program_id(2)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    q_desc = tl.make_tensor_descriptor(q_ptr + b * q_sb + h * q_sh, shape=[S, D], strides=[q_ss, 1],
                                       block_shape=[BLOCK_M, D_PAD])
    k_desc = tl.make_tensor_descriptor(k_ptr + b * k_sb + h * k_sh, shape=[S, D], strides=[k_ss, 1],
                                       block_shape=[BLOCK_N, D_PAD])
    v_desc = tl.make_tensor_descriptor(v_ptr + b * v_sb + h * v_sh, shape=[S, D], strides=[v_ss, 1],
                                       block_shape=[BLOCK_N, DV])
    q = q_desc.load([start_m, 0])  # (BLOCK_M, D_PAD), zeros past D and past S

    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_blocks_end = S // BLOCK_N * BLOCK_N
    for start in range(0, full_blocks_end, BLOCK_N):
        acc, l_i, m_i = _fold(acc, l_i, m_i, q, k_desc, v_desc, start, dv_start, S, qk_scale, False, BLOCK_N, DOT_PRECISION)
    if full_blocks_end < S:
        acc, l_i, m_i = _fold(acc, l_i, m_i, q, k_desc, v_desc, full_blocks_end, dv_start, S, qk_scale, True, BLOCK_N,
                              DOT_PRECISION)
    o_desc = tl.make_tensor_descriptor(o_ptr + b * o_sb + h * o_sh, shape=[S, D], strides=[o_ss, 1],
                                       block_shape=[BLOCK_M, DV])
    o_desc.store([start_m, dv_start], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty))  # rows past S, columns past D dropped


def supports(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the kernel takes q, k, v: one (B, H, S, D) shape and dtype (fp16, bf16; fp32 for tests), D in HEAD_DIMS."""
    return (q.ndim == 4 and k.shape == q.shape and v.shape == q.shape and q.shape[-1] in HEAD_DIMS
            and q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32))


@torch.library.custom_op("zflux::wide_attention", mutates_args=())
def wide_attention_bshd(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The custom op behind `wide_attention`: (B, H, S, D) inputs -> (B, S, H, D) output."""
    if not supports(q, k, v):
        raise ValueError(f"wide_attention takes q, k, v of one (B, H, S, D) shape and dtype (fp16, bf16, fp32) with D in "
                         f"{HEAD_DIMS}, got {tuple(q.shape)} {q.dtype}, {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, S, D = q.shape
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    o = rearrange(out, "b s h d -> b h s d")  # a view: the kernel addresses it by strides
    triton.set_allocator(_workspace)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), triton.cdiv(D, meta["DV"]), B * H)  # noqa: E731
    _wide_attention_kernel[grid](q, k, v, o, S, H, D, D**-0.5 * LOG2_E, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                 *o.stride()[:3], D_PAD=triton.next_power_of_2(D),
                                 DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32")
    return out


@wide_attention_bshd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    B, H, S, D = q.shape
    return q.new_empty((B, S, H, D))


def wide_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D)) v on (B, H, S, D) inputs, D in HEAD_DIMS -> (B, H, S, D), a view of a (B, S, H, D) buffer."""
    return rearrange(wide_attention_bshd(q, k, v), "b s h d -> b h s d")
