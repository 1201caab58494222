"""Tiled autoencoder decode and encode (common/tiling.py) against the whole-image ones, on the CPU.

The blend is exact for a pointwise map (every output pixel a weighted mean of equal values), so no
seam can come from the weights; what a tile changes is the autoencoder's own context: its group
norms take statistics over the tile, and it sees only part of the image. Measured with zflux's
trained small autoencoder (zimg/embedded/vae) on a 256 x 256 picture of shapes, 128-pixel tiles
(16 latent pixels) overlapping by half: decode mean |diff| 0.0074 on the [-1, 1] scale (about one
level of 255), relative L2 0.042; encode relative L2 0.11. Tolerances below are those, rounded up.

Every family's image-conditioned tasks (image to image, inpainting, Z-Image's ControlNet and Omni references, FLUX.1
Fill, Canny and Kontext, FLUX.2 references and inpainting) encode their images in tiles when asked (vae_tiling=True) or
when the whole would not fit, through common.pipeline.encode_raw.
"""

import functools

import pytest
import torch
from diffusers import FluxControlPipeline, FluxFillPipeline, FluxKontextPipeline
from PIL import Image, ImageDraw

from zflux.common import pipeline as common_pipeline
from zflux.common.images import to_tensor
from zflux.common.pipeline import decode_latents
from zflux.common.tiling import tile_starts, tiled, tiled_decode, tiled_encode
from zflux.common.vae import load_autoencoder
from zflux.flux.flux2.pipeline import Flux2Pipeline
from zflux.flux.pipeline import FluxPipeline
from zflux.zimg.pipeline import ZImagePipeline
from tiny_flux2 import flux2_snapshot
from tiny_pipelines import flux_snapshot, one_thread, zimage_snapshot  # noqa: F401 (one_thread: autouse fixture)
from tiny_tools import flux_tool_snapshot
from tiny_zimage_tasks import controlnet_snapshot, omni_snapshot

EMBEDDED_VAE = "zimg/embedded/vae"


@pytest.fixture(scope="module")
def vae():
    return load_autoencoder(EMBEDDED_VAE, "cpu", torch.float32)


@pytest.fixture(scope="module")
def picture() -> torch.Tensor:
    image = Image.new("RGB", (256, 256), (30, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 40, 180, 200), fill=(220, 40, 40))
    draw.rectangle((120, 20, 240, 120), fill=(40, 200, 60))
    return to_tensor(image)  # (1, 3, 256, 256) in [-1, 1]


def test_tile_starts_cover_the_axis_with_the_last_flush():
    assert tile_starts(40, 16, 6) == [0, 10, 20, 24]
    assert tile_starts(16, 16, 6) == tile_starts(10, 16, 6) == [0]


@pytest.mark.parametrize("scale, size", [(8, (40, 56)), (1 / 8, (320, 448))])
def test_the_blend_is_exact_for_a_pointwise_map(scale, size):
    x = torch.randn(1, 2, *size)
    if scale > 1:
        fn = lambda piece, place: piece.repeat_interleave(8, 2).repeat_interleave(8, 3)  # noqa: E731
        expected = fn(x, None)
    else:
        fn = lambda piece, place: piece[:, :, ::8, ::8]  # noqa: E731
        expected = x[:, :, ::8, ::8]
    tile = 16 if scale > 1 else 128
    overlap = 6 if scale > 1 else 48  # encode tiles start on the latent grid: multiples of 8 pixels
    assert torch.allclose(tiled(fn, x, tile=tile, overlap=overlap, scale=scale), expected, atol=1e-6)


def test_tiled_decode_is_close_to_the_whole(vae, picture):
    with torch.no_grad():
        latent = vae.encode(picture)  # (1, 16, 32, 32)
        whole = vae.decode(latent)
        tiles = tiled_decode(vae, latent, tile=16, overlap=8)
    assert tiles.shape == whole.shape
    assert (tiles - whole).abs().mean() <= 0.01
    assert (tiles - whole).norm() / whole.norm() <= 0.05


def test_tiled_encode_is_close_to_the_whole_and_samples_with_its_noise(vae, picture):
    with torch.no_grad():
        whole = vae.encode(picture)
        tiles = tiled_encode(vae, picture, tile=128, overlap=64)
        noise = torch.randn_like(whole)
        sampled = tiled_encode(vae, picture, noise, tile=128, overlap=64)
    assert (tiles - whole).norm() / whole.norm() <= 0.12
    assert not torch.equal(sampled, tiles) and (sampled - whole).norm() / whole.norm() <= 0.2


def test_decode_tiles_when_asked(vae, picture, monkeypatch):
    calls = []
    monkeypatch.setattr("zflux.common.pipeline.tiled_decode", lambda vae, raw: calls.append(raw.shape) or vae.decode(raw))
    latents = torch.randn(1, 16, 8, 8)
    decode_latents(vae, latents)  # on the CPU: whole
    assert calls == []
    decode_latents(vae, latents, tiling=True)
    assert calls == [(1, 16, 8, 8)]


def test_no_seam_where_tiles_disagree():
    """Tiles whose outputs differ (each a constant: its first row) meet through ramps: the output changes smoothly,
    never by a step at a tile's edge (a plain average would jump by half the difference there)."""
    x = torch.zeros(1, 1, 40, 8)
    out = tiled(lambda piece, place: torch.full((1, 1, piece.shape[2] * 8, piece.shape[3] * 8), float(place[0].start)), x,
                tile=16, overlap=6, scale=8)  # tiles start at rows 0, 10, 20, 24
    steps = out[0, 0].diff(dim=0).abs()
    assert out[0, 0, 0, 0] == 0 and out[0, 0, -1, 0] == 24
    assert steps.max() < 0.3  # about 10 over a 48-pixel overlap (a little more where three tiles meet); averaging: 5


def square(seed: int, mode: str = "RGB", size: int = 32) -> Image.Image:
    """A picture of 4 x 4 random blocks (an init, control or reference image; in "L", a mask)."""
    g = torch.Generator().manual_seed(seed)
    blocks = (torch.rand(4, 4, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST).convert(mode)


@pytest.fixture(scope="module")
def task_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    turbo = zimage_snapshot(root / "turbo")
    fp32 = dict(device="cpu", dtype=torch.float32)
    return {"z-image": ZImagePipeline.from_pretrained(turbo, **fp32),
            "z-image control": ZImagePipeline.from_pretrained(controlnet_snapshot(root / "control", turbo, inpaint=True), **fp32),
            "z-image omni": ZImagePipeline.from_pretrained(omni_snapshot(root / "omni", turbo), **fp32),
            "flux-dev": FluxPipeline.from_pretrained(flux_snapshot(root / "dev", "flux-dev"), **fp32),
            "flux fill": FluxPipeline.from_pretrained(flux_tool_snapshot(root / "fill", FluxFillPipeline, in_channels=384), **fp32),
            "flux canny": FluxPipeline.from_pretrained(flux_tool_snapshot(root / "canny", FluxControlPipeline, in_channels=128),
                                                       variant="flux-canny", **fp32),
            "flux kontext": FluxPipeline.from_pretrained(flux_tool_snapshot(root / "kontext", FluxKontextPipeline), **fp32),
            "flux2 klein": Flux2Pipeline.from_pretrained(flux2_snapshot(root / "klein", "flux2-klein"), **fp32)}


IMAGE, MASK, REFERENCE = square(1), square(2, "L").point(lambda v: 255 * (v > 127)), square(4, size=64)  # references: >= 64 px
TASKS = [  # (pipeline, its inputs, the images it encodes)
    ("z-image", dict(init_image=IMAGE, strength=0.5), 1),
    ("z-image", dict(init_image=IMAGE, mask=MASK), 1),
    ("z-image control", dict(control_image=square(3), init_image=IMAGE, mask=MASK), 2),  # the control image, the masked image
    ("z-image omni", dict(reference_images=[REFERENCE]), 1),
    ("flux-dev", dict(init_image=IMAGE, strength=0.5), 1),
    ("flux-dev", dict(init_image=IMAGE, mask=MASK), 1),
    ("flux fill", dict(init_image=IMAGE, mask=MASK), 2),  # the init image, the masked image
    ("flux canny", dict(control_image=square(3)), 1),
    ("flux kontext", dict(reference_images=[IMAGE], max_area=32 * 32), 1),
    ("flux2 klein", dict(reference_images=[REFERENCE]), 1),
    ("flux2 klein", dict(init_image=IMAGE, mask=MASK), 1),
]


@pytest.mark.parametrize("name, inputs, images", TASKS, ids=[f"{name}: {', '.join(inputs)}" for name, inputs, _ in TASKS])
def test_image_tasks_encode_in_tiles_when_asked(task_pipelines, monkeypatch, name, inputs, images):
    """Every family's image-conditioned task encodes its images through encode_raw: in tiles with vae_tiling=True, or when
    left to auto and the whole would not fit; whole with False, or auto where it fits (the CPU). The tiles here are
    16 pixels overlapping by 8, so that a 32 x 32 image is three by three of them: the output changes, within the
    tolerance of the tiled encode above."""
    tiled_calls = []
    small_tiles = functools.partial(tiled_encode, tile=16, overlap=8)
    monkeypatch.setattr(common_pipeline, "tiled_encode", lambda *args: tiled_calls.append(args[1].shape) or small_tiles(*args))
    monkeypatch.setattr("zflux.flux.tools.kontext_reference_size", lambda width, height: (32, 32))  # not a 1 MP bucket: small
    pipe = task_pipelines[name]
    run = dict(prompt="a red fox", height=32, width=32, steps=4, seed=3, output_type="latent", progress=False, **inputs)
    whole = pipe.generate(vae_tiling=False, **run)
    assert torch.equal(pipe.generate(vae_tiling=None, **run), whole) and tiled_calls == []
    tiles = pipe.generate(vae_tiling=True, **run)
    assert len(tiled_calls) == images and not torch.equal(tiles, whole)
    monkeypatch.setattr(common_pipeline, "vae_fits", lambda stage, *args, **kwargs: stage != "encode")
    assert torch.equal(pipe.generate(vae_tiling=None, **run), tiles) and len(tiled_calls) == 2 * images
