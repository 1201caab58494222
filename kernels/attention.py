"""Flash-attention forward: non-causal softmax(q k^T / sqrt(D)) v without materialising the scores.

One program owns BLOCK_M queries of one (batch, head), as two sub-tiles of BLOCK_M / 2 rows, and
streams the keys and values through in blocks of BLOCK_N, keeping for every query row a running
maximum m, a running denominator l and an unnormalised fp32 accumulator (the online softmax of
FlashAttention-2):

    s = q k_j^T * log2(e) / sqrt(D)        scores in base 2, so exp2 replaces exp
    m' = max(m, rowmax(s));  p = exp2(s - m');  a = exp2(m - m')
    l = a l + rowsum(p);     acc = a acc + p v_j
    out = acc / l

Keys at index >= key_lens[b] (right padding, Z-Image's captions) are skipped: every key block
wholly inside the valid length runs without a mask, and only the one block that straddles it
compares indices. Tiles are read and written through tensor descriptors (TMA on Hopper), built per
(batch, head) inside the kernel from the strides, so q, k, v may be any (B, H, S, D) views, such
as slices of the fused qkv projection, with no copy; rows past S read as zeros and are not written.
The output is written (B, S, H, D)-contiguous, so the caller's (B, S, H*D) is a free view.
"""

import os

import torch
import triton
import triton.language as tl
from einops import rearrange
from torch import Tensor

from zflux.common.quant import TINY
from zflux.kernels.quantize import quantize_heads

HEAD_DIMS = (64, 128)
LOG2_E = 1.4426950408889634
_TINY = tl.constexpr(TINY)


# Measured on the H100, config by config (bench/RESULTS.md, 2026-11-22 attention variants):
# two query sub-tiles per program beat one, and 128-row sub-tiles over two warpgroups (8 warps)
# beat 64-row ones over one; 64-key blocks beat 128 (fewer live registers per score tile).
CONFIGS = [triton.Config({"BLOCK_M": 256, "BLOCK_N": 64}, num_warps=8, num_stages=s) for s in (3, 4)]
CONFIGS += [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=s) for s in (2, 3)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """One small config where timing the rest is pointless: the interpreter (CPU tests), fp32 (tests only)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32})]
    if named_args["q_ptr"].dtype == torch.float32:
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
    return configs


@triton.jit
def _fold(acc, l_i, m_i, s, v, v_scale, start, kv_len, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
          DOT_PRECISION: tl.constexpr, FP8: tl.constexpr):
    """Fold the scores s = q k_j^T of one key block and its values v_j into the running (acc, l, m).

    FP8: v_j is e4m3 with one scale per key (v_scale, (BLOCK_N,)); each probability takes its key's
    scale relative to the block's largest, so P stays in [0, 1] (e4m3 keeps it to 2^-4), and the
    block's largest scale multiplies the product.
    """
    if MASKED:
        s = tl.where((start + tl.arange(0, BLOCK_N))[None, :] < kv_len, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)  # (ROWS,)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])  # one FMA per score
    alpha = tl.math.exp2(m_i - m_new)
    if FP8:
        peak = tl.maximum(tl.max(v_scale, axis=0), _TINY)
        acc = acc * alpha[:, None] + peak * tl.dot((p * (v_scale / peak)[None, :]).to(v.dtype), v)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i * alpha + tl.sum(p, axis=1), m_new


@triton.jit
def _attend(acc0, l0, m0, acc1, l1, m1, q0, q1, q0_scale, q1_scale, k_desc, v_desc, k_scale_ptr, v_scale_ptr, start,
            kv_len, S, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
            FP8: tl.constexpr):
    """Fold key/value block [start, start + BLOCK_N) into both query sub-tiles' running state.

    Both score products are issued before either softmax: the tensor cores compute the second
    while the warps exponentiate the first (Triton 3.6 does not warp-specialize on Hopper, so this
    is how one program keeps the tensor cores busy during its softmax). FP8: q, k, v are e4m3 with
    one scale per token (q0_scale, q1_scale (ROWS,); the keys' and values' read here), and v is
    stored transposed, (D, S): fp8 tensor-core products take both operands K-major.
    """
    k = k_desc.load([start, 0])  # (BLOCK_N, D)
    s0 = tl.dot(q0, k.T, input_precision=DOT_PRECISION)  # (ROWS, BLOCK_N)
    s1 = tl.dot(q1, k.T, input_precision=DOT_PRECISION)
    v_scale = q0_scale  # unused unless FP8
    if FP8:
        keys = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        k_scale = tl.load(k_scale_ptr + keys, mask=keys < S, other=0.0)
        v_scale = tl.load(v_scale_ptr + keys, mask=keys < S, other=0.0)
        s0 = s0 * q0_scale[:, None] * k_scale[None, :]
        s1 = s1 * q1_scale[:, None] * k_scale[None, :]
        v = v_desc.load([0, start]).T  # (BLOCK_N, D)
    else:
        v = v_desc.load([start, 0])  # (BLOCK_N, D)
    acc0, l0, m0 = _fold(acc0, l0, m0, s0, v, v_scale, start, kv_len, qk_scale, MASKED, BLOCK_N, DOT_PRECISION, FP8)
    acc1, l1, m1 = _fold(acc1, l1, m1, s1, v, v_scale, start, kv_len, qk_scale, MASKED, BLOCK_N, DOT_PRECISION, FP8)
    return acc0, l0, m0, acc1, l1, m1


@triton.jit
def _head(ptr, b, h, b_stride, h_stride, s_stride, S, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    """Descriptor of one (batch, head)'s (S, D) matrix, read and written in (ROWS, D) tiles."""
    return tl.make_tensor_descriptor(ptr + b * b_stride + h * h_stride, shape=[S, HEAD_DIM], strides=[s_stride, 1],
                                     block_shape=[ROWS, HEAD_DIM])


@triton.autotune(CONFIGS, key=["HEAD_DIM", "DOT_PRECISION", "FP8"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _flash_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, key_lens_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, S, H, qk_scale,
                            q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, o_sb, o_sh, o_ss,
                            HAS_KEY_LENS: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    ROWS: tl.constexpr = BLOCK_M // 2  # two query sub-tiles of ROWS each
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    start_m = tl.program_id(0) * BLOCK_M
    q_desc = _head(q_ptr, b, h, q_sb, q_sh, q_ss, S, HEAD_DIM, ROWS)
    q0 = q_desc.load([start_m, 0])  # (ROWS, D)
    q1 = q_desc.load([start_m + ROWS, 0])
    k_desc = _head(k_ptr, b, h, k_sb, k_sh, k_ss, S, HEAD_DIM, BLOCK_N)
    q0_scale = tl.zeros([ROWS], dtype=tl.float32)  # unused unless FP8
    q1_scale = q0_scale
    if FP8:  # per-token scales, (B, H, S) contiguous; v transposed, (D, S) per head
        rows = start_m + tl.arange(0, ROWS)
        q0_scale = tl.load(q_scale_ptr + bh * S + rows, mask=rows < S, other=0.0)
        q1_scale = tl.load(q_scale_ptr + bh * S + ROWS + rows, mask=ROWS + rows < S, other=0.0)
        v_desc = tl.make_tensor_descriptor(v_ptr + b * v_sb + h * v_sh, shape=[HEAD_DIM, S], strides=[v_ss, 1],
                                           block_shape=[HEAD_DIM, BLOCK_N])
    else:
        v_desc = _head(v_ptr, b, h, v_sb, v_sh, v_ss, S, HEAD_DIM, BLOCK_N)
    k_scale_ptr += bh * S
    v_scale_ptr += bh * S
    kv_len = S
    if HAS_KEY_LENS:
        kv_len = tl.minimum(tl.load(key_lens_ptr + b).to(tl.int32), S)

    acc0 = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    l0 = tl.zeros([ROWS], dtype=tl.float32)
    m0 = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    acc1, l1, m1 = acc0, l0, m0
    full_blocks_end = kv_len // BLOCK_N * BLOCK_N
    for start in range(0, full_blocks_end, BLOCK_N):
        acc0, l0, m0, acc1, l1, m1 = _attend(acc0, l0, m0, acc1, l1, m1, q0, q1, q0_scale, q1_scale, k_desc, v_desc,
                                             k_scale_ptr, v_scale_ptr, start, kv_len, S, qk_scale, False, BLOCK_N,
                                             DOT_PRECISION, FP8)
    if full_blocks_end < kv_len:
        acc0, l0, m0, acc1, l1, m1 = _attend(acc0, l0, m0, acc1, l1, m1, q0, q1, q0_scale, q1_scale, k_desc, v_desc,
                                             k_scale_ptr, v_scale_ptr, full_blocks_end, kv_len, S, qk_scale, True,
                                             BLOCK_N, DOT_PRECISION, FP8)
    o_desc = _head(o_ptr, b, h, o_sb, o_sh, o_ss, S, HEAD_DIM, ROWS)
    o_desc.store([start_m, 0], (acc0 / l0[:, None]).to(o_ptr.dtype.element_ty))
    o_desc.store([start_m + ROWS, 0], (acc1 / l1[:, None]).to(o_ptr.dtype.element_ty))


def _workspace(size: int, alignment: int, stream: int | None) -> Tensor:
    """Global scratch in which the kernel writes its tensor descriptors."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _check(q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (B, H, S, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} is not supported; the kernel handles {HEAD_DIMS}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one of fp16, bf16, fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_lens is not None and (key_lens.shape != q.shape[:1] or key_lens.is_floating_point()):
        raise ValueError(f"key_lens must be integer ({q.shape[0]},), got {key_lens.dtype} {tuple(key_lens.shape)}")


@torch.library.custom_op("zflux::flash_attention", mutates_args=())
def flash_attention_bshd(q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None) -> Tensor:
    """The custom op behind `flash_attention`: (B, H, S, D) inputs -> (B, S, H, D) output."""
    _check(q, k, v, key_lens)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, S, D = q.shape
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    o = rearrange(out, "b s h d -> b h s d")  # a view: the kernel addresses it by strides
    triton.set_allocator(_workspace)
    # fp32 (tests): three TF32 products per dot, close to fp32 accuracy, where plain IEEE fp32 dots
    # would take minutes to compile.
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    _flash_attention_kernel[grid](q, k, v, o, q if key_lens is None else key_lens, q, q, q, S, H, D**-0.5 * LOG2_E,
                                  *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                                  HAS_KEY_LENS=key_lens is not None, HEAD_DIM=D,
                                  DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32", FP8=False)
    return out


@flash_attention_bshd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None) -> Tensor:
    B, H, S, D = q.shape
    return q.new_empty((B, S, H, D))


@torch.library.custom_op("zflux::flash_attention_fp8", mutates_args=())
def flash_attention_fp8_bshd(q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None) -> Tensor:
    """`flash_attention_bshd` with q, k, v quantized to e4m3 per token and head, and P in e4m3: output in q's dtype."""
    _check(q, k, v, key_lens)
    B, H, S, D = q.shape
    q8, q_scale = quantize_heads(q, transpose=False)  # (B, H, S, D), (B, H, S)
    k8, k_scale = quantize_heads(k, transpose=False)
    vt8, v_scale = quantize_heads(v, transpose=True)  # (B, H, D, S rounded up to 16), (B, H, S)
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    o = rearrange(out, "b s h d -> b h s d")
    triton.set_allocator(_workspace)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    _flash_attention_kernel[grid](q8, k8, vt8, o, q if key_lens is None else key_lens, q_scale, k_scale, v_scale, S, H,
                                  D**-0.5 * LOG2_E, *q8.stride()[:3], *k8.stride()[:3], *vt8.stride()[:3], *o.stride()[:3],
                                  HAS_KEY_LENS=key_lens is not None, HEAD_DIM=D, DOT_PRECISION="tf32", FP8=True)
    return out


@flash_attention_fp8_bshd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None) -> Tensor:
    B, H, S, D = q.shape
    return q.new_empty((B, S, H, D))


def flash_attention(q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v on (B, H, S, D) inputs -> (B, H, S, D), a view of a (B, S, H, D) buffer.

    Keys at index >= key_lens[b] are ignored. Head dims 64 and 128; fp16, bf16 (fp32 for tests).
    """
    return rearrange(flash_attention_bshd(q, k, v, key_lens), "b s h d -> b h s d")


def flash_attention_fp8(q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None = None) -> Tensor:
    """flash_attention with q, k and v quantized to e4m3 (one scale per token and head) and the probabilities too, for
    fp8 tensor-core products; the output in q's dtype."""
    return rearrange(flash_attention_fp8_bshd(q, k, v, key_lens), "b s h d -> b h s d")
