"""The FLUX.1 tools and Z-Image inpainting at full size on the GPU, in bf16, against diffusers.

Transformer level, bf16 against diffusers' fp32 (test_flux_gpu.py's bar: our bf16 error at most 1.25x
diffusers' own): Fill (384 input channels), Canny / Depth (128) and Kontext (4096 image + 4096
reference tokens + 512 text tokens).

Pipeline level: every tool runs at 1024x1024 in bf16 with random weights at the real sizes of the
transformer, the autoencoder and, for Redux, SigLIP so400m and the Redux projector. The text encoders
are tiny random models with the real output widths (T5 4096, CLIP 768, Qwen3 2560): the real ones
(4.7 to 9 GB) would test nothing more here. diffusers' pipeline runs on the same weights and seed, in
bf16 and, as the reference, in fp32; after two steps our bf16 final latents are at most 1.25x as far
from the fp32 reference as diffusers' bf16 ones (the brief's bf16 bar, on whole pipelines: two bf16
implementations of a random full-size model drift 0.1 or more apart, so their distance to each other
says little). Each tool's code path runs on the CPU too, at tiny sizes in fp32 (test_tools_tiny_cpu),
where ours equals diffusers' within 1e-5.

Memory: one diffusers transformer at a time in bf16 (24 GB for FLUX.1, 12 GB for Z-Image) and ours
built on its tensors (the fused qkv / linear1 are new: 7 GB); the fp32 references of the transformer
level hold 48 GB, about 45 GiB at peak as in test_flux_gpu.py.
"""

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxControlPipeline,
    FluxFillPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxPriorReduxPipeline,
    FluxTransformer2DModel,
    ZImageInpaintPipeline,
    ZImageTransformer2DModel,
)
from diffusers import FluxPipeline as DiffusersFlux
from diffusers import ReduxImageEncoder as DiffusersRedux
from PIL import Image
from test_flux_gpu import bf16_errors
from test_vae import diffusers_config
from tiny_pipelines import (
    FLUX,
    SCHEDULERS,
    TEXT_DIM,
    VAE,
    ZIMAGE,
    flux_text_encoders,
    one_thread,
    qwen_encoder,
)
from tiny_tools import SIGLIP
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
from util import randomize_, rel_err
from zflux.common.images import outpaint_canvas
from zflux.common.vae import PRESETS as VAE_PRESETS
from zflux.common.vae import Autoencoder, AutoencoderConfig
from zflux.common.vae import from_diffusers as vae_from_diffusers
from zflux.flux.convert import from_diffusers as flux_from_diffusers
from zflux.flux.model import PRESETS as FLUX_PRESETS
from zflux.flux.model import Flux, FluxConfig
from zflux.flux.pipeline import FluxPipeline
from zflux.flux.redux import ReduxConfig, ReduxImageEncoder, ReduxProjector
from zflux.flux.text import FluxPromptEncoder
from zflux.zimg.convert import from_diffusers as zimage_from_diffusers
from zflux.zimg.model import PRESETS as ZIMAGE_PRESETS
from zflux.zimg.model import ZImageConfig, ZImageTransformer
from zflux.zimg.pipeline import ZImagePipeline
from zflux.zimg.text import Qwen3PromptEncoder

PROMPT = "a photo of a cat"
SEED = 5


@dataclass(frozen=True)
class Size:
    """Everything one scale of the test needs: model configs (diffusers kwargs), pixels per side, where it runs."""

    flux: dict  # FluxTransformer2DModel kwargs, less in_channels and guidance
    zimage: dict  # ZImageTransformer2DModel kwargs
    vae: dict  # AutoencoderKL kwargs
    siglip: dict  # SiglipVisionConfig kwargs
    text: tuple[int, int, int]  # T5, CLIP and Qwen3 output widths
    pixels: int
    device: str
    dtype: torch.dtype


def diffusers_kwargs(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}


def vae_kwargs(cfg: AutoencoderConfig) -> dict:
    return diffusers_config(cfg) | dict(use_quant_conv=False, use_post_quant_conv=False)


FLUX_FULL = {k: v for k, v in diffusers_kwargs(FLUX_PRESETS["flux-dev"]).items() if k not in ("in_channels", "out_channels", "guidance_embeds")}
FULL = Size(flux=FLUX_FULL, zimage=diffusers_kwargs(ZIMAGE_PRESETS["z-image-turbo"]), vae=vae_kwargs(VAE_PRESETS["flux"]),
            siglip=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
                        patch_size=14),
            text=(4096, 768, 2560), pixels=1024, device="cuda", dtype=torch.bfloat16)
TINY = Size(flux={k: v for k, v in FLUX.items() if k != "in_channels"}, zimage=ZIMAGE, vae=VAE, siglip=SIGLIP,
            text=(TEXT_DIM, TEXT_DIM, TEXT_DIM), pixels=64, device="cpu", dtype=torch.float32)  # bf16 convolutions crawl on the CPU


def random_model(module_factory, size: Size) -> torch.nn.Module:
    """A model built on meta, allocated in the size's dtype on its device and filled with random weights (norm scales ~1)."""
    with torch.device("meta"):
        model = module_factory()
    return randomize_(model.to(size.dtype).to_empty(device=size.device), std=0.02).eval()


def ours_from(state_dict: dict, build, convert) -> torch.nn.Module:
    """Our model sharing the reference's tensors (in their layout `convert` maps), built on meta."""
    with torch.device("meta"):
        model = build()
    model.load_state_dict(convert(state_dict), strict=True, assign=True)
    return model.eval()


class Parts:
    """The shared pieces of a scale: the autoencoder, text encoders and scheduler configs, diffusers' and ours."""

    def __init__(self, size: Size):
        self.size, device, dtype = size, size.device, size.dtype
        torch.manual_seed(0)
        self.vae = AutoencoderKL(**size.vae).to(device, dtype).eval()
        self.our_vae = ours_from(self.vae.state_dict(), lambda: Autoencoder(AutoencoderConfig.from_diffusers(size.vae)),
                                 vae_from_diffusers)
        t5_dim, clip_dim, qwen_dim = size.text
        self.flux_text = {k: v.to(device, dtype) if isinstance(v, torch.nn.Module) else v
                          for k, v in flux_text_encoders(t5_dim, clip_dim).items()}
        qwen, self.qwen_tokenizer = qwen_encoder(qwen_dim)
        self.qwen = qwen.to(device, dtype)

    def shared(self) -> list[torch.nn.Module]:
        """The modules every diffusers pipeline here holds beside its transformer."""
        return [self.vae, self.qwen, *(v for v in self.flux_text.values() if isinstance(v, torch.nn.Module))]

    def flux_common(self) -> dict:
        """diffusers' FLUX.1 pipelines' parts besides the transformer."""
        return dict(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS["flux-dev"]), vae=self.vae, **self.flux_text)

    def flux_encoder(self) -> FluxPromptEncoder:
        t = self.flux_text
        return FluxPromptEncoder(t["text_encoder_2"], t["tokenizer_2"], clip=t["text_encoder"], clip_tokenizer=t["tokenizer"])

    def flux(self, in_channels: int) -> tuple[FluxTransformer2DModel, Flux]:
        """A random FLUX.1 transformer of this input width (guidance-distilled), diffusers' and ours on its tensors."""
        kwargs = self.size.flux | dict(in_channels=in_channels, out_channels=64, guidance_embeds=True)
        ref = random_model(lambda: FluxTransformer2DModel(**kwargs), self.size)
        cfg = FluxConfig.from_diffusers(kwargs)
        return ref, ours_from(ref.state_dict(), lambda: Flux(cfg), flux_from_diffusers)


def free() -> None:
    """Give the memory of the models just dropped back before the next one is built (pipelines hold cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def photo(pixels: int, seed: int = 0, width: int | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return coarse.resize((width or pixels, pixels), Image.Resampling.BICUBIC)


def mask(pixels: int) -> Image.Image:
    image = Image.new("L", (pixels, pixels), 0)
    image.paste(255, (pixels // 4, pixels // 4, 3 * pixels // 4, 3 * pixels // 2))
    return image


class Case(NamedTuple):
    """One request to both pipelines: ours, and diffusers' made by `theirs()` in whatever dtype its modules are in now."""

    name: str
    ours: FluxPipeline | ZImagePipeline
    ours_kwargs: dict
    theirs: Callable[[], DiffusionPipeline]
    their_kwargs: Callable[[], dict]  # called after theirs() (Redux's prior embeds the reference in the current dtype)
    guidance: float = 3.5


def run_ours(case: Case) -> torch.Tensor:
    return case.ours.generate(PROMPT, seed=SEED, steps=2, guidance=case.guidance, output_type="latent", progress=False,
                              **case.ours_kwargs).float()


def run_theirs(case: Case, pixels: int) -> torch.Tensor:
    pipe = case.theirs()
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, guidance_scale=case.guidance) | case.their_kwargs()  # Redux's prior gives embeddings (prompt None)
    out = pipe(num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **kwargs).images
    return (out if out.ndim == 4 else DiffusersFlux._unpack_latents(out, pixels, pixels, 8)).float()


def compare(cases: list[Case], upcast: list[torch.nn.Module], pixels: int) -> dict[str, float]:
    """Each case's error: in fp32, ours against diffusers'; in bf16, the ratio of ours to diffusers' distance from diffusers
    in fp32 (the `upcast` modules, everything diffusers' pipelines hold, are moved to fp32 for it and back after)."""
    got = {case.name: run_ours(case) for case in cases}
    theirs = {case.name: run_theirs(case, pixels) for case in cases}
    dtype = next(upcast[0].parameters()).dtype
    if dtype == torch.float32:
        errors = {name: rel_err(got[name], theirs[name]) for name in got}
        for name, err in errors.items():
            print(f"\n{name} at {pixels}x{pixels} fp32: final latents {err:.2e} relative to diffusers'")
        return errors
    for case in cases:  # free our transformer's own tensors (the fused ones) before diffusers' is doubled in size
        case.ours.transformer = None
    free()
    for module in upcast:
        module.float()
    reference = {case.name: run_theirs(case, pixels) for case in cases}
    for module in upcast:
        module.to(dtype)
    errors = {}
    for name, ref in reference.items():
        ours, diffusers = rel_err(got[name], ref), rel_err(theirs[name], ref)
        errors[name] = ours / diffusers
        print(f"\n{name} at {pixels}x{pixels} bf16 vs diffusers fp32: diffusers {diffusers:.3e}, zflux {ours:.3e}, "
              f"ratio {errors[name]:.3f} (zflux vs diffusers bf16 {rel_err(got[name], theirs[name]):.3e})")
    return errors


def base_cases(parts: Parts) -> tuple[list[Case], list[torch.nn.Module]]:
    """FLUX.1 dev inpainting, Kontext and Redux on one 64-channel transformer, and every module diffusers' pipelines hold."""
    p, size, common = parts.size.pixels, dict(height=parts.size.pixels, width=parts.size.pixels), parts.flux_common()
    ref, ours = parts.flux(64)
    pipe = lambda variant: FluxPipeline(ours, parts.our_vae, parts.flux_encoder(), variant=variant)
    siglip = SiglipVisionModel(SiglipVisionConfig(**parts.size.siglip)).to(parts.size.device, parts.size.dtype).eval()
    processor = SiglipImageProcessor(size={"height": parts.size.siglip["image_size"], "width": parts.size.siglip["image_size"]})
    embedder = DiffusersRedux(redux_dim=parts.size.siglip["hidden_size"], txt_in_features=parts.size.text[0])
    embedder = embedder.to(parts.size.device, parts.size.dtype).eval()
    redux = pipe("flux-redux")
    redux.redux = ReduxImageEncoder(siglip, processor, ours_from(embedder.state_dict(), lambda: ReduxProjector(
        ReduxConfig(redux_dim=parts.size.siglip["hidden_size"], txt_in_features=parts.size.text[0])), dict))
    prior = FluxPriorReduxPipeline(image_encoder=siglip, feature_extractor=processor, image_embedder=embedder, **parts.flux_text)

    def redux_kwargs() -> dict:
        embeds = prior(image=photo(p, 2), prompt=PROMPT)
        return dict(prompt=None, prompt_embeds=embeds.prompt_embeds, pooled_prompt_embeds=embeds.pooled_prompt_embeds, **size)

    cases = [Case("FLUX.1 dev inpainting", pipe("flux-dev"), dict(init_image=photo(p), mask=mask(p), **size),
                  lambda: FluxInpaintPipeline(transformer=ref, **common), lambda: dict(image=photo(p), mask_image=mask(p), **size)),
             Case("FLUX.1 Kontext", pipe("flux-kontext"), dict(reference_images=[photo(p, 1)], max_area=p * p, **size),
                  lambda: FluxKontextPipeline(transformer=ref, **common), lambda: dict(image=photo(p, 1), max_area=p * p, **size)),
             Case("FLUX.1 Redux", redux, dict(reference_images=[photo(p, 2)], **size), lambda: DiffusersFlux(transformer=ref, **common),
                  redux_kwargs)]
    return cases, [ref, siglip, embedder, *parts.shared()]


def fill_cases(parts: Parts) -> tuple[list[Case], list[torch.nn.Module]]:
    """FLUX.1 Fill inpainting and outpainting on one 384-channel transformer."""
    p, size, common = parts.size.pixels, dict(height=parts.size.pixels, width=parts.size.pixels), parts.flux_common()
    ref, ours = parts.flux(384)
    fill = FluxPipeline(ours, parts.our_vae, parts.flux_encoder(), variant="flux-fill")
    narrow = photo(p, 3, width=p // 2)
    canvas, border = outpaint_canvas(narrow, (p // 4, 0, p // 4, 0))
    cases = [Case("FLUX.1 Fill inpainting", fill, dict(init_image=photo(p), mask=mask(p), **size),
                  lambda: FluxFillPipeline(transformer=ref, **common), lambda: dict(image=photo(p), mask_image=mask(p), **size)),
             Case("FLUX.1 Fill outpainting", fill, dict(init_image=narrow, outpaint=(p // 4, 0, p // 4, 0)),
                  lambda: FluxFillPipeline(transformer=ref, **common), lambda: dict(image=canvas, mask_image=border, **size))]
    return cases, [ref, *parts.shared()]


def control_cases(parts: Parts) -> tuple[list[Case], list[torch.nn.Module]]:
    """FLUX.1 Canny and Depth on one 128-channel transformer."""
    p, size, common = parts.size.pixels, dict(height=parts.size.pixels, width=parts.size.pixels), parts.flux_common()
    ref, ours = parts.flux(128)
    cases = [Case(f"FLUX.1 {variant[5:].title()}", FluxPipeline(ours, parts.our_vae, parts.flux_encoder(), variant=variant),
                  dict(control_image=control, **size), lambda: FluxControlPipeline(transformer=ref, **common),
                  lambda control=control: dict(control_image=control, **size))
             for variant, control in (("flux-canny", photo(p, 4)), ("flux-depth", photo(p, 5).convert("L").convert("RGB")))]
    return cases, [ref, *parts.shared()]


def zimage_cases(parts: Parts) -> tuple[list[Case], list[torch.nn.Module]]:
    """Z-Image-Turbo inpainting."""
    p, size = parts.size.pixels, dict(height=parts.size.pixels, width=parts.size.pixels)
    ref = random_model(lambda: ZImageTransformer2DModel(**parts.size.zimage), parts.size)
    ours = ours_from(ref.state_dict(), lambda: ZImageTransformer(ZImageConfig.from_diffusers(parts.size.zimage)), zimage_from_diffusers)
    pipe = ZImagePipeline(ours, parts.our_vae, Qwen3PromptEncoder(parts.qwen, parts.qwen_tokenizer), variant="z-image-turbo")
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS["z-image-turbo"])
    theirs = lambda: ZImageInpaintPipeline(scheduler=scheduler, vae=parts.vae, text_encoder=parts.qwen,
                                           tokenizer=parts.qwen_tokenizer, transformer=ref)
    cases = [Case("Z-Image-Turbo inpainting", pipe, dict(init_image=photo(p), mask=mask(p), **size), theirs,
                  lambda: dict(image=photo(p), mask_image=mask(p), **size), guidance=0.0)]
    return cases, [ref, *parts.shared()]


def all_errors(parts: Parts) -> dict[str, float]:
    """Every tool's error (see compare); one transformer in memory at a time."""
    errors = {}
    for build in (base_cases, fill_cases, control_cases, zimage_cases):
        errors |= compare(*build(parts), pixels=parts.size.pixels)
        free()
    return errors


@pytest.mark.parametrize("tool, reference", [("flux-fill", 0), ("flux-canny", 0), ("flux-kontext", 8)])
def test_transformer_bf16_tiny_cpu(tool, reference):
    """The transformer-level GPU test's code path, at a tiny size on the CPU."""
    cfg = FluxConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY.flux.items()} |
                     dict(in_channels=FLUX_PRESETS[tool].in_channels, out_channels=64, guidance_embeds=True))
    err_ref, err_ours = bf16_errors(cfg, 8, 7, "cpu", reference=reference)
    assert err_ours <= 1.25 * err_ref + 1e-3


def test_tools_tiny_cpu():
    """The pipeline-level GPU test's code path, at a tiny size on the CPU (in fp32: bf16 convolutions crawl there)."""
    parts = Parts(TINY)
    assert max(all_errors(parts).values()) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("tool, reference", [("flux-fill", 0), ("flux-canny", 0), ("flux-kontext", 128)])
def test_transformer_bf16_full_size(tool, reference):
    err_ref, err_ours = bf16_errors(FLUX_PRESETS[tool], 128, 512, "cuda", reference=reference)
    print(f"\n{tool} transformer bf16 vs fp32 ({'8192' if reference else '4096'} image tokens): diffusers {err_ref:.3e}, "
          f"zflux {err_ours:.3e}, ratio {err_ours / err_ref:.3f}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    assert err_ours <= 1.25 * err_ref


@pytest.mark.gpu
def test_tools_full_size():
    parts = Parts(FULL)
    ratios = all_errors(parts)
    print(f"\npeak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    assert max(ratios.values()) <= 1.25
