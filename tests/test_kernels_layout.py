"""kernels/layout.py: attention's output heads (B, H, S, D) into rows (B, S, H*D), against PyTorch's rearrange copy,
to the bit (a copy), and ops.rows_of's choice between a view and a copy."""

import pytest
import torch
from einops import rearrange

from kernel_env import DEVICE, DTYPES, require_triton

require_triton()  # before kernels/ is imported

from zflux.common import ops  # noqa: E402
from zflux.kernels.layout import heads_to_rows_  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, H, S, D", [(2, 3, 37, 64), (1, 2, 50, 128), (2, 1, 9, 200)])
def test_heads_to_rows_into_a_strided_view(dtype, B, H, S, D):
    """Heads (contiguous (B, H, S, D), as cuDNN writes them) into the first H*D channels of wider rows (a single block's
    [attention | activation]), the rest untouched; D not a power of two too (one head the width of a row)."""
    heads = torch.randn(B, H, S, D, device=DEVICE).to(dtype)
    joined = torch.full((B, S, H * D + 7), 5.0, device=DEVICE, dtype=dtype)
    heads_to_rows_(heads, joined[..., : H * D])
    assert torch.equal(joined[..., : H * D], rearrange(heads, "b h s d -> b s (h d)"))
    assert torch.equal(joined[..., H * D:], torch.full_like(joined[..., H * D:], 5.0))


def test_rows_of_views_or_copies():
    """(B, S, H, D)-laid-out heads (the flash kernels' outputs) come back as a view; (B, H, S, D) ones as a copy, by the
    kernel under triton and by PyTorch under sdpa, equal."""
    laid = torch.randn(2, 11, 3, 64, device=DEVICE)
    with ops.use_backend("triton"):
        assert ops.rows_of(laid.transpose(1, 2)).data_ptr() == laid.data_ptr()
    heads = torch.randn(2, 3, 11, 64, device=DEVICE)
    expected = rearrange(heads, "b h s d -> b s (h d)")
    for backend in ("triton", "sdpa"):
        with ops.use_backend(backend):
            rows = ops.rows_of(heads)
        assert rows.data_ptr() != heads.data_ptr() and torch.equal(rows, expected)


def test_heads_to_rows_refuses_mismatched_rows():
    with pytest.raises(ValueError, match="heads_to_rows takes"):
        heads_to_rows_(torch.zeros(1, 2, 3, 64, device=DEVICE), torch.zeros(1, 3, 64, device=DEVICE))


@pytest.mark.gpu
def test_heads_to_rows_full_size_bf16():
    """FLUX.1's joint attention output at 1024^2 (24 heads over 4608 tokens) into a single block's linear2 input."""
    heads = torch.randn(1, 24, 4608, 128, device=DEVICE, dtype=torch.bfloat16)
    joined = torch.empty(1, 4608, 3072 + 12288, device=DEVICE, dtype=torch.bfloat16)
    heads_to_rows_(heads, joined[..., :3072])
    assert torch.equal(joined[..., :3072], rearrange(heads, "b h s d -> b s (h d)"))
