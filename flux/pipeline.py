"""FLUX.1 and its tools without diffusers: prompt (and images) -> PIL image.

    pipe = FluxPipeline.from_pretrained("FLUX.1-schnell")
    pipe.generate("a red fox in snow", seed=0).save("fox.png")
    pipe.generate("a red fox in snow", init_image="photo.png", mask="mask.png")    # inpainting
    FluxPipeline.from_pretrained("FLUX.1-Fill-dev").generate("a cup", init_image=photo, outpaint=(0, 0, 256, 0))
    FluxPipeline.from_pretrained("FLUX.1-Kontext-dev").generate("make it winter", reference_images=[photo])

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

The tasks, each a keyword argument of generate() (check_task() says which one a call asks for):
- image to image (dev, schnell): init_image= and strength= (0.6) crop the schedule;
- inpainting (dev, schnell): init_image= and mask= (white = repaint); after every step the known
  region is put back, re-noised to the next sigma (common.pipeline.prepare_inpaint);
- Fill (flux-fill): init_image= with mask= or outpaint=(left, top, right, bottom) pixels; the masked
  image and the mask enter as extra input channels (flux/tools.py); 50 steps, guidance 30;
- Canny / Depth (flux-canny, flux-depth): control_image= (optionally control_preprocess="canny") enters as
  extra input channels;
- Kontext (flux-kontext): reference_images=[image] become extra image tokens at positions (1, row, col);
- Redux (after load_redux(), any variant but Kontext): reference_images=[...] become extra text tokens
  (flux/redux.py).
"""

from pathlib import Path
from typing import Callable

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from zflux.common.fp8 import apply_precision, check_precision
from zflux.common.graphs import forward_of
from zflux.common.identify import check_family, named_variant
from zflux.common.images import PREPROCESSORS, open_image, outpaint_canvas
from zflux.common.latents import pack_latents, unpack_latents
from zflux.common.lora import KeyMap, LoraPipeline, LoraSet
from zflux.common.pipeline import (Blend, Predict, Variant, check_request, decode_latents, default_device, denoise, encode_prompts,
                                   image_seq_len, open_snapshot, prepare_img2img, prepare_inpaint, read_scheduler, start_noise)
from zflux.common.offload import Offload, graphs_allowed, load_device, on_device_for, resolve_mode
from zflux.common.sampling import NUM_TRAIN_TIMESTEPS, SamplingDefaults, SchedulerConfig, cfg_combine
from zflux.common.step_cache import step_cache
from zflux.common.vae import Autoencoder, check_autoencoder, load_autoencoder
from zflux.common.weights import CheckpointError
from zflux.flux.convert import check_transformer, load_transformer, to_diffusers
from zflux.flux.lora import CONTROL_INPUT, XLABS, widen_input
from zflux.flux.model import PRESETS, Flux, FluxConfig
from zflux.flux.redux import ReduxImageEncoder, redux_conditioning
from zflux.flux.text import FluxPromptEncoder
from zflux.flux.tools import (KONTEXT_MAX_AREA, REFERENCE_INDEX, Conditioning, kontext_output_size,
                              prepare_control, prepare_fill, prepare_kontext, with_conditioning)

# schnell is distilled for 4 unshifted steps and has no guidance input; dev and every tool embed the
# guidance scale as a model input and shift their sigmas by the scheduler's mu, which grows with the
# number of image tokens (they ship dev's scheduler config). The tools' defaults: Fill as
# FluxFillPipeline; Canny and Depth as BFL's reference code (guidance 30 and 10, 50 steps); Kontext as
# FluxKontextPipeline; Redux (dev with reference images) as diffusers' and BFL's examples.
DEV_SCHEDULER = SchedulerConfig(shift=3.0, use_dynamic_shifting=True)  # shift unused: mu decides


def guidance_distilled(preset: str, steps: int, guidance: float) -> Variant:
    """A variant of dev's kind: the transformer preset `preset`, dev's scheduler, 512 T5 tokens and these defaults."""
    return Variant(model=PRESETS[preset], scheduler=DEV_SCHEDULER,
                   defaults=SamplingDefaults(steps=steps, guidance=guidance, max_sequence_length=512))


VARIANTS = {
    "flux-schnell": Variant(model=PRESETS["flux-schnell"], scheduler=SchedulerConfig(shift=1.0),
                            defaults=SamplingDefaults(steps=4, guidance=0.0, max_sequence_length=256)),
    "flux-dev": guidance_distilled("flux-dev", steps=28, guidance=3.5),
    "flux-fill": guidance_distilled("flux-fill", steps=50, guidance=30.0),
    "flux-canny": guidance_distilled("flux-canny", steps=50, guidance=30.0),
    "flux-depth": guidance_distilled("flux-depth", steps=50, guidance=10.0),
    "flux-kontext": guidance_distilled("flux-kontext", steps=28, guidance=3.5),
    "flux-redux": guidance_distilled("flux-dev", steps=50, guidance=2.5),
}
# What identify() reads off a FLUX.1 transformer -> the variants it can run as: dev's shapes are also Kontext's
# (unless a name says Kontext) and Redux runs on dev; Canny's shapes are Depth's (unless a name says which).
RUNS_AS = {"flux-schnell": ("flux-schnell",), "flux-dev": ("flux-dev", "flux-kontext", "flux-redux"), "flux-kontext": ("flux-kontext",),
           "flux-fill": ("flux-fill",), "flux-canny-or-depth": ("flux-canny", "flux-depth"), "flux-canny": ("flux-canny",),
           "flux-depth": ("flux-depth",)}
SNAPSHOT_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxFillPipeline", "FluxControlPipeline",
                      "FluxKontextPipeline")
# zflux's own small dev-shaped model, trained on drawn scenes (flux/training.py), shipped as a snapshot folder.
EMBEDDED_MODEL = Path(__file__).parent / "embedded"
EMBEDDED_SIZE = 128  # pixels, both sides: the size it was trained at
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
TOOL_TASKS = {"flux-fill": "fill", "flux-canny": "control", "flux-depth": "control", "flux-kontext": "kontext"}
STRENGTH = {"img2img": 0.6, "inpaint": 0.6, "fill": 1.0}  # each task's default, as its diffusers pipeline's


def check_settings(variant: str, negative_prompt: str | None = None, true_cfg: float = 1.0, **given) -> SamplingDefaults:
    """The variant's sampling defaults with the `given` ones (None: unset) in their place, checked before any work."""
    variant_cfg = VARIANTS[variant]
    if given.get("guidance") is not None and not variant_cfg.model.guidance_embeds:
        raise ValueError(f"{variant} has no guidance input: leave guidance unset")
    if negative_prompt is not None and true_cfg <= 1:
        raise ValueError("FLUX.1 uses a negative prompt only with true CFG: set true_cfg > 1")
    return variant_cfg.defaults.given(**given)


def img_ids(batch: int, h: int, w: int, device: torch.device | str | None = None, index: int = 0) -> Tensor:
    """(B, h*w, 3) RoPE positions (index, row, col) of an h x w grid of packed tokens (h, w = latent H/2, W/2);
    `index` is 0 for the image generated, REFERENCE_INDEX for a Kontext reference."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")  # (h, w) each
    ids = torch.stack([torch.full_like(rows, index), rows, cols], dim=-1)  # (h, w, 3)
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
              true_cfg: float, device: torch.device, conditioning: Conditioning = Conditioning(), cuda_graphs: bool = False,
              modulations_ahead: bool = False) -> Predict:
    """predict(tokens, i) for denoise over the packed tokens (1, S, 64) of an h x w latent (`size`): one transformer call per step.

    `features` and `pooled` hold the prompt's text, or with true CFG the prompt's and the negative
    prompt's (one batch of 2). dev reads `guidance` as a model input; schnell has none. A tool's
    `conditioning` joins the tokens on the way in (flux.tools.with_conditioning); only the S
    predictions for the image being generated come out. Times and positions are settled here, so
    that the loop adds no host sync; with `cuda_graphs` each call replays a CUDA graph (common/graphs.py).
    With `modulations_ahead` the first call takes every step's block modulations at once (Flux.modulations: their
    weights are read once per run, not once per step), for a transformer whose blocks are on the device whole then.
    """
    n, L = features.shape[:2]  # n = 2 with true CFG: conditional row, then the unconditional one
    S = size[0] // 2 * size[1] // 2
    times = flux_time(sigmas, transformer.dtype).to(device)  # (steps + 1,) rounded like the latents (transformer's dtype)
    image_ids = img_ids(n, size[0] // 2, size[1] // 2, device=device)  # (n, S, 3)
    if conditioning.reference is not None:
        reference_ids = img_ids(n, *conditioning.reference_grid, device=device, index=REFERENCE_INDEX)  # (n, S_ref, 3)
        image_ids = torch.cat([image_ids, reference_ids], dim=1)  # (n, S + S_ref, 3)
    text_ids = txt_ids(n, L, device)  # (n, L, 3)
    guidance_vec = embedded_guidance(guidance, n, device) if transformer.cfg.guidance_embeds else None  # (n,)
    forward = forward_of(transformer, cuda_graphs)
    ahead: list[Tensor] = []  # (steps, n, W) once taken

    def predict(tokens: Tensor, i: int) -> Tensor:
        t = times[i].expand(n)  # (n,)
        if modulations_ahead and not ahead:
            steps = len(times) - 1  # the last time (sigma 0) ends the run: no step is taken at it
            every = transformer.modulations(times[:steps].repeat_interleave(n), pooled.repeat(steps, 1),
                                            None if guidance_vec is None else guidance_vec.repeat(steps))  # (steps * n, W)
            ahead.append(every.view(steps, n, -1))
        x = with_conditioning(tokens.expand(n, -1, -1), conditioning)  # (n, S (+ S_ref), in_channels)
        out = forward(x, img_ids=image_ids, txt=features, txt_ids=text_ids, timesteps=t, y=pooled, guidance=guidance_vec,
                      modulations=ahead[0][i] if ahead else None)[:, :S]  # (n, S, 64)
        return cfg_combine(out[:1], out[1:], true_cfg - 1) if n == 2 else out  # (1, S, 64)

    return predict


def check_task(variant: str, *, init_image: bool, mask: bool, control_image: bool, control_preprocess: str | None,
               reference_images: int, outpaint: bool, redux: bool) -> str:
    """The task a generate() call asks of `variant` ("text", "img2img", "inpaint", "fill", "control", "kontext" or
    "redux"), given which inputs it has (`reference_images`: how many; `redux`: Redux is loaded), or a ValueError
    naming the first input that does not fit. Reads no image, so the CLI checks its flags with it before loading."""
    task = TOOL_TASKS.get(variant) or ("inpaint" if mask else "img2img" if init_image else "text")
    if mask and not init_image:
        raise ValueError("a mask needs the image it masks (init_image=, --init-image)")
    if mask and task not in ("inpaint", "fill"):
        raise ValueError(f"{variant} takes no mask: inpaint with flux-dev, flux-schnell or flux-fill")
    if outpaint and task != "fill":
        raise ValueError(f"outpainting needs FLUX.1 Fill (flux-fill), not {variant}")
    if task == "fill" and not (init_image and (mask or outpaint)):
        raise ValueError("FLUX.1 Fill needs an init image and a mask, or outpaint (left, top, right, bottom) to grow it")
    if control_image != (task == "control"):
        raise ValueError(f"{variant} needs a control image (control_image=, --control-image): edges or a depth map"
                         if task == "control" else f"a control image goes with FLUX.1 Canny or Depth (flux-canny, flux-depth), not {variant}")
    if control_preprocess is not None and (variant != "flux-canny" or control_preprocess not in PREPROCESSORS):
        raise ValueError(f"control_preprocess {control_preprocess!r}: the one preprocessor is 'canny', for flux-canny's control image")
    if task in ("control", "kontext") and init_image:
        image = "the control image" if task == "control" else "a reference image"
        raise ValueError(f"{variant} starts from noise: give its image as {image}, not as an init image")
    if task == "kontext":
        if reference_images != 1:
            raise ValueError(f"FLUX.1 Kontext edits one reference image (reference_images=[image], --reference-image); got {reference_images}")
        return task
    if variant == "flux-redux" and not reference_images:
        raise ValueError("flux-redux needs one or more reference images to condition on (reference_images=, --reference-image)")
    if reference_images and not redux:
        raise ValueError(f"{variant} takes reference images through FLUX.1 Redux: load it first (load_redux(), or --model flux-redux "
                         "--redux FOLDER); to edit an image use flux-kontext")
    return "redux" if task == "text" and reference_images else task


def shape_of(cfg: FluxConfig) -> tuple[int, bool]:
    """What tells the variants' transformers apart: the input width and whether guidance is a model input."""
    return cfg.in_channels, cfg.guidance_embeds


def variant_of(cfg: FluxConfig) -> str:
    """The variant a transformer of these shapes runs as by default (dev for dev's shapes, which Kontext shares)."""
    defaults = {shape_of(VARIANTS[name].model): name for name in ("flux-fill", "flux-dev", "flux-schnell")}
    if shape_of(cfg) not in defaults:
        raise ValueError(f"no default FLUX.1 variant for {cfg.in_channels} input channels (Canny and Depth share their shapes): "
                         "pass variant=")
    return defaults[shape_of(cfg)]


class FluxPipeline(LoraPipeline):
    """FLUX.1 dev, schnell or a tool (Fill, Canny, Depth, Kontext): the transformer, the autoencoder, the T5 + CLIP prompt
    encoder, FLUX.1 Redux once load_redux() has run, and LoRAs (load_lora: common/lora.py)."""

    def __init__(self, transformer: Flux, vae: Autoencoder, text_encoder: FluxPromptEncoder,
                 scheduler: SchedulerConfig | None = None, offload_text_encoder: bool = False, variant: str | None = None,
                 offload: str = "none", device: str | torch.device | None = None):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.variant = variant or variant_of(transformer.cfg)
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown FLUX.1 variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if shape_of(VARIANTS[self.variant].model) != shape_of(transformer.cfg):
            raise ValueError(f"the transformer takes {transformer.cfg.in_channels} input channels"
                             f"{'' if transformer.cfg.guidance_embeds else ' and no guidance'}; {self.variant} does not")
        self.scheduler = scheduler or VARIANTS[self.variant].scheduler
        components = dict(text_encoder=text_encoder, transformer=transformer, vae=vae)
        self.offload = Offload(resolve_mode(offload, offload_text_encoder), components, device or transformer.img_in.weight.device)
        self.redux: ReduxImageEncoder | None = None
        self.cuda_graphs = True  # replay the transformer's forward and the decode as CUDA graphs, where the tensors are on a GPU

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                        offload_text_encoder: bool = False, variant: str | None = None, precision: str | None = None,
                        offload: str = "none") -> "FluxPipeline":
        """Load a diffusers snapshot folder of FluxPipeline or a tool's pipeline (model_index.json, transformer/, vae/,
        text_encoder/ + tokenizer/ (CLIP), text_encoder_2/ + tokenizer_2/ (T5), scheduler/); `variant`, if given, must
        fit the weights (see from_single_files)."""
        root = open_snapshot(path, SNAPSHOT_PIPELINES, SUBFOLDERS)
        return cls.from_single_files(root / "transformer", root / "vae", t5=root / "text_encoder_2", t5_tokenizer=root / "tokenizer_2",
                                     clip=root / "text_encoder", clip_tokenizer=root / "tokenizer", variant=variant, device=device,
                                     dtype=dtype, offload_text_encoder=offload_text_encoder, scheduler=read_scheduler(root / "scheduler"),
                                     precision=precision, offload=offload)

    @classmethod
    def from_single_files(cls, transformer: str | Path, vae: str | Path, t5: str | Path, t5_tokenizer: str | Path,
                          clip: str | Path, clip_tokenizer: str | Path, variant: str | None = None,
                          device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                          offload_text_encoder: bool = False, scheduler: SchedulerConfig | None = None,
                          precision: str | None = None, offload: str = "none") -> "FluxPipeline":
        """Load from a transformer file (BFL `flux1-dev.safetensors`, ComfyUI or diffusers layout), a VAE file
        (`ae.safetensors`) and the T5 / CLIP model and tokenizer folders. Weights go to `device` (default: the GPU), or wait on the
        CPU as `offload` (common/offload.py) says; precision "fp8" runs the transformer blocks' linears in fp8 (common/fp8.py).

        The variant is what the weights say (common.identify): their shapes, and where shapes are shared
        (dev and Kontext, Canny and Depth) a name; a given `variant` must be one the weights can run as.
        """
        check_precision(precision)
        info = check_family(transformer, "flux.1", " (for Z-Image use zflux.zimg.pipeline.ZImagePipeline)")
        runs_as = RUNS_AS.get(info.variant, ())
        variant = variant or info.variant
        if variant not in runs_as:
            told = f", not {variant}" if variant != info.variant else ""
            raise CheckpointError(f"{transformer} holds {info.description}{told}; run it as {' or '.join(runs_as or VARIANTS)} "
                                  "(variant=, --model)")
        check_family(vae, "autoencoder")
        check_transformer(transformer)  # every key and shape, from the headers: before any weight is read
        check_autoencoder(vae)
        device = torch.device(device) if device is not None else default_device()
        mode = resolve_mode(offload, offload_text_encoder)
        encoder = FluxPromptEncoder.from_pretrained(t5, t5_tokenizer, clip=clip, clip_tokenizer=clip_tokenizer,
                                                    device=load_device(mode, "text_encoder", device), dtype=dtype)
        model = apply_precision(load_transformer(transformer, load_device(mode, "transformer", device), dtype), precision)
        return cls(model, load_autoencoder(vae, device, dtype), text_encoder=encoder, scheduler=scheduler, variant=variant,
                   offload=mode, device=device)

    def load_redux(self, redux: str | Path, siglip: str | Path | None = None) -> None:
        """Load FLUX.1 Redux: its projector (BFL's flux1-redux-dev.safetensors, a diffusers image_embedder/ folder or the
        FLUX.1-Redux-dev snapshot) and SigLIP (google/siglip-so400m-patch14-384; default: the snapshot's image_encoder/).
        generate(prompt, reference_images=[...]) then conditions on those images."""
        if self.variant == "flux-kontext":
            raise ValueError("FLUX.1 Kontext takes its reference images itself; Redux goes with dev, schnell or their tools")
        encoder = ReduxImageEncoder.from_pretrained(redux, siglip or redux, device=self.device, dtype=self.transformer.dtype)
        if encoder.projector.cfg.txt_in_features != self.transformer.cfg.joint_attention_dim:
            raise CheckpointError(f"the Redux projector gives {encoder.projector.cfg.txt_in_features}-wide tokens; this transformer "
                                  f"reads {self.transformer.cfg.joint_attention_dim}")
        self.redux = encoder

    def lora_set(self) -> LoraSet:
        """LoRAs change the transformer and CLIP; a BFL Canny / Depth LoRA widens img_in and makes dev that tool."""
        return LoraSet({"transformer": KeyMap(self.transformer, to_diffusers, aliases=XLABS), "text_encoder": KeyMap(self.text_encoder.clip)},
                       family="flux.1", widen=(CONTROL_INPUT, self._control_lora))

    def _control_lora(self, path: Path, width: int) -> Callable[[], None]:
        undo_input, variant = widen_input(self.transformer, width), self.variant
        self.variant = "flux-depth" if named_variant(path) == "flux-depth" else "flux-canny"

        def undo() -> None:
            undo_input()
            self.variant = variant

        return undo

    @property
    def device(self) -> torch.device:
        return self.offload.device

    @torch.inference_mode()
    def generate(self, prompt: str, negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance: float | None = None, true_cfg: float = 1.0, seed: int = 0,
                 latents: Tensor | None = None, init_image: Image.Image | str | Path | None = None,
                 mask: Image.Image | str | Path | None = None, strength: float | None = None,
                 control_image: Image.Image | str | Path | None = None, control_preprocess: str | None = None,
                 reference_images: list[Image.Image | str | Path] | None = None, outpaint: tuple[int, int, int, int] | None = None,
                 max_area: int = KONTEXT_MAX_AREA, redux_prompt_scale: float = 1.0, redux_pooled_scale: float = 1.0,
                 cache: float | None = None, vae_tiling: bool | None = None, output_type: str = "pil",
                 progress: bool = True) -> Image.Image | Tensor:
        """Generate one image (output_type "pil") or its final latents (1, 16, H/8, W/8) ("latent").

        Unset arguments take the variant's defaults (VARIANTS: dev 28 steps, guidance 3.5; schnell 4
        steps, no guidance input; ...). `true_cfg` > 1 adds real CFG against `negative_prompt`
        (default empty), doubling the work per step. The size defaults to that of the init image (or
        Fill's grown canvas) rounded down to a multiple of 16, else 1024x1024 (a control image is
        resized to it, as in diffusers); Kontext then rescales it to `max_area` pixels (as
        FluxKontextPipeline). `latents` (unpacked) replaces the seeded initial noise. The tasks and
        their inputs: see the module docstring and check_task(); `strength` defaults to the task's
        (image to image and inpainting 0.6, Fill 1.0). Redux's tokens and pooled vector are scaled by
        `redux_prompt_scale` and `redux_pooled_scale`. `cache`: the first-block step cache's threshold
        (common/step_cache.py; None: off); `vae_tiling`: encode images and decode in tiles (True), whole (False) or in tiles only
        when the whole would not fit (None).
        """
        self.vae.tiling = vae_tiling  # for this run's image encodes (init, mask, control, reference images): encode_raw
        # The decode's graphs share the transformer's memory pool (common/graphs.py): graphed with it, or not at all.
        self.vae.cuda_graphs = graphs = self.cuda_graphs and graphs_allowed(self.offload, cache)
        init_image, mask, control_image = open_image(init_image), open_image(mask), open_image(control_image)
        references = [open_image(image) for image in reference_images or []]
        task = check_task(self.variant, init_image=init_image is not None, mask=mask is not None, control_image=control_image is not None,
                          control_preprocess=control_preprocess, reference_images=len(references), outpaint=outpaint is not None,
                          redux=self.redux is not None)
        if outpaint is not None:
            init_image, mask = outpaint_canvas(init_image, outpaint, mask)
        height, width, init_image = check_request(prompt, height, width, multiple=2 * self.vae.cfg.downscale, init_image=init_image,
                                                  latents=latents, output_type=output_type)
        if task == "kontext":
            height, width = kontext_output_size(height, width, max_area)
        settings = check_settings(self.variant, negative_prompt=negative_prompt, true_cfg=true_cfg, steps=steps, guidance=guidance)
        use_cfg = true_cfg > 1
        if use_cfg and references and task != "kontext":
            raise ValueError("FLUX.1 Redux runs without true CFG: leave true_cfg at 1")
        strength = STRENGTH.get(task, 1.0) if strength is None else strength

        sigmas = self.scheduler.schedule(settings.steps, image_seq_len(self.vae, height, width))  # (steps + 1,)
        latents, start, conditioning, blend = self._start(task, sigmas, height=height, width=width, seed=seed, latents=latents,
                                                          init_image=init_image, mask=mask, strength=strength,
                                                          control_image=control_image, control_preprocess=control_preprocess,
                                                          references=references)
        features, pooled = encode_prompts(self.text_encoder, prompt, negative_prompt, cfg=use_cfg, max_length=settings.max_sequence_length,
                                          offload=self.offload)
        if references and task != "kontext":
            features, pooled = redux_conditioning(features, pooled, self.redux(references), prompt_scale=redux_prompt_scale,
                                                  pooled_scale=redux_pooled_scale)
        predict = predictor(self.transformer, features=features, pooled=pooled, size=latents.shape[2:], sigmas=sigmas,
                            guidance=settings.guidance, true_cfg=true_cfg, device=self.device, conditioning=conditioning,
                            cuda_graphs=graphs, modulations_ahead=on_device_for(self.offload, "transformer", "denoise"))
        with self.offload.stage("denoise"), step_cache(self.transformer, cache):
            tokens = denoise(predict, pack_latents(latents), sigmas, start, blend=blend, progress=progress, desc=self.variant)  # (1, S, 64)
        latents = unpack_latents(tokens, *latents.shape[2:])  # (1, C, h, w)
        if output_type == "latent":
            return latents
        with self.offload.stage("decode"):
            return decode_latents(self.vae, latents, vae_tiling)[0]

    def _start(self, task: str, sigmas: Tensor, *, height: int, width: int, seed: int, latents: Tensor | None,
               init_image: Image.Image | None, mask: Image.Image | None, strength: float, control_image: Image.Image | None,
               control_preprocess: str | None, references: list[Image.Image]) -> tuple[Tensor, int, Conditioning, Blend | None]:
        """The task's start latents (1, C, h, w), first step, model-input conditioning and per-step blend."""
        where = dict(height=height, width=width, seed=seed, device=self.device, dtype=self.transformer.dtype)
        if task == "img2img":
            return *prepare_img2img(self.vae, init_image, sigmas, strength=strength, **where), Conditioning(), None
        if task == "inpaint":
            latents, start, blend = prepare_inpaint(self.vae, init_image, mask, sigmas, strength=strength, layout=pack_latents, **where)
            return latents, start, Conditioning(), blend
        if task == "fill":
            return *prepare_fill(self.vae, init_image, mask, sigmas, strength=strength, **where), None
        if task == "control":
            latents, conditioning = prepare_control(self.vae, control_image, preprocess=control_preprocess, latents=latents, **where)
            return latents, 0, conditioning, None
        noise = start_noise(self.vae, latents=latents, **where)
        conditioning = prepare_kontext(self.vae, references[0], device=self.device, dtype=self.transformer.dtype) \
            if task == "kontext" else Conditioning()
        return noise, 0, conditioning, None
