"""Tiled autoencoder decode and encode (common/tiling.py) against the whole-image ones, on the CPU.

The blend is exact for a pointwise map (every output pixel a weighted mean of equal values), so no
seam can come from the weights; what a tile changes is the autoencoder's own context: its group
norms take statistics over the tile, and it sees only part of the image. Measured with zflux's
trained small autoencoder (zimg/embedded/vae) on a 256 x 256 picture of shapes, 128-pixel tiles
(16 latent pixels) overlapping by half: decode mean |diff| 0.0074 on the [-1, 1] scale (about one
level of 255), relative L2 0.042; encode relative L2 0.11. Tolerances below are those, rounded up.
"""

import pytest
import torch
from PIL import Image, ImageDraw

from zflux.common.images import to_tensor
from zflux.common.pipeline import decode_latents
from zflux.common.tiling import tile_starts, tiled, tiled_decode, tiled_encode
from zflux.common.vae import load_autoencoder
from tiny_pipelines import one_thread  # noqa: F401 (autouse fixture)

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
