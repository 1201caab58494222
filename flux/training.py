"""Training zflux's small FLUX.1-dev-shaped model from scratch (the one shipped in flux/embedded/).

Trained together: a FLUX.1 transformer at a small config (TRANSFORMER: 3 heads of 64, two double-stream
and two single-stream blocks, a guidance embedder as dev has, 4 M parameters) and the two small text
encoders under it, T5-style (T5: 2 layers of width 128) and CLIP-style (CLIP: 2 layers of width 128,
77 positions). The autoencoder comes trained (common/training.py: train_autoencoder) and stays frozen.
Both tokenizers are the byte-level BPE of the caption grammar (common/data.py), with T5's end token
and CLIP's start and end tokens.

Why the text encoders are trained rather than frozen at random: FLUX.1 gives every text token the
same RoPE position, so word order reaches the transformer only through T5's own relative attention.
At random that attention is near uniform, and "a red circle on a blue background" would look almost
like "a blue circle on a red background"; trained, T5 learns to tell them apart.

FLUX.1's conventions: the transformer is given t = sigma (1 = noise) and predicts noise - x0; dev's
sigma shift grows with the image's token count (mu), and training shifts its sigmas by the shift
sampling uses at the training size. The guidance input sees random scales from 1 to 5 in training:
with no guidance distillation it has no effect, and any scale a user passes is one it has seen.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tokenizers import processors
from torch import Tensor, nn

from zflux.common.data import SceneDataset, batches, byte_level_bpe
from zflux.common.latents import pack_latents, unpack_latents
from zflux.common.training import FlowRule, TrainSettings, flow_loss, picture_latents, prompt_grid, save_snapshot, train
from zflux.common.vae import load_autoencoder
from zflux.common.weights import read_state_dict
from zflux.flux.convert import from_diffusers, to_diffusers
from zflux.flux.model import Flux, FluxConfig
from zflux.flux.pipeline import VARIANTS, FluxPipeline, flux_time, img_ids, txt_ids
from zflux.flux.text import FluxPromptEncoder, flux_features

if TYPE_CHECKING:  # transformers loads when a run builds its models (common/text.py says why)
    from transformers import CLIPTextModel, PreTrainedTokenizerFast, T5EncoderModel

VARIANT = "flux-dev"
TEXT_DIM = 128
TRANSFORMER = FluxConfig(num_layers=2, num_single_layers=2, attention_head_dim=64, num_attention_heads=3, joint_attention_dim=TEXT_DIM,
                         pooled_projection_dim=TEXT_DIM, guidance_embeds=True, axes_dims_rope=(8, 28, 28))
T5 = dict(d_model=TEXT_DIM, d_kv=32, d_ff=256, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0)
CLIP = dict(hidden_size=TEXT_DIM, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
            projection_dim=TEXT_DIM)
GUIDANCE_RANGE = (1.0, 5.0)
SETTINGS = TrainSettings(batch_size=128, lr=1e-3, minutes=8.0)  # `zflux train flux-dev`, flags aside


def build_tokenizers() -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """(T5's, CLIP's): the grammar's byte-level BPE, T5's ending each text with </s>, CLIP's wrapping it in start and end tokens."""
    from transformers import PreTrainedTokenizerFast

    t5 = byte_level_bpe(["<pad>", "</s>", "<unk>"])
    t5.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", t5.token_to_id("</s>"))])
    clip = byte_level_bpe(["<|startoftext|>", "<|endoftext|>"])
    clip.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[(name, clip.token_to_id(name)) for name in ("<|startoftext|>", "<|endoftext|>")])
    return (PreTrainedTokenizerFast(tokenizer_object=t5, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                    model_max_length=VARIANTS[VARIANT].defaults.max_sequence_length),
            PreTrainedTokenizerFast(tokenizer_object=clip, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                    pad_token="<|endoftext|>", model_max_length=CLIP["max_position_embeddings"]))


class Denoiser(nn.Module):
    """What training updates: the transformer and its text encoders, from token ids to the prediction noise - x0."""

    def __init__(self, transformer: Flux, t5: T5EncoderModel, clip: CLIPTextModel):
        super().__init__()
        self.transformer = transformer
        self.t5 = t5
        self.clip = clip

    def forward(self, latents: Tensor, time: Tensor, t5_ids: Tensor, clip_ids: Tensor, guidance: Tensor) -> Tensor:
        """latents (B, 16, h, w), time and guidance (B,), T5 ids (B, L), CLIP ids (B, 77) -> (B, 16, h, w)."""
        features, pooled = flux_features(self.t5, self.clip, t5_ids, clip_ids)  # (B, L, D), (B, D)
        B, _, h, w = latents.shape
        out = self.transformer(pack_latents(latents), img_ids(B, h // 2, w // 2, latents.device), features,
                               txt_ids(B, features.shape[1], latents.device), time, pooled, guidance)  # (B, h*w/4, 64)
        return unpack_latents(out, h, w)


def build_denoiser(t5_tokenizer: PreTrainedTokenizerFast, clip_tokenizer: PreTrainedTokenizerFast, seed: int,
                   cfg: FluxConfig = TRANSFORMER, t5: dict = T5, clip: dict = CLIP, init: Path | None = None) -> Denoiser:
    """A Denoiser holding the weights of the snapshot `init` (a warm start), or fresh ones: PyTorch's and
    transformers' default initialisation, except that every modulation and the output projection start at zero,
    so that each block starts as the identity and the first prediction is 0."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = Flux(cfg, backend="sdpa")  # sdpa: the Triton norm kernels have no backward
    mods = [m for block in transformer.double_blocks for m in (block.img_mod.lin, block.txt_mod.lin)]
    for module in [*mods, *(b.modulation.lin for b in transformer.single_blocks), transformer.final_layer.adaLN_modulation[1],
                   transformer.final_layer.linear]:
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
    t5_model = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), pad_token_id=t5_tokenizer.pad_token_id,
                                       eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=t5_tokenizer.pad_token_id, **t5))
    clip_model = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tokenizer), bos_token_id=clip_tokenizer.bos_token_id,
                                              eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id, **clip))
    if init is not None:
        transformer.load_state_dict(from_diffusers(read_state_dict(init / "transformer")))
        t5_model.load_state_dict(T5EncoderModel.from_pretrained(init / "text_encoder_2").state_dict())
        clip_model.load_state_dict(CLIPTextModel.from_pretrained(init / "text_encoder").state_dict())
    return Denoiser(transformer, t5_model, clip_model)


def pipeline(model: Denoiser, vae, t5_tokenizer: PreTrainedTokenizerFast, clip_tokenizer: PreTrainedTokenizerFast) -> FluxPipeline:
    """A dev pipeline around the model being trained (or its EMA copy)."""
    return FluxPipeline(model.transformer, vae, FluxPromptEncoder(model.t5, t5_tokenizer, model.clip, clip_tokenizer))


def flow_rule(size: int) -> FlowRule:
    """FLUX.1's rule at `size` pixels: the shift is the one dev's scheduler picks for that many image tokens."""
    return FlowRule(time=flux_time, sign=1.0, shift=math.exp(VARIANTS[VARIANT].scheduler.mu((size // 16) ** 2)))


def train_flux(folder: Path, vae_folder: Path, settings: TrainSettings, size: int, device: torch.device, workers: int = 0,
               init: Path | None = None) -> Path:
    """Train the small FLUX.1 in `folder` (resuming its checkpoint there, else starting from the snapshot `init` or
    from scratch) on `size`-pixel scenes; save its snapshot as folder/model, draw folder/grid.png from it, return it."""
    t5_tokenizer, clip_tokenizer = build_tokenizers()
    model = build_denoiser(t5_tokenizer, clip_tokenizer, settings.seed, init=init).to(device)
    vae = load_autoencoder(vae_folder, device, torch.float32)
    encoder = FluxPromptEncoder(model.t5, t5_tokenizer, model.clip, clip_tokenizer)
    dataset, rule = SceneDataset(size, seed=settings.seed), flow_rule(size)

    def loss(model: Denoiser, batch: tuple[Tensor, list[str]], generator: torch.Generator) -> Tensor:
        pictures, captions = batch
        # T5 attends to its padding: the ids are padded to the pipeline's max_sequence_length, as at inference.
        t5_ids, clip_ids = encoder.tokens(captions, VARIANTS[VARIANT].defaults.max_sequence_length)
        low, high = GUIDANCE_RANGE
        guidance = low + (high - low) * torch.rand(len(captions), generator=generator, device=device)  # (B,)
        return flow_loss(lambda x, t: model(x, t, t5_ids, clip_ids, guidance), picture_latents(vae, pictures), rule, generator)

    def sample(model: Denoiser) -> Image.Image:
        return prompt_grid(pipeline(model, vae, t5_tokenizer, clip_tokenizer), size)

    averaged = train(model, loss, lambda step: batches(dataset, settings.batch_size, step, workers), settings, folder, sample,
                     name=VARIANT)
    text = {"text_encoder": averaged.clip, "tokenizer": clip_tokenizer, "text_encoder_2": averaged.t5, "tokenizer_2": t5_tokenizer}
    snapshot = save_snapshot(folder / "model", "FluxPipeline", vae=vae_folder, scheduler=VARIANTS[VARIANT].scheduler,
                             transformer=("FluxTransformer2DModel", to_diffusers(averaged.transformer.state_dict()), TRANSFORMER),
                             text=text)
    shipped = FluxPipeline.from_pretrained(snapshot, device=device, dtype=torch.float32)
    shipped.transformer.backend = "sdpa"  # as in training: no Triton kernels to compile at the end of a time slot
    prompt_grid(shipped, size).save(folder / "grid.png")
    return snapshot
