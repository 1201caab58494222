"""kernels/rmsnorm.py against the PyTorch definitions in common/ (norms.rms_norm, rope.qk_norm_rope).

Without a GPU the kernels run on the CPU through Triton's interpreter, at small sizes, in fp32 and
fp16: its fp32 -> bf16 conversion truncates instead of rounding to nearest, so bf16 is checked on
the GPU only. Tolerances (relative L2 error): fp32 1e-6 (summation order and the hardware rsqrt);
fp16 5e-4 and bf16 4e-3, one rounding of the output dtype, since PyTorch's kernels differ between
devices in whether the normalised value is rounded before the weight is applied (the interpreter
and the CPU reference agree bit for bit in fp16).
"""

import pytest
import torch

from kernel_env import DEVICE, DTYPES, require_triton

require_triton()  # before kernels/ is imported

from zflux.common import ops  # noqa: E402
from zflux.common.norms import rms_norm as reference_rms_norm  # noqa: E402
from zflux.common.rope import qk_norm_rope as reference_qk_norm_rope  # noqa: E402
from zflux.kernels.rmsnorm import qk_norm_rope, qk_norm_rope_into, rms_norm  # noqa: E402
from util import rel_err  # noqa: E402

TOL = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def randn(*shape, dtype=torch.float32, seed=0, std=1.0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=DEVICE) * std).to(dtype)


def norm_weight(n, dtype, seed=1):
    return (1 + randn(n, seed=seed, std=0.2)).to(dtype)


@pytest.mark.parametrize("shape", [(3, 37, 200), (1, 5, 128), (70, 64), (2, 3, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(shape, dtype):
    x = randn(*shape, dtype=dtype, std=3.0)
    w = norm_weight(shape[-1], dtype)
    out = rms_norm(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, reference_rms_norm(x, w, 1e-6)) <= TOL[dtype]


def test_rms_norm_reads_strided_rows():
    x = randn(4, 40, 96)[:, ::3]  # rows 3 apart: not viewable as a plain (rows, C) matrix
    w = norm_weight(96, torch.float32)
    assert rel_err(rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5)) <= TOL[torch.float32]


def qkv_views(B, S, H, D, dtype, seed=0):
    """q, k (B, H, S, D) as the models make them: non-contiguous slices of a fused qkv projection."""
    qkv = randn(B, S, 3 * H * D, dtype=dtype, seed=seed, std=2.0)
    q, k, _ = qkv.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
    return q, k


def rope_tables(B, S, D, seed=2):
    angle = randn(B, S, D // 2, seed=seed, std=3.0)
    return angle.cos(), angle.sin()


@pytest.mark.parametrize("B, S, H, D", [(2, 45, 3, 32), (1, 70, 2, 128), (2, 9, 1, 64), (1, 33, 2, 48)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope(B, S, H, D, dtype):
    q, k = qkv_views(B, S, H, D, dtype)
    qw, kw = norm_weight(D, dtype, seed=3), norm_weight(D, dtype, seed=4)
    cos, sin = rope_tables(B, S, D)
    got = qk_norm_rope(q, k, qw, kw, 1e-6, cos, sin)
    expected = reference_qk_norm_rope(q, k, qw, kw, 1e-6, cos, sin)
    for g, e in zip(got, expected):
        assert g.shape == q.shape and g.is_contiguous() and g.dtype == dtype
        assert rel_err(g, e) <= TOL[dtype]


def test_qk_norm_rope_broadcasts_and_slices_tables():
    """Tables shared by the batch (1, S, D/2), and token slices of a longer table (Z-Image's image part)."""
    q, k = qkv_views(2, 20, 2, 64, torch.float32)
    qw, kw = norm_weight(64, torch.float32), norm_weight(64, torch.float32, seed=5)
    cos, sin = rope_tables(1, 50, 64)
    cos, sin = cos[:, 10:30], sin[:, 10:30]
    got = qk_norm_rope(q, k, qw, kw, 1e-6, cos, sin)
    expected = reference_qk_norm_rope(q, k, qw, kw, 1e-6, cos.expand(2, -1, -1), sin.expand(2, -1, -1))
    assert all(rel_err(g, e) <= TOL[torch.float32] for g, e in zip(got, expected))


def test_bad_inputs_are_named():
    x = randn(2, 8, 64)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, torch.ones(32, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="share one dtype"):
        rms_norm(x, torch.ones(64, device=DEVICE, dtype=torch.float16), 1e-6)
    q, k = qkv_views(1, 8, 2, 64, torch.float32)
    cos, sin = rope_tables(1, 8, 64)
    with pytest.raises(ValueError, match="RoPE tables"):
        qk_norm_rope(q, k, torch.ones(64, device=DEVICE), torch.ones(64, device=DEVICE), 1e-6, cos[..., :16], sin)


def test_custom_ops_trace_and_check():
    """torch.library's own checks (schema, fake tensors, dispatch), and a fullgraph trace through both ops."""
    x, w = randn(2, 5, 64), norm_weight(64, torch.float32)
    q, k = qkv_views(1, 6, 2, 64, torch.float32)
    cos, sin = rope_tables(1, 6, 64)
    torch.library.opcheck(rms_norm, (x, w, 1e-6))
    torch.library.opcheck(qk_norm_rope, (q, k, w, w, 1e-6, cos, sin))

    def f(x, q, k):
        q, k = qk_norm_rope(q, k, w, w, 1e-6, cos, sin)
        return rms_norm(x, w, 1e-6), q, k

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert all(torch.equal(a, b) for a, b in zip(compiled(x, q, k), f(x, q, k)))


def test_qk_norm_rope_into_custom_op_check():
    """torch.library's checks of the op that writes one stream's share of joined tensors (offset 3 of 9 tokens)."""
    q, k = qkv_views(1, 6, 2, 64, torch.float32)
    v = randn(1, 6, 2, 64).transpose(1, 2)
    w = norm_weight(64, torch.float32)
    cos, sin = rope_tables(1, 6, 64)
    q_out, k_out, v_out = (torch.zeros(1, 2, 9, 64, device=DEVICE) for _ in range(3))
    torch.library.opcheck(qk_norm_rope_into, (q, k, v, w, w, w, 1e-6, cos, sin, 3, q_out, k_out, None, None, v_out))


@pytest.mark.gpu
@pytest.mark.parametrize("rows, C", [(4608, 3072), (4224, 3840), (77, 2560)])
def test_rms_norm_full_size_bf16(rows, C):
    x = randn(1, rows, C, dtype=torch.bfloat16, std=3.0)
    w = norm_weight(C, torch.bfloat16)
    assert rel_err(rms_norm(x, w, 1e-6), reference_rms_norm(x, w, 1e-6)) <= TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("B, S, H", [(1, 4608, 24), (2, 4224, 30)])
def test_qk_norm_rope_full_size_bf16(B, S, H):
    q, k = qkv_views(B, S, H, 128, torch.bfloat16)
    qw, kw = norm_weight(128, torch.bfloat16, seed=3), norm_weight(128, torch.bfloat16, seed=4)
    cos, sin = rope_tables(B, S, 128)
    got = qk_norm_rope(q, k, qw, kw, 1e-6, cos, sin)
    expected = reference_qk_norm_rope(q, k, qw, kw, 1e-6, cos, sin)
    assert all(rel_err(g, e) <= TOL[torch.bfloat16] for g, e in zip(got, expected))


def check_joined_streams(B, H, L, S, D, dtype):
    """ops.attention_inputs of two streams (FLUX's text and image) by the kernels: q and k as the kernel gives each stream
    on its own, and v, joined as torch.cat joins them, to the bit; against the PyTorch math (rope.qk_norm_rope of each
    stream, torch.cat) within TOL."""
    streams = []
    for seed, n in enumerate((L, S)):
        q, k = qkv_views(B, n, H, D, dtype, seed=seed)
        v = randn(B, n, 3 * H * D, dtype=dtype, seed=seed + 5).view(B, n, 3, H, D)[:, :, 2].transpose(1, 2)  # strided
        streams.append(ops.Heads(q, k, v, norm_weight(D, dtype, seed=seed + 3), norm_weight(D, dtype, seed=seed + 7)))
    cos, sin = rope_tables(B, L + S, D)
    with ops.use_backend("triton"):
        got = ops.attention_inputs(streams, 1e-6, cos, sin)
    unjoined = [(*qk_norm_rope(s.q, s.k, s.q_weight, s.k_weight, 1e-6, cos[:, a:b], sin[:, a:b]), s.v)
                for s, (a, b) in zip(streams, ((0, L), (L, L + S)))]
    for g, *parts in zip(got, *unjoined):
        assert g.shape == (B, H, L + S, D) and g.is_contiguous() and torch.equal(g, torch.cat(parts, dim=2))
    with ops.use_backend("reference"):
        expected = ops.attention_inputs(streams, 1e-6, cos, sin)
    assert all(rel_err(g, e) <= TOL[dtype] for g, e in zip(got, expected))


@pytest.mark.parametrize("dtype", DTYPES)
def test_joined_streams(dtype):
    check_joined_streams(2, 3, 7, 37, 64, dtype)


@pytest.mark.gpu
def test_joined_streams_full_size_bf16():
    """FLUX.1 at 1024^2: 512 text and 4096 image tokens, 24 heads of 128."""
    check_joined_streams(1, 24, 512, 4096, 128, torch.bfloat16)
