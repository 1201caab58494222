"""kernels/wide_attention.py against the fp32 reference in common/attention.py (and SDPA on the GPU).

Without a GPU the kernel runs through Triton's interpreter at small sizes in fp32 and fp16 (bf16 on
the GPU only, see kernel_env), with 32-query and 16-key blocks and 128-channel value slices, so
these sizes cover several query blocks, a ragged last key block and two to four value slices.
Tolerances as for the narrow flash kernel (tests/test_kernels_attention.py), relative L2 to the fp32
reference: fp32 1e-5, fp16 2e-3, bf16 1.5e-2 (the probabilities rounded to the input dtype before
the P.V product); on the GPU also within 1.5x SDPA's own error in the same dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from kernel_env import DEVICE, DTYPES, require_triton

require_triton()  # before kernels/ is imported

from zflux.common import ops  # noqa: E402
from zflux.common.attention import reference_attention as reference  # noqa: E402
from zflux.common.vae import AttnBlock  # noqa: E402
from zflux.kernels.wide_attention import supports, wide_attention, wide_attention_bshd  # noqa: E402
from util import rel_err  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def qkv(B, H, S, D, dtype, seed=0, std=1.0):
    """q, k, v (B, H, S, D), each contiguous, as the autoencoder's 1x1 projections make them."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    return tuple((torch.randn(B, H, S, D, generator=g, device=DEVICE) * std).to(dtype) for _ in range(3))


CASES = [  # (B, H, S, D)
    (1, 1, 64, 512),  # the autoencoders' width: four value slices, whole blocks
    (2, 1, 77, 256),  # ragged: the last query and key blocks run past S
    (1, 2, 40, 384),  # not a power of two: read 512 wide, zeros past 384
    (1, 1, 33, 128),
]


@pytest.mark.parametrize("B, H, S, D", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(B, H, S, D, dtype):
    q, k, v = qkv(B, H, S, D, dtype, std=2.0)
    out = wide_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, reference(q.float(), k.float(), v.float())) <= TOL[dtype]


def test_strided_inputs_and_the_output_layout():
    """q, k, v as strided views (a fused projection's slices); the output (B, S, H, D) in memory."""
    fused = torch.randn(2, 40, 3, 2, 256, device=DEVICE)
    q, k, v = fused.permute(2, 0, 3, 1, 4)  # (B, H, S, D) each, rows 3 * 2 * 256 apart
    out = wide_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    assert rel_err(out, reference(q, k, v)) <= TOL[torch.float32]


def test_unsupported_shapes_are_named():
    q, k, v = qkv(1, 1, 16, 192, torch.float32)
    assert not supports(q, k, v) and supports(*qkv(1, 1, 16, 256, torch.float32))
    with pytest.raises(ValueError, match=r"D in \(128, 256, 384, 512\)"):
        wide_attention(q, k, v)


def test_custom_op_check():
    torch.library.opcheck(wide_attention_bshd, qkv(1, 1, 32, 256, torch.float32))


def test_ops_dispatch():
    """ops.wide_attention: under `triton` head dim 256 runs this kernel; under `auto` it stays on SDPA (whose flash and
    cuDNN kernels take up to 256), as it does under `sdpa` and `reference`."""
    q, k, v = qkv(1, 1, 40, 256, torch.float32)
    with ops.use_backend("triton"):
        fused = ops.wide_attention(q, k, v)
    plain = F.scaled_dot_product_attention(q, k, v)
    for backend in ("auto", "sdpa", "reference"):
        with ops.use_backend(backend):
            assert torch.equal(ops.wide_attention(q, k, v), plain)
    assert not torch.equal(fused, plain) and rel_err(fused, plain) <= TOL[torch.float32]


@torch.no_grad()
def test_the_autoencoders_attention_block_on_the_kernels():
    """The mid block's attention with its GroupNorm and attention on the kernels (`triton`) against PyTorch's (`sdpa`)."""
    torch.manual_seed(0)
    block = AttnBlock(128, 32).to(DEVICE)
    x = torch.randn(2, 128, 6, 7, device=DEVICE)
    with ops.use_backend("triton"):
        fused = block(x)
    with ops.use_backend("sdpa"):
        plain = block(x)
    assert not torch.equal(fused, plain) and rel_err(fused - x, plain - x) <= TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autoencoder_shape_against_sdpa(dtype):
    """The autoencoders' mid-block attention at 1024x1024: one head of 512 channels over 128 x 128 latent pixels."""
    q, k, v = qkv(1, 1, 16384, 512, dtype)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    err = rel_err(wide_attention(q, k, v), expected)
    sdpa_err = rel_err(F.scaled_dot_product_attention(q, k, v), expected)
    assert err <= TOL[dtype] and err <= 1.5 * sdpa_err
