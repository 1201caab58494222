"""The small FLUX.1's training (flux/training.py): what it learns reaches the pipeline with the right time and sign.
Whole runs (the snapshot they write, warm starts) are tested with Z-Image's in test_training.py."""

import math

import pytest
import torch

from zflux.common.vae import Autoencoder, AutoencoderConfig
from zflux.flux.model import FluxConfig
from zflux.flux.text import FluxPromptEncoder
from zflux.flux.training import build_denoiser, build_tokenizers, flow_rule, pipeline
from tiny_pipelines import one_thread  # noqa: F401 (autouse fixture)
from util import CAPTION_BATCH, draws_caption_values, learn_caption_values

TINY = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                  pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_T5 = dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu", dropout_rate=0.0)
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                 projection_dim=16)
TINY_VAE = AutoencoderConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)


def test_shift_is_devs_at_the_training_size():
    """128 pixels: 64 image tokens, mu = 0.5 + (64 - 256) * 0.65 / 3840, as FluxPipeline computes it."""
    assert flow_rule(128).shift == pytest.approx(math.exp(0.5 + (64 - 256) * 0.65 / 3840))


def test_learns_what_the_caption_says(tmp_path):
    """Trained for a moment to map two captions to latents of +1 and -1, the model samples them back through the
    dev pipeline (8 steps from noise, on average): the training's time and sign are the pipeline's, and the caption
    reaches the transformer through T5 and CLIP."""
    t5_tokenizer, clip_tokenizer = build_tokenizers()
    model = build_denoiser(t5_tokenizer, clip_tokenizer, seed=0, cfg=TINY, t5=TINY_T5, clip=TINY_CLIP)
    t5_ids, clip_ids = FluxPromptEncoder(model.t5, t5_tokenizer, model.clip, clip_tokenizer).tokens(CAPTION_BATCH)
    guidance = torch.full((len(CAPTION_BATCH),), 3.5)
    averaged = learn_caption_values(model, lambda m, x, t: m(x, t, t5_ids, clip_ids, guidance), flow_rule(32), tmp_path)
    assert draws_caption_values(pipeline(averaged, Autoencoder(TINY_VAE), t5_tokenizer, clip_tokenizer), steps=8)
