"""Z-Image text-to-image (and image-to-image) without diffusers: prompt -> PIL image.

    pipe = ZImagePipeline.from_pretrained("Z-Image-Turbo")
    pipe.generate("a red fox in snow", seed=0).save("fox.png")

The steps, as diffusers' ZImagePipeline takes them:
1. Latents (1, 16, H/8, W/8) start as fp32 noise at sigma 1 (or as the noised init image); the
   sigmas are an even grid shifted statically (Turbo 3.0, base 6.0). diffusers builds that grid in
   float32, ours is rounded once from float64: a sigma may sit one float32 step away.
2. Qwen3 encodes the prompt (and, with CFG, the negative prompt, in the same batch); only the real
   tokens of each caption are kept.
3. Per sigma, the transformer sees the latents in its dtype and the time 1 - sigma (0 = noise) and
   predicts image - noise. With CFG (guidance > 0) the conditional and unconditional rows run as one
   batch of 2 and combine in fp32 (optionally renormalised, optionally switched off late in the
   schedule by cfg_truncation). The negated prediction is the velocity of an fp32 Euler step
   (predictor() below; common.pipeline.denoise runs the loop).
4. The autoencoder decodes latents / scaling_factor + shift_factor.

Turbo is distilled for 8 steps without CFG; the base model runs ~50 steps with CFG (guidance ~4).
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from zflux.common.identify import check_family
from zflux.common.pipeline import (Predict, Variant, check_request, decode_latents, default_device, denoise, encode_prompts,
                                   image_seq_len, open_snapshot, prepare_img2img, read_scheduler, start_noise)
from zflux.common.sampling import NUM_TRAIN_TIMESTEPS, SamplingDefaults, SchedulerConfig, cfg_combine
from zflux.common.vae import Autoencoder, check_autoencoder, load_autoencoder
from zflux.common.weights import CheckpointError
from zflux.zimg.convert import check_transformer, load_transformer
from zflux.zimg.model import PRESETS, ZImageTransformer
from zflux.zimg.text import Qwen3PromptEncoder


@dataclass(frozen=True)
class ZImageDefaults(SamplingDefaults):
    """Z-Image's defaults: `guidance` is the CFG scale (0 = off), with CFG's renormalisation and truncation."""

    cfg_normalization: float | None = None  # CFG renormalisation (None = off)
    cfg_truncation: float = 1.0  # CFG off once the model time 1 - sigma exceeds this


# Turbo is distilled: 8 steps and no CFG. Older diffusers (sigma_min = 0) ran Turbo with num_inference_steps=9:
# that grid reaches 0 one step early, so the ninth step has length 0 and the eight real steps use the
# sigmas of sigma_schedule(8, shift=3.0). The two share every shape: only the shipped scheduler tells them apart.
VARIANTS = {
    "z-image-turbo": Variant(model=PRESETS["z-image-turbo"], scheduler=SchedulerConfig(shift=3.0),
                             defaults=ZImageDefaults(steps=8, guidance=0.0, max_sequence_length=512)),
    "z-image": Variant(model=PRESETS["z-image"], scheduler=SchedulerConfig(shift=6.0),
                       defaults=ZImageDefaults(steps=50, guidance=4.0, max_sequence_length=512)),
}
SNAPSHOT_PIPELINES = ("ZImagePipeline", "ZImageImg2ImgPipeline")
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def check_settings(variant: str, negative_prompt: str | None = None, **given) -> ZImageDefaults:
    """The variant's sampling defaults with the `given` ones (None: unset) in their place, checked before any work."""
    settings = VARIANTS[variant].defaults.given(**given)
    if negative_prompt is not None and settings.guidance <= 0:
        raise ValueError("a negative prompt needs classifier-free guidance: set guidance > 0 (Turbo runs without it)")
    return settings


def zimage_time(sigma: Tensor) -> Tensor:
    """The time Z-Image's transformer receives for `sigma`: 1 - sigma (0 = pure noise), rounded as ZImagePipeline does."""
    return (NUM_TRAIN_TIMESTEPS - sigma.float() * NUM_TRAIN_TIMESTEPS) / NUM_TRAIN_TIMESTEPS


def cfg_active(sigma: Tensor | float, truncation: float | None) -> bool:
    """Whether Z-Image applies CFG at `sigma`: not once its model time 1 - sigma exceeds `truncation` (None or > 1: always)."""
    if truncation is None or truncation > 1:
        return True
    return zimage_time(torch.as_tensor(sigma, dtype=torch.float32)).item() <= truncation


def trim_captions(features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """Drop the token positions that no caption uses, and the mask once every position left is real.

    The transformer itself moves each caption's real tokens to the front. This runs once per prompt so
    that when all captions have the same length (one prompt without CFG, say) the transformer gets no
    mask, and so makes no host sync on every step.
    """
    used = mask.any(dim=0).nonzero()[:, 0]  # (L',) positions holding a real token of some caption
    features, mask = features[:, used], mask[:, used]  # (B, L', D), (B, L')
    return features, None if mask.all() else mask


def predictor(transformer: ZImageTransformer, *, features: Tensor, mask: Tensor, sigmas: Tensor, settings: ZImageDefaults,
              device: torch.device) -> Predict:
    """predict(latents, i) for denoise: one transformer call per step, both CFG rows in one batch while CFG is on.

    `features` and `mask` hold the prompt's caption, or with CFG the prompt's and the negative
    prompt's. Captions, times and CFG choices are settled here, so that the loop adds no host sync;
    the transformer makes one per step only when given a caption mask (CFG rows of unequal length).
    """
    use_cfg = settings.guidance > 0
    captions = {1: trim_captions(features[:1], mask[:1])}  # by batch size: the conditional row alone, or both rows
    if use_cfg:
        captions[2] = trim_captions(features, mask)
    cfg_steps = [use_cfg and cfg_active(s, settings.cfg_truncation) for s in sigmas[:-1]]
    times = zimage_time(sigmas).to(device)  # (steps + 1,) model time 1 - sigma
    dtype, guidance, normalization = transformer.dtype, settings.guidance, settings.cfg_normalization

    def predict(latents: Tensor, i: int) -> Tensor:
        n = 2 if cfg_steps[i] else 1  # conditional row, then the unconditional one
        cap_feats, cap_mask = captions[n]
        x = latents.to(dtype).expand(n, -1, -1, -1)  # (n, C, h, w)
        out = transformer(x, times[i].expand(n), cap_feats=cap_feats, cap_mask=cap_mask)  # (n, C, h, w)
        pred = cfg_combine(out[:1], out[1:], scale=guidance, normalization=normalization) if n == 2 else out.float()  # (1, C, h, w)
        return -pred  # the model predicts image - noise

    return predict


class ZImagePipeline:
    """Z-Image-Turbo or Z-Image base: the transformer, the autoencoder and the Qwen3 prompt encoder."""

    def __init__(self, transformer: ZImageTransformer, vae: Autoencoder, text_encoder: Qwen3PromptEncoder, variant: str,
                 scheduler: SchedulerConfig | None = None, offload_text_encoder: bool = False):
        if variant not in VARIANTS:
            raise ValueError(f"unknown Z-Image variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.variant = variant
        self.scheduler = scheduler or VARIANTS[variant].scheduler
        self.offload_text_encoder = offload_text_encoder

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                        offload_text_encoder: bool = False, variant: str | None = None) -> "ZImagePipeline":
        """Load a diffusers snapshot folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/).

        The variant (which sets the default steps and guidance) comes from the scheduler config
        unless given; a given one that contradicts the scheduler config is an error.
        """
        root = open_snapshot(path, SNAPSHOT_PIPELINES, SUBFOLDERS)
        scheduler = read_scheduler(root / "scheduler")
        shipped = next((name for name, v in VARIANTS.items() if v.scheduler == scheduler), None)  # Turbo and base differ only there
        if variant is None and shipped is None:
            raise CheckpointError(f"{root}: the scheduler (shift {scheduler.shift}) is neither Turbo's nor base's; pass variant=")
        if variant is not None and shipped is not None and variant != shipped:
            raise CheckpointError(f"{root} is {shipped} (its scheduler shifts sigmas by {scheduler.shift}), not {variant}")
        return cls.from_single_files(root / "transformer", root / "vae", text_encoder=root / "text_encoder",
                                     tokenizer=root / "tokenizer", variant=variant or shipped, device=device, dtype=dtype,
                                     offload_text_encoder=offload_text_encoder, scheduler=scheduler)

    @classmethod
    def from_single_files(cls, transformer: str | Path, vae: str | Path, text_encoder: str | Path, tokenizer: str | Path,
                          variant: str = "z-image-turbo", device: str | torch.device | None = None,
                          dtype: torch.dtype = torch.bfloat16, offload_text_encoder: bool = False,
                          scheduler: SchedulerConfig | None = None) -> "ZImagePipeline":
        """Load from a transformer file (official, ComfyUI or diffusers layout), a VAE file (`ae.safetensors`) and
        Qwen3 model and tokenizer folders. Weights go to `device` (default: the GPU) in `dtype`."""
        info = check_family(transformer, "z-image", " (for FLUX.1 use zflux.flux.pipeline.FluxPipeline)")
        if info.variant == "z-image-omni":
            raise CheckpointError(f"{transformer} holds {info.description}")
        check_family(vae, "autoencoder")
        check_transformer(transformer)  # every key and shape, from the headers: before any weight is read
        check_autoencoder(vae)
        device = torch.device(device) if device is not None else default_device()
        encoder = Qwen3PromptEncoder.from_pretrained(text_encoder, tokenizer, device="cpu" if offload_text_encoder else device,
                                                     dtype=dtype)
        return cls(load_transformer(transformer, device, dtype), load_autoencoder(vae, device, dtype), text_encoder=encoder,
                   variant=variant, scheduler=scheduler, offload_text_encoder=offload_text_encoder)

    @property
    def device(self) -> torch.device:
        return self.transformer.x_embedder.weight.device

    @torch.inference_mode()
    def generate(self, prompt: str, negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int = 0, latents: Tensor | None = None,
                 init_image: Image.Image | str | Path | None = None, strength: float = 0.6,
                 cfg_normalization: float | None = None, cfg_truncation: float | None = None,
                 output_type: str = "pil", progress: bool = True) -> Image.Image | Tensor:
        """Generate one image (output_type "pil") or its final latents (1, 16, H/8, W/8) fp32 ("latent").

        Unset arguments take the variant's defaults (Turbo: 8 steps, guidance 0; base: 50 steps,
        guidance 4). guidance > 0 turns on CFG against `negative_prompt` (default empty).
        Size defaults to 1024x1024, or to the init image's size rounded down to a multiple of 16.
        `latents` replaces the seeded initial noise; `init_image` + `strength` runs image-to-image.
        """
        height, width, init_image = check_request(prompt, height, width, multiple=2 * self.vae.cfg.downscale, init_image=init_image,
                                                  latents=latents, output_type=output_type)
        settings = check_settings(self.variant, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                  cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation)
        use_cfg = settings.guidance > 0
        sigmas = self.scheduler.schedule(settings.steps, image_seq_len(self.vae, height, width))  # (steps + 1,)
        if init_image is None:
            latents, start = start_noise(self.vae, height=height, width=width, seed=seed, latents=latents, device=self.device,
                                         dtype=torch.float32), 0
        else:
            latents, start = prepare_img2img(self.vae, init_image, sigmas, height=height, width=width, strength=strength, seed=seed,
                                             device=self.device, dtype=torch.float32)
        features, mask = encode_prompts(self.text_encoder, prompt, negative_prompt, cfg=use_cfg, max_length=settings.max_sequence_length,
                                        device=self.device, offload=self.offload_text_encoder)
        predict = predictor(self.transformer, features=features, mask=mask, sigmas=sigmas, settings=settings, device=self.device)
        latents = denoise(predict, latents, sigmas, start, progress=progress, desc=self.variant)  # (1, C, h, w) fp32
        return latents if output_type == "latent" else decode_latents(self.vae, latents)[0]
