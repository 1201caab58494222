"""Z-Image Omni's condition ("reference") images and their SigLIP2 features, as diffusers' ZImageOmniPipeline
makes them (the prompt's segments: zimg/text.py).

Condition images: at least 64 pixels a side and at most 8:1; one larger than 1024x1024 is first
resized (Lanczos) to that area (to height x width's when both are given), keeping its aspect; that
image is what SigLIP2 sees. The autoencoder sees it center-cropped to multiples of 16, in bf16 (the
reference pipeline casts it so), as the mode of its scaled latent. The output size defaults to the
last condition image's cropped size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from zflux.common.images import to_tensor
from zflux.common.pipeline import encode_mode
from zflux.common.text import load_text_model
from zflux.common.vae import Autoencoder

if TYPE_CHECKING:  # transformers loads with the model (common/text.py says why)
    from transformers import BaseImageProcessor, PreTrainedModel

MAX_AREA = 1024 * 1024  # pixels: larger condition images are scaled down to this area
MIN_SIDE, MAX_ASPECT = 64, 8  # the reference pipeline's limits on a condition image
MULTIPLE = 16  # the autoencoder's 8x times the 2x2 patches


def fit_reference(image: Image.Image, height: int | None, width: int | None) -> tuple[Image.Image, Image.Image]:
    """A condition image -> (what SigLIP2 sees: scaled down to the area limit, what the autoencoder sees: also cropped to 16s)."""
    w, h = image.size
    if min(w, h) < MIN_SIDE or max(w / h, h / w) > MAX_ASPECT:
        raise ValueError(f"a reference image must be at least {MIN_SIDE} pixels a side and at most {MAX_ASPECT}:1, got {w}x{h}")
    if w * h > MAX_AREA:
        scale = math.sqrt((height * width if height and width else MAX_AREA) / (w * h))
        image = image.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)
        w, h = image.size
    left, top = (w - w // MULTIPLE * MULTIPLE) // 2, (h - h // MULTIPLE * MULTIPLE) // 2
    return image, image.crop((left, top, left + w // MULTIPLE * MULTIPLE, top + h // MULTIPLE * MULTIPLE)).convert("RGB")


class SiglipEncoder:
    """SigLIP2 (transformers' Siglip2VisionModel and its image processor): an image -> its (h, w, C) patch features."""

    def __init__(self, model: PreTrainedModel, processor: BaseImageProcessor):
        self.model, self.processor = model, processor

    @classmethod
    def from_pretrained(cls, model: str | Path, processor: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> "SiglipEncoder":
        """Load from a Siglip2VisionModel folder and a Siglip2ImageProcessor folder (a snapshot's siglip/, siglip_processor/)."""
        from transformers import Siglip2ImageProcessor  # here: without torchvision, transformers warns as the name is imported

        encoder = load_text_model("Siglip2VisionModel", model, model_types=("siglip2_vision_model",), device=device, dtype=dtype)
        return cls(encoder, Siglip2ImageProcessor.from_pretrained(processor))

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> Tensor:
        """The last hidden state of the image's patches as an (h, w, C) map (the processor chooses the h x w patch grid)."""
        inputs = self.processor(images=[image], return_tensors="pt").to(self.model.device)
        h, w = inputs.spatial_shapes[0].tolist()
        hidden = self.model(**inputs).last_hidden_state  # (1, max_patches, C): the real patches first
        return hidden[0, : h * w].view(h, w, -1)  # (h, w, C)


def prepare_references(vae: Autoencoder, siglip: SiglipEncoder, fitted: list[tuple[Image.Image, Image.Image]], *,
                       device: torch.device, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor]]:
    """fit_reference's pairs -> condition latents (16, H_k/8, W_k/8) and SigLIP2 maps (h_k, w_k, C), both in `dtype`."""
    latents, maps = [], []
    for seen, cropped in fitted:
        pixels = to_tensor(cropped).to(device, torch.bfloat16).to(vae.dtype)  # (1, 3, H, W): rounded to bf16, as the reference does
        latents.append(encode_mode(vae, pixels)[0].to(dtype))  # (16, H/8, W/8)
        maps.append(siglip(seen).to(dtype))  # (h, w, C)
    return latents, maps
