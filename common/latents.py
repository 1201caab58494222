"""Latents as tokens: a VAE latent packed into 2x2-patch tokens and back, as the MM-DiTs read them.

A (B, C, H, W) latent becomes (B, H/2 * W/2, C * 4) tokens, each holding one 2x2 patch with its
channels outermost, in row-major order over the patch grid.
"""

from einops import rearrange
from torch import Tensor

PATCH = 2


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C * 4) tokens."""
    if latents.ndim != 4 or latents.shape[2] % PATCH or latents.shape[3] % PATCH:
        raise ValueError(f"latents must be (B, C, H, W) with even H and W, got {tuple(latents.shape)}")
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=PATCH, pw=PATCH)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, H/2 * W/2, C * 4) tokens -> (B, C, H, W) latents, for a latent of `height` x `width`."""
    if height % PATCH or width % PATCH:
        raise ValueError(f"latent size {height}x{width} must be even")
    h, w = height // PATCH, width // PATCH
    if tokens.ndim != 3 or tokens.shape[1] != h * w or tokens.shape[2] % (PATCH * PATCH):
        raise ValueError(f"tokens must be (B, {h * w}, C * {PATCH * PATCH}) for a {height}x{width} latent, got {tuple(tokens.shape)}")
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, ph=PATCH, pw=PATCH)
