"""kernels/modulate.py against the PyTorch definitions in common/norms.py.

Without a GPU the kernels run through Triton's interpreter, small sizes, fp32 and fp16 (bf16 on the
GPU only: the interpreter truncates fp32 -> bf16). The kernels round every intermediate where the
reference stores one, so tolerances (relative L2) are: fp32 1e-6 (summation order, hardware
rsqrt); fp16 5e-4 and bf16 4e-3, one rounding of the output dtype, for PyTorch's RMSNorm, whose CUDA
and CPU kernels differ in whether they round before applying the weight. The gated residual (torch.addcmul) is exact in
fp16 and bf16, where the product of two values is exact in fp32 and both round the fp32 sum once; in fp32 the CPU's
addcmul may fuse the multiply-add where the interpreter does not (one ulp). The fused residual + norm kernels run the
single kernels' device functions in one program: they equal those kernels to the bit, both outputs.
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


def fused_args(name, t, x=None, y=None, per=slice(None)):
    """Arguments of a fused residual + norm kernel (per: which samples' vectors, [:1] to broadcast one)."""
    x, y = t["x"] if x is None else x, t["y"] if y is None else y
    if name == "gated_rms_residual_norm_scale":
        return x, y, t["w"], t["gate"][per], t["w1"], t["scale"][per], 1e-5
    return x, y, t["gate"][per], t["shift"][per], t["scale"][per], 1e-6


def unfused(name, args):
    """The two single kernels a fused one replaces: (residual, norm of it)."""
    if name == "gated_rms_residual_norm_scale":
        x, y, w, gate, w1, scale, eps = args
        out = modulate.gated_rms_residual(x, y, w, gate, eps)
        return out, modulate.rms_norm_scale(out, w1, scale, eps)
    x, y, gate, shift, scale, eps = args
    out = modulate.gated_residual(x, y, gate)
    return out, modulate.layer_norm_modulate(out, shift, scale, eps)


def with_norm_weight(t, C, dtype):
    return t | dict(w1=randn(C, dtype=dtype, seed=6, std=0.2, mean=1.0))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual(shape, dtype):
    t = inputs(*shape, dtype)
    got, expected = modulate.gated_residual(t["x"], t["y"], t["gate"]), norms.gated_residual(t["x"], t["y"], t["gate"])
    assert got.dtype == dtype and (torch.equal(got, expected) if dtype != torch.float32 else rel_err(got, expected) <= 1e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["gated_rms_residual_norm_scale", "gated_residual_layer_norm_modulate"])
def test_residual_fused_with_norm(shape, dtype, name):
    """Both outputs equal the two single kernels' to the bit, and the two norms' ops within the single kernels' bar."""
    args = fused_args(name, with_norm_weight(inputs(*shape, dtype), shape[-1], dtype))
    out, normed = getattr(modulate, name)(*args)
    expected_out, expected_normed = unfused(name, args)
    assert out.dtype == normed.dtype == dtype and torch.equal(out, expected_out) and torch.equal(normed, expected_normed)
    reference_out, reference_normed = getattr(norms, name)(*args)
    assert rel_err(out, reference_out) <= TOL[dtype] and rel_err(normed, reference_normed) <= TOL[dtype]


@pytest.mark.parametrize("name", ["gated_rms_residual_norm_scale", "gated_residual_layer_norm_modulate"])
def test_fused_strided_rows_and_broadcast_vectors(name):
    """x and y token slices of longer sequences (FLUX's attention output out[:, L:]), vectors per sample or one (1, 1, C)
    shared by the batch of two."""
    t = with_norm_weight(inputs(2, 50, 96, torch.float16), 96, torch.float16)
    x, y = t["x"][:, 7:40], randn(2, 70, 96, dtype=torch.float16, seed=7)[:, 20:53]  # strides of their own
    for per in (slice(None), slice(0, 1)):
        args = fused_args(name, t, x, y, per)
        got, expected = getattr(modulate, name)(*args), unfused(name, args)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
        assert all(rel_err(g, e) <= TOL[torch.float16] for g, e in zip(got, getattr(norms, name)(*args)))
    assert torch.equal(modulate.gated_residual(x, y, t["gate"][:1]), norms.gated_residual(x, y, t["gate"][:1]))


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
    with pytest.raises(ValueError, match=r"x and y must have the same shape, got \(2, 8, 64\) and \(2, 7, 64\)"):
        modulate.gated_residual(t["x"], t["y"][:, 1:], t["gate"])
    with pytest.raises(ValueError, match=r"shift must be \(2, 1, 64\)"):
        modulate.gated_residual_layer_norm_modulate(t["x"], t["y"], t["gate"], t["x"], t["scale"], 1e-6)


def test_custom_ops_check():
    """torch.library's own checks: schema, fake (meta) implementations, dispatch."""
    t = inputs(2, 5, 64, torch.float32)
    torch.library.opcheck(modulate.layer_norm_modulate, (t["x"], t["shift"], t["scale"], 1e-6))
    torch.library.opcheck(modulate.layer_norm_modulate, (t["x"], None, t["scale"], 1e-6))
    torch.library.opcheck(modulate.rms_norm_scale, (t["x"], t["w"], t["scale"], 1e-6))
    torch.library.opcheck(modulate.gated_rms_residual, (t["x"], t["y"], t["w"], t["gate"], 1e-6))
    torch.library.opcheck(modulate.gated_residual, (t["x"], t["y"], t["gate"]))
    t = with_norm_weight(t, 64, torch.float32)
    for name in ("gated_rms_residual_norm_scale", "gated_residual_layer_norm_modulate"):
        torch.library.opcheck(getattr(modulate, name), fused_args(name, t))
        torch.library.opcheck(getattr(modulate, f"{name}_fp8"), fused_args(name, t))


@pytest.mark.gpu
@pytest.mark.parametrize("name, C", [("layer_norm_modulate", 3072), ("rms_norm_scale", 3840), ("gated_rms_residual", 3840)])
def test_full_size_bf16(name, C):
    t = inputs(1, 4608, C, torch.bfloat16)
    args = {"layer_norm_modulate": (t["x"], t["shift"], t["scale"], 1e-6), "rms_norm_scale": (t["x"], t["w"], t["scale"], 1e-5),
            "gated_rms_residual": (t["x"], t["y"], t["w"], t["gate"], 1e-5)}[name]
    check(name, args, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("name, C", [("gated_rms_residual_norm_scale", 3840), ("gated_residual_layer_norm_modulate", 3072)])
def test_full_size_fused_bf16(name, C):
    """Z-Image's (4096 tokens, 3840) and FLUX's (4608 tokens, 3072) rows in bf16: the fused kernels equal the single
    kernels to the bit; FLUX's residual equals torch.addcmul to the bit; the norms are within the single kernels' bar
    of the PyTorch ops."""
    S = 4096 if C == 3840 else 4608
    args = fused_args(name, with_norm_weight(inputs(1, S, C, torch.bfloat16), C, torch.bfloat16))
    got = getattr(modulate, name)(*args)
    assert all(torch.equal(g, e) for g, e in zip(got, unfused(name, args)))
    reference = getattr(norms, name)(*args)
    assert all(rel_err(g, e) <= TOL[torch.bfloat16] for g, e in zip(got, reference))
    if name == "gated_residual_layer_norm_modulate":
        assert torch.equal(got[0], reference[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_size_gated_residual(dtype):
    """FLUX's (2, 4608, 3072) gated residual, batch 2 with per-sample gates: torch.addcmul's result to the bit in bf16
    (exact product, one rounding); in fp32 within an ulp (the kernel's multiply-add is fused, addcmul's may not be)."""
    t = inputs(2, 4608, 3072, dtype)
    got, expected = modulate.gated_residual(t["x"], t["y"], t["gate"]), norms.gated_residual(t["x"], t["y"], t["gate"])
    assert torch.equal(got, expected) if dtype == torch.bfloat16 else rel_err(got, expected) <= 1e-7
