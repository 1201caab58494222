"""Inpainting's shared pieces: the per-step blend, mask processing and the outpainting canvas, against diffusers.

The blend is compared with diffusers' own scheduler driven as FluxInpaintPipeline and ZImageInpaintPipeline
drive it (scheduler.step, then scale_noise of the image latents to the next timestep with the run's noise,
then (1 - mask) * known + mask * latents): bit-exact, in fp32 and bf16. Masks are compared with the
mask processor those pipelines build (VaeImageProcessor with binarize + grayscale, no normalize) and
with FluxInpaintPipeline.prepare_mask_latents: exact.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxInpaintPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux import pipeline_flux_inpaint
from PIL import Image

from zflux.common.images import check_mask, mask_latents, mask_tensor, outpaint_canvas
from zflux.common.sampling import euler_step, img2img_start, inpaint_blend, noise_latent
from zflux.flux.pipeline import VARIANTS

FLUX_DEV = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
MASK_PROCESSOR = VaeImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def random_mask(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A mask with every gray level (so the 0.5 threshold is exercised), in `mode`."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_blend_matches_flux_inpaint_loop(dtype, strength):
    steps, h, w = 6, 8, 12
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    mu = pipeline_flux_inpaint.calculate_shift(h // 2 * w // 2)
    pipeline_flux_inpaint.retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    timesteps, _ = FluxInpaintPipeline.get_timesteps(SimpleNamespace(scheduler=sched), steps, strength, "cpu")

    g = torch.Generator().manual_seed(1)
    known, noise = torch.randn(1, 16, h, w, generator=g).to(dtype), torch.randn(1, 16, h, w, generator=g).to(dtype)
    mask = (torch.rand(1, 1, h, w, generator=g) > 0.5).to(dtype).expand(1, 16, h, w)
    velocities = [torch.randn(1, 16, h, w, generator=g).to(dtype) for _ in timesteps]
    model = lambda x, i: velocities[i] + 0.5 * x.flip(-1)  # noqa: E731 (a stand-in that mixes the known region into the rest)

    expected = sched.scale_noise(known, timesteps[:1], noise)
    for i, t in enumerate(timesteps):  # the denoising loop of pipeline_flux_inpaint.py, with the stand-in model
        expected = sched.step(model(expected, i), t, expected, return_dict=False)[0]
        proper = known if i == len(timesteps) - 1 else sched.scale_noise(known, torch.tensor([timesteps[i + 1]]), noise)
        expected = (1 - mask) * proper + mask * expected

    sigmas = VARIANTS["flux-dev"].scheduler.schedule(steps, h // 2 * w // 2)
    start = img2img_start(sigmas, strength)
    x = noise_latent(known, noise, sigmas[start])
    for i in range(start, steps):
        x = inpaint_blend(euler_step(x, model(x, i - start), sigmas[i], sigmas[i + 1]), known, noise, mask, sigmas[i + 1])
    assert x.dtype == dtype and torch.equal(x, expected)


def test_blend_keeps_known_region_exactly_at_the_end():
    g = torch.Generator().manual_seed(2)
    latents, known, noise = (torch.randn(1, 16, 4, 4, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    out = inpaint_blend(latents, known, noise, mask, 0.0)
    assert torch.equal(out[..., 2:, :], known[..., 2:, :]) and torch.equal(out[..., :2, :], latents[..., :2, :])
    renoised = inpaint_blend(latents, known, noise, mask, 0.25)
    assert torch.equal(renoised[..., 2:, :], (0.25 * noise + 0.75 * known)[..., 2:, :])


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
@pytest.mark.parametrize("size", [(48, 32), (40, 56)])  # (width, height) of the mask; the target is 48 x 32
def test_mask_tensor_matches_diffusers_mask_processor(mode, size):
    mask = random_mask(*size, mode=mode)
    got = mask_tensor(mask, 48, 32)
    expected = MASK_PROCESSOR.preprocess(mask, height=32, width=48)
    assert got.shape == (1, 1, 32, 48) and got.dtype == torch.float32
    assert torch.equal(got, expected) and set(got.unique().tolist()) == {0.0, 1.0}


def test_mask_threshold_is_one_half():
    gray = Image.fromarray(np.array([[127, 128, 0, 255]], dtype=np.uint8))
    assert mask_tensor(gray, 4, 1).flatten().tolist() == [0.0, 1.0, 0.0, 1.0]


def test_mask_latents_match_flux_prepare_mask_latents():
    mask = MASK_PROCESSOR.preprocess(random_mask(64, 48, seed=3), height=48, width=64)  # (1, 1, 48, 64)
    pipe = SimpleNamespace(vae_scale_factor=8, _pack_latents=FluxInpaintPipeline._pack_latents)
    masked = torch.zeros(1, 16, 6, 8)  # 16 channels: taken as latents already, no autoencoder needed
    expected, _ = FluxInpaintPipeline.prepare_mask_latents(pipe, mask, masked, 1, 16, 1, 48, 64, torch.float32, "cpu", None)
    got = mask_latents(mask, 6, 8)  # (1, 1, 6, 8)
    assert got.shape == (1, 1, 6, 8) and torch.equal(got, mask[:, :, ::8, ::8])
    assert torch.equal(FluxInpaintPipeline._pack_latents(got.expand(1, 16, 6, 8), 1, 16, 6, 8), expected)


def test_check_mask_refuses_another_size():
    with pytest.raises(ValueError, match="the mask is 32x16 but the image is 32x32"):
        check_mask(Image.new("L", (32, 16)), Image.new("RGB", (32, 32)))
    check_mask(Image.new("L", (32, 32)), Image.new("RGB", (32, 32)))


def test_outpaint_canvas():
    image = Image.fromarray(np.full((16, 32, 3), 200, dtype=np.uint8))
    canvas, mask = outpaint_canvas(image, (8, 0, 24, 16))
    assert canvas.size == mask.size == (64, 32) and canvas.mode == "RGB" and mask.mode == "L"
    pixels, repaint = np.asarray(canvas), np.asarray(mask)
    assert (pixels[:16, 8:40] == 200).all() and (pixels[16:] == 128).all() and (pixels[:, :8] == 128).all()
    assert (repaint[:16, 8:40] == 0).all() and (repaint[16:] == 255).all() and (repaint[:, 40:] == 255).all()
    assert repaint.sum() == 255 * (64 * 32 - 16 * 32)


def test_outpaint_canvas_keeps_a_given_mask():
    image, inner = Image.new("RGB", (16, 16)), Image.new("L", (16, 16), 0)
    inner.paste(255, (0, 0, 4, 4))
    _, mask = outpaint_canvas(image, (0, 16, 0, 0), inner)
    repaint = np.asarray(mask)
    assert (repaint[:16] == 255).all() and (repaint[16:20, :4] == 255).all() and repaint[20:].sum() == 0


@pytest.mark.parametrize("borders, message", [((0, 0, 0, 0), "adds no border"), ((8, -8, 0, 0), "non-negative"),
                                              ((8, 8, 8), "four"), ((8.0, 0, 0, 0), "four")])
def test_outpaint_canvas_errors(borders, message):
    with pytest.raises(ValueError, match=message):
        outpaint_canvas(Image.new("RGB", (16, 16)), borders)


def test_outpaint_canvas_refuses_a_mask_of_another_size():
    with pytest.raises(ValueError, match="the mask is"):
        outpaint_canvas(Image.new("RGB", (16, 16)), (8, 0, 0, 0), Image.new("L", (8, 8)))
