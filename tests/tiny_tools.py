"""Tiny random diffusers snapshot folders for the FLUX.1 tools and inpainting tests, built offline.

As tiny_pipelines.py: diffusers' own pipelines assembled from tiny random components and saved with
`save_pretrained`, so each folder is exactly what diffusers writes and reads. The tools reuse the tiny
FLUX.1 components of tiny_pipelines.py; only the transformer's input width and the pipeline class change.
"""

from pathlib import Path

import torch
from diffusers import FluxPriorReduxPipeline, FluxTransformer2DModel, ReduxImageEncoder, ZImageInpaintPipeline
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from tiny_pipelines import FLUX, TEXT_DIM, flux_snapshot, zimage_snapshot
from util import randomize_

SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
SIGLIP_TOKENS = (SIGLIP["image_size"] // SIGLIP["patch_size"]) ** 2  # 16 (so400m: 729)


def redux_snapshot(root: Path, seed: int = 0) -> Path:
    """Save a tiny random FluxPriorReduxPipeline snapshot laid out as FLUX.1-Redux-dev's: image_embedder/ (the
    projector into the tiny T5 width), image_encoder/ (SigLIP), feature_extractor/, and no text encoders."""
    torch.manual_seed(seed)
    siglip = randomize_(SiglipVisionModel(SiglipVisionConfig(**SIGLIP)), seed, std=0.2).eval()
    embedder = randomize_(ReduxImageEncoder(redux_dim=SIGLIP["hidden_size"], txt_in_features=TEXT_DIM), seed + 1, std=0.3).eval()
    processor = SiglipImageProcessor(size={"height": SIGLIP["image_size"], "width": SIGLIP["image_size"]})
    FluxPriorReduxPipeline(image_encoder=siglip, feature_extractor=processor, image_embedder=embedder).save_pretrained(root)
    return root


def flux_tool_snapshot(root: Path, pipeline_cls, variant: str = "flux-dev", in_channels: int = 64, seed: int = 0) -> Path:
    """Save a tiny random snapshot of a FLUX.1 tool's pipeline (FluxFillPipeline, FluxControlPipeline, FluxKontextPipeline,
    FluxInpaintPipeline, ...): the tiny FLUX.1 components, a transformer `in_channels` wide, saved by `pipeline_cls`."""
    base = flux_snapshot(root.with_name(root.name + "-base"), variant, seed)
    transformer = FluxTransformer2DModel(**FLUX | dict(in_channels=in_channels, out_channels=FLUX["in_channels"]),
                                         guidance_embeds=variant != "flux-schnell")
    pipeline_cls.from_pretrained(base, transformer=randomize_(transformer, seed + 2).eval()).save_pretrained(root)
    return root


def zimage_inpaint_snapshot(root: Path, variant: str = "z-image-turbo", seed: int = 0) -> Path:
    """Save a tiny random ZImageInpaintPipeline snapshot (the tiny Z-Image components)."""
    base = zimage_snapshot(root.with_name(root.name + "-base"), variant, seed)
    ZImageInpaintPipeline.from_pretrained(base).save_pretrained(root)
    return root
