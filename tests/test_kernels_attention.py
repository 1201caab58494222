"""kernels/attention.py against the fp32 reference in common/attention.py (and SDPA on the GPU).

Without a GPU the kernel runs through Triton's interpreter at small sizes in fp32 and fp16 (its
bf16 tl.dot returns garbage, so bf16 runs on the GPU only). Tolerances (relative L2 to the fp32
reference): fp32 1e-5 (IEEE dots, summation order); fp16 2e-3 and bf16 1.5e-2, set by rounding the
softmax probabilities to the input dtype before the P.V product (as every flash kernel does); on
the GPU the kernel must also be within 1.5x SDPA's own error in the same dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from kernel_env import DEVICE, DTYPES, require_triton

require_triton()  # before kernels/ is imported

from zflux.common.attention import key_padding_mask  # noqa: E402
from zflux.common.attention import reference_attention as reference  # noqa: E402
from zflux.kernels.attention import flash_attention, flash_attention_bshd  # noqa: E402
from util import rel_err  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def qkv(B, H, S, D, dtype, seed=0, std=1.0):
    """q, k, v (B, H, S, D) as the models make them: v a strided slice of a fused qkv projection."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    fused = (torch.randn(B, S, 3, H, D, generator=g, device=DEVICE) * std).to(dtype)
    q, k, v = fused.permute(2, 0, 3, 1, 4)  # (B, H, S, D) each
    return q.contiguous(), k.contiguous(), v


CASES = [  # (B, H, S, D, key_lens)
    (1, 2, 64, 64, None),
    (2, 3, 77, 64, [77, 40]),  # odd length, one sequence padded
    (1, 2, 50, 128, None),
    (2, 1, 100, 128, [33, 1]),  # a single valid key
]


@pytest.mark.parametrize("B, H, S, D, key_lens", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(B, H, S, D, key_lens, dtype):
    q, k, v = qkv(B, H, S, D, dtype, std=2.0)
    lens = None if key_lens is None else torch.tensor(key_lens, device=DEVICE)
    out = flash_attention(q, k, v, lens)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, reference(q.float(), k.float(), v.float(), lens)) <= TOL[dtype]


def test_output_is_a_free_view_of_tokens_by_heads():
    q, k, v = qkv(2, 3, 40, 64, torch.float32)
    out = flash_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # (B, S, H, D) in memory: (B, S, H*D) costs no copy


def test_bad_inputs_are_named():
    q, k, v = qkv(1, 2, 16, 64, torch.float32)
    with pytest.raises(ValueError, match="head dim 48"):
        flash_attention(q[..., :48], k[..., :48], v[..., :48])
    with pytest.raises(ValueError, match="key_lens must be integer"):
        flash_attention(q, k, v, torch.tensor([3.0, 4.0], device=DEVICE))


def test_custom_op_check():
    q, k, v = qkv(2, 2, 32, 64, torch.float32)
    torch.library.opcheck(flash_attention_bshd, (q, k, v, torch.tensor([32, 20], device=DEVICE)))
    torch.library.opcheck(flash_attention_bshd, (q, k, v, None))


@pytest.mark.gpu
@pytest.mark.parametrize("B, H, S, key_lens", [(1, 24, 4608, None), (2, 30, 4224, [4224, 4150]), (1, 4, 16384, None)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_full_size_against_sdpa(B, H, S, key_lens, dtype):
    """The models' shapes: FLUX.1 and Z-Image at 1024^2 (Z-Image with a padded caption), and a long sequence."""
    q, k, v = qkv(B, H, S, 128, dtype)
    lens = None if key_lens is None else torch.tensor(key_lens, device=DEVICE)
    mask = None if lens is None else key_padding_mask(lens, S)
    expected = reference(q.float(), k.float(), v.float(), lens)
    err = rel_err(flash_attention(q, k, v, lens), expected)
    sdpa_err = rel_err(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), expected)
    assert err <= TOL[dtype] and err <= 1.5 * sdpa_err
