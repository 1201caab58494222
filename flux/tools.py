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

Each tool's prepare_*() makes these inputs (and, where the tool draws random numbers before the start
noise, the start latents too, so that a seed gives diffusers' numbers); the pipeline's predict closure
feeds them to the model through with_conditioning().
"""

from typing import NamedTuple

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from zflux.common.images import PREPROCESSORS, check_mask, fit_image, mask_tensor, to_tensor
from zflux.common.latents import pack_latents
from zflux.common.pipeline import encode_mode, encode_sample, image_pixels, noised_init, start_noise
from zflux.common.vae import Autoencoder

MASK_BLOCK = 8  # pixels per latent cell along each axis: the autoencoder's downscale
SIZE_MULTIPLE = 16  # pixels per image token along each axis
REFERENCE_INDEX = 1  # first position axis of Kontext's reference tokens (the target's is 0)

# (width, height) pairs Kontext was trained at, from tall to wide (diffusers' PREFERRED_KONTEXT_RESOLUTIONS).
KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
                       (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
                       (1568, 672))
KONTEXT_MAX_AREA = 1024 ** 2  # pixels: the output's budget


class Conditioning(NamedTuple):
    """What a tool adds to the transformer's input besides the noisy tokens (1, S, 64)."""

    channels: Tensor | None = None  # (1, S, C): appended to every noisy token (Fill C = 320, Canny and Depth C = 64)
    reference: Tensor | None = None  # (1, S_ref, 64): Kontext's reference tokens, appended after the image tokens
    reference_grid: tuple[int, int] | None = None  # (h, w) of the reference's token grid, for its positions


def with_conditioning(tokens: Tensor, conditioning: Conditioning) -> Tensor:
    """Noisy tokens (n, S, 64) -> the transformer's image input: (n, S, 64 + C) with a tool's channels, then
    (n, S + S_ref, ...) with Kontext's reference tokens."""
    n = tokens.shape[0]
    if conditioning.channels is not None:
        tokens = torch.cat([tokens, conditioning.channels.expand(n, -1, -1)], dim=-1)  # (n, S, 64 + C)
    if conditioning.reference is not None:
        tokens = torch.cat([tokens, conditioning.reference.expand(n, -1, -1)], dim=1)  # (n, S + S_ref, 64)
    return tokens


def fill_mask_tokens(mask: Tensor) -> Tensor:
    """A pixel mask (B, 1, H, W) -> Fill's mask channels (B, H/16 * W/16, 256)."""
    blocks = rearrange(mask, "b 1 (h ph) (w pw) -> b (ph pw) h w", ph=MASK_BLOCK, pw=MASK_BLOCK)  # (B, 64, H/8, W/8)
    return pack_latents(blocks)  # (B, S, 256)


def fill_conditioning(masked_latents: Tensor, mask: Tensor) -> Tensor:
    """Fill's extra channels (B, S, 320): the masked image's scaled latents (B, 16, H/8, W/8) packed, then the pixel mask (B, 1, H, W)."""
    return torch.cat([pack_latents(masked_latents), fill_mask_tokens(mask.to(masked_latents.dtype))], dim=-1)


def prepare_fill(vae: Autoencoder, image: Image.Image, mask: Image.Image, sigmas: Tensor, *, height: int, width: int,
                 strength: float, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, int, Conditioning]:
    """Fill's start latents (1, C, h, w), first step and channels: the masked image's latent and the pixel mask.

    The masked image is the init image with the region to fill (mask >= 0.5) set to 0, mid-gray. Three
    draws from one CPU generator seeded `seed`, in FluxFillPipeline's order: the init image's posterior
    sample and the noise it is mixed with (image to image's start, pure noise at strength 1), then the
    masked image's posterior sample.
    """
    check_mask(mask, image)
    generator = torch.Generator("cpu").manual_seed(seed)
    pixels = image_pixels(image, height, width, device)  # (1, 3, H, W)
    init = noised_init(vae, pixels, sigmas, strength=strength, generator=generator, dtype=dtype)
    repaint = mask_tensor(mask, width, height).to(device)  # (1, 1, H, W)
    masked = encode_sample(vae, pixels * (1 - repaint), generator).to(dtype)  # (1, C, h, w)
    return init.latents, init.start, Conditioning(channels=fill_conditioning(masked, repaint))


def prepare_control(vae: Autoencoder, control_image: Image.Image, *, height: int, width: int, preprocess: str | None, seed: int,
                    latents: Tensor | None, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Conditioning]:
    """Canny / Depth's start noise (1, C, h, w) and channels: the control image's packed latent.

    The control image is resized to the output size, then made into edges by `preprocess` if asked
    (the order of BFL's reference code). Two draws from one CPU generator seeded `seed`, in
    FluxControlPipeline's order: the control latent's posterior sample, then the start noise
    (unless `latents` are given).
    """
    image = fit_image(control_image, width, height)
    if preprocess is not None:
        image = PREPROCESSORS[preprocess](image)
    generator = torch.Generator("cpu").manual_seed(seed)
    control = encode_sample(vae, to_tensor(image).to(device), generator).to(dtype)  # (1, C, h, w)
    noise = start_noise(vae, height=height, width=width, seed=generator, latents=latents, device=device, dtype=dtype)
    return noise, Conditioning(channels=pack_latents(control))


def prepare_kontext(vae: Autoencoder, reference: Image.Image, *, device: torch.device, dtype: torch.dtype) -> Conditioning:
    """Kontext's reference tokens: the image resized to the preferred resolution nearest its aspect ratio, the posterior
    mean of its latent (diffusers: sample_mode "argmax"; no random draw), packed."""
    width, height = kontext_reference_size(*reference.size)
    latents = encode_mode(vae, image_pixels(reference, height, width, device)).to(dtype)  # (1, C, h, w)
    return Conditioning(reference=pack_latents(latents), reference_grid=(latents.shape[2] // 2, latents.shape[3] // 2))


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
