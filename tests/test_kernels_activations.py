"""kernels/activations.py (SwiGLU's silu(gate) * up, GELU-tanh) against the PyTorch definitions in common/activations.py.

Without a GPU the kernels run through Triton's interpreter (fp32 and fp16; bf16 on the GPU only, see
kernel_env). The SwiGLU kernel rounds the silu where PyTorch stores it and GELU-tanh rounds once as
PyTorch does, so the tolerance is a last-bit flip through the exponential's (and for GELU the tanh's)
fp32 ulps: 1e-6 relative in fp32, 1e-3 in fp16 and bf16.
"""

import pytest
import torch

from kernel_env import DEVICE, DTYPES, require_triton

require_triton()  # before kernels/ is imported

from zflux.common import activations, ops  # noqa: E402
from zflux.kernels.activations import gelu_tanh_, silu_mul_  # noqa: E402
from util import rel_err  # noqa: E402

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def halves(B: int, S: int, F: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator(DEVICE).manual_seed(0)
    return (torch.randn(B, S, 2 * F, generator=g, device=DEVICE) * 3).to(dtype)  # (B, S, 2F): [gate | up]


@pytest.mark.parametrize("shape", [(2, 37, 200), (1, 5, 300)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_contiguous(shape, dtype):
    B, S, F = shape
    gate, up = halves(B, S, F, dtype).chunk(2, dim=-1)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    silu_mul_(gate, up, out)
    assert rel_err(out, activations.silu_mul(gate, up)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_views_into_a_buffer(dtype):
    """FLUX.2's single blocks: gate and up are halves of linear1's output, out the tail of linear2's input."""
    B, S, F, head = 2, 9, 260, 48
    hidden = halves(B, S, F, dtype)
    buffer = torch.full((B, S, head + F), 7.0, device=DEVICE, dtype=dtype)
    with ops.use_backend("triton"):
        ops.silu_mul(hidden[..., :F], hidden[..., F:], out=buffer[..., head:])
    assert rel_err(buffer[..., head:], activations.silu_mul(hidden[..., :F], hidden[..., F:])) <= TOL[dtype]
    assert (buffer[..., :head] == 7.0).all()  # nothing written outside the view


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_from_a_view_into_a_buffer(dtype):
    """FLUX.1's single blocks: the MLP input is the tail of linear1's output, the activation the tail of linear2's input."""
    B, S, F, head = 2, 9, 260, 48
    g = torch.Generator(DEVICE).manual_seed(0)
    projected = (torch.randn(B, S, head + F, generator=g, device=DEVICE) * 4).to(dtype)  # wide values: tanh's tails too
    buffer = torch.full((B, S, head + F), 7.0, device=DEVICE, dtype=dtype)
    with ops.use_backend("triton"):
        ops.gelu_tanh(projected[..., head:], out=buffer[..., head:])
    assert rel_err(buffer[..., head:], activations.gelu_tanh(projected[..., head:])) <= TOL[dtype]
    assert (buffer[..., :head] == 7.0).all()  # nothing written outside the view
    x = torch.tensor([-1e4, -30.0, 0.0, 30.0, 1e4], device=DEVICE, dtype=dtype)
    out = torch.empty_like(x)
    gelu_tanh_(x, out)  # saturated tanh both ways
    assert torch.equal(out, activations.gelu_tanh(x))


def test_rejects_what_is_not_rows():
    x = torch.zeros(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="unit stride"):
        silu_mul_(x.t(), x.t(), x.t())
    with pytest.raises(ValueError, match="share one shape"):
        silu_mul_(x, x[:, :3], x)
    with pytest.raises(ValueError, match="unit stride"):
        gelu_tanh_(x.t(), x.t())
