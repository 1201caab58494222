"""FLUX.2 without diffusers: prompt (+ reference images, or an image and a mask) -> PIL image.

    pipe = Flux2Pipeline.from_pretrained("FLUX.2-klein-4B")
    pipe.generate("a red fox in snow", seed=0).save("fox.png")
    pipe.generate("the fox in a top hat", reference_images=["fox.png"]).save("hat.png")

The steps, as diffusers' Flux2Pipeline / Flux2KleinPipeline / Flux2KleinKVPipeline /
Flux2KleinInpaintPipeline take them:
1. The LLM encodes the prompt to 512 tokens of stacked hidden states (text.py).
2. Noise (1, 128, H/16, W/16) is drawn from the seed, in the shape diffusers draws it, and
   flattened row-major into tokens (1, H/16 * W/16, 128) at positions (0, row, col, 0).
3. Each reference image (editing) is resized as diffusers does, encoded to its latent mean,
   patchified and standardized (Autoencoder.normalize) and appended after the noisy tokens at
   positions (10 + 10 j, row, col, 0). klein inpainting appends the source image as reference 0.
4. Per sigma, the transformer predicts the velocity noise - image for an Euler step; the output
   rows of the references are dropped. [dev] embeds its guidance scale (one call per step);
   distilled klein takes no guidance; klein base runs true CFG against the empty prompt (both rows
   in one batch); klein KV runs its references only in the first step and keeps their K/V.
5. The tokens are unpacked, de-standardized and unpatchified, and the autoencoder decodes them.

The schedule: sigmas 1 .. 1/N shifted by exp(mu), where mu (`empirical_mu`) depends on the number
of target image tokens and on the number of steps N.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from zflux.common.fp8 import apply_precision, check_precision
from zflux.common.graphs import forward_of
from zflux.common.identify import check_family, flux2_mode, flux2_variant
from zflux.common.images import fit_image, mask_tensor, open_image, to_tensor
from zflux.common.lora import KeyMap, LoraPipeline, LoraSet
from zflux.common.offload import Offload, graphs_allowed, load_device, resolve_mode
from zflux.common.pipeline import (Blend, Predict, Variant, check_request, decode_raw, default_device, denoise, encode_prompts,
                                   encode_raw, open_snapshot, read_scheduler)
from zflux.common.sampling import (NUM_TRAIN_TIMESTEPS, SamplingDefaults, SchedulerConfig, cfg_combine, img2img_start,
                                   initial_noise, inpaint_blend, noise_latent, sigma_schedule)
from zflux.common.step_cache import step_cache
from zflux.common.vae import Autoencoder, check_autoencoder, load_autoencoder
from zflux.common.weights import CheckpointError
from zflux.flux.flux2.convert import load_transformer, to_diffusers
from zflux.flux.flux2.model import PRESETS, Flux2
from zflux.flux.flux2.text import MAX_LENGTH, Flux2PromptEncoder

PIXELS_PER_TOKEN = 16  # the autoencoder's 8x times the 2x2 patches
MAX_REFERENCE_AREA = 1024 * 1024  # larger reference (and inpainting) images are scaled down to this many pixels
MIN_REFERENCE_SIDE, MAX_ASPECT = 64, 8  # diffusers' Flux2ImageProcessor.check_image_input (BFL's cap_min_pixels)
MAX_REFERENCES = 10  # BFL's stated limit for FLUX.2 multi-reference editing
REF_TIME_STEP = 10  # reference j sits at RoPE time 10 + 10 j
SCHEDULER = SchedulerConfig(shift=3.0, use_dynamic_shifting=True)  # what FLUX.2 ships; mu is the pipeline's own


@dataclass(frozen=True)
class Flux2Variant(Variant):
    """A FLUX.2 variant: how it runs on top of the shared entry (model preset, scheduler, sampling defaults)."""

    cfg: bool = False  # klein base: true CFG against the empty prompt when guidance > 1
    kv: bool = False  # klein 9B KV: references run once, their K/V kept for the later steps


DISTILLED = SamplingDefaults(steps=4, guidance=1.0, max_sequence_length=MAX_LENGTH)  # 1.0: no guidance at all
BASE = SamplingDefaults(steps=50, guidance=4.0, max_sequence_length=MAX_LENGTH)
VARIANTS = {
    "flux2-dev": Flux2Variant(PRESETS["flux2-dev"], SCHEDULER, BASE),  # guidance embedded in the model, one call per step
    "flux2-klein-4b": Flux2Variant(PRESETS["flux2-klein-4b"], SCHEDULER, DISTILLED),
    "flux2-klein-base-4b": Flux2Variant(PRESETS["flux2-klein-4b"], SCHEDULER, BASE, cfg=True),
    "flux2-klein-9b": Flux2Variant(PRESETS["flux2-klein-9b"], SCHEDULER, DISTILLED),
    "flux2-klein-base-9b": Flux2Variant(PRESETS["flux2-klein-9b"], SCHEDULER, BASE, cfg=True),
    "flux2-klein-9b-kv": Flux2Variant(PRESETS["flux2-klein-9b"], SCHEDULER, DISTILLED, kv=True),
}
SNAPSHOT_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline", "Flux2KleinInpaintPipeline")
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def check_settings(variant: str, negative_prompt: str | None = None, **given) -> SamplingDefaults:
    """The variant's sampling defaults with the `given` ones (None: unset) in their place, checked before any work."""
    entry = VARIANTS[variant]
    if given.get("guidance") is not None and variant != "flux2-dev" and not entry.cfg:
        raise ValueError(f"{variant} is distilled and takes no guidance: leave guidance unset (klein base runs CFG)")
    if negative_prompt is not None and not entry.cfg:
        raise ValueError(f"{variant} takes no negative prompt: only klein base runs CFG")
    return entry.defaults.given(**given)


def empirical_mu(image_seq_len: int, steps: int) -> float:
    """FLUX.2's time shift: linear in the image tokens, and below 4300 tokens also in the step count.

    BFL fitted two lines in the token count, for 10 and for 200 steps; between (and beyond) them mu
    is interpolated linearly in the steps. Larger images use the 200-step line alone.
    """
    at_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return float(at_200)
    at_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    slope = (at_200 - at_10) / 190.0
    intercept = at_200 - 200.0 * slope
    return float(slope * steps + intercept)


def flux2_sigmas(scheduler: SchedulerConfig, steps: int, image_seq_len: int) -> Tensor:
    """The (steps + 1,) sigmas: shifted by empirical_mu under the shipped dynamic shifting, else by the static shift."""
    if scheduler.use_dynamic_shifting:
        return sigma_schedule(steps, mu=empirical_mu(image_seq_len, steps))
    return sigma_schedule(steps, shift=scheduler.shift)


def flux2_time(sigmas: Tensor, dtype: torch.dtype) -> Tensor:
    """The transformer's times for `sigmas`: the timestep sigma * 1000 rounded to the latents' dtype, / 1000 (as diffusers)."""
    return (sigmas.float() * NUM_TRAIN_TIMESTEPS).to(dtype) / NUM_TRAIN_TIMESTEPS


def grid_ids(h: int, w: int, time: int = 0, device: torch.device | str | None = None) -> Tensor:
    """(1, h*w, 4) RoPE positions (time, row, col, 0) of an h x w token grid, row-major."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")  # (h, w) each
    ids = torch.stack([torch.full_like(rows, time), rows, cols, torch.zeros_like(rows)], dim=-1)  # (h, w, 4)
    return rearrange(ids, "h w n -> 1 (h w) n")


def text_ids(batch: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """(B, L, 4) RoPE positions (0, 0, 0, i) of L text tokens."""
    ids = torch.zeros(batch, length, 4, dtype=torch.long, device=device)
    ids[..., 3] = torch.arange(length, device=device)
    return ids


def to_tokens(latent: Tensor) -> Tensor:
    """(B, C, h, w) standardized patch latents -> (B, h*w, C) tokens, row-major."""
    return rearrange(latent, "b c h w -> b (h w) c")


def from_tokens(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h*w, C) tokens -> (B, C, h, w)."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w)


def checked_image(image: Image.Image | str | Path, what: str) -> Image.Image:
    """A PIL image, or the image file at a path, as RGB; anything else is a ValueError naming `what`."""
    if not isinstance(image, (Image.Image, str, Path)):
        raise ValueError(f"{what} must be a PIL image or an image file path, got {type(image).__name__}")
    return open_image(image).convert("RGB")


def cap_area(image: Image.Image) -> Image.Image:
    """`image` scaled down (Lanczos) to at most MAX_REFERENCE_AREA pixels, each side rounded down, as diffusers does."""
    if image.width * image.height <= MAX_REFERENCE_AREA:
        return image
    scale = math.sqrt(MAX_REFERENCE_AREA / (image.width * image.height))
    return image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.LANCZOS)


def reference_pixels(image: Image.Image | str | Path, index: int = 0) -> Tensor:
    """One reference image as diffusers prepares it: checked (sides >= 64, aspect <= 8), scaled to <= 1024^2 pixels,
    center-cropped to multiples of 16 -> (1, 3, h, w) in [-1, 1]."""
    image = checked_image(image, f"reference image {index}")
    w, h = image.size
    if min(w, h) < MIN_REFERENCE_SIDE or max(w / h, h / w) > MAX_ASPECT:
        raise ValueError(f"reference image {index} is {w}x{h}: both sides must be at least {MIN_REFERENCE_SIDE} pixels "
                         f"and the aspect ratio at most {MAX_ASPECT}:1")
    image = cap_area(image)
    w, h = image.width // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN, image.height // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return to_tensor(image.crop((left, top, left + w, top + h)))


def mask_pixels(mask: Image.Image | str | Path, image: Image.Image, width: int, height: int) -> Tensor:
    """The inpainting mask (white = repaint), of the init image's size, as diffusers' mask processor makes it for a
    width x height image -> (1, 1, height, width) of 0 and 1."""
    mask = checked_image(mask, "mask")
    if mask.size != image.size:
        raise ValueError(f"the mask is {mask.width}x{mask.height} but the init image is {image.width}x{image.height}")
    return mask_tensor(mask, width, height)


def check_inputs(variant: str, reference_images: list | None, init_image, mask, latents: Tensor | None = None) -> None:
    """Refuse a request `variant` cannot run, before any image is read or weight loaded (the CLI calls it first too)."""
    entry = VARIANTS[variant]
    if (init_image is None) != (mask is None):
        raise ValueError("FLUX.2 inpainting takes an init image and a mask together (white = repaint)")
    if init_image is not None and (variant == "flux2-dev" or entry.kv):
        raise ValueError(f"inpainting runs on FLUX.2 klein (distilled or base), not {variant}")
    if init_image is not None and latents is not None:
        raise ValueError("pass latents (initial noise) or init_image, not both")
    limit = MAX_REFERENCES - (init_image is not None)  # inpainting's source image is reference 0
    if len(reference_images or ()) > limit:
        raise ValueError(f"{len(reference_images)} reference images: FLUX.2 takes at most {limit} here")


def encode_references(vae: Autoencoder, pixels: list[Tensor], first: int, device: torch.device,
                      dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Reference images (1, 3, h_j, w_j) -> their tokens (1, R, 128) in `dtype` and positions (1, R, 4), the j-th at
    time 10 (first + j + 1), each on its own grid: latent mean, standardized patches, row-major tokens."""
    tokens, ids = [], []
    for j, image in enumerate(pixels):
        latent = vae.normalize(encode_raw(vae, image.to(device, vae.dtype)))  # (1, 128, h_j, w_j)
        tokens.append(to_tokens(latent))
        ids.append(grid_ids(*latent.shape[2:], time=REF_TIME_STEP * (first + j + 1), device=device))
    return torch.cat(tokens, dim=1).to(dtype), torch.cat(ids, dim=1)


def predictor(transformer: Flux2, *, text: Tensor, size: tuple[int, int], sigmas: Tensor, guidance: float,
              refs: tuple[Tensor, Tensor] | None, kv: bool, device: torch.device, cuda_graphs: bool = False) -> Predict:
    """predict(tokens, i) for denoise over the target's tokens (1, h*w, 128): one transformer call per step.

    `text` holds the prompt's features, or with CFG the prompt's then the negative prompt's (one
    batch of 2, combined as uncond + guidance * (cond - uncond)). [dev] reads `guidance` as a model
    input. `refs` (tokens, positions) follow the target's tokens; with `kv` they run in the first
    call only, whose K/V later calls reuse. Times and positions are settled here, so that the loop
    adds no host sync; with `cuda_graphs` the calls without cached K/V replay CUDA graphs (common/graphs.py).
    """
    n, L = text.shape[:2]
    h, w = size
    times = flux2_time(sigmas, transformer.dtype).to(device)  # (steps + 1,)
    img_ids, txt_ids = grid_ids(h, w, device=device).expand(n, -1, -1), text_ids(n, L, device)  # (n, h*w, 4), (n, L, 4)
    guidance_vec = torch.full((n,), guidance, device=device) if transformer.cfg.guidance_embeds else None  # (n,)
    ref_tokens, ref_ids = (None, None) if refs is None else (r.expand(n, -1, -1) for r in refs)  # (n, R, 128), (n, R, 4)
    cache = []  # klein KV: the references' K/V, from the first call on
    forward = forward_of(transformer, cuda_graphs)

    def predict(tokens: Tensor, i: int) -> Tensor:
        t, x = times[i].expand(n), tokens.expand(n, -1, -1)  # (n,), (n, h*w, 128)
        if ref_tokens is None:
            out = forward(x, img_ids, text, txt_ids, t, guidance_vec)
        elif kv and not cache:
            out, ref_kv = transformer.extract_ref_kv(x, img_ids, text, txt_ids, t, ref_tokens, ref_ids, guidance_vec)
            cache.append(ref_kv)
        elif kv:
            out = transformer(x, img_ids, text, txt_ids, t, guidance_vec, ref_kv=cache[0])
        else:
            out = forward(torch.cat([x, ref_tokens], dim=1), torch.cat([img_ids, ref_ids], dim=1), text, txt_ids, t,
                          guidance_vec)[:, : h * w]  # the target's rows
        return cfg_combine(out[:1], out[1:], guidance - 1) if n == 2 else out  # (1, h*w, 128)

    return predict


class Flux2Pipeline(LoraPipeline):
    """FLUX.2 [dev] or [klein] (distilled, base, KV): the transformer, the 32-channel autoencoder and the LLM prompt encoder;
    LoRAs through load_lora (common/lora.py).

    With `offload` "text-encoder" (or offload_text_encoder) the LLM lives on the CPU and its layers stream through the
    GPU for each new prompt, past the resident transformer (so that [dev] runs on one 80 GB GPU); the other modes:
    common/offload.py.
    """

    def __init__(self, transformer: Flux2, vae: Autoencoder, text_encoder: Flux2PromptEncoder, variant: str,
                 scheduler: SchedulerConfig | None = None, offload_text_encoder: bool = False, offload: str = "none",
                 device: str | torch.device | None = None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown FLUX.2 variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        dev = variant == "flux2-dev"
        if transformer.cfg.guidance_embeds != dev:
            held = "[dev] (with a guidance embedder)" if transformer.cfg.guidance_embeds else "[klein] (no guidance embedder)"
            raise CheckpointError(f"the transformer is FLUX.2 {held}: it cannot run as {variant}")
        if vae.cfg.patch_size is None or transformer.cfg.in_channels != 4 * vae.cfg.latent_channels:
            raise CheckpointError(f"the transformer takes {transformer.cfg.in_channels} channels: it needs FLUX.2's autoencoder "
                                  f"({transformer.cfg.in_channels // 4} latent channels with batch-norm statistics)")
        expected_text = "mistral3" if dev else "qwen3"
        if text_encoder.model.config.model_type != expected_text or text_encoder.width != transformer.cfg.joint_attention_dim:
            raise CheckpointError(f"{variant} reads {transformer.cfg.joint_attention_dim} features from {expected_text}; the "
                                  f"text encoder is {text_encoder.model.config.model_type} giving {text_encoder.width}")
        self.transformer, self.vae, self.text_encoder, self.variant = transformer, vae, text_encoder, variant
        self.cuda_graphs = True  # replay the transformer's forward and the decode as CUDA graphs, where the tensors are on a GPU
        self.scheduler = scheduler or VARIANTS[variant].scheduler
        components = dict(text_encoder=text_encoder, transformer=transformer, vae=vae)
        self.offload = Offload(resolve_mode(offload, offload_text_encoder), components, device or transformer.img_in.weight.device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                        offload_text_encoder: bool = False, variant: str | None = None, precision: str | None = None,
                        offload: str = "none") -> "Flux2Pipeline":
        """Load a diffusers Flux2Pipeline / Flux2KleinPipeline / Flux2KleinKVPipeline / Flux2KleinInpaintPipeline snapshot
        (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/); `variant`, if given, must be the one
        the snapshot names (its pipeline class, `is_distilled` and the transformer's size)."""
        root = open_snapshot(path, SNAPSHOT_PIPELINES, SUBFOLDERS)
        found = snapshot_variant(root)
        if variant is not None and variant != found:
            raise CheckpointError(f"{root} is a {found} snapshot, not {variant}")
        return cls.from_single_files(root / "transformer", root / "vae", root / "text_encoder", root / "tokenizer", variant=found,
                                     device=device, dtype=dtype, offload_text_encoder=offload_text_encoder,
                                     scheduler=read_scheduler(root / "scheduler"), precision=precision, offload=offload)

    @classmethod
    def from_single_files(cls, transformer: str | Path, vae: str | Path, text_encoder: str | Path, tokenizer: str | Path,
                          variant: str | None = None, device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                          offload_text_encoder: bool = False, scheduler: SchedulerConfig | None = None,
                          precision: str | None = None, offload: str = "none") -> "Flux2Pipeline":
        """Load from a transformer file (BFL's `flux2-dev.safetensors`, a klein file, ComfyUI or diffusers layout), the
        autoencoder (`ae.safetensors` or a vae/ folder) and the text-encoder and tokenizer folders. A klein file runs as its
        distilled variant unless `variant` names the base or KV one. Weights go to `device` (default: the GPU); precision
        "fp8" runs the transformer blocks' linears in fp8 (common/fp8.py)."""
        check_precision(precision)
        info = check_family(transformer, "flux.2", " (FLUX.1 runs in zflux.flux.pipeline.FluxPipeline)")
        if variant is not None and variant not in VARIANTS:
            raise ValueError(f"unknown FLUX.2 variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if variant is not None and info.variant is not None and VARIANTS[variant].model != VARIANTS[info.variant].model:
            raise CheckpointError(f"{transformer} holds {info.description}: it cannot run as {variant}")
        if check_family(vae, "autoencoder").variant == "flux-vae":
            raise CheckpointError(f"{vae} is the 16-channel FLUX.1 autoencoder; FLUX.2 needs its 32-channel one (its ae.safetensors)")
        check_autoencoder(vae)  # every key and shape, from the header; the transformer's are checked as it loads, before any read
        device = torch.device(device) if device is not None else default_device()
        mode = resolve_mode(offload, offload_text_encoder)
        model = apply_precision(load_transformer(transformer, load_device(mode, "transformer", device), dtype), precision)
        variant = variant or info.variant or ("flux2-dev" if model.cfg.guidance_embeds else "flux2-klein-4b")
        encoder = Flux2PromptEncoder.from_pretrained(text_encoder, tokenizer, load_device(mode, "text_encoder", device), dtype)
        return cls(model, load_autoencoder(vae, device, dtype), encoder, variant, scheduler, offload=mode, device=device)

    def lora_set(self) -> LoraSet:
        """LoRAs change the transformer only (a file's text-encoder parts are skipped, as diffusers does)."""
        return LoraSet({"transformer": KeyMap(self.transformer, to_diffusers)}, family="flux.2")

    @property
    def device(self) -> torch.device:
        return self.offload.device

    @torch.inference_mode()
    def generate(self, prompt: str, negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int = 0,
                 reference_images: list[Image.Image | str | Path] | None = None, init_image: Image.Image | str | Path | None = None,
                 mask: Image.Image | str | Path | None = None, strength: float = 0.8, latents: Tensor | None = None,
                 cache: float | None = None, vae_tiling: bool | None = None, output_type: str = "pil",
                 progress: bool = True) -> Image.Image | Tensor:
        """Generate one image (output_type "pil") or its final raw latent (1, 32, H/8, W/8) ("latent").

        Unset arguments take the variant's defaults: [dev] 50 steps with embedded guidance 4.0; klein
        distilled (and KV) 4 steps, no guidance; klein base 50 steps, true CFG 4.0 against
        `negative_prompt` (default empty). `reference_images` (one or more) edit or combine images;
        the size then defaults to the first one's (as prepared), else to 1024x1024. `init_image` +
        `mask` (white = repaint) + `strength` inpaint with klein at the init image's size (scaled to
        at most 1024^2 pixels, rounded down to multiples of 16). `latents` (1, 128, H/16, W/16)
        replaces the seeded initial noise. `cache`: the first-block step cache's threshold (common/step_cache.py; None:
        off); `vae_tiling`: encode images and decode in tiles (True), whole (False) or in tiles only when the whole
        would not fit (None).
        """
        self.vae.tiling = vae_tiling  # for this run's image encodes (init, mask, control, reference images): encode_raw
        # The decode's graphs share the transformer's memory pool (common/graphs.py): graphed with it, or not at all.
        self.vae.cuda_graphs = graphs = self.cuda_graphs and graphs_allowed(self.offload, cache)
        entry = VARIANTS[self.variant]
        check_inputs(self.variant, reference_images, init_image, mask, latents)
        settings = check_settings(self.variant, negative_prompt=negative_prompt, steps=steps, guidance=guidance)
        refs = [reference_pixels(image, j) for j, image in enumerate(reference_images or [])]
        original = None if init_image is None else checked_image(init_image, "init image")
        if original is not None:
            source = cap_area(original)
            size = (source.height // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN, source.width // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN)
            if (height or size[0], width or size[1]) != size:
                raise ValueError(f"inpainting keeps the init image's size, {size[1]}x{size[0]} as prepared: leave height and width unset")
            height, width = size
        elif refs:
            height, width = height or refs[0].shape[2], width or refs[0].shape[3]
        height, width, _ = check_request(prompt, height, width, multiple=PIXELS_PER_TOKEN, latents=latents, output_type=output_type)
        h, w = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
        sigmas = flux2_sigmas(self.scheduler, settings.steps, h * w)  # (steps + 1,)

        cfg = entry.cfg and settings.guidance > 1
        text = encode_prompts(self.text_encoder, prompt, negative_prompt, cfg=cfg, max_length=settings.max_sequence_length,
                              offload=self.offload)  # (1 or 2, 512, joint_attention_dim)
        noise = self._noise((1, 4 * self.vae.cfg.latent_channels, h, w), seed, latents)  # (1, 128, h, w)
        if original is None:
            tokens, start, blend, known = to_tokens(noise), 0, None, None  # (1, h*w, 128)
        else:
            tokens, start, blend, known = self._prepare_inpaint(source, mask_pixels(mask, original, width, height), to_tokens(noise),
                                                                sigmas, strength)
        predict = predictor(self.transformer, text=text, size=(h, w), sigmas=sigmas, guidance=settings.guidance,
                            refs=self._references(refs, known, (h, w)), kv=entry.kv, device=self.device,
                            cuda_graphs=graphs)
        with self.offload.stage("denoise"), step_cache(self.transformer, cache):
            tokens = denoise(predict, tokens, sigmas, start, blend=blend, progress=progress, desc=self.variant)  # (1, h*w, 128)
        latent = self.vae.denormalize(from_tokens(tokens, h, w))  # (1, 32, H/8, W/8)
        if output_type == "latent":
            return latent
        with self.offload.stage("decode"):
            return decode_raw(self.vae, latent, vae_tiling)[0]

    def _prepare_inpaint(self, source: Image.Image, mask: Tensor, noise: Tensor, sigmas: Tensor,
                         strength: float) -> tuple[Tensor, int, Blend, Tensor]:
        """klein inpainting's start: the source's tokens noised to the step `strength` leaves, that step, the per-step blend
        that keeps the unmasked region at the source, and the source's clean tokens (1, h*w, 128) (also reference 0).

        `mask` (1, 1, H, W) is 1 where to repaint; it reaches the token grid by bilinear interpolation.
        """
        dtype, (H, W) = self.transformer.dtype, mask.shape[2:]
        pixels = to_tensor(fit_image(source, W, H)).to(self.device, dtype)  # (1, 3, H, W)
        known = to_tokens(self.vae.normalize(encode_raw(self.vae, pixels)).to(dtype))  # (1, h*w, 128)
        start = img2img_start(sigmas, strength)
        grid = (H // PIXELS_PER_TOKEN, W // PIXELS_PER_TOKEN)
        repaint = to_tokens(F.interpolate(mask.to(self.device), size=grid, mode="bilinear").to(dtype))  # (1, h*w, 1)
        return (noise_latent(known, noise, sigmas[start]), start,
                lambda x, i: inpaint_blend(x, known, noise, repaint, sigmas[i + 1]), known)

    def _noise(self, shape: tuple[int, ...], seed: int, latents: Tensor | None) -> Tensor:
        """The initial noise in diffusers' shape (1, 128, h, w): `latents` if given, else drawn from `seed`."""
        if latents is None:
            return initial_noise(shape, seed, device=self.device, dtype=self.transformer.dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this size, got {tuple(latents.shape)}")
        return latents.to(self.device, self.transformer.dtype)

    def _references(self, pixels: list[Tensor], source: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor] | None:
        """Reference tokens (1, R, 128) and positions (1, R, 4): inpainting's `source` tokens first (time 10), then the images."""
        parts = [] if source is None else [(source, grid_ids(*size, time=REF_TIME_STEP, device=self.device))]
        if pixels:
            parts.append(encode_references(self.vae, pixels, first=len(parts), device=self.device, dtype=self.transformer.dtype))
        if not parts:
            return None
        return torch.cat([tokens for tokens, _ in parts], dim=1), torch.cat([ids for _, ids in parts], dim=1)


def snapshot_variant(root: Path) -> str:
    """The variant a snapshot folder holds: the transformer's size and the mode model_index.json names (identify)."""
    info = check_family(root / "transformer", "flux.2", " (FLUX.1 runs in zflux.flux.pipeline.FluxPipeline)")
    if info.variant in VARIANTS:
        return info.variant
    mode = flux2_mode(root / "transformer")  # a transformer of no known size: the settings of the size its mode ships in
    return "flux2-dev" if mode is None else flux2_variant("flux2-klein-9b" if mode == "kv" else "flux2-klein-4b", mode)
