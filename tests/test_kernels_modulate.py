"""kernels/modulate.py against the PyTorch definitions in common/norms.py.

Without a GPU the kernels run through Triton's interpreter, small sizes, fp32 and fp16 (bf16 on the
GPU only: the interpreter truncates fp32 -> bf16). The kernels round every intermediate where the
reference stores one, so tolerances (relative L2) are: fp32 1e-6 (summation order, hardware
rsqrt); fp16 5e-4 and bf16 4e-3, one rounding of the output dtype, for PyTorch's RMSNorm, whose CUDA
and CPU kernels differ in whether they round before applying the weight.
"""

import pytest
import torch

from kernel_env import DEVICE, DTYPES, require_triton

require_triton()  # before kernels/ is imported

from zflux.common import norms  # noqa: E402
from zflux.kernels import modulate  # noqa: E402
from util import rel_err  # noqa: E402

TOL = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
SHAPES = [(2, 37, 200), (1, 64, 256), (3, 5, 1000)]


def randn(*shape, dtype=torch.float32, seed=0, std=1.0, mean=0.0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    return (mean + torch.randn(shape, generator=g, device=DEVICE) * std).to(dtype)


def inputs(B, S, C, dtype):
    """x with a large mean and spread (LayerNorm must centre it), y, weight, and per-sample vectors."""
    return dict(x=randn(B, S, C, dtype=dtype, std=4.0, mean=2.0), y=randn(B, S, C, dtype=dtype, seed=1, std=3.0),
                w=randn(C, dtype=dtype, seed=2, std=0.2, mean=1.0), shift=randn(B, 1, C, dtype=dtype, seed=3),
                scale=randn(B, 1, C, dtype=dtype, seed=4, std=0.3), gate=randn(B, 1, C, dtype=dtype, seed=5).tanh())


def check(name, args, dtype):
    got = getattr(modulate, name)(*args)
    expected = getattr(norms, name)(*args)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert rel_err(got, expected) <= TOL[dtype]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_shift", [True, False])
def test_layer_norm_modulate(shape, dtype, with_shift):
    t = inputs(*shape, dtype)
    check("layer_norm_modulate", (t["x"], t["shift"] if with_shift else None, t["scale"], 1e-6), dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_scale(shape, dtype):
    t = inputs(*shape, dtype)
    check("rms_norm_scale", (t["x"], t["w"], t["scale"], 1e-5), dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_rms_residual(shape, dtype):
    t = inputs(*shape, dtype)
    check("gated_rms_residual", (t["x"], t["y"], t["w"], t["gate"], 1e-5), dtype)


def test_strided_rows_and_broadcast_vectors():
    """A token slice of a longer sequence (Z-Image's final layer) and (1, 1, C) vectors shared by the batch."""
    t = inputs(2, 50, 96, torch.float32)
    x, y = t["x"][:, 7:40], t["y"][:, 3:36]
    scale, shift, gate = t["scale"][:1], t["shift"][:1], t["gate"][:1]
    check("layer_norm_modulate", (x, shift, scale, 1e-6), torch.float32)
    check("rms_norm_scale", (x, t["w"], scale, 1e-6), torch.float32)
    check("gated_rms_residual", (x, y, t["w"], gate, 1e-6), torch.float32)


def test_bad_inputs_are_named():
    t = inputs(2, 8, 64, torch.float32)
    with pytest.raises(ValueError, match=r"scale must be \(2, 1, 64\)"):
        modulate.layer_norm_modulate(t["x"], None, t["scale"][:, :, :32], 1e-6)
    with pytest.raises(ValueError, match=r"x must be \(B, S, C\)"):
        modulate.rms_norm_scale(t["x"][0], t["w"], t["scale"], 1e-6)
    with pytest.raises(ValueError, match="share one dtype"):
        modulate.gated_rms_residual(t["x"], t["y"].half(), t["w"], t["gate"], 1e-6)


def test_custom_ops_check():
    """torch.library's own checks: schema, fake (meta) implementations, dispatch."""
    t = inputs(2, 5, 64, torch.float32)
    torch.library.opcheck(modulate.layer_norm_modulate, (t["x"], t["shift"], t["scale"], 1e-6))
    torch.library.opcheck(modulate.layer_norm_modulate, (t["x"], None, t["scale"], 1e-6))
    torch.library.opcheck(modulate.rms_norm_scale, (t["x"], t["w"], t["scale"], 1e-6))
    torch.library.opcheck(modulate.gated_rms_residual, (t["x"], t["y"], t["w"], t["gate"], 1e-6))


@pytest.mark.gpu
@pytest.mark.parametrize("name, C", [("layer_norm_modulate", 3072), ("rms_norm_scale", 3840), ("gated_rms_residual", 3840)])
def test_full_size_bf16(name, C):
    t = inputs(1, 4608, C, torch.bfloat16)
    args = {"layer_norm_modulate": (t["x"], t["shift"], t["scale"], 1e-6), "rms_norm_scale": (t["x"], t["w"], t["scale"], 1e-5),
            "gated_rms_residual": (t["x"], t["y"], t["w"], t["gate"], 1e-5)}[name]
    check(name, args, torch.bfloat16)
