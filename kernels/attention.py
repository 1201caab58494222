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

The fp8 variant (`flash_attention_fp8_bshd`) takes e4m3 q with a scale per token, k with one per head (or one for all:
the QK-norm + RoPE kernel quantizes both as it stores them, kernels/rmsnorm.py), and v transposed, (D, S) per head, with
one scale per channel (fp8 tensor-core products take both operands K-major). Each row's q scale times k's scale times
the softmax scale is the one multiplier the scores already take; the probabilities are rounded to e4m3 for the PV
product; v's channel scales multiply the accumulator once, at the end. For an fp8 linear next (the attention output
projection), `flash_attention_fp8_rows` writes the output as e4m3 rows under one scale per sample, bounded before the
kernel runs by v's scales, so no pass of its own quantizes them (e4m3's relative precision is the same over 2^15 of
range below the bound: outputs far smaller than the largest value lose nothing until they fall 2^15 below it).
"""

import os

import torch
import triton
import triton.language as tl
from einops import rearrange
from torch import Tensor

from zflux.common.quant import E4M3, E4M3_MAX
from zflux.kernels.quantize import quantize_heads

HEAD_DIMS = (64, 128)
LOG2_E = 1.4426950408889634
# fp8: probabilities are taken 2^8 larger, up to 256 of e4m3's 448 (see _fold).
_P_EXPONENT = tl.constexpr(8.0)
_E4M3_MAX = tl.constexpr(E4M3_MAX)
OUT_BOUND = 1.125  # e4m3 output's scale over the largest of v's channel scales (see _attend_fp8)


# Measured on the H100, config by config (bench/RESULTS.md, 2026-11-22 attention variants):
# two query sub-tiles per program beat one, and 128-row sub-tiles over two warpgroups (8 warps)
# beat 64-row ones over one; 64-key blocks beat 128 (fewer live registers per score tile).
CONFIGS = [triton.Config({"BLOCK_M": 256, "BLOCK_N": 64}, num_warps=8, num_stages=s) for s in (3, 4)]
CONFIGS += [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=s) for s in (2, 3)]
# fp8 (H100, bench/RESULTS.md 2026-11-24): 128-row tiles over 4 warps won; 128-key blocks ran at half the speed.
FP8_CONFIGS = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
               triton.Config({"BLOCK_M": 256, "BLOCK_N": 64}, num_warps=8, num_stages=2)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """One small config where timing the rest is pointless: the interpreter (CPU tests), fp32 (tests only); FP8_CONFIGS
    timed for fp8 only."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32})]
    if named_args["q_ptr"].dtype == torch.float32:
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
    return configs if kwargs["FP8"] else [c for c in configs if c not in FP8_CONFIGS]


@triton.jit
def _fold(acc, l_i, m_i, s, v, row_scale, start, kv_len, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
          DOT_PRECISION: tl.constexpr, FP8: tl.constexpr):
    """Fold the scores s = q k_j^T of one key block and its values v_j into the running (acc, l, m).

    FP8: s is in the quantized units of q and k; row_scale (ROWS,) = the row's q scale x the head's k scale x qk_scale
    takes it to base-2 logits in the same multiply-add that applies qk_scale in bf16. The probabilities are taken 2^8
    times larger (P in (0, 256], by 8 off the exponent: no extra multiply), which keeps e4m3's subnormals, 2^-9 and
    below, for probabilities under 2^-17 rather than 2^-9; l sums the same scaled values, so acc / l is unchanged.
    """
    if MASKED:
        s = tl.where((start + tl.arange(0, BLOCK_N))[None, :] < kv_len, s, float("-inf"))
    if FP8:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * row_scale)  # (ROWS,)
        p = tl.math.exp2(s * row_scale[:, None] - (m_new - _P_EXPONENT)[:, None])  # one FMA per score
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)  # (ROWS,)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])  # one FMA per score
    alpha = tl.math.exp2(m_i - m_new)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i * alpha + tl.sum(p, axis=1), m_new


@triton.jit
def _attend(acc0, l0, m0, acc1, l1, m1, q0, q1, row0, row1, k_desc, v_desc, start, kv_len, qk_scale, MASKED: tl.constexpr,
            BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr):
    """Fold key/value block [start, start + BLOCK_N) into both query sub-tiles' running state.

    Both score products are issued before either softmax: the tensor cores compute the second
    while the warps exponentiate the first (Triton 3.6 does not warp-specialize on Hopper, so this
    is how one program keeps the tensor cores busy during its softmax). FP8: v is stored transposed,
    (D, S): fp8 tensor-core products take both operands K-major.
    """
    k = k_desc.load([start, 0])  # (BLOCK_N, D)
    s0 = tl.dot(q0, k.T, input_precision=DOT_PRECISION)  # (ROWS, BLOCK_N)
    s1 = tl.dot(q1, k.T, input_precision=DOT_PRECISION)
    if FP8:
        v = v_desc.load([0, start]).T  # (BLOCK_N, D)
    else:
        v = v_desc.load([start, 0])  # (BLOCK_N, D)
    acc0, l0, m0 = _fold(acc0, l0, m0, s0, v, row0, start, kv_len, qk_scale, MASKED, BLOCK_N, DOT_PRECISION, FP8)
    acc1, l1, m1 = _fold(acc1, l1, m1, s1, v, row1, start, kv_len, qk_scale, MASKED, BLOCK_N, DOT_PRECISION, FP8)
    return acc0, l0, m0, acc1, l1, m1


@triton.jit
def _head(ptr, b, h, b_stride, h_stride, s_stride, S, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    """Descriptor of one (batch, head)'s (S, D) matrix, read and written in (ROWS, D) tiles."""
    return tl.make_tensor_descriptor(ptr + b * b_stride + h * h_stride, shape=[S, HEAD_DIM], strides=[s_stride, 1],
                                     block_shape=[ROWS, HEAD_DIM])


@triton.autotune(CONFIGS + FP8_CONFIGS, key=["HEAD_DIM", "DOT_PRECISION", "FP8"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _flash_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, key_lens_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, o_scale_ptr,
                            o_rows_ptr, S, H, qk_scale, k_scale_stride, q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss,
                            o_sb, o_sh, o_ss, HAS_KEY_LENS: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            FP8: tl.constexpr, OUT_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    ROWS: tl.constexpr = BLOCK_M // 2  # two query sub-tiles of ROWS each
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    start_m = tl.program_id(0) * BLOCK_M
    q_desc = _head(q_ptr, b, h, q_sb, q_sh, q_ss, S, HEAD_DIM, ROWS)
    q0 = q_desc.load([start_m, 0])  # (ROWS, D)
    q1 = q_desc.load([start_m + ROWS, 0])
    k_desc = _head(k_ptr, b, h, k_sb, k_sh, k_ss, S, HEAD_DIM, BLOCK_N)
    row0 = tl.zeros([ROWS], dtype=tl.float32)  # unused unless FP8
    row1 = row0
    if FP8:  # q: a scale per token, (B, H, S) contiguous; k: one per head; v: one per channel, stored (D, S) per head
        rows = start_m + tl.arange(0, ROWS)
        k_scale = tl.load(k_scale_ptr + bh * k_scale_stride) * qk_scale
        row0 = tl.load(q_scale_ptr + bh * S + rows, mask=rows < S, other=1.0) * k_scale  # rows past S: finite, unused
        row1 = tl.load(q_scale_ptr + bh * S + ROWS + rows, mask=ROWS + rows < S, other=1.0) * k_scale
        v_desc = tl.make_tensor_descriptor(v_ptr + b * v_sb + h * v_sh, shape=[HEAD_DIM, S], strides=[v_ss, 1],
                                           block_shape=[HEAD_DIM, BLOCK_N])
    else:
        v_desc = _head(v_ptr, b, h, v_sb, v_sh, v_ss, S, HEAD_DIM, BLOCK_N)
    kv_len = S
    if HAS_KEY_LENS:
        kv_len = tl.minimum(tl.load(key_lens_ptr + b).to(tl.int32), S)

    acc0 = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    l0 = tl.zeros([ROWS], dtype=tl.float32)
    m0 = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    acc1, l1, m1 = acc0, l0, m0
    full_blocks_end = kv_len // BLOCK_N * BLOCK_N
    for start in range(0, full_blocks_end, BLOCK_N):
        acc0, l0, m0, acc1, l1, m1 = _attend(acc0, l0, m0, acc1, l1, m1, q0, q1, row0, row1, k_desc, v_desc, start,
                                             kv_len, qk_scale, False, BLOCK_N, DOT_PRECISION, FP8)
    if full_blocks_end < kv_len:
        acc0, l0, m0, acc1, l1, m1 = _attend(acc0, l0, m0, acc1, l1, m1, q0, q1, row0, row1, k_desc, v_desc,
                                             full_blocks_end, kv_len, qk_scale, True, BLOCK_N, DOT_PRECISION, FP8)
    if FP8:
        v_scale = tl.load(v_scale_ptr + bh * HEAD_DIM + tl.arange(0, HEAD_DIM))[None, :]  # (1, D)
        if OUT_FP8:  # e4m3 out, in units of the sample's one output scale
            o_scale = tl.load(o_scale_ptr + b)
            v_scale = v_scale / o_scale
            if h == 0:
                tile = start_m + tl.arange(0, BLOCK_M)
                tl.store(o_rows_ptr + b * S + tile, tl.zeros([BLOCK_M], dtype=tl.float32) + o_scale, mask=tile < S)
        acc0, acc1 = acc0 * v_scale, acc1 * v_scale
    o_desc = _head(o_ptr, b, h, o_sb, o_sh, o_ss, S, HEAD_DIM, ROWS)
    out0, out1 = acc0 / l0[:, None], acc1 / l1[:, None]
    if OUT_FP8:
        out0, out1 = tl.clamp(out0, -_E4M3_MAX, _E4M3_MAX), tl.clamp(out1, -_E4M3_MAX, _E4M3_MAX)
    o_desc.store([start_m, 0], out0.to(o_ptr.dtype.element_ty))
    o_desc.store([start_m + ROWS, 0], out1.to(o_ptr.dtype.element_ty))


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
    _flash_attention_kernel[grid](q, k, v, o, q if key_lens is None else key_lens, q, q, q, q, q, S, H, D**-0.5 * LOG2_E, 0,
                                  *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                                  HAS_KEY_LENS=key_lens is not None, HEAD_DIM=D,
                                  DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32", FP8=False, OUT_FP8=False)
    return out


@flash_attention_bshd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None) -> Tensor:
    B, H, S, D = q.shape
    return q.new_empty((B, S, H, D))


def _attend_fp8(q: Tensor, q_scale: Tensor, k: Tensor, k_scale: Tensor, vt: Tensor, v_scale: Tensor, key_lens: Tensor | None,
                out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The fp8 kernel's launch: output (B, S, H, D) in out_dtype, and for e4m3 out its row scales (B, S, 1) (else a
    dummy)."""
    B, H, S, D = q.shape
    if D not in HEAD_DIMS or k.shape != q.shape or vt.shape[:3] != (B, H, D) or vt.shape[3] < S:
        raise ValueError(f"fp8 attention takes q, k (B, H, S, D), D in {HEAD_DIMS}, and v as (B, H, D, >= S), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(vt.shape)}")
    if q_scale.shape != (B, H, S) or k_scale.numel() not in (1, B * H) or v_scale.shape != (B, H, D):
        raise ValueError(f"fp8 attention scales must be (B, H, S), (B, H) or (1,), (B, H, D), got {tuple(q_scale.shape)}, "
                         f"{tuple(k_scale.shape)}, {tuple(v_scale.shape)}")
    out = torch.empty((B, S, H, D), dtype=out_dtype, device=q.device)
    o = rearrange(out, "b s h d -> b h s d")
    out_fp8 = out_dtype == E4M3
    # e4m3 out: each output is a mean of the head's values under weights summing to 1 (up to P's rounding to e4m3, at
    # most 2^-4 more, and its subnormals), so no output of a sample exceeds the largest of its values, v's channel
    # scales x 448: one scale per sample, that bound 1/8 wider, keeps every output under 448.
    o_scale = v_scale.amax(dim=(1, 2)) * OUT_BOUND if out_fp8 else v_scale  # (B,)
    o_rows = torch.empty((B, S, 1) if out_fp8 else (1,), dtype=torch.float32, device=q.device)
    triton.set_allocator(_workspace)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    _flash_attention_kernel[grid](q, k, vt, o, q if key_lens is None else key_lens, q_scale.contiguous(), k_scale,
                                  v_scale.contiguous(), o_scale, o_rows, S, H, D**-0.5 * LOG2_E, int(k_scale.numel() > 1),
                                  *q.stride()[:3], *k.stride()[:3], *vt.stride()[:3], *o.stride()[:3],
                                  HAS_KEY_LENS=key_lens is not None, HEAD_DIM=D, DOT_PRECISION="tf32", FP8=True,
                                  OUT_FP8=out_fp8)
    return out, o_rows


@torch.library.custom_op("zflux::flash_attention_fp8", mutates_args=())
def flash_attention_fp8_bshd(q: Tensor, q_scale: Tensor, k: Tensor, k_scale: Tensor, vt: Tensor, v_scale: Tensor,
                             key_lens: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """`flash_attention_bshd` on e4m3 inputs: q (B, H, S, D) with a scale per token and head (B, H, S), k (B, H, S, D)
    with one per head (B, H) or for all heads (1,), v transposed (B, H, D, S') with one per channel (B, H, D)
    (`zflux.kernels.quantize.quantize_heads` makes each); P in e4m3 too. Output (B, S, H, D) in out_dtype."""
    return _attend_fp8(q, q_scale, k, k_scale, vt, v_scale, key_lens, out_dtype)[0]


@torch.library.custom_op("zflux::flash_attention_fp8_rows", mutates_args=())
def flash_attention_fp8_rows(q: Tensor, q_scale: Tensor, k: Tensor, k_scale: Tensor, vt: Tensor, v_scale: Tensor,
                             key_lens: Tensor | None) -> tuple[Tensor, Tensor]:
    """`flash_attention_fp8_bshd` with e4m3 output for an fp8 linear next: (B, S, H, D) and fp32 row scales (B, S, 1),
    one value per sample (bounded by v's scales, see _attend_fp8), so that the rows (B, S, H*D) need no quantizing pass."""
    return _attend_fp8(q, q_scale, k, k_scale, vt, v_scale, key_lens, E4M3)


@flash_attention_fp8_bshd.register_fake
def _(q: Tensor, q_scale: Tensor, k: Tensor, k_scale: Tensor, vt: Tensor, v_scale: Tensor, key_lens: Tensor | None,
      out_dtype: torch.dtype) -> Tensor:
    B, H, S, D = q.shape
    return q.new_empty((B, S, H, D), dtype=out_dtype)


@flash_attention_fp8_rows.register_fake
def _(q: Tensor, q_scale: Tensor, k: Tensor, k_scale: Tensor, vt: Tensor, v_scale: Tensor, key_lens: Tensor | None
      ) -> tuple[Tensor, Tensor]:
    B, H, S, D = q.shape
    return q.new_empty((B, S, H, D), dtype=E4M3), q.new_empty((B, S, 1), dtype=torch.float32)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v on (B, H, S, D) inputs -> (B, H, S, D), a view of a (B, S, H, D) buffer.

    Keys at index >= key_lens[b] are ignored. Head dims 64 and 128; fp16, bf16 (fp32 for tests).
    """
    return rearrange(flash_attention_bshd(q, k, v, key_lens), "b s h d -> b h s d")


def flash_attention_fp8(q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None = None) -> Tensor:
    """flash_attention with e4m3 tensor-core products: q quantized per token and head, k per head, v per channel of each
    head, the probabilities too; the output in q's dtype."""
    _check(q, k, v, key_lens)
    vt, v_scale = quantize_heads(v, per="channel", transpose=True)  # (B, H, D, S rounded up to 16), (B, H, D)
    out = flash_attention_fp8_bshd(*quantize_heads(q, per="token"), *quantize_heads(k, per="head"), vt, v_scale, key_lens,
                                   q.dtype)
    return rearrange(out, "b s h d -> b h s d")
