"""Each model gives the same output on every backend (sdpa, triton, reference).

Tiny random models with head dim 64 (the attention kernel takes 64 and 128); Z-Image with a batch
of unequal captions, so the padded-key path runs, also steered by a ControlNet, and in Omni mode
(per-token modulation, which the kernels leave to PyTorch). On the CPU the Triton kernels run through the
interpreter, in fp32: every backend within 1e-5 relative of sdpa (summation order only). On the
GPU, in bf16: each backend's error against the fp32 sdpa output within 1.5x that of bf16 sdpa,
plus 2e-3 (the backends round in different places, each by one bf16 step at most).
"""

import pytest
import torch
from torch import nn

from kernel_env import DEVICE, require_triton

require_triton()  # before kernels/ is imported

from zflux.common.fp8 import quantize_model  # noqa: E402
from zflux.common.ops import BACKENDS  # noqa: E402
from zflux.flux.flux2.model import Flux2, Flux2Config  # noqa: E402
from zflux.flux.flux2.pipeline import grid_ids, text_ids  # noqa: E402
from zflux.flux.model import Flux, FluxConfig  # noqa: E402
from zflux.common.latents import pack_latents  # noqa: E402
from zflux.flux.pipeline import img_ids, txt_ids  # noqa: E402
from util import randomize_, rel_err  # noqa: E402
from zflux.zimg.controlnet import ControlNetConfig, ZImageControlNet  # noqa: E402
from zflux.zimg.model import ZImageConfig, ZImageTransformer  # noqa: E402
from zflux.zimg.omni import ZImageOmniTransformer  # noqa: E402

ZIMAGE = ZImageConfig(dim=128, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=32,
                      axes_dims=(16, 24, 24), axes_lens=(256, 64, 64))
FLUX = FluxConfig(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=64, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(16, 24, 24))


def zimage_case(device: str):
    """A random tiny Z-Image (fp32) and its inputs: two captions of 7 and 40 tokens, a 6x10 latent."""
    model = randomize_(ZImageTransformer(ZIMAGE).to(device), seed=0).eval()
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(2, 16, 6, 10, generator=g, device=device)
    t = torch.rand(2, generator=g, device=device)
    cap = torch.randn(2, 40, 32, generator=g, device=device)
    mask = torch.arange(40, device=device)[None] < torch.tensor([7, 40], device=device)[:, None]  # (B, L)
    return model, dict(x=x, t=t, cap_feats=cap, cap_mask=mask)


class Controlled(nn.Module):
    """A transformer and a ControlNet as one model, so that run() can set the backend and dtype of both."""

    def __init__(self, base: ZImageTransformer, controlnet: ZImageControlNet):
        super().__init__()
        self.base, self.controlnet = base, controlnet

    @property
    def backend(self) -> str | None:
        return self.base.backend

    @backend.setter
    def backend(self, name: str | None):
        self.base.backend = name  # the ControlNet runs inside the base's forward, under its backend

    def forward(self, control: torch.Tensor, **inputs) -> torch.Tensor:
        return self.base(**inputs, control=self.controlnet.bind(self.base, control, scale=0.7))


def zimage_controlnet_case(device: str):
    """zimage_case's model and inputs steered by a random 2.1-style ControlNet hinting both main layers and the refiner."""
    base, inputs = zimage_case(device)
    cfg = ControlNetConfig(control_layers_places=(0, 1), control_refiner_layers_places=(0,), dim=128, n_heads=2, n_kv_heads=2,
                           n_refiner_layers=1)
    controlnet = randomize_(ZImageControlNet(cfg).to(device), seed=2).eval()
    control = torch.randn(1, 33, 6, 10, generator=torch.Generator(device).manual_seed(3), device=device)
    return Controlled(base, controlnet), inputs | dict(control=control)


def zimage_omni_case(device: str):
    """A random tiny Z-Image Omni (fp32): a batch of two, one condition image with its SigLIP map."""
    model = randomize_(ZImageOmniTransformer(ZImageConfig(**{**ZIMAGE.__dict__, "siglip_feat_dim": 24})).to(device), seed=0).eval()
    g = torch.Generator(device).manual_seed(1)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device)
    captions = [[randn(n, 32) for n in lens] for lens in ((3, 7, 4), (5, 40, 2))]
    return model, dict(x=randn(2, 16, 6, 8), t=torch.rand(2, generator=g, device=device), captions=captions,
                       images=[randn(16, 4, 6)], siglip=[randn(3, 5, 24)])


def flux_case(device: str):
    """A random tiny FLUX.1-dev (fp32) and its inputs: 7 text tokens, an 8x12 latent (24 image tokens)."""
    model = randomize_(Flux(FLUX).to(device), seed=0).eval()
    g = torch.Generator(device).manual_seed(1)
    inputs = dict(img=pack_latents(torch.randn(2, 4, 8, 12, generator=g, device=device)), img_ids=img_ids(2, 4, 6, device),
                  txt=torch.randn(2, 7, 32, generator=g, device=device), txt_ids=txt_ids(2, 7, device),
                  timesteps=torch.rand(2, generator=g, device=device), y=torch.randn(2, 24, generator=g, device=device),
                  guidance=torch.tensor([3.5, 1.5], device=device))
    return model, inputs

FLUX2 = Flux2Config(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=64, num_attention_heads=2,
                    joint_attention_dim=32, axes_dims_rope=(16, 16, 16, 16), guidance_embeds=False)


def flux2_case(device: str):
    """A random tiny FLUX.2 klein (fp32) and its inputs: 7 text tokens, a 4x6 token grid, then a 2x3 reference."""
    model = randomize_(Flux2(FLUX2).to(device), seed=0).eval()
    g = torch.Generator(device).manual_seed(1)
    ids = torch.cat([grid_ids(4, 6, device=device), grid_ids(2, 3, time=10, device=device)], dim=1).expand(2, -1, -1)
    inputs = dict(img=torch.randn(2, 30, 16, generator=g, device=device), img_ids=ids,
                  txt=torch.randn(2, 7, 32, generator=g, device=device), txt_ids=text_ids(2, 7, device),
                  timesteps=torch.rand(2, generator=g, device=device))
    return model, inputs


def run(model, inputs: dict, backend: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The model's output (fp32) with its weights in `dtype`; both models cast their inputs themselves."""
    model.backend = backend
    with torch.no_grad():
        return model.to(dtype)(**inputs).float()


CASES = {"zimage": zimage_case, "zimage-controlnet": zimage_controlnet_case, "zimage-omni": zimage_omni_case, "flux": flux_case,
         "flux2": flux2_case}


@pytest.mark.parametrize("case", CASES)
def test_same_output_on_every_backend_fp32(case):
    model, inputs = CASES[case](DEVICE)
    expected = run(model, inputs, "sdpa")
    for backend in BACKENDS:
        assert rel_err(run(model, inputs, backend), expected) <= 1e-5, backend


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_same_output_on_every_backend_bf16(case):
    model, inputs = CASES[case]("cuda")
    expected = run(model, inputs, "sdpa")
    bar = 1.5 * rel_err(run(model, inputs, "sdpa", torch.bfloat16), expected) + 2e-3
    for backend in BACKENDS:
        assert rel_err(run(model, inputs, backend, torch.bfloat16), expected) <= bar, backend


def flux2_kv_steps(model, inputs: dict, backend: str) -> torch.Tensor:
    """klein KV's extract step and a cached step after it, stacked."""
    target = {k: v[:, :24] if k.startswith("img") else v for k, v in inputs.items()}
    refs = dict(ref=inputs["img"][:, 24:], ref_ids=inputs["img_ids"][:, 24:])
    model.backend = backend
    with torch.no_grad():
        first, ref_kv = model.extract_ref_kv(**target, **refs)
        return torch.stack([first, model(**target | dict(timesteps=target["timesteps"] / 2), ref_kv=ref_kv)])


def test_flux2_kv_steps_on_every_backend_fp32():
    """klein KV's extract step and a cached step, where the keys outnumber the queries (SDPA under every backend)."""
    model, inputs = flux2_case(DEVICE)
    expected = flux2_kv_steps(model, inputs, "sdpa")
    for backend in BACKENDS:
        assert rel_err(flux2_kv_steps(model, inputs, backend), expected) <= 1e-5, backend


def test_flux2_kv_steps_with_fp8_attention():
    """The extract step attends in fp8 and caches plain keys; the cached step's queries and keys go back to fp32 to
    join the cached ones."""
    model, inputs = flux2_case(DEVICE)
    expected = flux2_kv_steps(model, inputs, "sdpa")
    model.fp8_attention = True
    assert rel_err(flux2_kv_steps(model, inputs, "triton"), expected) <= (0.12 if DEVICE == "cpu" else 0.06)


@pytest.mark.parametrize("case", CASES)
def test_fp8_attention_in_every_model(case, monkeypatch):
    """A model with fp8 attention (linears left in fp32, so attention is the only fp8 step) under `triton`: its queries
    and keys quantized by the QK-norm + RoPE kernel on every attention call, FLUX's two streams' keys joined under one
    scale, Z-Image's padded captions masked; within fp8 attention's error of the exact output (a few % per call on the
    GPU; the interpreter's e4m3 casts round worse, see test_kernels_fp8.py)."""
    from zflux.kernels import rmsnorm

    model, inputs = CASES[case](DEVICE)
    with torch.no_grad():  # FLUX's text keys normed 8x smaller than the image's: one scale must cover both
        for name, p in model.named_parameters():
            if "txt_attn.norm.key_norm" in name:
                p.div_(8)
    expected = run(model, inputs, "sdpa")
    calls = []
    fused = rmsnorm.qk_norm_rope_into
    monkeypatch.setattr(rmsnorm, "qk_norm_rope_into", lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
    for module in model.modules():
        if hasattr(module, "fp8_attention"):
            module.fp8_attention = True
    err = rel_err(run(model, inputs, "triton"), expected)
    print(f"{case}: fp8 attention {err:.4f}")
    assert calls and err <= (0.12 if DEVICE == "cpu" else 0.06), err
    monkeypatch.setenv("ZFLUX_FP8_ATTENTION", "0")  # the switch: exact again
    assert rel_err(run(model, inputs, "triton"), expected) <= 1e-5


@pytest.mark.parametrize("case", ["flux", "flux2"])
def test_fp8_activations_fused_in_flux(case, monkeypatch):
    """FLUX.1 and FLUX.2 with fp8 linears (attention left exact) under `triton`: every double-block MLP's second linear
    and every single block's linear2 takes its input as e4m3 rows from the fused activation kernel (counted: the MLPs'
    alone, linear2's after the attention output), and the output is the unfused kernels' to the bit. Against `sdpa`
    (plain activation, concatenation, quant.quantize) it differs by the e4m3 casts that round differently: on the
    interpreter, whose casts are not torch's (test_kernels_fp8.py), by more than fp8's own error against the fp32 model
    (measured 0.12 and 0.19, fp8 itself 0.08 and 0.11); on the GPU by the kernels' approximate division alone."""
    from zflux.kernels import activations
    from zflux.kernels.quantize import quantize_rows
    from test_kernels_fp8 import unfused_activation

    model, inputs = CASES[case](DEVICE)
    exact = run(model, inputs, "sdpa")
    quantize_model(model)
    expected = run(model, inputs, "sdpa")
    calls = []
    fused = activations.activation_fp8
    monkeypatch.setattr(activations, "activation_fp8", lambda *args: calls.append(args[2] is not None) or fused(*args))
    out = run(model, inputs, "triton")
    assert sorted(calls) == [False] * (2 * model.cfg.num_layers) + [True] * model.cfg.num_single_layers
    monkeypatch.setattr(activations, "activation_fp8", lambda *args: quantize_rows(unfused_activation(*args)))
    assert torch.equal(out, run(model, inputs, "triton"))
    err, fp8_err = rel_err(out, expected), rel_err(expected, exact)
    print(f"{case}: fp8 triton vs sdpa {err:.4f}, fp8 vs fp32 {fp8_err:.4f}")
    assert err <= (0.25 if DEVICE == "cpu" else 0.02), err


@pytest.mark.parametrize("case", ["zimage", "flux", "flux2"])
def test_fp8_attention_hands_e4m3_rows_to_the_output_projection(case, monkeypatch):
    """A model with fp8 linears and fp8 attention under `triton`: every attention whose output projection is fp8 (Z-Image's
    every block, FLUX's double blocks; the single blocks join it with the MLP's activation first) writes its output as
    e4m3 rows under the bound scale (flash_attention_fp8_rows, counted), against the plain output quantized per row by
    its own pass: the whole model's fp8 error from the fp32 model within 1.25x (+1%) of the latter's. (The two differ from
    each other by about as much as either from fp32: two roundings of every attention output, carried through the
    blocks.)"""
    from zflux.kernels import attention
    from zflux.kernels.quantize import quantize_rows

    model, inputs = CASES[case](DEVICE)
    exact = run(model, inputs, "sdpa")
    quantize_model(model)
    model.fp8_attention = True
    calls = []
    fused = attention.flash_attention_fp8_rows
    monkeypatch.setattr(attention, "flash_attention_fp8_rows", lambda *args: calls.append(1) or fused(*args))
    out = run(model, inputs, "triton")
    attentions = 2 + len(model.layers) if case == "zimage" else model.cfg.num_layers  # Z-Image: one refiner block of each kind
    assert len(calls) == attentions

    def separate(*args):  # the plain output, then its own quantizing pass
        plain = attention.flash_attention_fp8_bshd(*args, torch.float32)  # (B, S, H, D)
        data, scale = quantize_rows(plain.flatten(2))
        return data.unflatten(2, plain.shape[2:]), scale

    monkeypatch.setattr(attention, "flash_attention_fp8_rows", separate)
    apart = run(model, inputs, "triton")
    err, err_apart = rel_err(out, exact), rel_err(apart, exact)
    print(f"{case}: fp8 vs fp32, e4m3 attention rows {err:.4f}, quantized apart {err_apart:.4f}")
    assert err <= 1.25 * err_apart + 0.01, (err, err_apart)


FUSED_RESIDUALS = {"zimage": ["gated_rms_residual_norm_scale"], "flux": ["gated_residual_layer_norm_modulate", "gated_residual"],
                   "flux2": ["gated_residual_layer_norm_modulate", "gated_residual"]}


def fused_residual_calls(model, case: str) -> list[int]:
    """How often each of FUSED_RESIDUALS[case] runs in one forward: Z-Image once a modulated block (the attention
    residual with the MLP's pre-norm); FLUX twice a double block (the attention residual with the MLP's adaLN, each
    stream), and the plain gated residual after every double block's MLP (each stream) and every single block."""
    if case == "zimage":
        return [sum(getattr(m, "modulated", False) for m in model.modules())]
    doubles, singles = model.cfg.num_layers, model.cfg.num_single_layers
    return [2 * doubles, 2 * doubles + singles]


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", ["zimage", "flux", "flux2"])
def test_residuals_fused_with_the_next_norm(case, fp8, monkeypatch):
    """Under `triton` each model runs its gated residuals through the fused kernels (counted), fp8 models the forms that
    hand the norm to the fp8 linear as e4m3 rows, and the output is that of the single kernels they replace, to the bit."""
    from zflux.kernels import modulate
    from test_kernels_modulate import unfused

    model, inputs = CASES[case](DEVICE)
    if fp8:
        quantize_model(model)
    names = [f"{name}_fp8" if fp8 and name != "gated_residual" else name for name in FUSED_RESIDUALS[case]]
    calls = {name: 0 for name in names}

    def counted(name, fused):
        return lambda *args: calls.__setitem__(name, calls[name] + 1) or fused(*args)

    for name in names:
        monkeypatch.setattr(modulate, name, counted(name, getattr(modulate, name)))
    out = run(model, inputs, "triton")
    assert list(calls.values()) == fused_residual_calls(model, case)

    def single_kernels(name):
        if not name.endswith("_fp8"):
            return lambda *args: unfused(name, args)
        norm_fp8 = modulate.rms_norm_scale_fp8 if name.startswith("gated_rms") else modulate.layer_norm_modulate_fp8

        def unfused_fp8(*args):
            residual = unfused(name.removesuffix("_fp8"), args)[0]
            return residual, *norm_fp8(residual, *args[-3:])  # (norm weight or shift, scale, eps)
        return unfused_fp8

    for name in names:
        if name != "gated_residual":
            monkeypatch.setattr(modulate, name, single_kernels(name))
    expected = run(model, inputs, "triton")
    if fp8 and DEVICE == "cuda":  # the GPU's fp32 sums round an ulp apart in the two kernels, which tips a few e4m3 bytes
        err = rel_err(out, expected)
        print(f"{case}: fused residual + norm vs single kernels, fp8 {err:.2e}")
        assert err <= 1e-2, err
    else:
        assert torch.equal(out, expected)
