"""FLUX.1 text-to-image (and image-to-image) without diffusers: prompt -> PIL image.

    pipe = FluxPipeline.from_pretrained("FLUX.1-schnell")
    pipe.generate("a red fox in snow", seed=0).save("fox.png")

The steps, as diffusers' FluxPipeline takes them:
1. Latents (1, 16, H/8, W/8) start as noise in the transformer's dtype at sigma 1 (or as the noised
   init image) and are packed into 2x2-patch tokens (1, H/16 * W/16, 64).
2. T5 encodes the prompt to exactly `max_sequence_length` tokens (dev 512, schnell 256) and CLIP to
   one pooled vector.
3. Per sigma, the transformer sees the tokens, the time sigma (1 = noise; rounded to the latents'
   dtype) and, for dev, the guidance scale as an input, and predicts the velocity noise - image for
   an Euler step. One model call per step: dev's guidance is distilled into the model. Optional true
   CFG (true_cfg > 1, against a negative prompt) runs both rows as one batch of 2 (predictor() below;
   common.pipeline.denoise runs the loop).
4. The tokens are unpacked and the autoencoder decodes latents / scaling_factor + shift_factor.

The schedule: schnell's even sigmas unshifted (4 steps); dev's shifted by the scheduler's mu, which
grows with the number of image tokens (28 steps, guidance 3.5).
"""

from pathlib import Path

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from zflux.common.identify import check_family
from zflux.common.latents import pack_latents, unpack_latents
from zflux.common.pipeline import (Predict, Variant, check_request, decode_latents, default_device, denoise, encode_prompts,
                                   image_seq_len, open_snapshot, prepare_img2img, read_scheduler, start_noise)
from zflux.common.sampling import NUM_TRAIN_TIMESTEPS, SamplingDefaults, SchedulerConfig, cfg_combine
from zflux.common.vae import Autoencoder, check_autoencoder, load_autoencoder
from zflux.common.weights import CheckpointError
from zflux.flux.convert import check_transformer, load_transformer
from zflux.flux.model import PRESETS, Flux
from zflux.flux.text import FluxPromptEncoder

# The variants this pipeline runs (the tools in PRESETS need pipelines of their own). schnell is distilled
# for 4 unshifted steps and has no guidance input; dev embeds its guidance scale as a model input and
# shifts its sigmas by the scheduler's mu, which grows with the number of image tokens.
VARIANTS = {
    "flux-schnell": Variant(model=PRESETS["flux-schnell"], scheduler=SchedulerConfig(shift=1.0),
                            defaults=SamplingDefaults(steps=4, guidance=0.0, max_sequence_length=256)),
    "flux-dev": Variant(model=PRESETS["flux-dev"], scheduler=SchedulerConfig(shift=3.0, use_dynamic_shifting=True),  # mu decides
                        defaults=SamplingDefaults(steps=28, guidance=3.5, max_sequence_length=512)),
}
SNAPSHOT_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline")
# zflux's own small dev-shaped model, trained on drawn scenes (flux/training.py), shipped as a snapshot folder.
EMBEDDED_MODEL = Path(__file__).parent / "embedded"
EMBEDDED_SIZE = 128  # pixels, both sides: the size it was trained at
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


def check_settings(variant: str, negative_prompt: str | None = None, true_cfg: float = 1.0, **given) -> SamplingDefaults:
    """The variant's sampling defaults with the `given` ones (None: unset) in their place, checked before any work."""
    variant_cfg = VARIANTS[variant]
    if given.get("guidance") is not None and not variant_cfg.model.guidance_embeds:
        raise ValueError(f"{variant} has no guidance input: leave guidance unset")
    if negative_prompt is not None and true_cfg <= 1:
        raise ValueError("FLUX.1 uses a negative prompt only with true CFG: set true_cfg > 1")
    return variant_cfg.defaults.given(**given)


def img_ids(batch: int, h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """(B, h*w, 3) RoPE positions (0, row, col) of an h x w grid of packed tokens (h, w = latent H/2, W/2)."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")  # (h, w) each
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)  # (h, w, 3)
    return rearrange(ids, "h w n -> 1 (h w) n").repeat(batch, 1, 1)  # (B, h*w, 3)


def txt_ids(batch: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """(B, L, 3) RoPE positions of L text tokens: all (0, 0, 0), so only their order within attention tells them apart."""
    return torch.zeros(batch, length, 3, dtype=torch.long, device=device)


def flux_time(sigma: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The time FLUX.1's transformer receives for `sigma`: the timestep sigma * 1000 rounded to the latents' dtype, / 1000.

    FluxPipeline rounds the timestep to the latents' dtype (bf16 in practice) before dividing; BFL's
    sampler rounds sigma itself to that dtype instead.
    """
    return (sigma.float() * NUM_TRAIN_TIMESTEPS).to(dtype) / NUM_TRAIN_TIMESTEPS


def embedded_guidance(scale: float, batch: int, device: torch.device | str = "cpu") -> Tensor:
    """FLUX.1 dev's guidance input (B,) fp32: distilled from CFG, the scale is a model input, one call per step."""
    return torch.full((batch,), scale, dtype=torch.float32, device=device)  # (B,)


def predictor(transformer: Flux, *, features: Tensor, pooled: Tensor, size: tuple[int, int], sigmas: Tensor, guidance: float,
              true_cfg: float, device: torch.device) -> Predict:
    """predict(tokens, i) for denoise over the packed tokens (1, S, 64) of an h x w latent (`size`): one transformer call per step.

    `features` and `pooled` hold the prompt's text, or with true CFG the prompt's and the negative
    prompt's (one batch of 2). dev reads `guidance` as a model input; schnell has none. Times and
    positions are settled here, so that the loop adds no host sync.
    """
    n, L = features.shape[:2]  # n = 2 with true CFG: conditional row, then the unconditional one
    times = flux_time(sigmas, transformer.dtype).to(device)  # (steps + 1,) rounded like the latents (transformer's dtype)
    image_ids = img_ids(n, size[0] // 2, size[1] // 2, device=device)  # (n, S, 3)
    text_ids = txt_ids(n, L, device)  # (n, L, 3)
    guidance_vec = embedded_guidance(guidance, n, device) if transformer.cfg.guidance_embeds else None  # (n,)

    def predict(tokens: Tensor, i: int) -> Tensor:
        t = times[i].expand(n)  # (n,)
        out = transformer(tokens.expand(n, -1, -1), img_ids=image_ids, txt=features, txt_ids=text_ids, timesteps=t, y=pooled,
                          guidance=guidance_vec)  # (n, S, 64)
        return cfg_combine(out[:1], out[1:], true_cfg - 1) if n == 2 else out  # (1, S, 64)

    return predict


class FluxPipeline:
    """FLUX.1 dev or schnell: the transformer, the autoencoder and the T5 + CLIP prompt encoder."""

    def __init__(self, transformer: Flux, vae: Autoencoder, text_encoder: FluxPromptEncoder,
                 scheduler: SchedulerConfig | None = None, offload_text_encoder: bool = False):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.variant = "flux-dev" if transformer.cfg.guidance_embeds else "flux-schnell"
        if transformer.cfg.in_channels != 4 * vae.cfg.latent_channels:
            raise ValueError(f"the transformer takes {transformer.cfg.in_channels} input channels; text-to-image needs "
                             f"{4 * vae.cfg.latent_channels} (the Fill, Canny and Depth tools are not supported)")
        self.scheduler = scheduler or VARIANTS[self.variant].scheduler
        self.offload_text_encoder = offload_text_encoder

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                        offload_text_encoder: bool = False, variant: str | None = None) -> "FluxPipeline":
        """Load a diffusers snapshot folder (model_index.json, transformer/, vae/, text_encoder/ + tokenizer/ (CLIP),
        text_encoder_2/ + tokenizer_2/ (T5), scheduler/); `variant`, if given, must match the weights."""
        root = open_snapshot(path, SNAPSHOT_PIPELINES, SUBFOLDERS)
        return cls.from_single_files(root / "transformer", root / "vae", t5=root / "text_encoder_2", t5_tokenizer=root / "tokenizer_2",
                                     clip=root / "text_encoder", clip_tokenizer=root / "tokenizer", variant=variant, device=device,
                                     dtype=dtype, offload_text_encoder=offload_text_encoder, scheduler=read_scheduler(root / "scheduler"))

    @classmethod
    def from_single_files(cls, transformer: str | Path, vae: str | Path, t5: str | Path, t5_tokenizer: str | Path,
                          clip: str | Path, clip_tokenizer: str | Path, variant: str | None = None,
                          device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                          offload_text_encoder: bool = False, scheduler: SchedulerConfig | None = None) -> "FluxPipeline":
        """Load from a transformer file (BFL `flux1-dev.safetensors`, ComfyUI or diffusers layout), a VAE file
        (`ae.safetensors`) and the T5 / CLIP model and tokenizer folders. Weights go to `device` (default: the GPU)."""
        info = check_family(transformer, "flux.1", " (for Z-Image use zflux.zimg.pipeline.ZImagePipeline)")
        if info.variant not in VARIANTS:
            raise CheckpointError(f"{transformer} holds {info.description}; this pipeline runs FLUX.1 dev and schnell")
        if variant is not None and variant != info.variant:
            raise CheckpointError(f"{transformer} holds {info.description}, not {variant}")
        check_family(vae, "autoencoder")
        check_transformer(transformer)  # every key and shape, from the headers: before any weight is read
        check_autoencoder(vae)
        device = torch.device(device) if device is not None else default_device()
        encoder = FluxPromptEncoder.from_pretrained(t5, t5_tokenizer, clip=clip, clip_tokenizer=clip_tokenizer,
                                                    device="cpu" if offload_text_encoder else device, dtype=dtype)
        return cls(load_transformer(transformer, device, dtype), load_autoencoder(vae, device, dtype), text_encoder=encoder,
                   scheduler=scheduler, offload_text_encoder=offload_text_encoder)

    @property
    def device(self) -> torch.device:
        return self.transformer.img_in.weight.device

    @torch.inference_mode()
    def generate(self, prompt: str, negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance: float | None = None, true_cfg: float = 1.0, seed: int = 0,
                 latents: Tensor | None = None, init_image: Image.Image | str | Path | None = None, strength: float = 0.6,
                 output_type: str = "pil", progress: bool = True) -> Image.Image | Tensor:
        """Generate one image (output_type "pil") or its final latents (1, 16, H/8, W/8) ("latent").

        Unset arguments take the variant's defaults (dev: 28 steps, guidance 3.5; schnell: 4 steps,
        no guidance input). `true_cfg` > 1 adds real CFG against `negative_prompt` (default empty),
        doubling the work per step. Size defaults to 1024x1024, or to the init image's size rounded
        down to a multiple of 16. `latents` (unpacked) replaces the seeded initial noise;
        `init_image` + `strength` runs image-to-image.
        """
        height, width, init_image = check_request(prompt, height, width, multiple=2 * self.vae.cfg.downscale, init_image=init_image,
                                                  latents=latents, output_type=output_type)
        settings = check_settings(self.variant, negative_prompt=negative_prompt, true_cfg=true_cfg, steps=steps, guidance=guidance)
        use_cfg = true_cfg > 1
        sigmas = self.scheduler.schedule(settings.steps, image_seq_len(self.vae, height, width))  # (steps + 1,)
        if init_image is None:
            latents, start = start_noise(self.vae, height=height, width=width, seed=seed, latents=latents, device=self.device,
                                         dtype=self.transformer.dtype), 0
        else:
            latents, start = prepare_img2img(self.vae, init_image, sigmas, height=height, width=width, strength=strength, seed=seed,
                                             device=self.device, dtype=self.transformer.dtype)
        features, pooled = encode_prompts(self.text_encoder, prompt, negative_prompt, cfg=use_cfg, max_length=settings.max_sequence_length,
                                          device=self.device, offload=self.offload_text_encoder)
        predict = predictor(self.transformer, features=features, pooled=pooled, size=latents.shape[2:], sigmas=sigmas,
                            guidance=settings.guidance, true_cfg=true_cfg, device=self.device)
        tokens = denoise(predict, pack_latents(latents), sigmas, start, progress=progress, desc=self.variant)  # (1, S, 64)
        latents = unpack_latents(tokens, *latents.shape[2:])  # (1, C, h, w)
        return latents if output_type == "latent" else decode_latents(self.vae, latents)[0]
