"""The ControlNet tasks' input: the control latents a ZImageControlNet (zimg/controlnet.py) reads, as diffusers'
ZImageControlNetPipeline and ZImageControlNetInpaintPipeline make them.

Every image is resized (Lanczos) to the output size and encoded to the mode of its scaled latent.
Text to image: the control image's latent (16 channels) followed by zeros up to the ControlNet's
`control_in_dim` (33). Inpainting: [control image's latent (16), keep-mask (1), masked image's latent
(16)]: the keep-mask is 1 - mask (the mask's white repaints) on the latent grid, and the masked image
is the image with the repaint region set to 0 (mid-gray). Inpainting steers the model only through
these channels: the sampler starts from pure noise and never blends the known latents back in.
"""

import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from zflux.common.images import fit_image, mask_latents, mask_tensor, to_tensor
from zflux.common.pipeline import encode_mode
from zflux.common.vae import Autoencoder


def pixels(image: Image.Image, height: int, width: int, vae: Autoencoder, device: torch.device) -> Tensor:
    """An image resized to height x width -> (1, 3, H, W) in [-1, 1] on `device` in the autoencoder's dtype."""
    return to_tensor(fit_image(image, width, height)).to(device, vae.dtype)


def prepare_control(vae: Autoencoder, control_image: Image.Image, *, channels: int, height: int, width: int,
                    device: torch.device) -> Tensor:
    """ControlNet text to image: (1, channels, h, w) control latents, the control image's latent then zeros."""
    latent = encode_mode(vae, pixels(control_image, height, width, vae, device))  # (1, 16, h, w)
    return F.pad(latent, (0, 0, 0, 0, 0, channels - latent.shape[1]))  # (1, channels, h, w)


def prepare_control_inpaint(vae: Autoencoder, control_image: Image.Image, image: Image.Image, mask: Image.Image, *,
                            channels: int, height: int, width: int, device: torch.device) -> Tensor:
    """ControlNet inpainting: (1, 33, h, w) control latents [control latent, keep-mask, masked image's latent]."""
    needed = 2 * vae.cfg.latent_channels + 1
    if channels != needed:
        raise ValueError(f"inpainting needs a ControlNet with {needed} control channels, this one has {channels}")
    control = encode_mode(vae, pixels(control_image, height, width, vae, device))  # (1, 16, h, w)
    image = pixels(image, height, width, vae, device)  # (1, 3, H, W)
    repaint = mask_tensor(mask, width, height).to(image)  # (1, 1, H, W): 1 = repaint
    masked = encode_mode(vae, image * (repaint < 0.5))  # (1, 16, h, w)
    keep = mask_latents(1 - repaint, *masked.shape[-2:])  # (1, 1, h, w)
    return torch.cat([control, keep, masked], dim=1)  # (1, 33, h, w)
