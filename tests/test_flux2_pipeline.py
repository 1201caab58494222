"""FLUX.2 pipelines: parity with diffusers' Flux2Pipeline, Flux2KleinPipeline (distilled and base),
Flux2KleinKVPipeline and Flux2KleinInpaintPipeline end to end, loading, the schedule, named errors.

Each case loads one tiny random snapshot (tiny_flux2.py) into our pipeline and into diffusers' own,
runs both from the same seed (diffusers with a CPU generator of that seed) and compares the final
latents. Tolerance: fp32 on the CPU, relative error <= 1e-5: the text encoder is the same
`transformers` code, the transformer agrees to ~1e-7 per call (test_flux2_model.py), and a few
Euler steps keep that far below 1e-5. Decoded images may differ by one 8-bit level where a pixel sits
at a rounding boundary.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinInpaintPipeline, Flux2KleinKVPipeline, Flux2KleinPipeline
from diffusers import Flux2Pipeline as DiffusersFlux2
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from PIL import Image

from zflux.common.weights import CheckpointError
from zflux.flux.flux2.pipeline import (VARIANTS, Flux2Pipeline, cap_area, empirical_mu, flux2_sigmas, mask_pixels,
                                       reference_pixels)
from tiny_flux2 import PIPELINES, SCHEDULER, flux2_snapshot
from tiny_pipelines import one_thread  # noqa: F401 (autouse: one CPU thread for this module)
from util import rel_err

TOL = 1e-5  # see the module docstring
PROMPT = "a photo of a cat"
FP32 = dict(device="cpu", dtype=torch.float32)
DIFFUSERS = {"flux2-dev": DiffusersFlux2, "flux2-klein": Flux2KleinPipeline, "flux2-klein-base": Flux2KleinPipeline,
             "flux2-klein-kv": Flux2KleinKVPipeline, "flux2-klein-inpaint": Flux2KleinInpaintPipeline}


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2_snapshots")
    return {name: flux2_snapshot(root / name, name) for name in PIPELINES}


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def blob_mask(width: int, height: int) -> Image.Image:
    """White (repaint) in a soft-edged rectangle, black elsewhere, with grey levels on both sides of the threshold."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 3 :] = 255
    mask[height // 4 - 3 : height // 4, :] = 120
    return Image.fromarray(mask).convert("RGB")


def reference(pipe, ours_kwargs: dict, ref_kwargs: dict, seed: int) -> torch.Tensor:
    """diffusers' final latents for the same request, in our format: the raw latent (1, C, H/8, W/8)."""
    out = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(seed), output_type="latent", **ref_kwargs).images
    if isinstance(pipe, DiffusersFlux2):  # [dev] returns its packed, standardized tokens
        h, w = ours_kwargs["height"] // 16, ours_kwargs["width"] // 16
        std = torch.sqrt(pipe.vae.bn.running_var + pipe.vae.config.batch_norm_eps).view(1, -1, 1, 1)
        patches = out.transpose(1, 2).reshape(1, -1, h, w) * std + pipe.vae.bn.running_mean.view(1, -1, 1, 1)
        out = DiffusersFlux2._unpatchify_latents(patches)
    return out


REFS = [picture(80, 96, 1), picture(100, 72, 2)]  # cropped to 80x96 and 96x64
CASES = [  # (snapshot, our generate kwargs, diffusers __call__ kwargs)
    ("flux2-dev", dict(steps=3, height=64, width=64), dict(num_inference_steps=3, guidance_scale=4.0, height=64, width=64)),
    ("flux2-dev", dict(steps=2, guidance=2.5, height=48, width=80, reference_images=REFS),
     dict(num_inference_steps=2, guidance_scale=2.5, height=48, width=80, image=REFS)),
    ("flux2-klein", dict(steps=3, height=64, width=96), dict(num_inference_steps=3, height=64, width=96)),
    ("flux2-klein", dict(steps=2, reference_images=REFS), dict(num_inference_steps=2, image=REFS)),  # size from the first
    ("flux2-klein-base", dict(steps=3, height=64, width=64), dict(num_inference_steps=3, guidance_scale=4.0, height=64, width=64)),
    ("flux2-klein-base", dict(steps=2, guidance=3.0, height=64, width=48, reference_images=REFS[1:]),
     dict(num_inference_steps=2, guidance_scale=3.0, height=64, width=48, image=REFS[1:])),
    ("flux2-klein-base", dict(steps=2, guidance=1.0, height=32, width=64), dict(num_inference_steps=2, guidance_scale=1.0, height=32, width=64)),
    ("flux2-klein-kv", dict(steps=3, height=64, width=64, reference_images=REFS),
     dict(num_inference_steps=3, height=64, width=64, image=REFS)),
    ("flux2-klein-kv", dict(steps=2, height=32, width=48), dict(num_inference_steps=2, height=32, width=48)),  # no references
]


@pytest.mark.parametrize("name, ours_kwargs, ref_kwargs", CASES)
def test_matches_diffusers(snapshots, name, ours_kwargs, ref_kwargs):
    ours = Flux2Pipeline.from_pretrained(snapshots[name], **FP32)
    pipe = DIFFUSERS[name].from_pretrained(snapshots[name]).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    got = ours.generate(PROMPT, seed=3, output_type="latent", progress=False, **ours_kwargs)
    expected = reference(pipe, ours_kwargs | dict(height=ref_kwargs.get("height", 96), width=ref_kwargs.get("width", 80)),
                         ref_kwargs, seed=3)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= TOL


INPAINT = [  # (our generate kwargs, diffusers __call__ kwargs), on the base snapshot (true CFG)
    (dict(steps=4, strength=0.6), dict(num_inference_steps=4, strength=0.6, guidance_scale=4.0)),
    (dict(steps=3, strength=1.0, guidance=2.0, reference_images=REFS[:1]),
     dict(num_inference_steps=3, strength=1.0, guidance_scale=2.0, image_reference=REFS[0])),
]


@pytest.mark.parametrize("ours_kwargs, ref_kwargs", INPAINT)
def test_inpainting_matches_diffusers(snapshots, ours_kwargs, ref_kwargs):
    image, mask = picture(72, 50, 5), blob_mask(72, 50)  # prepared as 64x48
    ours = Flux2Pipeline.from_pretrained(snapshots["flux2-klein-inpaint"], **FP32)
    pipe = Flux2KleinInpaintPipeline.from_pretrained(snapshots["flux2-klein-inpaint"]).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    got = ours.generate(PROMPT, seed=4, init_image=image, mask=mask, output_type="latent", progress=False, **ours_kwargs)
    expected = pipe(prompt=PROMPT, image=image, mask_image=mask, generator=torch.Generator().manual_seed(4), output_type="latent",
                    **ref_kwargs).images
    assert got.shape == expected.shape == (1, 4, 48 // 8, 64 // 8)
    assert rel_err(got, expected) <= TOL


def test_same_seed_same_image(snapshots):
    ours = Flux2Pipeline.from_pretrained(snapshots["flux2-klein"], **FP32)
    pipe = Flux2KleinPipeline.from_pretrained(snapshots["flux2-klein"]).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    got = np.asarray(ours.generate(PROMPT, seed=11, steps=2, height=48, width=64, progress=False), dtype=np.int16)
    expected = np.asarray(pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(11), num_inference_steps=2, height=48,
                               width=64).images[0], dtype=np.int16)
    assert got.shape == expected.shape == (48, 64, 3)
    assert np.abs(got - expected).max() <= 1


def test_schedule_and_preparation_match_diffusers():
    for seq_len, steps in ((4096, 50), (4096, 4), (256, 28), (6000, 50), (16, 3)):
        assert empirical_mu(seq_len, steps) == compute_empirical_mu(seq_len, steps)
    assert abs(empirical_mu(4096, 50) - 2.0234) < 1e-4 and abs(empirical_mu(4096, 4) - 2.2912) < 1e-4
    for steps, seq_len in ((4, 4096), (50, 4096), (3, 12)):
        scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(seq_len, steps))
        assert torch.equal(flux2_sigmas(VARIANTS["flux2-klein-4b"].scheduler, steps, seq_len), scheduler.sigmas)
    assert torch.allclose(flux2_sigmas(VARIANTS["flux2-klein-4b"].scheduler, 4, 4096), torch.tensor([1, 0.967, 0.908, 0.767, 0]),
                          atol=1e-3)  # the spec's worked example

    processor = Flux2ImageProcessor()
    big = picture(1500, 900, 3)
    assert cap_area(big).size == processor._resize_to_target_area(big, 1024 * 1024).size
    assert np.array_equal(np.asarray(cap_area(big)), np.asarray(processor._resize_to_target_area(big, 1024 * 1024)))
    expected = processor.preprocess(REFS[1], height=64, width=96, resize_mode="crop")
    assert torch.equal(reference_pixels(REFS[1]), expected)

    masks = Flux2ImageProcessor(do_normalize=False, do_binarize=True, do_convert_rgb=False, do_convert_grayscale=True)
    mask = blob_mask(72, 50)
    assert torch.equal(mask_pixels(mask, picture(72, 50, 0), 64, 48), masks.preprocess(mask, height=48, width=64))


def test_variants_from_snapshots_and_files(snapshots):
    expected = {"flux2-dev": "flux2-dev", "flux2-klein": "flux2-klein-4b", "flux2-klein-base": "flux2-klein-base-4b",
                "flux2-klein-kv": "flux2-klein-9b-kv", "flux2-klein-inpaint": "flux2-klein-base-4b"}
    for name, variant in expected.items():
        assert Flux2Pipeline.from_pretrained(snapshots[name], **FP32).variant == variant
    root = snapshots["flux2-klein"]
    pipe = Flux2Pipeline.from_single_files(root / "transformer", root / "vae", root / "text_encoder", root / "tokenizer",
                                           variant="flux2-klein-base-4b", **FP32)
    assert pipe.variant == "flux2-klein-base-4b"


@pytest.mark.parametrize("kwargs, message", [
    (dict(variant="flux2-dev"), "is a flux2-klein-4b snapshot, not flux2-dev"),
])
def test_snapshot_variant_mismatch_is_named(snapshots, kwargs, message):
    with pytest.raises(CheckpointError, match=message):
        Flux2Pipeline.from_pretrained(snapshots["flux2-klein"], **FP32, **kwargs)


def test_klein_file_as_dev_is_named(snapshots):
    root = snapshots["flux2-klein"]
    with pytest.raises(CheckpointError, match="FLUX.2 \\[klein\\] \\(no guidance embedder\\): it cannot run as flux2-dev"):
        Flux2Pipeline.from_single_files(root / "transformer", root / "vae", snapshots["flux2-dev"] / "text_encoder",
                                        snapshots["flux2-dev"] / "tokenizer", variant="flux2-dev", **FP32)


@pytest.mark.parametrize("name, kwargs, message", [
    ("flux2-klein", dict(guidance=3.0), "is distilled and takes no guidance"),
    ("flux2-dev", dict(negative_prompt="blurry"), "takes no negative prompt"),
    ("flux2-klein", dict(mask=blob_mask(64, 64)), "takes an init image and a mask together"),
    ("flux2-dev", dict(init_image=picture(64, 64, 0), mask=blob_mask(64, 64)), "inpainting runs on FLUX.2 klein"),
    ("flux2-klein-kv", dict(init_image=picture(64, 64, 0), mask=blob_mask(64, 64)), "not flux2-klein-9b-kv"),
    ("flux2-klein", dict(init_image=picture(64, 64, 0), mask=blob_mask(64, 48)), "the mask is 64x48 but the init image is 64x64"),
    ("flux2-klein", dict(init_image=picture(64, 64, 0), mask=blob_mask(64, 64), height=32), "inpainting keeps the init image's size"),
    ("flux2-klein", dict(reference_images=[picture(64, 64, 0)] * 11), "11 reference images: FLUX.2 takes at most 10"),
    ("flux2-klein", dict(reference_images=[picture(40, 64, 0)]), "reference image 0 is 40x64: both sides must be at least 64"),
    ("flux2-klein", dict(reference_images=[42]), "reference image 0 must be a PIL image or an image file path, got int"),
    ("flux2-klein", dict(latents=torch.zeros(1, 16, 2, 2)), "latents must have shape \\(1, 16, 4, 4\\)"),
    ("flux2-klein", dict(height=60), "height 60 is not a multiple of 16"),
])
def test_bad_requests_are_named(snapshots, name, kwargs, message):
    pipe = Flux2Pipeline.from_pretrained(snapshots[name], **FP32)
    with pytest.raises(ValueError, match=message):
        pipe.generate(PROMPT, steps=1, output_type="latent", progress=False, **{"height": 64, "width": 64} | kwargs)
