"""fp8 on the GPU (compute capability 8.9+): the `torch._scaled_mm` path against the reference path at the models'
shapes, and a whole Z-Image NFE at full size in fp8 against bf16, per-row against per-tensor scales.

The scaled-mm path multiplies the same e4m3 operands as the reference (dequantize, matmul in fp32) and rounds once
to bf16, so the two differ by bf16 rounding, summation order and (fast accumulation) the tensor cores' accumulator
only (bound 1e-2 relative L2; bf16 alone is ~3e-3).
"""

import pytest
import torch
from torch import nn

from util import rel_err
from zflux.common import ops
from zflux.common.fp8 import FP8Linear, quantize_model, scaled_mm_runs
from zflux.common.weights import build_on_meta, load_into
from zflux.zimg.model import PRESETS, ZImageTransformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                                  reason="needs a GPU with fp8 tensor cores (compute capability 8.9+)")]

SHAPES = [  # (tokens, in, out, bias): Z-Image qkv and w2, FLUX.1 qkv and single-block linear2
    (4224, 3840, 3 * 3840, False), (4224, 10240, 3840, False), (4608, 3072, 3 * 3072, True), (4608, 15360, 3072, True)]


@pytest.mark.parametrize("M, K, N, bias", SHAPES)
@pytest.mark.parametrize("granularity", ["per-row", "per-tensor"])
@pytest.mark.parametrize("exact", [False, True], ids=["fast-accumulation", "exact-accumulation"])
def test_scaled_mm_matches_the_reference_path(M, K, N, bias, granularity, exact, monkeypatch):
    """Fast accumulation (the default: common/fp8.py) moves each GEMM 1e-3 to 3e-3 from the exact product; bf16's own
    rounding adds ~3e-3."""
    monkeypatch.setenv("ZFLUX_FP8_EXACT_ACCUMULATION", "1" if exact else "0")
    g = torch.Generator("cuda").manual_seed(0)
    with torch.device("cuda"):
        linear = nn.Linear(K, N, bias=bias, dtype=torch.bfloat16)
        nn.init.normal_(linear.weight, std=0.02, generator=g)
        x = torch.randn(1, M, K, generator=g, dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(linear, granularity)
    assert scaled_mm_runs(fp8.weight, torch.bfloat16)
    fast = fp8(x)
    with ops.use_backend("reference"):  # the same quantized operands, dequantized and multiplied in fp32
        reference = fp8(x)
    assert fast.dtype == torch.bfloat16 and fast.shape == (1, M, N)
    assert rel_err(fast, reference) < 1e-2
    assert rel_err(fast, linear(x)) < 0.04


def zimage_nfe(model, x, t, cap):
    with torch.no_grad():
        return model(x, t, cap)[0].float()


def test_zimage_nfe_fp8_vs_bf16_full_size():
    """One Z-Image-Turbo NFE at 1024x1024, random weights: fp8 (per-row, with and without the fp8 attention kernel)
    and per-tensor fp8 against bf16, errors printed for the report. Per-row scales must be no worse than per-tensor
    ones (issue 15's bar), within 5%: e4m3 is a float format, so the two schemes round to equally fine grids except
    where a row sits 2^8 or more below the tensor's largest (subnormals), and elsewhere differ by where the grid falls
    (the small trained models on the CPU: per-row 0.9971 SSIM, per-tensor 0.9978)."""
    cfg = PRESETS["z-image-turbo"]
    g = torch.Generator("cuda").manual_seed(0)
    model = build_on_meta(lambda: ZImageTransformer(cfg)).to(torch.bfloat16).to_empty(device="cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if p.ndim == 1 and "norm" in name else 0.0, 0.02, generator=g)
    model = model.eval().requires_grad_(False)
    x = torch.randn(1, 16, 128, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    cap = torch.randn(1, 128, cfg.cap_feat_dim, generator=g, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([0.5], device="cuda")
    bf16 = zimage_nfe(model, x, t, cap)
    errors = {}
    for label, granularity, attention in [("per-row", "per-row", "0"), ("per-row + fp8 attention", "per-row", "1"),
                                          ("per-tensor", "per-tensor", "0")]:
        copy = load_into(build_on_meta(lambda: ZImageTransformer(cfg)), {k: v.clone() for k, v in model.state_dict().items()})
        copy.fp8_attention = True
        ours = quantize_model(copy, granularity)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ZFLUX_FP8_ATTENTION", attention)
            errors[label] = rel_err(zimage_nfe(ours, x, t, cap), bf16)
        del copy, ours
        torch.cuda.empty_cache()
    print("\nZ-Image NFE, fp8 vs bf16 (relative L2): " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
    assert errors["per-row"] <= 1.05 * errors["per-tensor"]
    assert errors["per-row"] < 0.1
