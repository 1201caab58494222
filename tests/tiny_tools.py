"""Tiny random diffusers snapshot folders for the FLUX.1 tools and inpainting tests, built offline.

As tiny_pipelines.py: diffusers' own pipelines assembled from tiny random components and saved with
`save_pretrained`, so each folder is exactly what diffusers writes and reads. The tools reuse the tiny
FLUX.1 components of tiny_pipelines.py; only the transformer's input width and the pipeline class change.
"""

from pathlib import Path

import torch
from diffusers import FluxPriorReduxPipeline, ReduxImageEncoder
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from tiny_pipelines import TEXT_DIM
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
