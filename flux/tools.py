"""What the FLUX.1 tools add to the transformer's input, as pure functions of tensors and sizes.

Every tool runs the plain FLUX.1 transformer; only its input grows:
- Fill (in_channels 384): each image token carries [noisy latent 64 | masked-image latent 64 | mask 256].
  The mask stays at pixel resolution: each 8x8 pixel block becomes 64 channels (row-major within the
  block), and those (64, H/8, W/8) maps are packed 2x2 like latents, 256 channels per token.
- Canny / Depth (in_channels 128): each token carries [noisy latent 64 | control-image latent 64].
- Kontext (dev's shapes): the reference image's latent tokens are appended to the image stream at
  positions (1, row, col) on their own grid; only the first, target tokens' predictions are used. The
  reference is resized to the preferred resolution nearest its aspect ratio, and the output size is
  rescaled to a pixel budget, both as diffusers' FluxKontextPipeline does.
"""

import torch
from einops import rearrange
from torch import Tensor

from zflux.flux.sampling import img_ids, pack_latents

MASK_BLOCK = 8  # pixels per latent cell along each axis: the autoencoder's downscale
SIZE_MULTIPLE = 16  # pixels per image token along each axis
REFERENCE_INDEX = 1  # first position axis of Kontext's reference tokens (the target's is 0)

# (width, height) pairs Kontext was trained at, from tall to wide (diffusers' PREFERRED_KONTEXT_RESOLUTIONS).
KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
                       (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
                       (1568, 672))
KONTEXT_MAX_AREA = 1024 ** 2  # pixels: the output's budget


def fill_mask_tokens(mask: Tensor) -> Tensor:
    """A pixel mask (B, 1, H, W) -> Fill's mask channels (B, H/16 * W/16, 256)."""
    blocks = rearrange(mask, "b 1 (h ph) (w pw) -> b (ph pw) h w", ph=MASK_BLOCK, pw=MASK_BLOCK)  # (B, 64, H/8, W/8)
    return pack_latents(blocks)  # (B, S, 256)


def fill_conditioning(masked_latents: Tensor, mask: Tensor) -> Tensor:
    """Fill's extra channels (B, S, 320): the masked image's scaled latents (B, 16, H/8, W/8) packed, then the pixel mask (B, 1, H, W)."""
    return torch.cat([pack_latents(masked_latents), fill_mask_tokens(mask.to(masked_latents.dtype))], dim=-1)


def with_conditioning(tokens: Tensor, conditioning: Tensor) -> Tensor:
    """Noisy tokens (B, S, 64) with a tool's per-token channels (1, S, C) appended: the transformer's input (B, S, 64 + C)."""
    return torch.cat([tokens, conditioning.expand(tokens.shape[0], -1, -1)], dim=-1)


def kontext_ids(batch: int, h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """(B, h*w, 3) positions (1, row, col) of a Kontext reference's h x w grid of packed tokens."""
    ids = img_ids(batch, h, w, device)  # (B, h*w, 3)
    ids[..., 0] = REFERENCE_INDEX
    return ids


def kontext_reference_size(width: int, height: int) -> tuple[int, int]:
    """The (width, height) a Kontext reference image is resized to: the preferred resolution whose aspect ratio is
    nearest that of its size rounded down to a multiple of 16 (ties to the narrower)."""
    width, height = width // SIZE_MULTIPLE * SIZE_MULTIPLE, height // SIZE_MULTIPLE * SIZE_MULTIPLE
    if not width or not height:
        raise ValueError(f"a Kontext reference image must be at least {SIZE_MULTIPLE}x{SIZE_MULTIPLE} pixels")
    aspect = width / height
    _, width, height = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return width, height


def kontext_output_size(height: int, width: int, max_area: int = KONTEXT_MAX_AREA) -> tuple[int, int]:
    """The (height, width) Kontext generates for a requested size: rescaled to `max_area` pixels at the requested aspect
    ratio, each side rounded down to a multiple of 16."""
    aspect = width / height
    width, height = round((max_area * aspect) ** 0.5), round((max_area / aspect) ** 0.5)
    height, width = height // SIZE_MULTIPLE * SIZE_MULTIPLE, width // SIZE_MULTIPLE * SIZE_MULTIPLE
    if not height or not width:
        raise ValueError(f"max_area {max_area} leaves no {SIZE_MULTIPLE}-pixel row or column at aspect ratio {aspect:.3g}")
    return height, width
