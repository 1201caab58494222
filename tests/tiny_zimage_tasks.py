"""Tiny random snapshots of diffusers' Z-Image task pipelines, saved by diffusers: ZImageControlNetPipeline,
ZImageControlNetInpaintPipeline (a ControlNet hinting both main layers and the refiner, 2.1-style) and
ZImageOmniPipeline (an Omni transformer with a tiny Siglip2VisionModel and its processor).

Each reuses a tiny Z-Image snapshot's components (tiny_pipelines.zimage_snapshot) and adds its own.
"""

from pathlib import Path

import torch
from diffusers import (ZImageControlNetInpaintPipeline, ZImageControlNetModel, ZImageControlNetPipeline, ZImageOmniPipeline,
                       ZImagePipeline, ZImageTransformer2DModel)
from transformers import Siglip2VisionConfig, Siglip2VisionModel

from tiny_pipelines import ZIMAGE
from util import randomize_

SIGLIP_DIM = 24  # the tiny SigLIP2's hidden size, the Omni transformer's siglip_feat_dim
CONTROLNET = dict(control_layers_places=[0, 1], control_refiner_layers_places=[0], control_in_dim=33,
                  add_control_noise_refiner="control_noise_refiner", dim=ZIMAGE["dim"], n_refiner_layers=ZIMAGE["n_refiner_layers"],
                  n_heads=ZIMAGE["n_heads"], n_kv_heads=ZIMAGE["n_kv_heads"])


def controlnet_snapshot(root: Path, base: Path, inpaint: bool = False, seed: int = 5) -> Path:
    """Save the Z-Image snapshot `base` plus a random ControlNet as a ZImageControlNet(Inpaint)Pipeline snapshot."""
    controlnet = randomize_(ZImageControlNetModel(**CONTROLNET), seed).eval()
    pipeline = ZImageControlNetInpaintPipeline if inpaint else ZImageControlNetPipeline
    pipeline(**ZImagePipeline.from_pretrained(base).components, controlnet=controlnet).save_pretrained(root)
    return root


def omni_snapshot(root: Path, base: Path, seed: int = 6) -> Path:
    """Save `base`'s autoencoder, text encoder and scheduler with a random Omni transformer and SigLIP2 as a ZImageOmniPipeline."""
    from transformers import Siglip2ImageProcessor  # here: without torchvision, transformers warns as the name is imported

    torch.manual_seed(seed)
    components = ZImagePipeline.from_pretrained(base).components
    components["transformer"] = randomize_(ZImageTransformer2DModel(**ZIMAGE, siglip_feat_dim=SIGLIP_DIM), seed).eval()
    siglip = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=SIGLIP_DIM, intermediate_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, patch_size=16, num_patches=16))
    processor = Siglip2ImageProcessor(patch_size=16, max_num_patches=16)
    ZImageOmniPipeline(**components, siglip=randomize_(siglip, seed + 1).eval(), siglip_processor=processor).save_pretrained(root)
    return root
