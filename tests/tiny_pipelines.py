"""Tiny random diffusers snapshot folders for the pipeline and CLI tests, built offline.

Each builder assembles diffusers' own pipeline from tiny random components (transformer, the
autoencoder at 4 levels like the real one but 8-16 channels wide, `transformers` text encoders,
the test tokenizers of test_text.py, the scheduler config the real checkpoint ships) and saves
it with `save_pretrained`, so the folder is exactly what diffusers writes and reads:
model_index.json + one subfolder per component.
"""

from pathlib import Path

import pytest
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, ZImagePipeline,
                       ZImageTransformer2DModel)
from transformers import CLIPTextConfig, CLIPTextModel, Qwen2Tokenizer, Qwen3Config, Qwen3Model, T5Config, T5EncoderModel

from test_text import clip_tokenizer, qwen_tokenizer, t5_tokenizer
from util import randomize_

TEXT_DIM = 32  # hidden size of every tiny text encoder
ZIMAGE = dict(dim=64, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=TEXT_DIM,
              axes_dims=[8, 12, 12], axes_lens=[640, 64, 64])  # axis 0 covers a full 512-token caption
FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, axes_dims_rope=[4, 6, 6])
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
           norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
SCHEDULERS = {  # the shipped scheduler_config.json values
    "z-image-turbo": dict(shift=3.0),
    "z-image": dict(shift=6.0),
    "flux-schnell": dict(shift=1.0, use_dynamic_shifting=False),
    "flux-dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread for the importing test module: tiny matmuls gain nothing from threads, and on a
    loaded 2-core box (CI) the thread hand-off made them ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CONV_OUT_GAIN = 0.25  # decoded pixels mostly inside [-1, 1]: at the randomize_ scale 45% clipped to 0 or 255


def tiny_vae(seed: int) -> AutoencoderKL:
    vae = randomize_(AutoencoderKL(**VAE), seed, std=0.2).eval()
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(CONV_OUT_GAIN)
    return vae


def qwen_encoder(dim: int = TEXT_DIM) -> tuple[Qwen3Model, Qwen2Tokenizer]:
    """A tiny random Qwen3 text encoder of hidden size `dim` (Z-Image's cap_feat_dim) and the test tokenizer."""
    tokenizer = qwen_tokenizer()
    qwen = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=640,
                                  pad_token_id=tokenizer.pad_token_id))
    return qwen.eval(), tokenizer


def flux_text_encoders(t5_dim: int = TEXT_DIM, clip_dim: int = TEXT_DIM) -> dict:
    """Tiny random CLIP (pooled width `clip_dim`) and T5 (width `t5_dim`) with the test tokenizers, as FLUX.1 pipeline components."""
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=clip_dim, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, projection_dim=clip_dim,
                                        eos_token_id=clip_tok.eos_token_id, bos_token_id=0, pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=t5_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"))
    return dict(text_encoder=clip.eval(), tokenizer=clip_tok, text_encoder_2=t5.eval(), tokenizer_2=t5_tok)


def zimage_snapshot(root: Path, variant: str = "z-image-turbo", seed: int = 0) -> Path:
    """Save a tiny random Z-Image snapshot (Turbo or base: only the scheduler differs) to `root`."""
    torch.manual_seed(seed)
    qwen, tokenizer = qwen_encoder()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant]), vae=tiny_vae(seed + 1),
                          text_encoder=qwen, tokenizer=tokenizer,
                          transformer=randomize_(ZImageTransformer2DModel(**ZIMAGE), seed + 2).eval())
    pipe.save_pretrained(root)
    return root


def flux_snapshot(root: Path, variant: str = "flux-schnell", seed: int = 0) -> Path:
    """Save a tiny random FLUX.1 snapshot (dev: with a guidance embedder) to `root`."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**FLUX, guidance_embeds=variant == "flux-dev")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant]), vae=tiny_vae(seed + 1),
                        **flux_text_encoders(), transformer=randomize_(transformer, seed + 2).eval())
    pipe.save_pretrained(root)
    return root
