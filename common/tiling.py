"""Tiled autoencoder decode and encode: a large image in overlapping pieces, so that its activations fit a small GPU.

The input is cut into tiles of `tile` pixels (latent pixels for decode, image pixels for encode)
overlapping by `overlap`, the last row and column of tiles flush with the far edges. Each tile goes
through the autoencoder alone; the outputs are blended with weights that ramp linearly across each
overlap (1 where no other tile reaches), so that every output pixel is a weighted mean of the tiles
that cover it and no seam shows. What tiling changes: a tile sees only `overlap / 2` pixels of
context past its blended part, and its group norms take statistics over the tile, not the image.
"""

from collections.abc import Callable

import torch
from torch import Tensor
from zflux.common.vae import Autoencoder

TILE = 64  # latent pixels: 512 image pixels
OVERLAP = 16  # latent pixels: 128 image pixels


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of `tile` pixels overlapping by `overlap` start along an axis of `size` pixels (the last one flush)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def ramp(length: int, before: int, after: int) -> Tensor:
    """Blend weights (length,) along one axis of a tile: rising over its first `before` pixels, falling over its last `after`."""
    position = torch.arange(length, dtype=torch.float32) + 0.5
    rise = (position / before).clamp(max=1) if before else torch.ones(length)
    fall = ((length - position) / after).clamp(max=1) if after else torch.ones(length)
    return rise * fall  # > 0 everywhere: every output pixel has weight


def axis_weights(starts: list[int], size: int, tile: int, scale: float) -> list[Tensor]:
    """Each tile's blend weights along one axis of the output (`scale` output pixels per input pixel): ramps over
    what it shares with the tile before and the tile after."""
    shared = [round((a + tile - b) * scale) for a, b in zip(starts, starts[1:])]  # > 0: the tiles overlap
    return [ramp(round((min(start + tile, size) - start) * scale), before=shared[k - 1] if k else 0,
                 after=shared[k] if k < len(shared) else 0) for k, start in enumerate(starts)]


def tiled(fn: Callable[[Tensor, tuple[slice, slice]], Tensor], x: Tensor, *, tile: int, overlap: int, scale: float) -> Tensor:
    """fn applied to overlapping tiles of x (B, C, H, W) and blended, fp32. fn(piece, (rows, cols)) maps a tile to one
    `scale` times its size, and is told the tile's place in x (to slice inputs that go with it)."""
    H, W = x.shape[2:]
    rows, cols = tile_starts(H, tile, overlap), tile_starts(W, tile, overlap)
    ramps_r, ramps_c = axis_weights(rows, H, tile, scale), axis_weights(cols, W, tile, scale)
    out = weight = None
    for r, ramp_r in zip(rows, ramps_r):
        for c, ramp_c in zip(cols, ramps_c):
            place = (slice(r, min(r + tile, H)), slice(c, min(c + tile, W)))
            piece = fn(x[:, :, place[0], place[1]], place).float()  # (B, C', h', w')
            if out is None:
                out = x.new_zeros(x.shape[0], piece.shape[1], round(H * scale), round(W * scale), dtype=torch.float32)
                weight = x.new_zeros(round(H * scale), round(W * scale), dtype=torch.float32)
            blend = (ramp_r[:, None] * ramp_c[None, :]).to(x.device)  # (h', w')
            top, left = round(r * scale), round(c * scale)
            window = (slice(top, top + blend.shape[0]), slice(left, left + blend.shape[1]))
            out[:, :, window[0], window[1]] += piece * blend
            weight[window] += blend
    return out / weight  # (B, C', H * scale, W * scale)


def tiled_decode(vae: Autoencoder, latent: Tensor, tile: int = TILE, overlap: int = OVERLAP) -> Tensor:
    """vae.decode of a raw latent (B, C, h, w) in overlapping tiles of `tile` latent pixels -> (B, 3, 8h, 8w) in the VAE's dtype."""
    down = vae.cfg.downscale
    return tiled(lambda piece, place: vae.decode(piece), latent, tile=tile, overlap=overlap, scale=down).to(vae.dtype)


def tiled_encode(vae: Autoencoder, image: Tensor, noise: Tensor | None = None, tile: int = TILE * 8,
                 overlap: int = OVERLAP * 8) -> Tensor:
    """vae.encode of an image (B, 3, H, W) in overlapping tiles of `tile` image pixels -> its raw latent (B, C, H/8, W/8).

    With `noise` (the latent's shape), each tile samples with its part of it: the blend of the tiles'
    samples is then the blend of their means plus the blend of their deviations times the noise.
    """
    down = vae.cfg.downscale
    if tile % down or overlap % down:
        raise ValueError(f"encode tiles of {tile} pixels overlapping by {overlap}: both must be multiples of {down}, the latent grid")

    def encode(piece: Tensor, place: tuple[slice, slice]) -> Tensor:
        rows, cols = (slice(s.start // down, s.stop // down) for s in place)
        return vae.encode(piece, None if noise is None else noise[:, :, rows, cols])

    return tiled(encode, image, tile=tile, overlap=overlap, scale=1 / down).to(vae.dtype)
