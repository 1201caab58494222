"""Z-Image's ControlNet and Omni tasks: parity with diffusers' ZImageControlNetPipeline, ZImageControlNetInpaintPipeline
and ZImageOmniPipeline end to end (tiny random snapshots saved by diffusers, fp32 on the CPU), loading, named errors.

Both sides start from the same seed (diffusers with a CPU generator of that seed, drawing the noise in
its shape and order) and the final latents must agree within 1e-5 relative: the same math in another
summation order (~1e-7 per transformer call, test_zimg_controlnet.py, test_zimg_omni.py) over a few steps.
The step counts are ones where our sigmas equal diffusers' float32 grid exactly (common/sampling.py: at
3 steps with shift 6 one sigma sits one float32 step away, which alone moves the latents by ~2e-5).

diffusers' Omni pipeline casts each condition image to bf16 before its autoencoder sees it (it assumes
a bf16 autoencoder; an fp32 one raises). Ours sends the bf16-rounded image at the autoencoder's own
dtype; the reference here gets the same by an encode that takes that bf16 image back to fp32.
"""

import re

import numpy as np
import pytest
import torch
from diffusers import ZImageControlNetInpaintPipeline, ZImageControlNetPipeline, ZImageOmniPipeline
from PIL import Image

from zflux.cli import main
from zflux.common.images import canny
from zflux.common.weights import CheckpointError
from tiny_pipelines import one_thread, zimage_snapshot  # noqa: F401 (one_thread: autouse fixture)
from tiny_zimage_tasks import controlnet_snapshot, omni_snapshot
from util import rel_err
from zflux.zimg.pipeline import ZImagePipeline

TOL = 1e-5
PROMPT = "a photo of a cat"
FP32 = dict(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("zimage_tasks")
    turbo, base = zimage_snapshot(root / "turbo", "z-image-turbo"), zimage_snapshot(root / "base", "z-image")
    return {"turbo": turbo, "base": base, "controlnet": controlnet_snapshot(root / "controlnet", turbo),
            "controlnet-base": controlnet_snapshot(root / "controlnet_base", base),
            "inpaint": controlnet_snapshot(root / "inpaint", base, inpaint=True), "omni": omni_snapshot(root / "omni", base)}


def picture(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference(cls, folder):
    ref = cls.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    return ref


def ours(folder) -> ZImagePipeline:
    return ZImagePipeline.from_pretrained(folder, **FP32)


def run(pipe: ZImagePipeline, **kwargs) -> torch.Tensor:
    return pipe.generate(PROMPT, output_type="latent", progress=False, **kwargs)


CONTROL_CASES = {  # snapshot: (our generate kwargs, diffusers __call__ kwargs)
    "turbo": ("controlnet", dict(steps=3, control_scale=0.6), dict(num_inference_steps=3, guidance_scale=0.0,
                                                                  controlnet_conditioning_scale=0.6)),
    "base, CFG": ("controlnet-base", dict(steps=2, guidance=3.0, negative_prompt="blurry", cfg_normalization=0.9),
                  dict(num_inference_steps=2, guidance_scale=3.0, negative_prompt="blurry", cfg_normalization=0.9)),
    "base, CFG truncated": ("controlnet-base", dict(steps=4, guidance=3.0, cfg_truncation=0.3),
                            dict(num_inference_steps=4, guidance_scale=3.0, cfg_truncation=0.3)),
}


@pytest.mark.parametrize("case", CONTROL_CASES)
def test_controlnet_matches_diffusers(snapshots, case):
    folder, ours_kwargs, ref_kwargs = CONTROL_CASES[case]
    control = picture(80, 48, seed=1)  # resized to the output size, as diffusers does
    got = run(ours(snapshots[folder]), height=64, width=48, seed=3, control_image=control, **ours_kwargs)
    expected = reference(ZImageControlNetPipeline, snapshots[folder])(
        PROMPT, control_image=control, height=64, width=48, generator=torch.Generator("cpu").manual_seed(3), output_type="latent",
        **ref_kwargs).images
    assert got.shape == expected.shape == (1, 16, 8, 6)
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_controlnet_inpaint_matches_diffusers(snapshots, guidance):
    control, image = picture(64, 64, seed=1), picture(64, 64, seed=2)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 20, 40, 52))  # white repaints
    got = run(ours(snapshots["inpaint"]), height=64, width=64, steps=4, guidance=guidance, seed=4, control_image=control,
              init_image=image, mask=mask)
    expected = reference(ZImageControlNetInpaintPipeline, snapshots["inpaint"])(
        PROMPT, image=image, mask_image=mask, control_image=control, height=64, width=64, num_inference_steps=4,
        guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(4), output_type="latent").images
    assert rel_err(got, expected) <= TOL
    plain = run(ours(snapshots["inpaint"]), height=64, width=64, steps=4, guidance=guidance, seed=4, control_image=control)
    assert rel_err(got, plain) > 1e-3  # the mask and image reach the model


def omni_reference(folder) -> ZImageOmniPipeline:
    """diffusers' Omni pipeline with its condition images' bf16 cast taken back to fp32 (module docstring)."""
    ref = reference(ZImageOmniPipeline, folder)
    encode = ref.vae.encode
    ref.vae.encode = lambda x, *args, **kwargs: encode(x.float(), *args, **kwargs)
    return ref


OMNI_CASES = {  # name: (reference image sizes (h, w), our generate kwargs, diffusers __call__ kwargs)
    "text to image": ([], dict(height=48, width=64, steps=2), dict(height=48, width=64, num_inference_steps=2)),
    "one reference": ([(80, 64)], dict(steps=2, guidance=3.0, negative_prompt="blurry"),
                      dict(num_inference_steps=2, guidance_scale=3.0, negative_prompt="blurry")),
    "two references, CFG normalized and truncated": ([(64, 96), (72, 88)], dict(steps=4, guidance=3.0, cfg_normalization=0.8,
                                                                                cfg_truncation=0.5),
                                                     dict(num_inference_steps=4, guidance_scale=3.0, cfg_normalization=0.8,
                                                          cfg_truncation=0.5)),
}


@pytest.mark.parametrize("case", OMNI_CASES)
def test_omni_matches_diffusers(snapshots, case):
    sizes, ours_kwargs, ref_kwargs = OMNI_CASES[case]
    images = [picture(h, w, seed=10 + i) for i, (h, w) in enumerate(sizes)]
    pipe = ours(snapshots["omni"])
    assert pipe.variant == "z-image-omni"
    got = run(pipe, reference_images=images, seed=5, **ours_kwargs)
    expected = omni_reference(snapshots["omni"])(image=images or None, prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(5),
                                                output_type="latent", **ref_kwargs).images
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= TOL


def test_omni_size_follows_the_last_reference(snapshots):
    """Cropped to multiples of 16: 72x88 -> 64x80 pixels, an (8, 10) latent."""
    got = run(ours(snapshots["omni"]), reference_images=[picture(64, 96, seed=1), picture(72, 88, seed=2)], steps=1)
    assert got.shape == (1, 16, 8, 10)


def test_load_controlnet_equals_the_snapshot(snapshots):
    pipe = ours(snapshots["turbo"])
    pipe.load_controlnet(snapshots["controlnet"] / "controlnet")
    control = picture(64, 64, seed=1)
    kwargs = dict(height=64, width=64, steps=2, seed=1, control_image=control)
    assert torch.equal(run(pipe, **kwargs), run(ours(snapshots["controlnet"]), **kwargs))


def test_seed_gives_the_same_image(snapshots):
    pipe = ours(snapshots["controlnet"])
    kwargs = dict(height=64, width=64, steps=2, control_image=picture(64, 64, seed=1))
    assert torch.equal(run(pipe, seed=1, **kwargs), run(pipe, seed=1, **kwargs))
    assert not torch.allclose(run(pipe, seed=1, **kwargs), run(pipe, seed=2, **kwargs))
    omni = ours(snapshots["omni"])
    refs = [picture(64, 64, seed=2)]
    assert torch.equal(run(omni, seed=3, reference_images=refs, steps=2), run(omni, seed=3, reference_images=refs, steps=2))


def test_canny_preprocess(snapshots):
    pipe = ours(snapshots["controlnet"])
    photo = picture(64, 64, seed=7)
    kwargs = dict(height=64, width=64, steps=2, seed=1)
    assert torch.equal(run(pipe, control_image=photo, control_preprocess="canny", **kwargs),
                       run(pipe, control_image=canny(photo), **kwargs))
    edges = np.asarray(canny(photo))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) <= {0, 255}


@pytest.mark.parametrize("kwargs, message", [
    (dict(control_image=picture(64, 64, 1), mask=picture(64, 64, 2)), "a mask needs the image it masks"),
    (dict(control_image=picture(64, 64, 1), init_image=picture(64, 64, 2)), "give its mask too"),
    (dict(control_image=picture(64, 64, 1), control_preprocess="depth"), r"control_preprocess \(canny\)"),
    (dict(reference_images=[picture(64, 64, 1)]), "reference images are Z-Image Omni's"),
])
def test_controlnet_request_errors(snapshots, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(ours(snapshots["controlnet"]), height=64, width=64, **kwargs)


def test_task_and_loading_errors(snapshots):
    with pytest.raises(ValueError, match="control_image needs a ControlNet"):
        run(ours(snapshots["turbo"]), height=64, width=64, control_image=picture(64, 64, 1))
    omni = ours(snapshots["omni"])
    with pytest.raises(ValueError, match="Z-Image Omni edits through reference_images"):
        run(omni, control_image=picture(64, 64, 1))
    with pytest.raises(ValueError, match="at least 64 pixels a side and at most 8:1"):
        run(omni, reference_images=[picture(32, 64, 1)])
    with pytest.raises(CheckpointError, match="does not fit the transformer: .*the transformer is Z-Image Omni"):
        omni.load_controlnet(snapshots["controlnet"] / "controlnet")
    with pytest.raises(CheckpointError, match=r"is z-image-omni \(a ZImageOmniPipeline snapshot\), not z-image"):
        ZImagePipeline.from_pretrained(snapshots["omni"], variant="z-image", **FP32)
    with pytest.raises(CheckpointError, match="holds Z-Image Omni .*, not z-image-turbo: load it as variant='z-image-omni'"):
        ZImagePipeline.from_single_files(snapshots["omni"] / "transformer", snapshots["omni"] / "vae",
                                         snapshots["omni"] / "text_encoder", snapshots["omni"] / "tokenizer", **FP32)


def test_cli_controlnet_and_omni(snapshots, tmp_path, capsys):
    control, reference_image = tmp_path / "control.png", tmp_path / "reference.png"
    picture(64, 64, seed=1).save(control)
    picture(64, 80, seed=2).save(reference_image)
    cpu = ["--device", "cpu", "--dtype", "fp32", "--steps", "2", "--seed", "1"]
    main(["generate", "--model", "z-image-turbo", "--weights", str(snapshots["turbo"]), "--controlnet",
          str(snapshots["controlnet"] / "controlnet"), "--control-image", str(control), "--control-scale", "0.6", "--prompt", PROMPT,
          "--height", "64", "--width", "64", "--out", str(tmp_path / "controlled.png"), *cpu])
    pipe = ours(snapshots["controlnet"])
    expected = pipe.generate(PROMPT, height=64, width=64, steps=2, seed=1, control_image=Image.open(control), control_scale=0.6,
                             progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "controlled.png")), np.asarray(expected))
    main(["generate", "--model", "z-image-omni", "--weights", str(snapshots["omni"]), "--reference-image", str(reference_image),
          "--reference-image", str(reference_image), "--prompt", PROMPT, "--out", str(tmp_path / "edited.png"), *cpu])
    assert Image.open(tmp_path / "edited.png").size == (80, 64)
    assert "z-image-omni, seed 1" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--model", "z-image-turbo", "--reference-image", "{image}"], "--reference-image is z-image-omni's"),
    (["--model", "z-image-turbo", "--control-image", "{image}"], "--control-image needs --controlnet FILE"),
    (["--model", "z-image-turbo", "--controlnet", "{turbo}/transformer", "--control-image", "{image}"],
     "holds a Z-Image transformer .*, not a Z-Image ControlNet"),
    (["--model", "z-image-turbo", "--controlnet", "{controlnet}/controlnet", "--control-image", "{image}", "--mask", "{image}"],
     "--mask needs the --init-image it masks"),
    (["--model", "z-image-omni", "--control-image", "{image}"], "z-image-omni edits through --reference-image"),
    (["--model", "z-image-turbo", "--controlnet", "{controlnet}/controlnet", "--control-image", "{tmp}/missing.png"],
     "no image file at"),
])
def test_cli_errors_come_before_loading(snapshots, tmp_path, monkeypatch, flags, message):
    image = tmp_path / "image.png"
    picture(64, 64, seed=1).save(image)
    names = dict(image=image, turbo=snapshots["turbo"], controlnet=snapshots["controlnet"], tmp=tmp_path)
    monkeypatch.setattr(ZImagePipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded before the flags were checked"))
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--weights", str(snapshots["turbo"]), "--prompt", PROMPT, "--out", str(tmp_path / "x.png"),
              *[flag.format(**names) for flag in flags]])
    assert re.search(message, str(exit_info.value.code))
