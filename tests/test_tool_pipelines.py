"""The tools end to end against diffusers' own pipelines: inpainting (FLUX.1, Z-Image), Fill (inpaint, outpaint),
Canny/Depth control, Kontext, Redux; each from one tiny random snapshot saved by that diffusers pipeline.

Both sides get the same prompt, images and seed (diffusers: a CPU generator of that seed), so every
random draw (posterior samples of encoded images, the start noise) must come in diffusers' order and
shape. Tolerance: fp32 on the CPU, final latents <= 1e-5 relative; the differences are the transformer's
fused / reordered math (~1e-7 per call, test_flux_model.py) over a few steps (measured: 1.3e-7 to 9e-7).
The same seed gives the same latents twice, bit for bit.
"""

import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import (FluxControlPipeline, FluxFillPipeline, FluxInpaintPipeline, FluxKontextPipeline, FluxPipeline as DiffusersFlux,
                       FluxPriorReduxPipeline, ZImageInpaintPipeline)
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from zflux.common.images import fit_image, outpaint_canvas
from zflux.common.pipeline import encode_sample, image_pixels
from zflux.common.images import canny
from zflux.common.weights import CheckpointError, read_state_dict, save_state_dict
from zflux.flux.convert import from_diffusers as flux_from_diffusers
from zflux.flux.pipeline import FluxPipeline, check_task
from zflux.zimg.pipeline import ZImagePipeline
from tiny_pipelines import flux_snapshot, one_thread  # noqa: F401 (one_thread: autouse fixture)
from tiny_tools import flux_tool_snapshot, redux_snapshot, zimage_inpaint_snapshot
from util import rel_err

TOL = 1e-5  # see the module docstring
H, W = 48, 64  # pixels: a (6, 8) latent, 12 image tokens
PROMPT = "a photo of a cat"
FP32 = dict(device="cpu", dtype=torch.float32)
SEED = 3


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    return {
        "inpaint-schnell": flux_tool_snapshot(root / "inpaint-schnell", FluxInpaintPipeline, "flux-schnell"),
        "inpaint-dev": flux_tool_snapshot(root / "inpaint-dev", FluxInpaintPipeline, "flux-dev"),
        "zimage-turbo": zimage_inpaint_snapshot(root / "zimage-turbo", "z-image-turbo"),
        "zimage": zimage_inpaint_snapshot(root / "zimage", "z-image"),
        "fill": flux_tool_snapshot(root / "fill", FluxFillPipeline, in_channels=384),
        "control": flux_tool_snapshot(root / "control", FluxControlPipeline, in_channels=128),
        "kontext": flux_tool_snapshot(root / "kontext", FluxKontextPipeline),
        "dev": flux_snapshot(root / "dev", "flux-dev"),
        "redux": redux_snapshot(root / "redux"),
    }


def photo(width: int = W, height: int = H, seed: int = 0) -> Image.Image:
    """A smooth random image (edges for Canny to find, content for the autoencoder)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.Resampling.BICUBIC)


def mask_image(width: int = W, height: int = H) -> Image.Image:
    """White (repaint) over a rectangle, with a gray edge below and above the 0.5 threshold."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[8:32, 16:48] = 255
    pixels[8:32, 48:52] = 140
    pixels[32:36, 16:48] = 100
    return Image.fromarray(pixels)


def ours(pipe, **kwargs) -> torch.Tensor:
    return pipe.generate(PROMPT, seed=SEED, output_type="latent", progress=False, **kwargs)


def theirs(pipe, height: int = H, width: int = W, **kwargs) -> torch.Tensor:
    """diffusers' final latents, unpacked to (1, 16, h, w) where the pipeline returns FLUX.1's packed tokens."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, height=height, width=width, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent",
               **kwargs).images
    return out if out.ndim == 4 else DiffusersFlux._unpack_latents(out, height, width, 8)


def check(got: torch.Tensor, expected: torch.Tensor, rerun: torch.Tensor) -> None:
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= TOL
    assert torch.equal(got, rerun)  # the same seed gives the same latents


@pytest.mark.parametrize("variant, kwargs, ref_kwargs", [
    ("schnell", dict(steps=3, strength=0.7), dict(num_inference_steps=3, strength=0.7, max_sequence_length=256)),
    ("dev", dict(steps=4), dict(num_inference_steps=4, strength=0.6, guidance_scale=3.5)),  # strength: the task's default
    ("dev", dict(steps=3, strength=1.0, guidance=5.0, true_cfg=2.0, negative_prompt="blurry"),
     dict(num_inference_steps=3, strength=1.0, guidance_scale=5.0, true_cfg_scale=2.0, negative_prompt="blurry")),
])
def test_flux_inpainting_matches_diffusers(snapshots, variant, kwargs, ref_kwargs):
    snapshot = snapshots[f"inpaint-{variant}"]
    pipe = FluxPipeline.from_pretrained(snapshot, **FP32)
    run = lambda: ours(pipe, init_image=photo(), mask=mask_image(), **kwargs)
    got = run()
    expected = theirs(FluxInpaintPipeline.from_pretrained(snapshot), image=photo(), mask_image=mask_image(), **ref_kwargs)
    check(got, expected, run())


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_inpainting_keeps_the_unmasked_image(snapshots, family):
    """After the last step the known region is exactly the init image's latent sample (the seed's first draw)."""
    pipe = FluxPipeline.from_pretrained(snapshots["inpaint-schnell"], **FP32) if family == "flux" else \
        ZImagePipeline.from_pretrained(snapshots["zimage-turbo"], **FP32)
    left = Image.new("L", (W, H), 0)
    left.paste(255, (0, 0, W // 2, H))  # repaint the left half: latent columns 0-3
    latents = ours(pipe, init_image=photo(), mask=left, steps=2, strength=1.0)
    known = encode_sample(pipe.vae, image_pixels(photo(), H, W, torch.device("cpu")), torch.Generator("cpu").manual_seed(SEED))
    assert torch.equal(latents[..., 4:], known[..., 4:]) and not torch.allclose(latents[..., :4], known[..., :4], atol=0.1)


@pytest.mark.parametrize("variant, kwargs, ref_kwargs", [
    ("zimage-turbo", dict(steps=3), dict(num_inference_steps=3, guidance_scale=0.0, strength=1.0)),  # strength: the task's default
    ("zimage", dict(steps=4, guidance=4.0, strength=0.8, negative_prompt="blurry"),
     dict(num_inference_steps=4, guidance_scale=4.0, strength=0.8, negative_prompt="blurry")),
])
def test_zimage_inpainting_matches_diffusers(snapshots, variant, kwargs, ref_kwargs):
    pipe = ZImagePipeline.from_pretrained(snapshots[variant], **FP32)
    run = lambda: ours(pipe, init_image=photo(), mask=mask_image(), **kwargs)
    got = run()
    expected = theirs(ZImageInpaintPipeline.from_pretrained(snapshots[variant]), image=photo(), mask_image=mask_image(), **ref_kwargs)
    check(got, expected, run())


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_fill_inpainting_matches_diffusers(snapshots, strength):
    pipe = FluxPipeline.from_pretrained(snapshots["fill"], **FP32)
    assert pipe.variant == "flux-fill"
    run = lambda: ours(pipe, init_image=photo(), mask=mask_image(), steps=3, strength=strength)
    got = run()
    expected = theirs(FluxFillPipeline.from_pretrained(snapshots["fill"]), image=photo(), mask_image=mask_image(), num_inference_steps=3,
                      strength=strength)  # guidance 30: both pipelines' default
    check(got, expected, run())


def test_fill_outpainting_matches_diffusers(snapshots):
    """outpaint=(left, top, right, bottom) grows the canvas; diffusers is given the same canvas and mask."""
    pipe = FluxPipeline.from_pretrained(snapshots["fill"], **FP32)
    image, borders = photo(32, 32), (16, 0, 16, 16)
    run = lambda: ours(pipe, init_image=image, outpaint=borders, steps=3)
    got = run()
    canvas, mask = outpaint_canvas(image, borders)
    expected = theirs(FluxFillPipeline.from_pretrained(snapshots["fill"]), height=48, width=64, image=canvas, mask_image=mask,
                      num_inference_steps=3)
    assert got.shape == (1, 16, 6, 8)  # the canvas' size by default
    check(got, expected, run())


@pytest.mark.parametrize("preprocess", [None, "canny"])
def test_control_matches_diffusers(snapshots, preprocess):
    pipe = FluxPipeline.from_pretrained(snapshots["control"], variant="flux-canny", **FP32)
    control = photo(80, 60, seed=1)  # another size: resized to the output first
    run = lambda: ours(pipe, control_image=control, control_preprocess=preprocess, steps=3, guidance=30.0, height=H, width=W)
    got = run()
    given = canny(fit_image(control, W, H)) if preprocess else control  # diffusers leaves preprocessing to the caller
    expected = theirs(FluxControlPipeline.from_pretrained(snapshots["control"]), control_image=given, num_inference_steps=3,
                      guidance_scale=30.0)
    check(got, expected, run())


@pytest.mark.parametrize("kwargs, ref_kwargs", [
    (dict(steps=3), dict(num_inference_steps=3, guidance_scale=3.5)),
    (dict(steps=2, guidance=2.5, true_cfg=1.5, negative_prompt="blurry"),
     dict(num_inference_steps=2, guidance_scale=2.5, true_cfg_scale=1.5, negative_prompt="blurry")),
])
def test_kontext_matches_diffusers(snapshots, kwargs, ref_kwargs):
    """A reference of another size and aspect (40 x 24: the 1456 x 720 bucket) than the output (64 x 48)."""
    pipe = FluxPipeline.from_pretrained(snapshots["kontext"], **FP32)
    assert pipe.variant == "flux-kontext"  # model_index.json names it
    reference = photo(40, 24, seed=2)
    run = lambda: ours(pipe, reference_images=[reference], height=H, width=W, max_area=H * W, **kwargs)
    got = run()
    expected = theirs(FluxKontextPipeline.from_pretrained(snapshots["kontext"]), image=reference, max_area=H * W, **ref_kwargs)
    check(got, expected, run())


def test_redux_matches_diffusers(snapshots):
    """FluxPriorReduxPipeline (with the base's text encoders) then FluxPipeline on its embeddings, against load_redux + generate."""
    base, references = snapshots["dev"], [photo(seed=4), photo(40, 40, seed=5)]
    pipe = FluxPipeline.from_pretrained(base, variant="flux-redux", **FP32)
    pipe.load_redux(snapshots["redux"])
    run = lambda: ours(pipe, reference_images=references, steps=3, guidance=2.5, height=H, width=W, redux_prompt_scale=0.8,
                       redux_pooled_scale=0.5)
    got = run()

    prior = FluxPriorReduxPipeline.from_pretrained(
        snapshots["redux"], text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base / "tokenizer"), text_encoder_2=T5EncoderModel.from_pretrained(base / "text_encoder_2"),
        tokenizer_2=T5TokenizerFast.from_pretrained(base / "tokenizer_2"))
    embeds = prior(image=references, prompt=PROMPT, prompt_embeds_scale=0.8, pooled_prompt_embeds_scale=0.5)
    flux = DiffusersFlux.from_pretrained(base)
    flux.set_progress_bar_config(disable=True)
    expected = flux(prompt_embeds=embeds.prompt_embeds, pooled_prompt_embeds=embeds.pooled_prompt_embeds, height=H, width=W,
                    num_inference_steps=3, guidance_scale=2.5, generator=torch.Generator("cpu").manual_seed(SEED),
                    output_type="latent").images
    check(got, DiffusersFlux._unpack_latents(expected, H, W, 8), run())


def test_decoded_image_matches_diffusers(snapshots):
    """The decode path after a tool (Fill), to 8-bit pixels."""
    pipe = FluxPipeline.from_pretrained(snapshots["fill"], **FP32)
    image = pipe.generate(PROMPT, init_image=photo(), mask=mask_image(), steps=2, seed=SEED, progress=False)
    ref = FluxFillPipeline.from_pretrained(snapshots["fill"])
    ref.set_progress_bar_config(disable=True)
    expected = ref(prompt=PROMPT, image=photo(), mask_image=mask_image(), height=H, width=W, num_inference_steps=2,
                   generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    assert image.size == expected.size == (W, H)
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max() <= 1


NONE = dict(init_image=False, mask=False, control_image=False, control_preprocess=None, reference_images=0, outpaint=False,
            redux=False)


@pytest.mark.parametrize("variant, given, task", [
    ("flux-dev", {}, "text"), ("flux-schnell", dict(init_image=True), "img2img"), ("flux-dev", dict(init_image=True, mask=True), "inpaint"),
    ("flux-fill", dict(init_image=True, mask=True), "fill"), ("flux-fill", dict(init_image=True, outpaint=True), "fill"),
    ("flux-canny", dict(control_image=True, control_preprocess="canny"), "control"), ("flux-depth", dict(control_image=True), "control"),
    ("flux-kontext", dict(reference_images=1), "kontext"), ("flux-redux", dict(reference_images=2, redux=True), "redux"),
    ("flux-dev", dict(reference_images=1, redux=True, init_image=True, mask=True), "inpaint"),  # Redux conditions any task's text
])
def test_check_task(variant, given, task):
    assert check_task(variant, **NONE | given) == task


@pytest.mark.parametrize("variant, given, message", [
    ("flux-dev", dict(mask=True), "a mask needs the image it masks"),
    ("flux-canny", dict(control_image=True, init_image=True, mask=True), "flux-canny takes no mask"),
    ("flux-kontext", dict(reference_images=1, init_image=True, mask=True), "flux-kontext takes no mask"),
    ("flux-dev", dict(init_image=True, outpaint=True), "outpainting needs FLUX.1 Fill (flux-fill), not flux-dev"),
    ("flux-fill", dict(init_image=True), "FLUX.1 Fill needs an init image and a mask, or outpaint"),
    ("flux-fill", dict(mask=True), "a mask needs the image it masks"),
    ("flux-canny", {}, "flux-canny needs a control image"),
    ("flux-dev", dict(control_image=True), "a control image goes with FLUX.1 Canny or Depth"),
    ("flux-depth", dict(control_image=True, control_preprocess="canny"), "the one preprocessor is 'canny', for flux-canny"),
    ("flux-canny", dict(control_image=True, control_preprocess="depth"), "control_preprocess 'depth'"),
    ("flux-canny", dict(control_image=True, init_image=True), "give its image as the control image, not as an init image"),
    ("flux-kontext", {}, "FLUX.1 Kontext edits one reference image"),
    ("flux-kontext", dict(reference_images=2), "got 2"),
    ("flux-kontext", dict(reference_images=1, init_image=True), "give its image as a reference image, not as an init image"),
    ("flux-redux", dict(redux=True), "flux-redux needs one or more reference images"),
    ("flux-dev", dict(reference_images=1), "load it first (load_redux()"),
])
def test_check_task_errors(variant, given, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_task(variant, **NONE | given)


def test_generate_errors(snapshots):
    fill = FluxPipeline.from_pretrained(snapshots["fill"], **FP32)
    with pytest.raises(ValueError, match="the mask is 32x32 but the image is 64x48"):
        fill.generate(PROMPT, init_image=photo(), mask=Image.new("L", (32, 32)), steps=1)
    with pytest.raises(ValueError, match="a control image goes with FLUX.1 Canny or Depth"):
        fill.generate(PROMPT, init_image=photo(), mask=mask_image(), control_image=photo(), steps=1)
    dev = FluxPipeline.from_pretrained(snapshots["dev"], **FP32)
    with pytest.raises(ValueError, match="load it first"):
        dev.generate(PROMPT, reference_images=[photo()], steps=1)
    dev.load_redux(snapshots["redux"])
    with pytest.raises(ValueError, match="Redux runs without true CFG"):
        dev.generate(PROMPT, reference_images=[photo()], true_cfg=2.0, steps=1)
    kontext = FluxPipeline.from_pretrained(snapshots["kontext"], **FP32)
    with pytest.raises(ValueError, match="Kontext takes its reference images itself"):
        kontext.load_redux(snapshots["redux"])


def test_loading_tool_snapshots(snapshots):
    """Each tool's snapshot loads into FluxPipeline as its variant; shapes and names decide, a contradicting variant= is refused."""
    assert FluxPipeline.from_pretrained(snapshots["inpaint-dev"], **FP32).variant == "flux-dev"
    assert FluxPipeline.from_pretrained(snapshots["kontext"], **FP32).variant == "flux-kontext"
    assert FluxPipeline.from_pretrained(snapshots["control"], variant="flux-depth", **FP32).variant == "flux-depth"
    assert FluxPipeline.from_pretrained(snapshots["dev"], variant="flux-kontext", **FP32).variant == "flux-kontext"  # nothing names dev
    assert ZImagePipeline.from_pretrained(snapshots["zimage"], **FP32).variant == "z-image"
    with pytest.raises(CheckpointError, match="share every shape and nothing here names either.*run it as flux-canny or flux-depth"):
        FluxPipeline.from_pretrained(snapshots["control"], **FP32)
    with pytest.raises(CheckpointError, match="FLUX.1 Kontext .*, not flux-dev; run it as flux-kontext"):
        FluxPipeline.from_pretrained(snapshots["kontext"], variant="flux-dev", **FP32)
    with pytest.raises(CheckpointError, match="FLUX.1 Fill .*, not flux-canny"):
        FluxPipeline.from_pretrained(snapshots["fill"], variant="flux-canny", **FP32)


def test_tool_single_files_equal_their_snapshot(snapshots, tmp_path):
    """BFL-layout files of a tool load by name and shape: flux1-kontext-dev.safetensors runs as Kontext, a Fill file as Fill."""
    for name, file, kwargs in (("kontext", "flux1-kontext-dev.safetensors", dict(reference_images=[photo(40, 24, seed=2)])),
                               ("fill", "flux1-fill-dev.safetensors", dict(init_image=photo(), mask=mask_image()))):
        folder, snapshot = tmp_path / name, snapshots[name]
        folder.mkdir()
        save_state_dict(flux_from_diffusers(read_state_dict(snapshot / "transformer")), folder / file)
        shutil.copy(snapshot / "transformer" / "config.json", folder)  # a tiny file needs its config (real ones: the presets)
        single = FluxPipeline.from_single_files(folder / file, snapshot / "vae", t5=snapshot / "text_encoder_2",
                                                t5_tokenizer=snapshot / "tokenizer_2", clip=snapshot / "text_encoder",
                                                clip_tokenizer=snapshot / "tokenizer", **FP32)
        assert single.variant == f"flux-{name}"
        run = lambda pipe: ours(pipe, steps=2, height=H, width=W, **kwargs)  # noqa: E731
        assert torch.equal(run(single), run(FluxPipeline.from_pretrained(snapshot, **FP32)))
