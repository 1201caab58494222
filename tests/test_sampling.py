"""Sampling: schedules, steps, guidance, noise and img2img against diffusers' scheduler and pipelines.

References are diffusers' own code wherever it can be called: FlowMatchEulerDiscreteScheduler set up
from each checkpoint's shipped scheduler_config.json and driven by the pipelines' module-level helpers
(calculate_shift, retrieve_timesteps, get_default_z_image_sigmas, get_timesteps), and the real
ZImagePipeline / FluxPipeline denoising loops run with a stand-in transformer (a cheap closed-form
function of latent, time and text) so that every sampling detail is compared end to end.

Tolerances: FLUX.1 paths are bit-exact (same float32 operations). Z-Image's sigma grid is built by
ZImagePipeline with float32 torch.linspace, ours is rounded once from float64 (as FluxPipeline's
np.linspace), so Z-Image sigmas may differ by a float32 rounding step or two (<= 2.4e-7) and
the denoised latents by ~1e-7 relative.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline, ZImageImg2ImgPipeline, ZImagePipeline
from diffusers.pipelines.flux import pipeline_flux
from diffusers.pipelines.z_image import pipeline_z_image
from diffusers.utils.torch_utils import randn_tensor
from einops import rearrange

from zflux.common.sampling import (SchedulerConfig, cfg_combine, euler_step, img2img_latent, img2img_start, initial_noise, noise_latent,
                                   shift_sigmas, sigma_schedule, time_shift)
from zflux.flux.pipeline import VARIANTS as FLUX_VARIANTS
from zflux.flux.pipeline import embedded_guidance, flux_time
from util import rel_err
from zflux.zimg.pipeline import VARIANTS as ZIMAGE_VARIANTS
from zflux.zimg.pipeline import cfg_active, zimage_time

VARIANTS = ZIMAGE_VARIANTS | FLUX_VARIANTS

# scheduler/scheduler_config.json as shipped with each checkpoint on the Hub.
SHIPPED = {
    "z-image-turbo": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.36.0.dev0",
                      "num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0},
    "z-image": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.37.0.dev0",
                "num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 6.0},
    "flux-dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                 "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                 "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
    "flux-schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                     "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                     "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False},
}
ZIMAGE_SIGMA_ATOL = 2.4e-7  # two float32 steps below 1 (see the module docstring)


def scheduler(name: str) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_config(SHIPPED[name])


def diffusers_schedule(name: str, steps: int, height: int, width: int) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler after the pipeline's "Prepare timesteps" block (pipeline_z_image.py / pipeline_flux.py)."""
    sched = scheduler(name)
    seq = (height // 16) * (width // 16)
    if name.startswith("z-image"):
        mod, sigmas = pipeline_z_image, pipeline_z_image.get_default_z_image_sigmas(steps)
    else:
        mod, sigmas = pipeline_flux, np.linspace(1.0, 1 / steps, steps)
    mu = mod.calculate_shift(seq, sched.config.get("base_image_seq_len", 256), sched.config.get("max_image_seq_len", 4096),
                             sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
    mod.retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
    return sched


def test_presets_are_the_shipped_configs():
    for name, config in SHIPPED.items():
        assert SchedulerConfig.from_diffusers(config) == VARIANTS[name].scheduler
    full = dict(scheduler("flux-dev").config)  # every field a saved scheduler config carries
    assert SchedulerConfig.from_diffusers(full) == VARIANTS["flux-dev"].scheduler
    assert VARIANTS["z-image-turbo"].defaults.steps == 8 and VARIANTS["flux-schnell"].defaults.steps == 4


@pytest.mark.parametrize("option", [{"use_karras_sigmas": True}, {"use_beta_sigmas": True}, {"invert_sigmas": True},
                                    {"shift_terminal": 0.1}, {"time_shift_type": "linear"}, {"stochastic_sampling": True},
                                    {"num_train_timesteps": 500}])
def test_unsupported_scheduler_options_are_refused(option):
    with pytest.raises(ValueError):
        SchedulerConfig.from_diffusers(SHIPPED["flux-dev"] | option)


CASES = [  # (preset, steps, height, width)
    ("z-image-turbo", 8, 1024, 1024),
    ("z-image-turbo", 8, 768, 1344),
    ("z-image", 50, 1024, 1024),
    ("z-image", 28, 1280, 720),
    ("flux-schnell", 4, 1024, 1024),
    ("flux-dev", 28, 1024, 1024),
    ("flux-dev", 28, 768, 1360),
    ("flux-dev", 50, 2048, 2048),  # beyond max_image_seq_len: mu extrapolates
]


@pytest.mark.parametrize("name, steps, height, width", CASES)
def test_schedule_matches_diffusers(name, steps, height, width):
    ref = diffusers_schedule(name, steps, height, width)
    ours = VARIANTS[name].scheduler.schedule(steps, (height // 16) * (width // 16))
    assert ours.shape == (steps + 1,) and ours.dtype == torch.float32 and ours[-1] == 0
    if name.startswith("z-image"):
        assert (ours - ref.sigmas).abs().max() <= ZIMAGE_SIGMA_ATOL
    else:
        assert torch.equal(ours, ref.sigmas)
    # the model times, read off each pipeline's denoising loop
    assert torch.equal(zimage_time(ref.sigmas[:-1]), (1000 - ref.timesteps) / 1000)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(flux_time(ref.sigmas[:-1], dtype), ref.timesteps.to(dtype) / 1000)


def test_turbo_nine_steps_legacy_is_eight_model_steps():
    """Older ZImagePipeline set sigma_min = 0 and ran num_inference_steps=9: 8 steps of length > 0, then one of length 0."""
    sched = scheduler("z-image-turbo")
    sched.sigma_min = 0.0
    sched.set_timesteps(9, mu=1.15)
    assert sched.sigmas[8] == 0 and sched.sigmas[9] == 0
    assert (sched.sigmas[:9] - sigma_schedule(8, shift=3.0)).abs().max() <= ZIMAGE_SIGMA_ATOL


def test_shift_formulas():
    s = sigma_schedule(20)[:-1]
    assert torch.equal(s, torch.linspace(1.0, 1 / 20, 20, dtype=torch.float64).float())
    dev = VARIANTS["flux-dev"].scheduler
    for seq in (256, 1024, 4096, 6000):
        assert dev.mu(seq) == pipeline_flux.calculate_shift(seq)
    assert dev.mu(256) == pytest.approx(0.5) and dev.mu(4096) == pytest.approx(1.15)
    mu = dev.mu(1024)
    assert torch.allclose(time_shift(mu, s), shift_sigmas(s, float(np.exp(mu))), atol=1e-6)  # e^mu is a static shift
    # BFL's get_schedule: time_shift of linspace(1, 0, steps + 1) (float32 rounding differs slightly)
    grid = torch.linspace(1, 0, 21)[:-1]
    bfl = np.exp(mu) / (np.exp(mu) + (1 / grid - 1))
    assert torch.allclose(sigma_schedule(20, mu=mu)[:-1], bfl.float(), atol=1e-6)
    with pytest.raises(ValueError):
        sigma_schedule(4, shift=3.0, mu=1.0)
    with pytest.raises(ValueError):
        sigma_schedule(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", [0, 13, 27])
def test_euler_step_matches_scheduler_step(dtype, index):
    sched = diffusers_schedule("flux-dev", 28, 512, 512)
    g = torch.Generator().manual_seed(index)
    x, v = torch.randn(2, 16, 64, generator=g).to(dtype), torch.randn(2, 16, 64, generator=g).to(dtype)
    sched.set_begin_index(index)
    expected = sched.step(v, sched.timesteps[index], x, return_dict=False)[0]
    got = euler_step(x, v, sched.sigmas[index], sched.sigmas[index + 1])
    assert got.dtype == dtype and torch.equal(got, expected)
    assert torch.equal(euler_step(x, v, sched.sigmas[index].item(), sched.sigmas[index + 1].item()), expected)


@pytest.mark.parametrize("pipeline", [FluxImg2ImgPipeline, ZImageImg2ImgPipeline])
@pytest.mark.parametrize("steps, strength", [(28, 0.6), (28, 1.0), (8, 0.3), (4, 0.95), (9, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_img2img_matches_pipelines(pipeline, steps, strength, dtype):
    name = "flux-dev" if pipeline is FluxImg2ImgPipeline else "z-image-turbo"
    sched = diffusers_schedule(name, steps, 512, 768)
    timesteps, remaining = pipeline.get_timesteps(SimpleNamespace(scheduler=sched), steps, strength, "cpu")
    start = img2img_start(sched.sigmas, strength)
    assert start == steps - remaining and remaining >= 1

    g = torch.Generator().manual_seed(steps)
    latent, noise = torch.randn(2, 16, 8, 12, generator=g).to(dtype), torch.randn(2, 16, 8, 12, generator=g).to(dtype)
    expected = sched.scale_noise(latent, timesteps[:1].repeat(2), noise)  # as prepare_latents calls it
    assert torch.equal(noise_latent(latent, noise, sched.sigmas[start]), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_img2img_latent_matches_flux_prepare_latents(dtype):
    """Start index, seeded noise and noising together, against FluxImg2ImgPipeline.prepare_latents given a latent."""
    sched = diffusers_schedule("flux-dev", 28, 128, 96)
    pipe = SimpleNamespace(scheduler=sched, vae_scale_factor=8, latent_channels=16, _pack_latents=FluxImg2ImgPipeline._pack_latents,
                           _prepare_latent_image_ids=FluxImg2ImgPipeline._prepare_latent_image_ids)
    timesteps, _ = FluxImg2ImgPipeline.get_timesteps(pipe, 28, 0.6, "cpu")
    latent = torch.randn(2, 16, 16, 12, generator=torch.Generator().manual_seed(0))
    expected, _ = FluxImg2ImgPipeline.prepare_latents(pipe, latent, timesteps[:1].repeat(2), 2, 16, 128, 96, dtype, "cpu",
                                                      torch.Generator("cpu").manual_seed(7))
    got, noise, start = img2img_latent(latent.to(dtype), sched.sigmas, 0.6, seed=7)
    assert start == 28 - len(timesteps)
    assert torch.equal(rearrange(got, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2), expected)


def test_img2img_errors():
    sigmas = sigma_schedule(4)
    with pytest.raises(ValueError, match="strength"):
        img2img_start(sigmas, 1.5)
    with pytest.raises(ValueError, match="no denoising step"):
        img2img_start(sigmas, 0.0)
    assert img2img_start(sigmas, 1.0) == 0 and img2img_start(sigmas, 0.01) == 3  # the start index is rounded down


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_initial_noise_is_seeded(dtype):
    shape = (2, 16, 8, 6)
    a = initial_noise(shape, 42, "cpu", dtype)
    assert a.dtype == dtype and torch.equal(a, initial_noise(shape, 42, "cpu", dtype))
    assert not torch.equal(a, initial_noise(shape, 43, "cpu", dtype))
    assert torch.equal(a, randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(42), device=torch.device("cpu"), dtype=dtype))


@pytest.mark.gpu
def test_initial_noise_is_device_independent():
    """Drawn on the CPU then moved: the CUDA copy holds the same numbers (memory: a few KB, time: < 1 s)."""
    shape = (1, 16, 128, 128)
    assert torch.equal(initial_noise(shape, 7, "cuda", torch.bfloat16).cpu(), initial_noise(shape, 7, "cpu", torch.bfloat16))


def zimage_cfg_reference(pos: torch.Tensor, neg: torch.Tensor, scale: float, normalization) -> torch.Tensor:
    """ZImagePipeline.__call__'s "Perform CFG" block (pipeline_z_image.py), per sample as written there."""
    out = []
    for p, n in zip(pos.float(), neg.float()):
        pred = p + scale * (p - n)
        if normalization and float(normalization) > 0.0:
            max_norm = torch.linalg.vector_norm(p) * float(normalization)
            norm = torch.linalg.vector_norm(pred)
            if norm > max_norm:
                pred = pred * (max_norm / norm)
        out.append(pred)
    return torch.stack(out)


@pytest.mark.parametrize("normalization", [None, 1.0, 0.5, True, 0.0])
def test_cfg_combine_matches_zimage(normalization):
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(4, 16, 1, 8, 8, generator=g)
    neg = pos * torch.tensor([1.1, 0.2, -1.0, 3.0]).view(4, 1, 1, 1, 1) + 0.1 * torch.randn(4, 16, 1, 8, 8, generator=g)
    got = cfg_combine(pos.bfloat16(), neg.bfloat16(), 4.0, normalization)
    expected = zimage_cfg_reference(pos.bfloat16(), neg.bfloat16(), 4.0, normalization)
    assert got.dtype == torch.float32 and rel_err(got, expected) <= 1e-6  # batched vs per-sample norm: summation order
    if normalization == 1.0:  # the first sample's guided norm stays below ||cond||, the others are scaled down
        rescaled = (got != cfg_combine(pos.bfloat16(), neg.bfloat16(), 4.0)).flatten(1).any(1)
        assert rescaled.tolist() == [False, True, True, True]
    assert torch.equal(cfg_combine(pos, neg, 0.0), pos)


def test_cfg_combine_as_true_cfg():
    """FluxPipeline's true CFG neg + s * (pos - neg) is scale s - 1 (equal up to float32 rounding)."""
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(2, 64, 64, generator=g), torch.randn(2, 64, 64, generator=g)
    assert rel_err(cfg_combine(pos, neg, 1.5 - 1), neg + 1.5 * (pos - neg)) <= 1e-6


def test_cfg_truncation_matches_zimage():
    ref = diffusers_schedule("z-image", 50, 1024, 1024)
    t_norms = ((1000 - ref.timesteps.float()) / 1000).tolist()  # the pipeline's _precomputed_t_norms
    for truncation in (0.0, 0.25, 0.5, 0.9, 1.0):
        assert [cfg_active(s, truncation) for s in ref.sigmas[:-1]] == [t <= truncation for t in t_norms]
    assert all(cfg_active(s, None) and cfg_active(s, 1.5) for s in ref.sigmas)


def test_embedded_guidance():
    assert torch.equal(embedded_guidance(3.5, 3), torch.full([1], 3.5, dtype=torch.float32).expand(3))


# ---- whole denoising loops: the real diffusers pipelines vs. a loop built from common.sampling and the families' rules ----

class StubZImage(torch.nn.Module):
    """Stands in for ZImageTransformer2DModel: a smooth function of latent, time and caption."""

    in_channels = 16
    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @staticmethod
    def velocity(x: torch.Tensor, t: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
        """x (C, 1, H, W), t scalar, cap (L, 16) -> (C, 1, H, W)."""
        return x * (0.5 - t) + torch.tanh(cap.mean(0)).view(-1, 1, 1, 1)

    def forward(self, xs, t, caps, joint_attention_kwargs=None, return_dict=False):
        return ([self.velocity(x, ti, c) for x, ti, c in zip(xs, t, caps)],)


@pytest.mark.parametrize("name, steps, guidance, normalization, truncation", [
    ("z-image-turbo", 8, 0.0, False, 1.0),
    ("z-image", 12, 4.0, True, 0.6),
    ("z-image", 10, 3.0, False, 1.0),
])
@torch.no_grad()
def test_zimage_loop_matches_pipeline(name, steps, guidance, normalization, truncation):
    g = torch.Generator().manual_seed(3)
    caps = [torch.randn(5, 16, generator=g), torch.randn(9, 16, generator=g)]
    negs = [torch.randn(3, 16, generator=g), 3 * torch.randn(7, 16, generator=g)]
    height, width, seed = 128, 96, 11
    pipe = ZImagePipeline(scheduler=scheduler(name), vae=None, text_encoder=None, tokenizer=None, transformer=StubZImage())
    expected = pipe(prompt_embeds=caps, negative_prompt_embeds=negs, height=height, width=width, num_inference_steps=steps,
                    guidance_scale=guidance, cfg_normalization=normalization, cfg_truncation=truncation,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images

    x = initial_noise((2, 16, height // 8, width // 8), seed)  # (B, C, H, W) fp32, as ZImagePipeline draws it
    sigmas = VARIANTS[name].scheduler.schedule(steps, (height // 16) * (width // 16))
    for i in range(steps):
        t = zimage_time(sigmas[i])
        pos = torch.stack([StubZImage.velocity(xi[:, None], t, c) for xi, c in zip(x, caps)])  # (B, C, 1, H, W)
        pred = pos
        if guidance > 0 and cfg_active(sigmas[i], truncation):
            neg = torch.stack([StubZImage.velocity(xi[:, None], t, c) for xi, c in zip(x, negs)])
            pred = cfg_combine(pos, neg, guidance, float(normalization))
        x = euler_step(x, -pred[:, :, 0], sigmas[i], sigmas[i + 1])  # Z-Image predicts image - noise: negate
    assert rel_err(x, expected) <= 1e-6


class StubFlux(torch.nn.Module):
    """Stands in for FluxTransformer2DModel on packed latents (B, S, 64) and T5 features (B, L, 64)."""

    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)

    def __init__(self, guidance_embeds: bool):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(in_channels=64, guidance_embeds=guidance_embeds)
        self.cache_context = lambda name: torch.no_grad()

    @staticmethod
    def velocity(x, t, guidance, pooled, text):
        v = x * (0.5 - t[:, None, None]) + text.mean(1, keepdim=True) + pooled.mean(1)[:, None, None]
        v = v if guidance is None else v + 0.01 * guidance[:, None, None]
        return v.to(x.dtype)  # a real transformer answers in its own dtype

    def forward(self, hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states, txt_ids, img_ids,
                joint_attention_kwargs=None, return_dict=False):
        return (self.velocity(hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states),)


@pytest.mark.parametrize("name, steps, guidance, true_cfg, dtype", [
    ("flux-schnell", 4, None, None, torch.bfloat16),
    ("flux-dev", 6, 3.5, None, torch.bfloat16),
    ("flux-dev", 6, 3.5, None, torch.float32),
    ("flux-dev", 5, 3.5, 2.0, torch.float32),  # negative prompt through true CFG
])
@torch.no_grad()
def test_flux_loop_matches_pipeline(name, steps, guidance, true_cfg, dtype):
    g = torch.Generator().manual_seed(5)
    text, pooled = torch.randn(2, 12, 64, generator=g).to(dtype), torch.randn(2, 32, generator=g).to(dtype)
    neg_text, neg_pooled = torch.randn(2, 12, 64, generator=g).to(dtype), torch.randn(2, 32, generator=g).to(dtype)
    height, width, seed = 128, 96, 13
    pipe = FluxPipeline(scheduler=scheduler(name), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=StubFlux(guidance is not None).to(dtype))
    negative = dict(negative_prompt_embeds=neg_text, negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=true_cfg) if true_cfg else {}
    expected = pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, height=height, width=width, num_inference_steps=steps,
                    guidance_scale=guidance or 0.0, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                    **negative).images

    noise = initial_noise((2, 16, height // 8, width // 8), seed, dtype=dtype)  # (B, C, H, W)
    x = rearrange(noise, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)  # (B, S, 64)
    sigmas = VARIANTS[name].scheduler.schedule(steps, x.shape[1])
    vec = embedded_guidance(guidance, 2) if guidance is not None else None
    for i in range(steps):
        t = flux_time(sigmas[i], dtype).expand(2)
        v = StubFlux.velocity(x, t, vec, pooled, text)
        if true_cfg:
            v = cfg_combine(v, StubFlux.velocity(x, t, vec, neg_pooled, neg_text), true_cfg - 1).to(dtype)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
    assert x.dtype == expected.dtype == dtype
    assert torch.equal(x, expected) if not true_cfg else rel_err(x, expected) <= 1e-6
