"""Tiny random diffusers FLUX.2 snapshot folders for the pipeline and CLI tests, built offline.

Each builder assembles diffusers' own FLUX.2 pipeline (Flux2Pipeline, Flux2KleinPipeline,
Flux2KleinKVPipeline, Flux2KleinInpaintPipeline) from tiny random components and saves it with
`save_pretrained`: a transformer 2 x 16 wide, the 4-level autoencoder 8-16 channels wide with 4
latent channels (16 after the 2x2 patches) and random batch-norm statistics, and the LLMs and
tokenizers of test_flux2_text.py (hidden 16, so 48 text features).
"""

from pathlib import Path

import torch
from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinInpaintPipeline, Flux2KleinKVPipeline,
                       Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel)

from test_flux2_text import mistral_tokenizer, tiny_mistral3, tiny_qwen3
from test_text import qwen_tokenizer
from util import randomize_

TEXT_HIDDEN = 16
TRANSFORMER = dict(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=3 * TEXT_HIDDEN, axes_dims_rope=[4, 4, 4, 4])
VAE = dict(latent_channels=4, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4)
# The shipped scheduler_config.json: the pipelines pass their own mu, so only the dynamic shifting matters.
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096, time_shift_type="exponential")
PIPELINES = {  # snapshot name -> (diffusers class, its extra config, guidance embedder)
    "flux2-dev": (Flux2Pipeline, {}, True),
    "flux2-klein": (Flux2KleinPipeline, {"is_distilled": True}, False),
    "flux2-klein-base": (Flux2KleinPipeline, {"is_distilled": False}, False),
    "flux2-klein-kv": (Flux2KleinKVPipeline, {"is_distilled": True}, False),
    "flux2-klein-inpaint": (Flux2KleinInpaintPipeline, {"is_distilled": False}, False),
}


def tiny_vae(seed: int) -> AutoencoderKLFlux2:
    vae = randomize_(AutoencoderKLFlux2(**VAE), seed, std=0.2).eval()
    g = torch.Generator().manual_seed(seed)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.3)
    vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) + 0.5)
    return vae


def flux2_pipeline(name: str = "flux2-klein", seed: int = 0):
    """diffusers' tiny random pipeline `name` (a key of PIPELINES), in memory."""
    cls, extra, guidance = PIPELINES[name]
    torch.manual_seed(seed)
    tokenizer = mistral_tokenizer() if cls is Flux2Pipeline else qwen_tokenizer()
    text_encoder = (tiny_mistral3 if cls is Flux2Pipeline else tiny_qwen3)(tokenizer, TEXT_HIDDEN)
    transformer = randomize_(Flux2Transformer2DModel(**TRANSFORMER, guidance_embeds=guidance), seed + 2).eval()
    return cls(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=tiny_vae(seed + 1), text_encoder=text_encoder,
               tokenizer=tokenizer, transformer=transformer, **extra)


def flux2_snapshot(root: Path, name: str = "flux2-klein", seed: int = 0) -> Path:
    """Save the tiny random snapshot `name` (a key of PIPELINES) to `root`."""
    flux2_pipeline(name, seed).save_pretrained(root)
    return root
