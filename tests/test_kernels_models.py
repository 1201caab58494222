"""Each model gives the same output on every backend (sdpa, triton, reference).

Tiny random models with head dim 64 (the attention kernel takes 64 and 128) and a batch of unequal
captions, so the padded-key path runs. On the CPU the Triton kernels run through the interpreter,
in fp32: every backend within 1e-5 relative of sdpa (summation order only). On the GPU, in bf16:
each backend's error against the fp32 sdpa output within 1.5x that of bf16 sdpa, plus 2e-3 (the
backends round in different places, each by one bf16 step at most).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # must be set before kernels/ is imported: triton.jit reads it
    os.environ["TRITON_INTERPRET"] = "1"

from common.backend import BACKENDS  # noqa: E402
from util import randomize_, rel_err  # noqa: E402
from zimg.model import ZImageConfig, ZImageTransformer  # noqa: E402

ZIMAGE = dict(dim=128, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=32,
              axes_dims=(16, 24, 24), axes_lens=(256, 64, 64))


def zimage_case(device: str, dtype: torch.dtype):
    """A random tiny Z-Image and inputs: two captions of 7 and 40 tokens, a 6x10 latent."""
    model = randomize_(ZImageTransformer(ZImageConfig(**ZIMAGE)).to(device), seed=0).eval().to(dtype)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(2, 16, 6, 10, generator=g, device=device)
    t = torch.rand(2, generator=g, device=device)
    cap = torch.randn(2, 40, 32, generator=g, device=device).to(dtype)
    mask = torch.arange(40, device=device)[None] < torch.tensor([7, 40], device=device)[:, None]  # (B, L)
    return model, (x, t, cap, mask)


def run(model, inputs, backend):
    model.backend = backend
    with torch.no_grad():
        return model(*inputs).float()


def test_zimage_same_output_on_every_backend_fp32():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, inputs = zimage_case(device, torch.float32)
    expected = run(model, inputs, "sdpa")
    for backend in BACKENDS:
        assert rel_err(run(model, inputs, backend), expected) <= 1e-5, backend


@pytest.mark.gpu
def test_zimage_same_output_on_every_backend_bf16():
    model, inputs = zimage_case("cuda", torch.float32)
    expected = run(model, inputs, "sdpa")
    model = model.to(torch.bfloat16)
    inputs = (*inputs[:2], inputs[2].bfloat16(), inputs[3])
    bar = 1.5 * rel_err(run(model, inputs, "sdpa"), expected) + 2e-3
    for backend in BACKENDS:
        assert rel_err(run(model, inputs, backend), expected) <= bar, backend
