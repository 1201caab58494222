"""Training zflux's small Z-Image-Turbo-shaped model from scratch (the one shipped in zimg/embedded/).

Trained together: a Z-Image transformer at a small config (TRANSFORMER: dim 192, 4 layers, one refiner
layer of each kind, 4 M parameters) and the small Qwen3 text encoder under it (TEXT_ENCODER: 3 layers
of width 128; the pipeline reads the second-to-last layer's hidden states, so the last layer is built
but never used). The autoencoder comes trained (common/training.py: train_autoencoder) and stays
frozen. The tokenizer is a byte-level BPE learnt from the caption grammar (common/data.py), saved with
a cut-down Qwen3 chat template, since the prompt encoder wraps every prompt in it.

Why the text encoder is trained rather than frozen at random: a random encoder does map distinct
captions to distinct features, but its near-uniform random attention mixes neighbouring words only
faintly, so which colour belongs to the shape and which to the background would reach the
transformer as a faint signal; trained, it carries that in the same few minutes.

Z-Image's conventions: the transformer is given t = 1 - sigma (0 = noise) and predicts x0 - noise;
sigmas are shifted by Turbo's 3.0 in training as in sampling, which takes 8 steps without CFG.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor, nn

from zflux.common.data import SceneDataset, batches, byte_level_bpe
from zflux.common.training import FlowRule, TrainSettings, flow_loss, picture_latents, prompt_grid, save_snapshot, train
from zflux.common.vae import load_autoencoder
from zflux.common.weights import read_state_dict
from zflux.zimg.convert import from_diffusers, to_diffusers
from zflux.zimg.model import ZImageConfig, ZImageTransformer
from zflux.zimg.pipeline import VARIANTS, ZImagePipeline, zimage_time
from zflux.zimg.text import Qwen3PromptEncoder, qwen3_features

if TYPE_CHECKING:  # transformers loads when a run builds its models (common/text.py says why)
    from transformers import PreTrainedTokenizerFast, Qwen3Model

VARIANT = "z-image-turbo"
TEXT_DIM = 128
TRANSFORMER = ZImageConfig(dim=192, n_layers=4, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=TEXT_DIM,
                           axes_dims=(16, 24, 24), axes_lens=(640, 64, 64))  # axis 0 covers a padded 512-token caption
TEXT_ENCODER = dict(hidden_size=TEXT_DIM, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, max_position_embeddings=512)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen3's chat template cut down to one user turn and the assistant's opening (with thinking enabled,
# as the prompt encoder asks, the real template adds nothing more).
CHAT_TEMPLATE = (
    r"{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    r"{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"
)
SETTINGS = TrainSettings(batch_size=128, lr=1e-3, minutes=8.0)  # `zflux train z-image-turbo`, flags aside
RULE = FlowRule(time=zimage_time, sign=-1.0, shift=VARIANTS[VARIANT].scheduler.shift)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level BPE of the caption grammar with Qwen3's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(SPECIAL_TOKENS), pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", model_max_length=TEXT_ENCODER["max_position_embeddings"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class Denoiser(nn.Module):
    """What training updates: the transformer and its text encoder, from token ids to the prediction x0 - noise."""

    def __init__(self, transformer: ZImageTransformer, text_encoder: Qwen3Model):
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder

    def forward(self, latents: Tensor, time: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """latents (B, 16, h, w), time (B,), caption ids and mask (B, L) -> (B, 16, h, w)."""
        return self.transformer(latents, time, qwen3_features(self.text_encoder, ids), mask)


def build_denoiser(tokenizer: PreTrainedTokenizerFast, seed: int, cfg: ZImageConfig = TRANSFORMER,
                   text_encoder: dict = TEXT_ENCODER, init: Path | None = None) -> Denoiser:
    """A Denoiser holding the weights of the snapshot `init` (a warm start), or fresh ones: PyTorch's default
    initialisation, except that every modulation and the output projection start at zero, so that each block
    starts as the identity and the first prediction is 0 (as DiT does)."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer(cfg, backend="sdpa")  # sdpa: the Triton norm kernels have no backward
    for module in [*(b.adaLN_modulation[0] for b in [*transformer.noise_refiner, *transformer.layers]),
                   transformer.final_layer.adaLN_modulation[1], transformer.final_layer.linear]:
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
    qwen3 = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **text_encoder))
    if init is not None:
        transformer.load_state_dict(from_diffusers(read_state_dict(init / "transformer")))
        qwen3.load_state_dict(Qwen3Model.from_pretrained(init / "text_encoder").state_dict())
    return Denoiser(transformer, qwen3)


def pipeline(model: Denoiser, vae, tokenizer: PreTrainedTokenizerFast) -> ZImagePipeline:
    """A Turbo pipeline around the model being trained (or its EMA copy)."""
    return ZImagePipeline(model.transformer, vae, Qwen3PromptEncoder(model.text_encoder, tokenizer), VARIANT)


def train_zimage(folder: Path, vae_folder: Path, settings: TrainSettings, size: int, device: torch.device, workers: int = 0,
                 init: Path | None = None) -> Path:
    """Train the small Z-Image in `folder` (resuming its checkpoint there, else starting from the snapshot `init` or
    from scratch) on `size`-pixel scenes; save its snapshot as folder/model, draw folder/grid.png from it, return it."""
    tokenizer = build_tokenizer()
    model = build_denoiser(tokenizer, settings.seed, init=init).to(device)
    vae = load_autoencoder(vae_folder, device, torch.float32)
    encoder = Qwen3PromptEncoder(model.text_encoder, tokenizer)
    dataset = SceneDataset(size, seed=settings.seed)

    def loss(model: Denoiser, batch: tuple[Tensor, list[str]], generator: torch.Generator) -> Tensor:
        pictures, captions = batch
        # Padded to the longest caption, not to 512: Qwen3 is causal, so padding changes no real token's features.
        ids, mask = encoder.tokens([encoder.template(c) for c in captions])
        return flow_loss(lambda x, t: model(x, t, ids, mask), picture_latents(vae, pictures), RULE, generator)

    def sample(model: Denoiser) -> Image.Image:
        return prompt_grid(pipeline(model, vae, tokenizer), size)

    averaged = train(model, loss, lambda step: batches(dataset, settings.batch_size, step, workers), settings, folder, sample,
                     name=VARIANT)
    snapshot = save_snapshot(folder / "model", "ZImagePipeline", vae=vae_folder, scheduler=VARIANTS[VARIANT].scheduler,
                             transformer=("ZImageTransformer2DModel", to_diffusers(averaged.transformer.state_dict()), TRANSFORMER),
                             text={"text_encoder": averaged.text_encoder, "tokenizer": tokenizer})
    shipped = ZImagePipeline.from_pretrained(snapshot, device=device, dtype=torch.float32)
    shipped.transformer.backend = "sdpa"  # as in training: no Triton kernels to compile at the end of a time slot
    prompt_grid(shipped, size).save(folder / "grid.png")
    return snapshot
