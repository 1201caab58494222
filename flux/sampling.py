"""FLUX.1 token layout: pack latents into 2x2-patch tokens and back, and the RoPE position ids.

A (B, 16, H, W) VAE latent becomes (B, H/2 * W/2, 64) tokens, each holding one 2x2 patch with its
channels outermost. Image token (r, c) of the patch grid sits at position (0, r, c); text tokens
all sit at (0, 0, 0), so only their order within attention distinguishes them.
"""

import torch
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


def img_ids(batch: int, h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """(B, h*w, 3) positions (0, row, col) of an h x w grid of packed tokens (h, w = latent H/2, W/2)."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")  # (h, w) each
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)  # (h, w, 3)
    return rearrange(ids, "h w n -> 1 (h w) n").repeat(batch, 1, 1)  # (B, h*w, 3)


def txt_ids(batch: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """(B, L, 3) zero positions for L text tokens."""
    return torch.zeros(batch, length, 3, dtype=torch.long, device=device)
