"""Z-Image without diffusers: prompt (and images) -> PIL image.

    pipe = ZImagePipeline.from_pretrained("Z-Image-Turbo")
    pipe.generate("a red fox in snow", seed=0).save("fox.png")
    pipe.load_controlnet("Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors")
    pipe.generate("a red fox in snow", control_image="pose.png", control_scale=0.75).save("fox_posed.png")
    omni = ZImagePipeline.from_pretrained("Z-Image-Omni")  # a ZImageOmniPipeline snapshot
    omni.generate("the same fox, in autumn", reference_images=["fox.png"]).save("fox_autumn.png")

The tasks, by what generate() is given:
- text to image, and image to image (`init_image`, `strength`);
- ControlNet text to image (`control_image`, with a ControlNet Union loaded: zimg/controlnet.py) and
  ControlNet inpainting (also `init_image` and `mask`): the control latents come from zimg/control.py,
  the ControlNet adds its hints inside each transformer call;
- Z-Image Omni (a ZImageOmniPipeline snapshot): text to image, or editing with one or more
  `reference_images` (zimg/reference.py, zimg/omni.py).

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

Turbo is distilled for 8 steps without CFG; the base model runs ~50 steps with CFG (guidance ~4), and
so does Omni (guidance 5). The ControlNet and Omni tasks start from noise at the requested size
(default 1024x1024; Omni: the last reference image's size) as their diffusers pipelines do.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import Tensor

from zflux.common.fp8 import apply_precision, check_precision
from zflux.common.graphs import forward_of
from zflux.common.identify import check_family
from zflux.common.images import PREPROCESSORS, open_image
from zflux.common.lora import KeyMap, LoraPipeline, LoraSet
from zflux.common.pipeline import (Predict, Variant, check_request, decode_latents, default_device, denoise, encode_prompts,
                                   image_seq_len, open_snapshot, prepare_img2img, prepare_inpaint, read_scheduler, start_noise)
from zflux.common.offload import Offload, graphs_allowed, load_device, resolve_mode, stays_on_device
from zflux.common.sampling import NUM_TRAIN_TIMESTEPS, SamplingDefaults, SchedulerConfig, cfg_combine
from zflux.common.step_cache import step_cache
from zflux.common.vae import Autoencoder, check_autoencoder, load_autoencoder
from zflux.common.weights import CheckpointError
from zflux.zimg.control import prepare_control, prepare_control_inpaint
from zflux.zimg.controlnet import ZImageControlNet
from zflux.zimg.convert import check_transformer, load_controlnet, load_omni_transformer, load_transformer, to_diffusers
from zflux.zimg.model import PRESETS, Stream, ZImageTransformer
from zflux.zimg.omni import ZImageOmniTransformer
from zflux.zimg.reference import SiglipEncoder, fit_reference, prepare_references
from zflux.zimg.text import OmniPromptEncoder, Qwen3PromptEncoder


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
    # Omni-Base is not published: the defaults are diffusers' ZImageOmniPipeline's, its shape is base's plus the
    # SigLIP2 width its checkpoint holds, and base's scheduler stands in until a snapshot brings its own.
    "z-image-omni": Variant(model=PRESETS["z-image"], scheduler=SchedulerConfig(shift=6.0),
                            defaults=ZImageDefaults(steps=50, guidance=5.0, max_sequence_length=512)),
}
OMNI = "z-image-omni"
SNAPSHOT_PIPELINES = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline", "ZImageControlNetPipeline",
                      "ZImageControlNetInpaintPipeline", "ZImageOmniPipeline")
# zflux's own small Turbo-shaped model, trained on drawn scenes (zimg/training.py), shipped as a snapshot folder.
EMBEDDED_MODEL = Path(__file__).parent / "embedded"
EMBEDDED_SIZE = 128  # pixels, both sides: the size it was trained at
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
EXTRA_SUBFOLDERS = {"ZImageControlNetPipeline": ("controlnet",), "ZImageControlNetInpaintPipeline": ("controlnet",),
                    "ZImageOmniPipeline": ("siglip", "siglip_processor")}
STRENGTH = {"img2img": 0.6, "inpaint": 1.0}  # each task's default, as its diffusers pipeline's


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


def guided(call: Callable[[Tensor, Tensor, int], Tensor], *, sigmas: Tensor, settings: ZImageDefaults, device: torch.device,
           dtype: torch.dtype) -> Predict:
    """predict(latents, i) for denoise around one model call per step, call(x (n, C, h, w), t (n,), n) -> (n, C, h, w):
    n = 2 (the conditional row, then the unconditional one, in one batch) while CFG is on, else 1.

    Times and CFG choices are settled here, so that the loop adds no host sync of its own.
    """
    use_cfg = settings.guidance > 0
    cfg_steps = [use_cfg and cfg_active(s, settings.cfg_truncation) for s in sigmas[:-1]]
    times = zimage_time(sigmas).to(device)  # (steps + 1,) model time 1 - sigma
    guidance, normalization = settings.guidance, settings.cfg_normalization

    def predict(latents: Tensor, i: int) -> Tensor:
        n = 2 if cfg_steps[i] else 1
        out = call(latents.to(dtype).expand(n, -1, -1, -1), times[i].expand(n), n)  # (n, C, h, w)
        pred = cfg_combine(out[:1], out[1:], scale=guidance, normalization=normalization) if n == 2 else out.float()  # (1, C, h, w)
        return -pred  # the model predicts image - noise

    return predict


def predictor(transformer: ZImageTransformer, *, features: Tensor, mask: Tensor, sigmas: Tensor, settings: ZImageDefaults,
              device: torch.device, control: Callable[[Stream], dict[int, Tensor]] | None = None,
              cuda_graphs: bool = False) -> Predict:
    """predict(latents, i) for Turbo and base (guided()): `features` and `mask` hold the prompt's caption, or with CFG
    the prompt's and the negative prompt's; `control` is a ControlNet's (ZImageControlNet.bind), for every call.

    The captions' lengths are read here once, so that the transformer makes no host sync per step even with a
    caption mask (CFG rows of unequal length); with `cuda_graphs` its calls replay CUDA graphs (common/graphs.py).
    """
    captions = {1: trim_captions(features[:1], mask[:1])}  # by batch size: the conditional row alone, or both rows
    if settings.guidance > 0:
        captions[2] = trim_captions(features, mask)
    lens = {n: None if m is None else tuple(m.sum(dim=1).tolist()) for n, (_, m) in captions.items()}  # host copies
    forward = forward_of(transformer, cuda_graphs and control is None)

    def call(x: Tensor, t: Tensor, n: int) -> Tensor:
        cap_feats, cap_mask = captions[n]
        return forward(x, t, cap_feats=cap_feats, cap_mask=cap_mask, control=control, cap_lens=lens[n])

    return guided(call, sigmas=sigmas, settings=settings, device=device, dtype=transformer.dtype)


def omni_predictor(transformer: ZImageOmniTransformer, *, captions: list[list[Tensor]], images: list[Tensor],
                   siglip: list[Tensor] | None, sigmas: Tensor, settings: ZImageDefaults, device: torch.device) -> Predict:
    """predict(latents, i) for Z-Image Omni (guided()): `captions` are the prompt's segments, or with CFG the prompt's
    and the negative prompt's; both rows see the same condition latents and SigLIP2 maps."""
    call = lambda x, t, n: transformer(x, t, captions[:n], images, siglip)  # noqa: E731
    return guided(call, sigmas=sigmas, settings=settings, device=device, dtype=transformer.dtype)


class ZImagePipeline(LoraPipeline):
    """Z-Image-Turbo, Z-Image base or Z-Image Omni: the transformer, the autoencoder, the Qwen3 prompt encoder,
    optionally a ControlNet Union (Turbo, base) or the SigLIP2 image encoder (Omni), and LoRAs (load_lora)."""

    def __init__(self, transformer: ZImageTransformer, vae: Autoencoder, text_encoder: Qwen3PromptEncoder, variant: str,
                 scheduler: SchedulerConfig | None = None, offload_text_encoder: bool = False,
                 controlnet: ZImageControlNet | None = None, siglip: SiglipEncoder | None = None, offload: str = "none",
                 device: str | torch.device | None = None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown Z-Image variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if (variant == OMNI) != isinstance(transformer, ZImageOmniTransformer) or (variant == OMNI) != (siglip is not None):
            raise ValueError("z-image-omni, and only it, runs an Omni transformer with a SigLIP2 encoder")
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.variant = variant
        self.scheduler = scheduler or VARIANTS[variant].scheduler
        self.controlnet, self.siglip = controlnet, siglip
        components = dict(text_encoder=text_encoder, transformer=transformer, vae=vae)
        self.offload = Offload(resolve_mode(offload, offload_text_encoder), components, device or transformer.x_embedder.weight.device)
        self.cuda_graphs = True  # replay the transformer's and Qwen3's forwards and the decode as CUDA graphs, where the tensors are on a GPU

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                        offload_text_encoder: bool = False, variant: str | None = None, precision: str | None = None,
                        offload: str = "none") -> "ZImagePipeline":
        """Load a diffusers snapshot folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)
        of ZImagePipeline or ZImageImg2ImgPipeline; ZImageControlNet(Inpaint)Pipeline (and its controlnet/); or
        ZImageOmniPipeline (and its siglip/, siglip_processor/).

        The variant (which sets the default steps and guidance) is z-image-omni for an Omni snapshot and
        otherwise comes from the scheduler config, unless given; a given one that contradicts either is an error.
        """
        root = open_snapshot(path, SNAPSHOT_PIPELINES, SUBFOLDERS)
        kind = json.loads((root / "model_index.json").read_text())["_class_name"]
        open_snapshot(root, (kind,), SUBFOLDERS + EXTRA_SUBFOLDERS.get(kind, ()))
        scheduler = read_scheduler(root / "scheduler")
        if kind == "ZImageOmniPipeline":
            shipped, why = OMNI, "a ZImageOmniPipeline snapshot"
        else:  # Turbo and base differ only in their schedulers
            shipped = next((name for name, v in VARIANTS.items() if v.scheduler == scheduler and name != OMNI), None)
            why = f"its scheduler shifts sigmas by {scheduler.shift}"
        if variant is None and shipped is None:
            raise CheckpointError(f"{root}: the scheduler (shift {scheduler.shift}) is neither Turbo's nor base's; pass variant=")
        if variant is not None and shipped is not None and variant != shipped:
            raise CheckpointError(f"{root} is {shipped} ({why}), not {variant}")
        siglip = (root / "siglip", root / "siglip_processor") if kind == "ZImageOmniPipeline" else None
        pipe = cls.from_single_files(root / "transformer", root / "vae", text_encoder=root / "text_encoder",
                                     tokenizer=root / "tokenizer", variant=variant or shipped, device=device, dtype=dtype,
                                     offload_text_encoder=offload_text_encoder, scheduler=scheduler, siglip=siglip,
                                     precision=precision, offload=offload)
        if "controlnet" in EXTRA_SUBFOLDERS.get(kind, ()):
            pipe.load_controlnet(root / "controlnet")
        return pipe

    @classmethod
    def from_single_files(cls, transformer: str | Path, vae: str | Path, text_encoder: str | Path, tokenizer: str | Path,
                          variant: str = "z-image-turbo", device: str | torch.device | None = None,
                          dtype: torch.dtype = torch.bfloat16, offload_text_encoder: bool = False,
                          scheduler: SchedulerConfig | None = None,
                          siglip: tuple[str | Path, str | Path] | None = None, precision: str | None = None,
                          offload: str = "none") -> "ZImagePipeline":
        """Load from a transformer file (official, ComfyUI or diffusers layout), a VAE file (`ae.safetensors`) and
        Qwen3 model and tokenizer folders; Omni also needs `siglip`, its SigLIP2 model and processor folders.
        Weights go to `device` (default: the GPU) in `dtype`, or wait on the CPU as `offload` (common/offload.py) says;
        precision "fp8" runs the transformer blocks' linears in fp8 (common/fp8.py)."""
        check_precision(precision)
        info = check_family(transformer, "z-image", " (for FLUX.1 use zflux.flux.pipeline.FluxPipeline)")
        omni = variant == OMNI
        if (info.variant == OMNI) != omni:
            use = "variant='z-image-omni' (--model z-image-omni)" if info.variant == OMNI else "variant 'z-image-turbo' or 'z-image'"
            raise CheckpointError(f"{transformer} holds {info.description}, not {variant}: load it as {use}")
        if omni and (siglip is None or not all(Path(folder).is_dir() for folder in siglip)):
            raise CheckpointError(f"Z-Image Omni needs its SigLIP2 encoder: siglip=(model folder, processor folder), got {siglip}")
        check_family(vae, "autoencoder")
        check_transformer(transformer, omni=omni)  # every key and shape, from the headers: before any weight is read
        check_autoencoder(vae)
        device = torch.device(device) if device is not None else default_device()
        mode = resolve_mode(offload, offload_text_encoder)
        encoder = Qwen3PromptEncoder.from_pretrained(text_encoder, tokenizer, device=load_device(mode, "text_encoder", device),
                                                     dtype=dtype)
        load = load_omni_transformer if omni else load_transformer
        return cls(apply_precision(load(transformer, load_device(mode, "transformer", device), dtype), precision),
                   load_autoencoder(vae, device, dtype), text_encoder=encoder, variant=variant, scheduler=scheduler, offload=mode,
                   device=device,
                   siglip=SiglipEncoder.from_pretrained(*siglip, device=device, dtype=dtype) if omni else None)

    def load_controlnet(self, path: str | Path) -> None:
        """Add a ControlNet Union (a published Z-Image-Turbo-Fun-Controlnet-Union*.safetensors file or a diffusers
        folder) for generate(control_image=...); one that does not fit this transformer is refused before loading."""
        self.controlnet = load_controlnet(path, self.transformer.cfg, device=self.device, dtype=self.transformer.dtype)

    def lora_set(self) -> LoraSet:
        """LoRAs change the transformer only (a file's Qwen3 parts are skipped, as diffusers does)."""
        return LoraSet({"transformer": KeyMap(self.transformer, to_diffusers)}, family="z-image")

    @property
    def device(self) -> torch.device:
        return self.offload.device

    @torch.inference_mode()
    def generate(self, prompt: str, negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int = 0, latents: Tensor | None = None,
                 init_image: Image.Image | str | Path | None = None, strength: float | None = None,
                 cfg_normalization: float | None = None, cfg_truncation: float | None = None,
                 control_image: Image.Image | str | Path | None = None, control_scale: float = 0.75,
                 control_preprocess: str | None = None, mask: Image.Image | str | Path | None = None,
                 reference_images: list[Image.Image | str | Path] | None = None,
                 cache: float | None = None, vae_tiling: bool | None = None, output_type: str = "pil",
                 progress: bool = True) -> Image.Image | Tensor:
        """Generate one image (output_type "pil") or its final latents (1, 16, H/8, W/8) fp32 ("latent").

        Unset arguments take the variant's defaults (Turbo: 8 steps, guidance 0; base: 50 steps,
        guidance 4; Omni: 50 steps, guidance 5). guidance > 0 turns on CFG against `negative_prompt`
        (default empty). Size defaults to 1024x1024, or to the init image's size rounded down to a
        multiple of 16 (image to image), or the last reference image's (Omni). `latents` replaces the
        seeded initial noise; `init_image` + `strength` runs image to image, and with a `mask` (white =
        repaint) inpainting: after every step the known region is put back, re-noised to the next sigma
        (common.pipeline.prepare_inpaint). `strength` defaults to the task's (image to image 0.6,
        inpainting 1.0, as diffusers' pipelines).
        With a ControlNet loaded: `control_image` (a canny, depth, pose... map, or a photo with
        `control_preprocess="canny"`) steers the image, its hints scaled by `control_scale`; adding
        `init_image` and `mask` (white = repaint) inpaints. Omni: `reference_images` (one or more) to edit or combine.
        `cache`: the first-block step cache's threshold (common/step_cache.py; None: off); `vae_tiling`: encode images and decode
        in tiles (True), whole (False) or in tiles only when the whole would not fit (None).
        """
        self.vae.tiling = vae_tiling  # for this run's image encodes (init, mask, control, reference images): encode_raw
        # The decode's graphs share the transformer's memory pool (common/graphs.py): graphed with it, or not at all.
        self.vae.cuda_graphs = graphs = self.cuda_graphs and graphs_allowed(self.offload, cache)
        self._check_task(init_image=init_image, control_image=control_image, control_preprocess=control_preprocess, mask=mask,
                         reference_images=reference_images)
        settings = check_settings(self.variant, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                  cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation)
        fitted = [fit_reference(open_image(image), height, width) for image in reference_images or []]
        if fitted:  # Omni's size defaults to the last reference image's
            height, width = height or fitted[-1][1].height, width or fitted[-1][1].width
        img2img = None if control_image is not None else init_image  # with a control image, init_image is to be inpainted
        height, width, img2img = check_request(prompt, height, width, multiple=2 * self.vae.cfg.downscale, init_image=img2img,
                                               latents=latents, output_type=output_type)
        use_cfg = settings.guidance > 0
        sigmas = self.scheduler.schedule(settings.steps, image_seq_len(self.vae, height, width))  # (steps + 1,)
        # Text to image draws its noise in fp32; an init image's run draws and noises it in the transformer's dtype and
        # steps on in fp32 (diffusers' Z-Image img2img and inpainting), which .float() of the start makes exact.
        where = dict(height=height, width=width, seed=seed, device=self.device, dtype=self.transformer.dtype)
        blend = None
        if img2img is not None and mask is not None:
            latents, start, blend = prepare_inpaint(self.vae, img2img, open_image(mask), sigmas, strength=STRENGTH["inpaint"]
                                                    if strength is None else strength, **where)
            latents = latents.float()
        elif img2img is not None:
            latents, start = prepare_img2img(self.vae, img2img, sigmas, strength=STRENGTH["img2img"] if strength is None else strength,
                                             **where)
            latents = latents.float()
        else:
            latents, start = start_noise(self.vae, latents=latents, **where | dict(dtype=torch.float32)), 0
        self.text_encoder.cuda_graphs = self.cuda_graphs and stays_on_device(self.offload, "text_encoder")
        encoder = OmniPromptEncoder(self.text_encoder, len(fitted)) if self.variant == OMNI else self.text_encoder
        text = encode_prompts(encoder, prompt, negative_prompt, cfg=use_cfg, max_length=settings.max_sequence_length,
                              offload=self.offload)
        if self.variant == OMNI:
            images, maps = prepare_references(self.vae, self.siglip, fitted, device=self.device, dtype=self.transformer.dtype)
            predict = omni_predictor(self.transformer, captions=text, images=images, siglip=maps if maps else None, sigmas=sigmas,
                                     settings=settings, device=self.device)
        else:
            control = None
            if control_image is not None:
                control = self._control(control_image, control_preprocess=control_preprocess, init_image=init_image, mask=mask,
                                        scale=control_scale, height=height, width=width)
            features, cap_mask = text
            predict = predictor(self.transformer, features=features, mask=cap_mask, sigmas=sigmas, settings=settings,
                                device=self.device, control=control,
                                cuda_graphs=graphs)
        with self.offload.stage("denoise"), step_cache(self.transformer, cache):
            latents = denoise(predict, latents, sigmas, start, blend=blend, progress=progress, desc=self.variant)  # (1, C, h, w) fp32
        if output_type == "latent":
            return latents
        with self.offload.stage("decode"):
            return decode_latents(self.vae, latents, vae_tiling)[0]

    def _control(self, control_image: Image.Image | str | Path, *, control_preprocess: str | None,
                 init_image: Image.Image | str | Path | None, mask: Image.Image | str | Path | None, scale: float, height: int,
                 width: int) -> Callable[[Stream], dict[int, Tensor]]:
        """The ControlNet's part of every transformer call: its control latents (text to image, or inpainting) bound to it."""
        control_image = open_image(control_image)
        if control_preprocess is not None:
            control_image = PREPROCESSORS[control_preprocess](control_image)
        size = dict(channels=self.controlnet.cfg.control_in_dim, height=height, width=width, device=self.device)
        if mask is None:
            context = prepare_control(self.vae, control_image, **size)
        else:
            context = prepare_control_inpaint(self.vae, control_image, open_image(init_image), open_image(mask), **size)
        return self.controlnet.bind(self.transformer, context, scale=scale)

    def _check_task(self, *, init_image, control_image, control_preprocess, mask, reference_images) -> None:
        """Refuse inputs this pipeline cannot use together, with one line saying what to do instead."""
        if self.variant == OMNI:
            if any(x is not None for x in (init_image, control_image, mask)):
                raise ValueError("Z-Image Omni edits through reference_images (--reference-image); init_image, control_image "
                                 "and mask are for Turbo and base")
        elif reference_images:
            raise ValueError("reference images are Z-Image Omni's: load a ZImageOmniPipeline snapshot (--model z-image-omni)")
        if control_image is not None and self.controlnet is None:
            raise ValueError("control_image needs a ControlNet: pipe.load_controlnet(path) (--controlnet FILE), or a "
                             "ZImageControlNetPipeline snapshot")
        if control_preprocess is not None and (control_image is None or control_preprocess not in PREPROCESSORS):
            raise ValueError(f"control_preprocess ({', '.join(PREPROCESSORS)}) turns a given control_image into the control "
                             f"map, got {control_preprocess!r}" + ("" if control_image is not None else " without a control_image"))
        if mask is not None and init_image is None:
            raise ValueError("a mask needs the image it masks (init_image=, --init-image)")
        if control_image is not None and init_image is not None and mask is None:
            raise ValueError("with a control_image, init_image is the image to inpaint: give its mask too (white = repaint)")
