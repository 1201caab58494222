"""The small models zflux ships (zimg/embedded/, flux/embedded/): they load like any snapshot, diffusers' pipelines
draw the same pictures from them, `zflux generate` runs them by default, and they draw what captions they never saw
in training ask for.

Until the trained folders are committed these tests skip, saying so; a folder that is there is always tested.

Prompt following is read off the pixels: every pixel is named by its nearest palette colour
(common/shapes.py COLOURS); the background's colour must fill all four corners, and the commonest
colour among the other pixels (the shape's, far larger than any anti-aliased edge) must be the
shape's colour, centred.
"""

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline as DiffusersFlux
from diffusers import ZImagePipeline as DiffusersZImage
from PIL import Image

from zflux.cli import main
from zflux.common.shapes import COLOURS, HELD_OUT, LANGUAGES, Scene, caption, draw
from zflux.flux import pipeline as flux
from zflux.zimg import pipeline as zimage
from tiny_pipelines import one_thread  # noqa: F401 (autouse fixture)
from util import rel_err

FP32 = dict(device="cpu", dtype=torch.float32)
PROMPT = "a red circle on a blue background"
CORNER = 0.1  # corner patches, fraction of the side
MIN_SHAPE = 0.03  # the shape's colour covers at least this share of the picture
HELD_OUT_SCENES = [Scene(*triple) for triple in sorted(HELD_OUT)]


def shipped(folder: Path):
    """Skip while `folder` is absent (a folder that is there, however broken, is tested)."""
    return pytest.mark.skipif(not folder.exists(),
                              reason=f"{folder} is absent: train the small model and commit it (README: zflux's small models)")


zimage_shipped, flux_shipped = shipped(zimage.EMBEDDED_MODEL), shipped(flux.EMBEDDED_MODEL)


def colour_names(image: Image.Image) -> np.ndarray:
    """(H, W) index into COLOURS of each pixel's nearest palette colour."""
    palette = np.array(list(COLOURS.values()), dtype=float)  # (K, 3)
    pixels = np.asarray(image, dtype=float)  # (H, W, 3)
    return np.square(pixels[:, :, None] - palette).sum(-1).argmin(-1)  # (H, W)


def misreading(image: Image.Image, scene: Scene) -> str | None:
    """None when the picture shows `scene`'s colours where they belong (centred shape), else what it shows instead."""
    names, side = colour_names(image), image.width
    colours = list(COLOURS)
    c = max(1, int(CORNER * side))
    corners = [names[:c, :c], names[:c, -c:], names[-c:, :c], names[-c:, -c:]]
    corner_colours = [colours[np.bincount(p.ravel(), minlength=len(colours)).argmax()] for p in corners]
    if any(colour != scene.background for colour in corner_colours):
        return f"corners {corner_colours}"
    rest = names[names != colours.index(scene.background)]
    if rest.size < MIN_SHAPE * names.size:
        return "no shape"
    shape_colour = colours[np.bincount(rest, minlength=len(colours)).argmax()]
    rows, cols = np.nonzero(names == colours.index(shape_colour))
    centre = np.array([rows.mean(), cols.mean()]) / side
    if shape_colour != scene.colour or np.abs(centre - 0.5).max() > 0.2:
        return f"a {shape_colour} shape centred at {centre.round(2).tolist()}"
    return None


def follows(generate, scenes: list[Scene], language: str) -> tuple[float, list[str]]:
    """The share of `scenes` drawn right from their captions in `language`, and what went wrong with the others."""
    wrong = []
    for scene in scenes:
        prompt = caption(scene, language)
        problem = misreading(generate(prompt), scene)
        if problem:
            wrong.append(f"{prompt!r}: {problem}")
    return 1 - len(wrong) / len(scenes), wrong


def test_the_pixel_check_reads_the_training_pictures():
    """The check itself: it accepts drawn scenes, and refuses them under another caption."""
    for scene in HELD_OUT_SCENES:
        picture = draw(scene, zimage.EMBEDDED_SIZE)
        assert misreading(picture, scene) is None
        swapped = Scene(scene.background, scene.shape, scene.colour)
        assert misreading(picture, swapped) is not None


@zimage_shipped
@pytest.mark.parametrize("language", LANGUAGES)
def test_zimage_follows_unseen_prompts(language):
    """Every held-out (colour, shape, background) combination (24, never in training), at the default 8 steps: >= 90% right."""
    pipe = zimage.ZImagePipeline.from_pretrained(zimage.EMBEDDED_MODEL, **FP32)
    size = zimage.EMBEDDED_SIZE
    share, wrong = follows(lambda p: pipe.generate(p, height=size, width=size, progress=False), HELD_OUT_SCENES, language)
    assert share >= 0.9, "\n".join(wrong)


@flux_shipped
@pytest.mark.parametrize("language", LANGUAGES)
def test_flux_follows_unseen_prompts(language):
    """Every other held-out combination (12), at 8 steps instead of dev's 28 to keep the test short: >= 90% right."""
    pipe = flux.FluxPipeline.from_pretrained(flux.EMBEDDED_MODEL, **FP32)
    size = flux.EMBEDDED_SIZE
    share, wrong = follows(lambda p: pipe.generate(p, height=size, width=size, steps=8, progress=False), HELD_OUT_SCENES[::2],
                           language)
    assert share >= 0.9, "\n".join(wrong)


@zimage_shipped
def test_zimage_matches_diffusers():
    """diffusers' ZImagePipeline loads the shipped folder and draws the same latents (fp32, <= 1e-4) and picture for the
    same seed."""
    size = zimage.EMBEDDED_SIZE
    got = zimage.ZImagePipeline.from_pretrained(zimage.EMBEDDED_MODEL, **FP32).generate(
        PROMPT, height=size, width=size, seed=5, output_type="latent", progress=False)
    ref = DiffusersZImage.from_pretrained(zimage.EMBEDDED_MODEL, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, height=size, width=size, num_inference_steps=8, guidance_scale=0.0, output_type="latent",
                   generator=torch.Generator().manual_seed(5)).images
    assert rel_err(got, expected) <= 1e-4
    image = zimage.ZImagePipeline.from_pretrained(zimage.EMBEDDED_MODEL, **FP32).generate(PROMPT, height=size, width=size, seed=5,
                                                                                         progress=False)
    expected = ref(PROMPT, height=size, width=size, num_inference_steps=8, guidance_scale=0.0,
                   generator=torch.Generator().manual_seed(5)).images[0]
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert diff.max() <= 1  # the same picture, but for a pixel on an 8-bit rounding boundary


@flux_shipped
def test_flux_matches_diffusers():
    """diffusers' FluxPipeline loads the shipped folder and draws the same latents for the same seed (fp32, 4 steps, <= 1e-4)."""
    size = flux.EMBEDDED_SIZE
    got = flux.FluxPipeline.from_pretrained(flux.EMBEDDED_MODEL, **FP32).generate(
        PROMPT, height=size, width=size, steps=4, seed=5, output_type="latent", progress=False)
    ref = DiffusersFlux.from_pretrained(flux.EMBEDDED_MODEL, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, height=size, width=size, num_inference_steps=4, guidance_scale=3.5, output_type="latent",
                   generator=torch.Generator().manual_seed(5)).images
    assert rel_err(got, DiffusersFlux._unpack_latents(expected, size, size, 8)) <= 1e-4


@zimage_shipped
def test_generate_runs_the_small_model_by_default(tmp_path):
    """`zflux generate --prompt ... --out ...` alone runs the shipped Z-Image on the CPU and says so. The whole command
    (Python's start, imports, loading, 8 steps, decoding) takes under 30 s of CPU time, so under 30 s on any idle
    machine; its wall time here depends on what else shares the machine."""
    out = tmp_path / "circle.png"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "zflux.cli", "generate", "--prompt", PROMPT, "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "2"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "zflux's small z-image-turbo-shaped model" in done.stdout and str(zimage.EMBEDDED_MODEL) in done.stdout
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert cpu < 30, f"took {cpu:.1f} s of CPU time"
    with Image.open(out) as image:
        assert image.size == (128, 128) and misreading(image, Scene("red", "circle", "blue")) is None


@flux_shipped
def test_generate_runs_the_small_flux_by_default(tmp_path, capsys):
    """`zflux generate --model flux-dev` without --weights runs the shipped FLUX.1 (8 steps here, to keep the test short)."""
    main(["generate", "--model", "flux-dev", "--prompt", PROMPT, "--steps", "8", "--out", str(tmp_path / "circle.png"),
          "--device", "cpu"])
    assert "zflux's small flux-dev-shaped model" in capsys.readouterr().out
    with Image.open(tmp_path / "circle.png") as image:
        assert image.size == (128, 128) and misreading(image, Scene("red", "circle", "blue")) is None
