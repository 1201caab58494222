"""kernels/groupnorm.py against the PyTorch definitions in common/ (norms.group_norm_silu, norms.bias_residual), and the
autoencoder with them.

Without a GPU the kernel runs on the CPU through Triton's interpreter, at small sizes, in fp32 and
fp16 (bf16 on the GPU only: the interpreter truncates fp32 -> bf16). Tolerances (relative L2 error):
fp32 1e-6 (summation order: the kernel merges per-tile statistics); fp16 1e-3 and bf16 8e-3, a
rounding or two of the output dtype, since PyTorch rounds after the norm and again after the SiLU
where the kernel rounds once.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernel_env import DEVICE, DTYPES, require_triton

require_triton()  # before kernels/ is imported

from zflux.common import ops  # noqa: E402
from zflux.common.norms import group_norm_silu as reference  # noqa: E402
from zflux.common.norms import bias_residual as reference_residual  # noqa: E402
from zflux.kernels import groupnorm  # noqa: E402
from zflux.kernels.groupnorm import bias_residual_, group_norm_silu, supports, supports_residual  # noqa: E402
from util import rel_err  # noqa: E402

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def inputs(B, C, H, W, dtype, offset=0.0, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, device=DEVICE) * 2 + offset
    w = 1 + 0.2 * torch.randn(C, generator=g, device=DEVICE)
    b = 0.3 * torch.randn(C, generator=g, device=DEVICE)
    return x.to(dtype), w.to(dtype), b.to(dtype)


@pytest.mark.parametrize("B, C, H, W, groups", [(2, 16, 5, 7, 4), (1, 32, 8, 8, 32), (1, 64, 3, 50, 8), (1, 8, 1, 1, 2)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_silu(B, C, H, W, groups, channels_last, dtype):
    x, w, b = inputs(B, C, H, W, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = group_norm_silu(x, w, b, groups, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert rel_err(out, reference(x.float(), w.float(), b.float(), groups, 1e-6)) <= TOL[dtype]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_previous_convolutions_bias_folded_in(channels_last, dtype):
    """x_bias: the ResNet block's first convolution ran without its bias; the norm adds it as it loads x."""
    x, w, b = inputs(2, 16, 5, 7, dtype)
    x_bias = inputs(1, 16, 1, 1, dtype, seed=1)[2] * 10  # large: a bias the statistics must see
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = group_norm_silu(x, w, b, 4, 1e-6, x_bias)
    expected = reference(x.float(), w.float(), b.float(), 4, 1e-6, x_bias.float())
    assert rel_err(out, expected) <= TOL[dtype]
    assert rel_err(expected, reference(x.float(), w.float(), b.float(), 4, 1e-6)) > 0.1  # the bias matters here


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_residual(channels_last, dtype):
    """The ResNet block's output: its last convolution's output h (run without the bias) + bias + the shortcut x."""
    h, x, bias = inputs(2, 16, 5, 7, dtype)[0], inputs(2, 16, 5, 7, dtype, seed=1)[0], inputs(1, 16, 1, 1, dtype, seed=2)[2]
    if channels_last:
        h, x = h.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    expected = reference_residual(h.float().clone(), bias.float(), x.float())  # in place: never into h itself
    out = h.clone()
    bias_residual_(out, bias, x)
    assert out.stride() == h.stride() and rel_err(out, expected) <= TOL[dtype]  # one rounding of the fp32 sum
    assert not supports_residual(h, x.contiguous(memory_format=torch.channels_last if not channels_last else torch.contiguous_format))
    with torch.no_grad(), ops.use_backend("triton"):  # mixed layouts: ops runs the PyTorch math
        mixed = ops.bias_residual(h.clone(), bias, x.to(memory_format=torch.channels_last if not channels_last else torch.contiguous_format))
    assert rel_err(mixed, expected) <= TOL[dtype]


def test_the_merge_steps_over_many_tiles(monkeypatch):
    """The merge of the tiles' statistics in steps of MERGE_BLOCK tiles (4096 on the GPU: 2 here, 5 tiles), the last step
    past the tiles, the last tile short."""
    monkeypatch.setattr(groupnorm, "MERGE_BLOCK", 2)
    x, w, b = inputs(2, 64, 9, 60, torch.float32, offset=3.0)  # 540 positions in tiles of 128
    assert rel_err(group_norm_silu(x, w, b, 8, 1e-6), reference(x, w, b, 8, 1e-6)) <= TOL[torch.float32]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_group_norm_without_the_silu(channels_last, dtype):
    """silu=False: the attention block's plain GroupNorm, against PyTorch's."""
    x, w, b = inputs(2, 32, 6, 5, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    expected = F.group_norm(x.float(), 8, w.float(), b.float(), 1e-6)
    assert rel_err(group_norm_silu(x, w, b, 8, 1e-6, silu=False), expected) <= TOL[dtype]
    norm = nn.GroupNorm(8, 32, eps=1e-6).to(DEVICE)
    with torch.no_grad(), ops.use_backend("triton"):
        fused = ops.group_norm_silu(x.float(), norm, silu=False)
    assert rel_err(fused, norm(x.float())) <= TOL[torch.float32]


def test_variance_is_exact_far_from_zero():
    """Chan's merge keeps the statistics of values far from 0 exact, where E[x^2] - E[x]^2 in fp32 would not; against fp64."""
    x, w, b = inputs(1, 16, 16, 16, torch.float32, offset=1000.0)
    truth = reference(x.double(), w.double(), b.double(), 4, 1e-6)
    assert rel_err(group_norm_silu(x, w, b, 4, 1e-6).double(), truth) <= 2 * rel_err(reference(x, w, b, 4, 1e-6).double(), truth)


def test_shapes_the_tiles_cannot_hold_run_the_reference():
    x, w, b = inputs(1, 24, 4, 4, torch.float32)  # 24 channels: not a power of two
    assert not supports(x, 4) and supports(inputs(1, 16, 4, 4, torch.float32)[0], 4)
    norm = nn.GroupNorm(4, 24, eps=1e-6).to(DEVICE)
    with ops.use_backend("triton"):
        assert torch.equal(ops.group_norm_silu(x, norm), reference(x, norm.weight, norm.bias, 4, 1e-6))
    with pytest.raises(ValueError, match="power-of-two"):
        group_norm_silu(x, w, b, 4, 1e-6)


def test_ops_runs_the_kernel_under_triton():
    x, *_ = inputs(1, 16, 4, 4, torch.float32)
    norm = nn.GroupNorm(4, 16, eps=1e-6).to(DEVICE)
    with torch.no_grad(), ops.use_backend("triton"):
        fused = ops.group_norm_silu(x, norm)
    with torch.no_grad(), ops.use_backend("sdpa"):
        plain = ops.group_norm_silu(x, norm)
    assert not torch.equal(fused, plain) and rel_err(fused, plain) <= TOL[torch.float32]  # the same math, another summation


@pytest.mark.gpu
@pytest.mark.parametrize("C, size", [(128, 1024), (256, 512), (512, 128)])
def test_group_norm_silu_full_size_bf16(C, size):
    """The decoder's shapes at 1024x1024, channels-last as the autoencoder runs on the GPU."""
    x, w, b = inputs(1, C, size, size, torch.bfloat16)
    x = x.to(memory_format=torch.channels_last)
    assert rel_err(group_norm_silu(x, w, b, 32, 1e-6), reference(x.float(), w.float(), b.float(), 32, 1e-6)) <= TOL[torch.bfloat16]


def test_training_runs_the_math_the_kernel_has_no_backward():
    x, *_ = inputs(1, 16, 4, 4, torch.float32)
    norm = nn.GroupNorm(4, 16, eps=1e-6).to(DEVICE)
    with ops.use_backend("triton"):
        ops.group_norm_silu(x, norm).sum().backward()  # the kernel would raise: no autograd formula
    assert norm.weight.grad is not None
